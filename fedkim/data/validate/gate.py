"""validate_site: load site.yaml and index.parquet, build and run each step's tables, write the report."""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Callable

import pandas as pd
import pyarrow.parquet as pq

from fedkim.config import GateParams
from fedkim.data.siteformat import (INDEX_FILE, REPORTS_DIR, SITE_FILE, SiteFormatError, SiteManifest,
                                     read_manifest)
from fedkim.data.catalogue import Catalogue, load_catalogue
from fedkim.data.validate.engine import DOCS_DIR, Table, _Gate, _gx_frame, _write_reports
from fedkim.data.validate.files import _clinical_tables, _ecg_table, _image_table, _text_tables
from fedkim.data.validate.report import Finding, ValidationReport
from fedkim.data.validate.tables import _counts_table, _index_table, _manifest_tables, _paths, _relative

PER_FILE_TABLES = ("image", "ecg", "clinical_files", "text_files")


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
def _steps(site: Path, manifest: SiteManifest | None, index: pd.DataFrame | None,
           rules: GateParams, catalogue: Catalogue) -> list[tuple[str, Callable[[], list[Table]]]]:
    """(name, build the tables) for what the loaded files allow; built lazily, one at a time."""
    steps: list[tuple[str, Callable[[], list[Table]]]] = []
    if index is not None:
        columns = set(index.columns)
        steps.append(("index", lambda: [_index_table(index, rules, catalogue)]))
        if "image_path" in columns:
            steps.append(("image", lambda: [_image_table(site, _paths(index, "image_path"), rules)]))
        if "ecg_path" in columns:
            steps.append(("ecg", lambda: [_ecg_table(site, _paths(index, "ecg_path"), rules)]))
        if "clinical_path" in columns:
            steps.append(("clinical", lambda: _clinical_tables(site, index, rules)))
        if "text_path" in columns:
            steps.append(("text", lambda: _text_tables(site, index)))
        steps.append(("counts", lambda: _counts_table(index, rules, catalogue)))
    if manifest is not None:
        steps.append(("manifest", lambda: _manifest_tables(site, manifest, index)))
    return steps


def validate_site(site_dir: str | Path, rules: GateParams | None = None, *,
                  write_docs: bool = True, catalogue: Catalogue | None = None) -> ValidationReport:
    """Run the gate on one site directory; task names, modalities and answers are those of `catalogue` (None:
    the shipped one). Bad data becomes findings; this never raises for it."""
    started = time.perf_counter()
    site = Path(site_dir)
    rules = rules or GateParams()
    if not site.is_dir():
        return ValidationReport(site_dir=str(site), success=False, stats={"seconds": 0.0}, findings=[
            Finding(rule="site.directory", file=str(site), message="not a directory")])
    manifest, findings = _load_manifest(site)
    index, index_findings = _load_index(site)
    findings += index_findings
    reports = site / REPORTS_DIR
    docs = write_docs and not reports.is_symlink() and (reports.is_dir() or not reports.exists())
    gate = _Gate(reports / DOCS_DIR if docs else None)
    tables: list[Table] = []
    for name, build in _steps(site, manifest, index, rules, catalogue or load_catalogue()):
        try:  # a bug in one step fails the site with gate.error; the other steps still run
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # GX and pandas deprecation chatter
                for table in build():
                    if len(table.frame) or table.name == "index":
                        tables.append(table)
                        findings += gate.run(table)
        except Exception as exc:
            findings.append(Finding(rule="gate.error",
                                    message=f"{name} checks: {exc.__class__.__name__}: {exc}"))
    report = ValidationReport(site_dir=str(site), site_id=getattr(manifest, "site_id", None),
                              success=not findings, findings=findings,
                              stats=_stats(index, tables, gate, started))
    if docs:
        _write_reports(report, gate, reports)
    return report


def _stats(index: pd.DataFrame | None, tables: list[Table], gate: _Gate, started: float) -> dict:
    per_file = {t.name.removesuffix("_files"): len(t.frame) for t in tables if t.name in PER_FILE_TABLES}
    modalities = {}
    if index is not None and "modality" in index.columns:
        modalities = {str(k): int(v) for k, v in index["modality"].value_counts().items()}
    return {"samples": 0 if index is None else len(index), "files_checked": sum(per_file.values()),
            "files_per_kind": per_file, "modalities": modalities, "expectations": gate.expectations,
            "seconds": round(time.perf_counter() - started, 3)}
