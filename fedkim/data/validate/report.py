"""What the gate reports: the rule vocabulary and what each rule does to a site, the findings and the report,
and the summary of a report that leaves the site (never its examples, sample ids or values).

Each rule has an action: `block` fails the site, `quarantine` leaves the samples it names out of training and
evaluation (never deleting or changing them), `warn` only reports. Rules about the site as a whole (schema,
manifest, index structure, counts) always block; rules about one sample can be set per federation
(data.gate.actions)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

Action = Literal["block", "quarantine", "warn"]

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
    "image.bit_depth": "bits stored in image_bits; PNG is 8-bit",
    "image.photometric": "single-channel grayscale (PNG L or I;16, DICOM MONOCHROME1/2)",
    "image.modality": "DICOM modality is DX or CR",
    "ecg.leads": "all 12 standard leads present",
    "ecg.sampling_rate": "sampling rate within [ecg_min_hz, ecg_max_hz]",
    "ecg.duration": "duration within [ecg_min_seconds, ecg_max_seconds]",
    "ecg.amplitude": "no sample beyond ecg_max_abs_mv",
    "ecg.flat_lead": "no lead with std below ecg_flat_std_mv",
    "clinical.schema": "hour is an integer column and value a numeric one",
    "clinical.variables": "variable is one of clinical.VARIABLES",
    "clinical.hours": "hour is set and not negative",
    "clinical.physiological_range": "values within each variable's physiological limits",
    "clinical.units": "each unit is an accepted unit of its variable (clinical.UNITS)",
    "clinical.empty_sample": "a sample that needs clinical data has at least one measurement",
    "clinical.missingness": "each variable a sample records is measured in >= clinical_min_hours hours of the "
                            "window the model reads",
    "clinical.static_schema": "clinical/static.parquet is readable, with sample_id, variable and a numeric value",
    "clinical.static_variables": "a static covariate is one of clinical.STATIC",
    "clinical.static_range": "static covariates within their limits (after unit conversion)",
    "text.sample_present": "each sample's question is in its JSONL file",
    "text.answer_matches": "the index answer equals the JSONL answer",
    "counts.per_class": "samples per (binary task, split, label) >= min_samples_per_class, test split too",
    "counts.per_site": "samples in the index >= min_samples_per_site",
    "gate.error": "a check could not run (a bug in the gate: the site is not trusted)",
}


# Rules about one sample (a value, a file, a stay): quarantine by default, and the actions each allows. A rule
# whose samples cannot be read at all (a missing file, an unknown unit) cannot be `warn`: training would fail.
SAMPLE_RULES: dict[str, tuple[Action, ...]] = {
    **{rule: ("quarantine", "block") for rule in (
        "file.path", "file.exists", "file.decodes", "ecg.leads", "image.photometric", "clinical.units",
        "text.sample_present")},
    **{rule: ("quarantine", "block", "warn") for rule in (
        "image.size", "image.bit_depth", "image.modality", "ecg.sampling_rate", "ecg.duration", "ecg.amplitude",
        "ecg.flat_lead", "clinical.hours", "clinical.physiological_range", "clinical.empty_sample",
        "clinical.missingness", "text.answer_matches", "clinical.static_range")},
}
# Rules about data the model ignores: warn by default.
WARN_RULES: dict[str, tuple[Action, ...]] = {"clinical.static_variables": ("warn", "block")}
# Every other rule blocks and allows nothing else.
ACTIONS: dict[str, Action] = {rule: (SAMPLE_RULES.get(rule) or WARN_RULES.get(rule) or ("block",))[0]
                              for rule in RULES}


def allowed_actions(rule: str) -> tuple[Action, ...]:
    return SAMPLE_RULES.get(rule) or WARN_RULES.get(rule) or ("block",)


def check_actions(actions: dict[str, str]) -> None:
    """data.gate.actions: every rule id known, every action one the rule allows; else a ValueError naming them."""
    unknown = sorted(set(actions) - set(RULES))
    if unknown:
        raise ValueError(f"unknown rule id(s) {unknown}; rules: {', '.join(RULES)}")
    refused = [f"{rule}: {action} (allowed: {', '.join(allowed_actions(rule))})"
               for rule, action in actions.items() if action not in allowed_actions(rule)]
    if refused:
        raise ValueError("action not allowed for " + "; ".join(refused)
                         + " (schema, manifest, index and count rules always block)")


def action_of(rule: str, actions: dict[str, str] | None = None) -> Action:
    return (actions or {}).get(rule, ACTIONS.get(rule, "block"))


class Finding(BaseModel):
    rule: str
    action: Action = "block"
    severity: Literal["error"] = "error"
    file: str | None = None
    column: str | None = None
    message: str
    count: int = 1
    examples: list[str] = Field(default_factory=list)
    samples: list[str] = Field(default_factory=list, description="every sample id the finding names (quarantine)")

    def line(self) -> str:
        where = ", ".join(p for p in (self.file, f"column {self.column}" if self.column else None) if p)
        text = f"  {self.rule:<28} {where + ': ' if where else ''}{self.message}: {self.count} found"
        if self.action == "quarantine":
            text += f", {len(self.samples)} sample(s) quarantined"
        return text + ("; e.g. " + "; ".join(self.examples[:3]) if self.examples else "")


class ValidationReport(BaseModel):
    site_dir: str
    site_id: str | None = None
    success: bool
    findings: list[Finding] = Field(default_factory=list)
    quarantine: dict[str, list[str]] = Field(default_factory=dict, description="sample id -> the rules it failed")
    stats: dict = Field(default_factory=dict)
    docs_path: str | None = None

    @property
    def blocking(self) -> list[Finding]:
        return [f for f in self.findings if f.action == "block"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.action == "warn"]

    @property
    def quarantined(self) -> list[str]:
        """The sample ids left out of training and evaluation (the site's data is never changed)."""
        return sorted(self.quarantine)

    def summary(self) -> str:
        name = self.site_id or "(unknown site)"
        s = self.stats
        scope = (f"{s.get('samples', 0)} samples, {s.get('files_checked', 0)} files, "
                 f"{s.get('expectations', 0)} expectations, {s.get('seconds', 0.0):.1f} s")
        kept = f"; {len(self.quarantine)} sample(s) quarantined" if self.quarantine else ""
        head = (f"PASS {name} ({self.site_dir}): {scope}{kept}" if self.success
                else f"FAIL {name} ({self.site_dir}): {len(self.blocking)} blocking finding(s); {scope}{kept}")
        order = {"block": 0, "quarantine": 1, "warn": 2}
        lines = [head, *(f.line() for f in sorted(self.findings, key=lambda f: order[f.action]))]
        if self.docs_path:
            lines.append(f"  data docs: {self.docs_path}")
        return "\n".join(lines)


def gate_summary(report: ValidationReport) -> dict:
    """What the central side may see of a gate report: rule, action, file, column, message and count of each
    finding, and the number of quarantined samples per rule. The examples and sample ids stay at the site, in
    its validation.json."""
    findings = [{"rule": f.rule, "action": f.action, "file": f.file, "column": f.column, "message": f.message,
                 "count": f.count} for f in report.findings]
    per_rule: dict[str, int] = {}
    for rules in report.quarantine.values():
        for rule in rules:
            per_rule[rule] = per_rule.get(rule, 0) + 1
    shared = ("samples", "files_checked", "expectations", "seconds")
    stats = {k: v for k, v in report.stats.items() if k in shared}
    return {"site_id": report.site_id, "success": report.success, "findings": findings,
            "quarantined": {"samples": len(report.quarantine), "per_rule": dict(sorted(per_rule.items()))},
            "stats": stats}


def gate_reason(summary: dict) -> str:
    """One line naming the blocking rules and files, for the round summary and the report."""
    blocking = [f for f in summary["findings"] if f.get("action", "block") == "block"]
    parts = [f"{f['rule']}" + (f" ({f['file']})" if f.get("file") else "") + f": {f['message']}"
             for f in blocking[:4]]
    more = len(blocking) - len(parts)
    return (f"data gate failed, {len(blocking)} blocking finding(s): " + "; ".join(parts)
            + (f"; and {more} more" if more > 0 else ""))
