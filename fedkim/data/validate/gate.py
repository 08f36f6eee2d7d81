"""validate_site: load site.yaml and index.parquet, build and run each step's tables, quarantine the samples that
sample-level rules name, judge the counts on what remains, write the report."""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Callable

import pandas as pd
import pyarrow.parquet as pq

from fedkim.config import DataParams, GateParams
from fedkim.data.siteformat import (INDEX_FILE, REPORTS_DIR, SITE_FILE, SiteFormatError, SiteManifest,
                                     read_manifest)
from fedkim.data.catalogue import Catalogue, load_catalogue
from fedkim.data.validate.engine import DOCS_DIR, Table, _Gate, _gx_frame, _write_reports
from fedkim.data.validate.clinical import _clinical_tables, _static_tables
from fedkim.data.validate.files import _ecg_table, _image_table, _text_tables
from fedkim.data.validate.report import Finding, ValidationReport
from fedkim.data.validate.tables import _counts_table, _index_table, _manifest_tables, _paths, _relative

PER_FILE_TABLES = ("image", "ecg", "clinical_files", "text_files")
# per-file table -> the index column whose rows use each file (the samples a finding on the file names)
FILE_SAMPLES = {"image": "image_path", "ecg": "ecg_path", "clinical_files": "clinical_path",
                "text_files": "text_path"}
DEFAULT_ICU_HOURS = DataParams.model_fields["icu_hours"].default


# --------------------------------------------------------------------------------------------- site loading
def _load_manifest(site: Path) -> tuple[SiteManifest | None, list[Finding]]:
    try:
        return read_manifest(site), []
    except SiteFormatError as exc:
        return None, [Finding(rule="manifest.readable", file=SITE_FILE, message=_relative(str(exc), site))]
    except Exception as exc:  # unreadable bytes (permissions, encoding)
        return None, [Finding(rule="manifest.readable", file=SITE_FILE, message=f"cannot read ({exc})")]


def _load_index(site: Path) -> tuple[pd.DataFrame | None, list[Finding]]:
    """The raw index: missing columns and wrong types are the index suite's findings, not errors here."""
    if not (site / INDEX_FILE).is_file():
        return None, [Finding(rule="index.readable", file=INDEX_FILE, message="index file missing")]
    try:
        frame = pq.read_table(site / INDEX_FILE).to_pandas()
    except Exception as exc:  # pyarrow raises several types for a damaged file
        return None, [Finding(rule="index.readable", file=INDEX_FILE,
                              message=f"not a readable Parquet file ({exc.__class__.__name__}: {exc})")]
    return _gx_frame(frame), []


# ------------------------------------------------------------------------------------------------- the gate
def _steps(site: Path, manifest: SiteManifest | None, index: pd.DataFrame | None, rules: GateParams,
           icu_hours: int, catalogue: Catalogue) -> list[tuple[str, Callable[[], list[Table]]]]:
    """(name, build the tables) of the index and its files; built lazily, one at a time. The counts come
    later, on what the quarantine leaves, and then site.yaml."""
    steps: list[tuple[str, Callable[[], list[Table]]]] = []
    if index is not None:
        columns = set(index.columns)
        steps.append(("index", lambda: [_index_table(index, rules, catalogue)]))
        if "image_path" in columns:
            steps.append(("image", lambda: [_image_table(site, _paths(index, "image_path"), rules)]))
        if "ecg_path" in columns:
            steps.append(("ecg", lambda: [_ecg_table(site, _paths(index, "ecg_path"), rules)]))
        if "clinical_path" in columns:
            steps.append(("clinical", lambda: _clinical_tables(site, index, rules, icu_hours, catalogue)))
            steps.append(("static", lambda: _static_tables(site, index, catalogue)))
        if "text_path" in columns:
            steps.append(("text", lambda: _text_tables(site, index, catalogue)))
    return steps


