"""What the gate reports: the rule vocabulary, the findings and the report, and the summary of a report that
leaves the site (never its examples or values)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

REPORT_FILE = "validation.json"

# rule id -> what it checks: the stable vocabulary of findings (tests and dashboards key on these ids)
RULES: dict[str, str] = {
    "site.directory": "the site path is a directory",
    "manifest.readable": "site.yaml exists and follows SiteManifest",
    "manifest.fingerprint": "site.yaml fingerprint equals the content's",
    "manifest.modalities": "site.yaml modalities equal the index's",
    "manifest.counts": "site.yaml counts equal the index's per (task, split)",
    "index.readable": "index.parquet exists and is a readable Parquet file",
    "index.schema": "every index column exists with its type",
    "index.not_null": "sample_id, task, modality, split and answer are set",
    "index.duplicate_ids": "sample_id is unique",
    "index.split_values": "split is one of SPLITS",
    "index.task_known": "task is in the catalogue",
    "index.modality": "modality is the task's",
    "index.label_set": "label is 0/1 for binary tasks, null for choice tasks",
    "index.answer_set": "answer is one of the task's answers",
    "index.answer_label": "a binary task's answer agrees with its label (1 = Yes)",
    "index.zero_shot_split": "zero-shot tasks appear only in the test split",
    "index.paths": "the path columns the task's modality needs are set",
    "file.path": "a referenced path stays inside the site directory",
    "file.exists": "a referenced file exists (WFDB: .hea and .dat)",
    "file.decodes": "a referenced file decodes with its reader",
    "image.size": "image sides within [image_min_side, image_max_side]",
    "image.bit_depth": "bits per sample within [image_min_bits, image_max_bits]",
    "image.photometric": "a colour form the reader converts to gray (gray, gray+alpha, RGB(A), palette; DICOM "
                         "MONOCHROME1/2, RGB, YBR)",
    "image.colour": "mean spread between colour channels <= image_max_colour_spread (a radiograph, not a photo)",
    "image.modality": "DICOM modality is DX or CR",
    "ecg.leads": "all 12 standard leads present",
    "ecg.sampling_rate": "sampling rate within [ecg_min_hz, ecg_max_hz]",
    "ecg.units": "every standard lead states a voltage unit (mV, uV/µV, V)",
    "ecg.duration": "whole record's duration within [ecg_min_seconds, ecg_max_seconds]",
    "ecg.amplitude": "no sample of the window read beyond ecg_max_abs_mv",
    "ecg.flat_lead": "no lead with std below ecg_flat_std_mv in the window read",
    "clinical.schema": "hour is an integer column and value a numeric one",
    "clinical.variables": "variable is one of clinical.VARIABLES",
    "clinical.hours": "hour is set and not negative",
    "clinical.physiological_range": "values within each variable's physiological limits",
    "clinical.missingness": "share of empty (hour, variable) cells per sample <= clinical_max_missing",
    "text.sample_present": "each sample's question is in its JSONL file",
    "text.answer_matches": "the index answer equals the JSONL answer",
    "counts.per_class": "samples per (binary task, split, label) >= min_samples_per_class, test split too",
    "counts.per_site": "samples in the index >= min_samples_per_site",
    "gate.error": "a check could not run (a bug in the gate: the site is not trusted)",
}


class Finding(BaseModel):
    rule: str
    severity: Literal["error"] = "error"
    file: str | None = None
    column: str | None = None
    message: str
    count: int = 1
    examples: list[str] = Field(default_factory=list)

    def line(self) -> str:
        where = ", ".join(p for p in (self.file, f"column {self.column}" if self.column else None) if p)
        text = f"  {self.rule:<28} {where + ': ' if where else ''}{self.message}: {self.count} found"
        return text + ("; e.g. " + "; ".join(self.examples[:3]) if self.examples else "")


class ValidationReport(BaseModel):
    site_dir: str
    site_id: str | None = None
    success: bool
    findings: list[Finding] = Field(default_factory=list)
    stats: dict = Field(default_factory=dict)
    docs_path: str | None = None

    def summary(self) -> str:
        name = self.site_id or "(unknown site)"
        s = self.stats
        scope = (f"{s.get('samples', 0)} samples, {s.get('files_checked', 0)} files, "
                 f"{s.get('expectations', 0)} expectations, {s.get('seconds', 0.0):.1f} s")
        head = (f"PASS {name} ({self.site_dir}): {scope}" if self.success
                else f"FAIL {name} ({self.site_dir}): {len(self.findings)} finding(s); {scope}")
        lines = [head, *(f.line() for f in self.findings)]
        if self.docs_path:
            lines.append(f"  data docs: {self.docs_path}")
        return "\n".join(lines)


def gate_summary(report: ValidationReport) -> dict:
    """What the central side may see of a gate report: rule, file, column, message and count of each finding.
    The examples (sample ids, values) stay at the site, in <site>/reports/validation.json."""
    findings = [{"rule": f.rule, "file": f.file, "column": f.column, "message": f.message, "count": f.count}
                for f in report.findings]
    shared = ("samples", "files_checked", "expectations", "seconds")
    stats = {k: v for k, v in report.stats.items() if k in shared}
    return {"site_id": report.site_id, "success": report.success, "findings": findings, "stats": stats}


def gate_reason(summary: dict) -> str:
    """One line naming the failed rules and files, for the round summary and the report."""
    parts = [f"{f['rule']}" + (f" ({f['file']})" if f.get("file") else "") + f": {f['message']}"
             for f in summary["findings"][:4]]
    more = len(summary["findings"]) - len(parts)
    return (f"data gate failed, {len(summary['findings'])} finding(s): " + "; ".join(parts)
            + (f"; and {more} more" if more > 0 else ""))