def validate_site(site_dir: str | Path, rules: GateParams | None = None, *, write_docs: bool = True,
                  reports_dir: str | Path | None = None, icu_hours: int | None = None,
                  catalogue: Catalogue | None = None) -> ValidationReport:
    """Run the gate on one site directory. Bad data becomes findings; this never raises for it.

    reports_dir: where validation.json and the GX data docs go (default <site>/reports/; a provided hospital
    directory is read-only to us). icu_hours: data.icu_hours, the window the model reads of each ICU stay.
    catalogue: the task names, modalities and answers the index may use (None: the shipped catalogue)."""
    started = time.perf_counter()
    site = Path(site_dir)
    rules = rules or GateParams()
    if not site.is_dir():
        return ValidationReport(site_dir=str(site), success=False, stats={"seconds": 0.0}, findings=[
            Finding(rule="site.directory", file=str(site), message="not a directory")])
    manifest, findings = _load_manifest(site)
    index, index_findings = _load_index(site)
    findings += index_findings
    reports = Path(reports_dir) if reports_dir is not None else site / REPORTS_DIR
    docs = write_docs and not reports.is_symlink() and (reports.is_dir() or not reports.exists())
    gate = _Gate(reports / DOCS_DIR if docs else None)
    tables: list[Table] = []
    catalogue = catalogue or load_catalogue()

    def run(name: str, build: Callable[[], list[Table]]) -> None:
        try:  # a bug in one step fails the site with gate.error; the other steps still run
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # GX and pandas deprecation chatter
                for table in build():
                    if len(table.frame) or table.name == "index":
                        _attach_samples(table, index)
                        tables.append(table)
                        findings.extend(gate.run(table, rules.actions))
        except Exception as exc:
            findings.append(Finding(rule="gate.error",
                                    message=f"{name} checks: {exc.__class__.__name__}: {exc}"))

    for name, build in _steps(site, manifest, index, rules, icu_hours or DEFAULT_ICU_HOURS, catalogue):
        run(name, build)
    quarantine = _quarantine(findings)
    if index is not None:
        run("counts", lambda: _counts_table(index, rules, catalogue, quarantined=set(quarantine)))
    if manifest is not None:
        run("manifest", lambda: _manifest_tables(site, manifest, index))
    report = ValidationReport(site_dir=str(site), site_id=getattr(manifest, "site_id", None),
                              success=not any(f.action == "block" for f in findings), findings=findings,
                              quarantine=quarantine, stats=_stats(index, tables, gate, started))
    if docs:
        _write_reports(report, gate, reports)
    return report


def _attach_samples(table: Table, index: pd.DataFrame | None) -> None:
    """Per-file tables: each file stands for the samples whose row references it."""
    column = FILE_SAMPLES.get(table.name)
    if column is None or index is None or not {"sample_id", column} <= set(index.columns):
        return
    users: dict[str, list[str]] = {}
    for sample, rel in zip(index["sample_id"], index[column]):
        if isinstance(sample, str) and isinstance(rel, str):
            users.setdefault(rel, []).append(sample)
    table.samples = [users.get(rel, []) for rel in table.frame["file"]]


def _quarantine(findings: list[Finding]) -> dict[str, list[str]]:
    quarantine: dict[str, list[str]] = {}
    for f in findings:
        if f.action == "quarantine":
            for sample in f.samples:
                rules = quarantine.setdefault(sample, [])
                if f.rule not in rules:
                    rules.append(f.rule)
    return dict(sorted(quarantine.items()))


def _stats(index: pd.DataFrame | None, tables: list[Table], gate: _Gate, started: float) -> dict:
    per_file = {t.name.removesuffix("_files"): len(t.frame) for t in tables if t.name in PER_FILE_TABLES}
    modalities = {}
    if index is not None and "modality" in index.columns:
        modalities = {str(k): int(v) for k, v in index["modality"].value_counts().items()}
    return {"samples": 0 if index is None else len(index), "files_checked": sum(per_file.values()),
            "files_per_kind": per_file, "modalities": modalities, "expectations": gate.expectations,
            "seconds": round(time.perf_counter() - started, 3)}
