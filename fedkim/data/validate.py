"""The Great Expectations gate: a site's data must pass it before it trains.

Every check is a GX 1.x expectation over a pandas frame, one suite per frame:

    index              the index itself: schema, allowed values, labels, answers, required paths, row count
    image, ecg         one row per referenced file, with facts read here by fedkim.data.formats (exists,
                       decodes, size, bit depth, leads, sampling rate, duration, amplitude, flat leads)
    clinical_files     one row per clinical Parquet file; clinical_values: their long rows (physiological
                       limits); clinical_samples: missingness per sample over its (hours x variables) grid
    text_files         one row per question file; text_samples: each sample's question is there
    counts             samples per (binary task, split, label), the test split included
    manifest           site.yaml against the directory: fingerprint, modalities; manifest_counts: counts

A failed expectation becomes a Finding named by a stable rule id (RULES). A missing or damaged site.yaml or
index.parquet is a finding too, never an exception, and the checks that need it are skipped. Validation only
reads the site, apart from <site>/reports/: validation.json and the GX data docs under reports/gx/.
"""

from __future__ import annotations

import os

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

import logging  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, Literal  # noqa: E402

import great_expectations as gx  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from great_expectations.data_context.types.base import ProgressBarsConfig  # noqa: E402
from great_expectations.expectations.row_conditions import Column  # noqa: E402
from pydantic import BaseModel, Field  # noqa: E402

from fedkim.config import GateParams  # noqa: E402
from fedkim.data.catalogue import TASKS, ZERO_SHOT_TASKS  # noqa: E402
from fedkim.data.formats import FormatError  # noqa: E402
from fedkim.data.formats import clinical as clinical_fmt  # noqa: E402
from fedkim.data.formats import ecg as ecg_fmt  # noqa: E402
from fedkim.data.formats import image as image_fmt  # noqa: E402
from fedkim.data.formats import text as text_fmt  # noqa: E402
from fedkim.data.siteformat import (  # noqa: E402
    INDEX_COLUMNS, INDEX_FILE, REPORTS_DIR, SITE_FILE, SPLITS, SiteFormatError, SiteManifest,
    compute_fingerprint, count_samples, read_manifest, resolve,
)

# GX logs at INFO and sets one module's logger to INFO itself; a gate run should be quiet
for _name in ("great_expectations", "great_expectations.data_context.types.base"):
    logging.getLogger(_name).setLevel(logging.ERROR)

GX = gx.expectations
MAX_EXAMPLES = 5
# A first pass only says pass/fail (about twice as fast); failed expectations run again for their examples.
FIRST_PASS = {"result_format": "BOOLEAN_ONLY"}
DETAILS = {"result_format": "SUMMARY", "partial_unexpected_count": MAX_EXAMPLES}
DOCS_DIR = "gx"
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
    "clinical.missingness": "share of empty (hour, variable) cells per sample <= clinical_max_missing",
    "text.sample_present": "each sample's question is in its JSONL file",
    "text.answer_matches": "the index answer equals the JSONL answer",
    "counts.per_class": "samples per (binary task, split, label) >= min_samples_per_class, test split too",
    "counts.per_site": "samples in the index >= min_samples_per_site",
    "gate.error": "a check could not run (a bug in the gate: the site is not trusted)",
}

INT_TYPES = ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
             "Int8", "Int16", "Int32", "Int64"]
NUMERIC_TYPES = [*INT_TYPES, "float32", "float64", "Float32", "Float64"]
GRAYSCALE = ["L", "I;16", "I", "MONOCHROME1", "MONOCHROME2"]
BINARY_TASKS = [n for n, t in TASKS.items() if t.kind == "binary"]
INPUT_KINDS = ("image", "ecg", "clinical", "text")
PER_FILE_TABLES = ("image", "ecg", "clinical_files", "text_files")


# ------------------------------------------------------------------------------------------------- report
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


# ------------------------------------------------------------------------------------------ rules and tables
@dataclass
class Rule:
    """One expectation and how its failures are reported."""

    id: str
    kind: type  # a gx.expectations class
    message: str
    kwargs: dict = field(default_factory=dict)
    shown: str | None = None  # column named in the finding; default: the expectation's
    detail: str | None = None  # frame column shown in examples instead of the checked value
    uses: tuple[str, ...] = ()  # further frame columns it needs (row conditions)

    def checked(self) -> list[str]:
        return [self.kwargs[k] for k in ("column", "column_A", "column_B") if k in self.kwargs]

    def runnable(self, columns: set[str]) -> bool:
        """Whether its columns exist (a missing one is reported by ExpectColumnToExist alone)."""
        return self.kind is GX.ExpectColumnToExist or {*self.checked(), *self.uses} <= columns


def _rule(rule_id: str, kind: type, message: str, *, shown: str | None = None, detail: str | None = None,
          uses: tuple[str, ...] = (), **kwargs) -> Rule:
    return Rule(rule_id, kind, message, kwargs, shown, detail, uses)


@dataclass
class Table:
    """A frame validated by one suite; `labels` name its rows in examples."""

    name: str
    frame: pd.DataFrame
    rules: list[Rule]
    labels: list[str]
    file: str | None = None  # the file every finding names (index.parquet, site.yaml) ...
    file_column: str | None = None  # ... or the frame column that holds each row's file


# ------------------------------------------------------------------------------------------------ the runner
class _Gate:
    """An ephemeral GX context (nothing on disk); data docs go to `docs_dir` when given."""

    def __init__(self, docs_dir: Path | None):
        self.context = gx.get_context(mode="ephemeral")
        self.context.variables.progress_bars = ProgressBarsConfig(globally=False)
        self.docs_dir = docs_dir
        if docs_dir is not None:
            self.context.variables.data_docs_sites = {"local_site": {
                "class_name": "SiteBuilder",
                "show_how_to_buttons": False,
                "store_backend": {"class_name": "TupleFilesystemStoreBackend",
                                  "base_directory": str(docs_dir)},
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            }}
        self.source = self.context.data_sources.add_pandas("site")
        self.expectations = 0

    def run(self, table: Table) -> list[Finding]:
        rules = [r for r in table.rules if r.runnable(set(table.frame.columns))]
        self.expectations += len(rules)
        failed = [rules[n] for n, _ in self._validate(table.name, table.frame, rules, FIRST_PASS)]
        if not failed:
            return []
        details = self._validate(f"{table.name}_failures", table.frame, failed, DETAILS)
        return [_finding(table, failed[n], result) for n, result in details]

    def _validate(self, name: str, frame: pd.DataFrame, rules: list[Rule], result_format: dict) -> list:
        """One suite over one frame: (rule position, result) of each failed expectation, in rule order."""
        batch = self.source.add_dataframe_asset(name).add_batch_definition_whole_dataframe("whole")
        # the whole list at once: add_expectation re-serialises the suite each time (quadratic)
        expectations = [r.kind(**r.kwargs, meta={"rule": r.id, "n": n}) for n, r in enumerate(rules)]
        suite = self.context.suites.add(gx.ExpectationSuite(name=name, expectations=expectations))
        definition = self.context.validation_definitions.add(
            gx.ValidationDefinition(name=name, data=batch, suite=suite))
        result = definition.run(batch_parameters={"dataframe": frame}, result_format=result_format)
        return sorted(((r.expectation_config.meta["n"], r) for r in result.results if not r.success),
                      key=lambda item: item[0])

    def build_docs(self) -> str:
        if self.docs_dir.exists():  # only this run's pages
            shutil.rmtree(self.docs_dir)
        self.context.build_data_docs()
        return str(self.docs_dir / "index.html")


def _finding(table: Table, rule: Rule, result: Any) -> Finding:
    column = rule.shown or next(iter(rule.checked()), None)
    error = _exception_message(result.exception_info)
    if error:
        return Finding(rule=rule.id, file=table.file, column=column, count=len(table.frame),
                       message=f"{rule.message}: could not be checked ({error})")
    res = result.result or {}
    rows = list(res.get("partial_unexpected_index_list") or [])
    if not rows and "observed_value" in res:  # a table-level expectation (row count)
        return Finding(rule=rule.id, file=table.file, column=column,
                       message=f"{rule.message} (observed {res['observed_value']})")
    file = table.file
    if file is None and table.file_column and rows:
        file = str(table.frame.at[rows[0], table.file_column])
    return Finding(rule=rule.id, file=file, column=column, message=rule.message,
                   count=max(int(res.get("unexpected_count") or len(rows)), 1),
                   examples=[_example(table, rule, i) for i in rows[:MAX_EXAMPLES]])


def _exception_message(info: dict | None) -> str | None:
    """GX reports exceptions flat or keyed by metric; the first message."""
    for entry in (info or {}, *(v for v in (info or {}).values() if isinstance(v, dict))):
        if entry.get("raised_exception"):
            return str(entry.get("exception_message", "error")).splitlines()[0]
    return None


def _example(table: Table, rule: Rule, row: int) -> str:
    label = table.labels[row] if 0 <= row < len(table.labels) else f"row {row}"
    if rule.detail:
        return f"{label}: {table.frame.at[row, rule.detail]}"
    return f"{label}: " + ", ".join(f"{c}={_fmt(table.frame.at[row, c])}" for c in rule.checked())


def _fmt(value: Any, limit: int = 40) -> str:
    if isinstance(value, (float, np.floating)):
        return f"{float(value):g}"
    if isinstance(value, (np.integer, np.bool_)):
        return str(value.item())
    if isinstance(value, str):
        return repr(value if len(value) <= limit else value[:limit] + "...")
    return str(value)


def _gx_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """pandas 3 string columns become object, so that GX's type check looks at each value (it cannot match
    the new StringDtype); a plain RangeIndex, so that GX's unexpected rows are positions."""
    frame = frame.reset_index(drop=True)
    strings = [c for c in frame.columns if isinstance(frame[c].dtype, pd.StringDtype)]
    return frame.astype({c: object for c in strings}) if strings else frame


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


def _relative(message: str, site: Path) -> str:
    """Messages name files relative to the site."""
    return message.replace(f"{site}/", "").replace(str(site), ".")


def _strings(values) -> list[str]:
    return [v for v in values if isinstance(v, str)]


def _paths(index: pd.DataFrame, column: str) -> list[str]:
    """The distinct files a path column references: each is read once however many samples share it."""
    return sorted(set(_strings(index[column])))


def _needing(index: pd.DataFrame, kind: str) -> pd.DataFrame:
    """Index rows whose task needs an input of `kind`, with string sample_id and path."""
    column = f"{kind}_path"
    if not {"task", "sample_id", column} <= set(index.columns):
        return index.iloc[0:0]
    rows = index[index["task"].isin([n for n, t in TASKS.items() if kind in t.inputs])]
    is_text = rows[[column, "sample_id"]].map(lambda v: isinstance(v, str))
    return rows[is_text.all(axis=1)]


# ------------------------------------------------------------------------------------------------ index suite
def _index_table(index: pd.DataFrame, rules: GateParams) -> Table:
    tasks = sorted(set(_strings(index["task"])) & set(TASKS)) if "task" in index.columns else []
    checks = [_rule("index.schema", GX.ExpectColumnToExist, f"required column {c!r} missing", column=c)
              for c in INDEX_COLUMNS]
    checks += [_rule("index.schema", GX.ExpectColumnValuesToBeInTypeList, "values must be strings",
                     column=c, type_list=["str"]) for c in INDEX_COLUMNS if c != "label"]
    checks += [
        # Parquet int8 with nulls arrives as float64 (choice tasks leave label null)
        _rule("index.schema", GX.ExpectColumnValuesToBeInTypeList, "label must be an integer column",
              column="label", type_list=[*NUMERIC_TYPES, "int", "float"]),
        *[_rule("index.not_null", GX.ExpectColumnValuesToNotBeNull, f"{c} must be set", column=c)
          for c in ("sample_id", "task", "modality", "split", "answer")],
        _rule("index.duplicate_ids", GX.ExpectColumnValuesToBeUnique, "sample_id appears more than once",
              column="sample_id"),
        _rule("index.split_values", GX.ExpectColumnValuesToBeInSet, f"split must be one of {list(SPLITS)}",
              column="split", value_set=list(SPLITS)),
        _rule("index.task_known", GX.ExpectColumnValuesToBeInSet, "task not in the catalogue",
              column="task", value_set=list(TASKS)),
        _rule("counts.per_site", GX.ExpectTableRowCountToBeBetween,
              f"fewer than {rules.min_samples_per_site} samples in the site",
              min_value=rules.min_samples_per_site),
    ]
    labels = [_row_label(index, i) for i in range(len(index))]
    return Table("index", index, checks + _task_rules(tasks), labels, file=INDEX_FILE)


def _task_rules(tasks: list[str]) -> list[Rule]:
    """Rules for the rows of some tasks, built only for the tasks present: row conditions are GX's slowest
    expectations, and one that selects no row checks nothing."""
    binary = [t for t in tasks if TASKS[t].kind == "binary"]
    choice = [t for t in tasks if TASKS[t].kind == "choice"]
    zero_shot = [t for t in tasks if t in ZERO_SHOT_TASKS]
    is_binary = Column("task").is_in(binary)
    checks = []
    if binary:
        checks += [
            _rule("index.label_set", GX.ExpectColumnValuesToBeInSet, "binary task label must be 0 or 1",
                  column="label", value_set=[0, 1], row_condition=is_binary, uses=("task",)),
            _rule("index.label_set", GX.ExpectColumnValuesToNotBeNull, "binary task label missing",
                  column="label", row_condition=is_binary, uses=("task",)),
            *[_rule("index.answer_label", GX.ExpectColumnValuesToBeInSet,
                    f"label {label} needs answer {answer!r}", column="answer", value_set=[answer],
                    row_condition=is_binary & (Column("label") == label),
                    uses=("task", "label")) for label, answer in ((0, "No"), (1, "Yes"))],
        ]
    if choice:
        checks.append(_rule("index.label_set", GX.ExpectColumnValuesToBeNull,
                            "choice task label must be null", column="label",
                            row_condition=Column("task").is_in(choice), uses=("task",)))
    if zero_shot:
        checks.append(_rule("index.zero_shot_split", GX.ExpectColumnValuesToBeInSet,
                            "zero-shot task outside the test split", column="split", value_set=["test"],
                            row_condition=Column("task").is_in(zero_shot), uses=("task",)))
    for name in tasks:
        task, is_task = TASKS[name], Column("task") == name
        checks += [
            _rule("index.modality", GX.ExpectColumnValuesToBeInSet,
                  f"{name} needs modality {task.modality!r}", column="modality", value_set=[task.modality],
                  row_condition=is_task, uses=("task",)),
            _rule("index.answer_set", GX.ExpectColumnValuesToBeInSet,
                  f"{name} answer not in {list(task.answers)}", column="answer",
                  value_set=list(task.answers), row_condition=is_task, uses=("task",)),
        ]
    for kind in INPUT_KINDS:
        needing = [t for t in tasks if kind in TASKS[t].inputs]
        if needing:
            checks.append(_rule("index.paths", GX.ExpectColumnValuesToNotBeNull,
                                f"{kind}_path needed by the task", column=f"{kind}_path",
                                row_condition=Column("task").is_in(needing), uses=("task",)))
    return checks


def _row_label(index: pd.DataFrame, row: int) -> str:
    sample = index["sample_id"].iat[row] if "sample_id" in index.columns else None
    return f"{sample} (row {row})" if isinstance(sample, str) else f"row {row}"


# ---------------------------------------------------------------------------------------- per-file facts
def _locate(site: Path, rel: str) -> tuple[dict, Path | None]:
    """A referenced path's first facts; None when it leaves the site (or cannot be a path at all)."""
    row: dict[str, Any] = {"file": rel, "inside": True, "exists": None, "decodes": None, "detail": ""}
    try:
        return row, resolve(site, rel)
    except SiteFormatError:
        row.update(inside=False, detail="points outside the site directory")
    except (ValueError, OSError) as exc:  # a NUL byte, a name too long
        row.update(inside=False, detail=str(exc))
    return row, None


def _exists(row: dict, parts: list[Path], site: Path) -> bool:
    try:
        missing = [p for p in parts if not p.is_file()]
    except (OSError, ValueError) as exc:
        missing, row["detail"] = parts, str(exc)
    row["exists"] = not missing
    if missing and not row["detail"]:
        row["detail"] = "missing " + ", ".join(_relative(str(p), site.resolve()) for p in missing)
    return not missing


def _failed(row: dict, exc: Exception, site: Path) -> dict:
    reason = exc.reason if isinstance(exc, FormatError) else f"{exc.__class__.__name__}: {exc}"
    row.update(decodes=False, detail=_relative(reason, site.resolve()))
    return row


def _file_rules() -> list[Rule]:
    common = (("file.path", "inside", "path leaves the site directory"),
              ("file.exists", "exists", "referenced file missing"),
              ("file.decodes", "decodes", "file does not decode"))
    return [_rule(rid, GX.ExpectColumnValuesToBeInSet, msg, column=col, value_set=[True], detail="detail")
            for rid, col, msg in common]


def _facts_table(name: str, rows: list[dict], columns: list[str], checks: list[Rule]) -> Table:
    """Facts of None/NaN were not measured: GX's column-map expectations skip them."""
    frame = _gx_frame(pd.DataFrame(rows, columns=["file", "inside", "exists", "decodes", "detail", *columns]))
    return Table(name, frame, _file_rules() + checks, list(frame["file"]), file_column="file")


def _image_row(site: Path, rel: str) -> dict:
    row, path = _locate(site, rel)
    if path is None or not _exists(row, [path], site):
        return row
    row["format"] = "dicom" if path.suffix.lower() in image_fmt.DICOM_SUFFIXES else "png"
    try:
        facts = image_fmt.image_facts(path)  # header: width, height, bits, photometric, modality
        row.update({k: facts[k] for k in ("width", "height", "bits", "photometric", "modality")})
        image_fmt.read_image(path)  # decoded once: truncated pixel data fails here
        row["decodes"] = True
    except Exception as exc:  # image_facts does not wrap the libraries' errors
        _failed(row, exc, site)
    return row


def _image_table(site: Path, paths: list[str], rules: GateParams) -> Table:
    side = {"min_value": rules.image_min_side, "max_value": rules.image_max_side}
    size = f"image side outside [{rules.image_min_side}, {rules.image_max_side}] px"
    checks = [
        _rule("image.size", GX.ExpectColumnValuesToBeBetween, size, column="width", **side),
        _rule("image.size", GX.ExpectColumnValuesToBeBetween, size, column="height", **side),
        _rule("image.bit_depth", GX.ExpectColumnValuesToBeInSet, f"bits stored not in {rules.image_bits}",
              column="bits", value_set=list(rules.image_bits)),
        _rule("image.bit_depth", GX.ExpectColumnValuesToBeInSet, "PNG must be 8-bit", column="bits",
              value_set=[8], row_condition=Column("format") == "png", uses=("format",)),
        _rule("image.photometric", GX.ExpectColumnValuesToBeInSet, "not single-channel grayscale",
              column="photometric", value_set=GRAYSCALE),
        _rule("image.modality", GX.ExpectColumnValuesToBeInSet, "DICOM modality must be DX or CR",
              column="modality", value_set=["DX", "CR"], row_condition=Column("format") == "dicom",
              uses=("format",)),
    ]
    rows = [_image_row(site, rel) for rel in paths]
    facts = ["format", "width", "height", "bits", "photometric", "modality"]
    return _facts_table("image", rows, facts, checks)


def _ecg_parts(path: Path) -> list[Path]:
    """The files a record needs, found as read_ecg finds them."""
    if path.suffix.lower() in (".dcm", ".dicom"):
        return [path]
    record = path.with_suffix("") if path.suffix in (".hea", ".dat") else path
    return [record.with_suffix(".hea"), record.with_suffix(".dat")]


def _ecg_row(site: Path, rel: str, rules: GateParams) -> dict:
    row, path = _locate(site, rel)
    if path is None or not _exists(row, _ecg_parts(path), site):
        return row
    try:
        record = ecg_fmt.read_ecg(path)  # header and samples read once
    except Exception as exc:
        return _ecg_header_only(row, path, exc, site)
    signal = np.asarray(record.signal, dtype=np.float64)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN leads give NaN facts, which GX skips
        row.update(
            decodes=True, leads=len(record.leads), fs=float(record.fs),
            seconds=signal.shape[0] / record.fs if record.fs > 0 else np.nan,
            max_abs_mv=float(np.nanmax(np.abs(signal))) if signal.size else np.nan,
            flat_leads=int((np.nanstd(signal, axis=0) < rules.ecg_flat_std_mv).sum()) if signal.size else 0,
        )
    return row


def _ecg_header_only(row: dict, path: Path, exc: Exception, site: Path) -> dict:
    """read_ecg refused the record: missing leads in a readable header are ecg.leads' finding, anything
    else is a decoding failure."""
    _failed(row, exc, site)
    try:
        header = ecg_fmt.header_facts(path)
    except Exception:
        return row
    found, fs = len(set(ecg_fmt.LEADS) & set(header["leads"])), float(header["fs"])
    row.update(leads=found, fs=fs, seconds=header["samples"] / fs if fs > 0 else np.nan)
    if found < len(ecg_fmt.LEADS):
        row["decodes"] = None
    return row


def _ecg_table(site: Path, paths: list[str], rules: GateParams) -> Table:
    n = len(ecg_fmt.LEADS)
    checks = [
        _rule("ecg.leads", GX.ExpectColumnValuesToBeBetween, f"fewer than the {n} standard leads",
              column="leads", min_value=n, max_value=n),
        _rule("ecg.sampling_rate", GX.ExpectColumnValuesToBeBetween,
              f"sampling rate outside [{rules.ecg_min_hz:g}, {rules.ecg_max_hz:g}] Hz",
              column="fs", min_value=rules.ecg_min_hz, max_value=rules.ecg_max_hz),
        _rule("ecg.duration", GX.ExpectColumnValuesToBeBetween,
              f"duration outside [{rules.ecg_min_seconds:g}, {rules.ecg_max_seconds:g}] s",
              column="seconds", min_value=rules.ecg_min_seconds, max_value=rules.ecg_max_seconds),
        _rule("ecg.amplitude", GX.ExpectColumnValuesToBeBetween,
              f"|signal| beyond {rules.ecg_max_abs_mv:g} mV (unit or amplifier error)",
              column="max_abs_mv", max_value=rules.ecg_max_abs_mv),
        _rule("ecg.flat_lead", GX.ExpectColumnValuesToBeBetween,
              f"lead(s) with std below {rules.ecg_flat_std_mv:g} mV", column="flat_leads", max_value=0),
    ]
    rows = [_ecg_row(site, rel, rules) for rel in paths]
    return _facts_table("ecg", rows, ["leads", "fs", "seconds", "max_abs_mv", "flat_leads"], checks)


# ------------------------------------------------------------------------------------------------- clinical
def _clinical_tables(site: Path, index: pd.DataFrame, rules: GateParams) -> list[Table]:
    rows, frames = [], {}
    for rel in _paths(index, "clinical_path"):
        row, path = _locate(site, rel)
        if path is not None and _exists(row, [path], site):
            try:
                frames[rel] = clinical_fmt.read_long(path)
                row.update(decodes=True, hour_type=str(frames[rel]["hour"].dtype),
                           value_type=str(frames[rel]["value"].dtype))
            except Exception as exc:
                _failed(row, exc, site)
        rows.append(row)
    checks = [
        _rule("clinical.schema", GX.ExpectColumnValuesToBeInSet, "hour must be an integer column",
              column="hour_type", value_set=[*INT_TYPES, "float64"]),  # float64: int16 with nulls
        _rule("clinical.schema", GX.ExpectColumnValuesToBeInSet, "value must be a numeric column",
              column="value_type", value_set=NUMERIC_TYPES),
    ]
    tables = [_facts_table("clinical_files", rows, ["hour_type", "value_type"], checks)]
    if frames:
        long = _long_frame(frames)
        tables += [_values_table(long), _missingness_table(long, _needing(index, "clinical"), rules)]
    return tables


def _long_frame(frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """All files' long rows with comparable types: numbers coerced (unparseable -> NaN), names as text."""
    return pd.concat([pd.DataFrame({
        "file": rel,
        "sample_id": frame["sample_id"].map(_text).astype(object),
        "hour": pd.to_numeric(frame["hour"], errors="coerce").astype("float64"),
        "variable": frame["variable"].map(_text).astype(object),
        "value": pd.to_numeric(frame["value"], errors="coerce").astype("float64"),
    }) for rel, frame in frames.items()], ignore_index=True)


def _text(value: Any) -> str | None:
    return None if value is None or (isinstance(value, float) and np.isnan(value)) else str(value)


def _values_table(long: pd.DataFrame) -> Table:
    checks = [
        _rule("clinical.variables", GX.ExpectColumnValuesToBeInSet, "unknown variable",
              column="variable", value_set=list(clinical_fmt.VARIABLES)),
        _rule("clinical.hours", GX.ExpectColumnValuesToNotBeNull, "hour missing", column="hour"),
        _rule("clinical.hours", GX.ExpectColumnValuesToBeBetween, "negative hour", column="hour",
              min_value=0),
    ]
    checks += [_rule("clinical.physiological_range", GX.ExpectColumnValuesToBeBetween,
                     f"{variable} outside physiological limits [{low:g}, {high:g}] {unit}", shown=variable,
                     column="value", min_value=float(low), max_value=float(high),
                     row_condition=Column("variable") == variable, uses=("variable",))
               for variable, (unit, low, high) in clinical_fmt.VARIABLES.items()]
    labels = [f"{f}: {s} hour {_fmt(h)}" for f, s, h in zip(long["file"], long["sample_id"], long["hour"])]
    return Table("clinical_values", long, checks, labels, file_column="file")


def _missingness_table(long: pd.DataFrame, needing: pd.DataFrame, rules: GateParams) -> Table:
    """Share of empty cells in each sample's (hours x variables) grid, hours = its max hour + 1; a sample
    without rows is fully missing. Same cells as clinical.to_grid, counted for all samples at once."""
    keys = ["file", "sample_id"]
    samples = pd.DataFrame({"file": list(needing["clinical_path"]), "sample_id": list(needing["sample_id"])})
    samples = samples[samples["file"].isin(set(long["file"]))].drop_duplicates(ignore_index=True)
    timed = long[long["hour"].notna()]
    hours = (timed.groupby(keys)["hour"].max() + 1).clip(lower=0).rename("hours")
    measured = timed[timed["variable"].isin(list(clinical_fmt.VARIABLES)) & timed["value"].notna()
                     & (timed["hour"] >= 0)]
    cells = measured.drop_duplicates([*keys, "hour", "variable"]).groupby(keys).size().rename("cells")
    samples = samples.join(hours, on=keys).join(cells, on=keys)
    samples["hours"] = samples["hours"].fillna(0).astype("int64")
    grid = (samples["hours"] * len(clinical_fmt.VARIABLES)).astype("float64")
    samples["missing_share"] = (1.0 - samples["cells"].fillna(0) / grid.where(grid > 0)).fillna(1.0)
    check = _rule("clinical.missingness", GX.ExpectColumnValuesToBeBetween,
                  f"more than {rules.clinical_max_missing:.0%} of (hour, variable) cells empty",
                  column="missing_share", max_value=rules.clinical_max_missing)
    labels = [f"{f}: {s}" for f, s in zip(samples["file"], samples["sample_id"])]
    return Table("clinical_samples", _gx_frame(samples), [check], labels, file_column="file")


# ----------------------------------------------------------------------------------------------------- text
def _text_tables(site: Path, index: pd.DataFrame) -> list[Table]:
    rows, questions = [], {}
    for rel in _paths(index, "text_path"):
        row, path = _locate(site, rel)
        if path is not None and _exists(row, [path], site):
            try:
                questions[rel] = text_fmt.read_jsonl(path)
                row["decodes"] = True
            except Exception as exc:
                _failed(row, exc, site)
        rows.append(row)
    tables = [_facts_table("text_files", rows, [], [])]
    needing = _needing(index, "text")
    needing = needing[needing["text_path"].isin(list(questions))]
    if len(needing):
        tables.append(_text_samples_table(needing, questions))
    return tables


def _text_samples_table(needing: pd.DataFrame, questions: dict[str, dict]) -> Table:
    answers = needing["answer"] if "answer" in needing.columns else [None] * len(needing)
    records = []
    for rel, sample, answer in zip(needing["text_path"], needing["sample_id"], answers):
        question = questions[rel].get(sample)
        known = question is not None and isinstance(answer, str)  # a null answer is index.not_null's
        records.append({"file": rel, "sample_id": sample, "present": question is not None,
                        "answer_matches": str(question["answer"]) == answer if known else None})
    frame = _gx_frame(pd.DataFrame(records))
    checks = [
        _rule("text.sample_present", GX.ExpectColumnValuesToBeInSet, "sample's question not in the file",
              column="present", value_set=[True]),
        _rule("text.answer_matches", GX.ExpectColumnValuesToBeInSet, "index answer differs from the file's",
              column="answer_matches", value_set=[True]),
    ]
    labels = [f"{f}: {s}" for f, s in zip(frame["file"], frame["sample_id"])]
    return Table("text_samples", frame, checks, labels, file_column="file")


# --------------------------------------------------------------------------------------- counts and manifest
def _counts_table(index: pd.DataFrame, rules: GateParams) -> list[Table]:
    if not {"task", "split", "label"} <= set(index.columns):
        return []
    rows = index[index["task"].isin(BINARY_TASKS) & index["split"].isin(list(SPLITS))]
    labels = pd.to_numeric(rows["label"], errors="coerce")
    records = [{"task": task, "split": split, "label": label,
                "n": int((labels.loc[group.index] == label).sum())}
               for (task, split), group in rows.groupby(["task", "split"], sort=True) for label in (0, 1)]
    frame = _gx_frame(pd.DataFrame(records, columns=["task", "split", "label", "n"]))
    check = _rule("counts.per_class", GX.ExpectColumnValuesToBeBetween,
                  f"fewer than {rules.min_samples_per_class} samples for a (task, split, label)",
                  shown="label", column="n", min_value=rules.min_samples_per_class)
    names = [f"{t}/{s}/label {lab}" for t, s, lab in zip(frame["task"], frame["split"], frame["label"])]
    return [Table("counts", frame, [check], names, file=INDEX_FILE)]


def _manifest_tables(site: Path, manifest: SiteManifest, index: pd.DataFrame | None) -> list[Table]:
    try:
        content = compute_fingerprint(site)
    except OSError as exc:  # an unreadable file: the mismatch below reports it
        content = f"(cannot compute: {exc.__class__.__name__})"
    row = {"fingerprint": manifest.fingerprint, "content_fingerprint": content,
           "modalities": ",".join(sorted(manifest.modalities))}
    checks = [_rule("manifest.fingerprint", GX.ExpectColumnPairValuesToBeEqual,
                    "fingerprint differs from the content's (files changed after the export)",
                    column_A="fingerprint", column_B="content_fingerprint")]
    if index is not None and "modality" in index.columns:
        row["index_modalities"] = ",".join(sorted({m for mod in _strings(index["modality"].unique())
                                                   for m in mod.split("+")}))
        checks.append(_rule("manifest.modalities", GX.ExpectColumnPairValuesToBeEqual,
                            "modalities differ from the index's", column_A="modalities",
                            column_B="index_modalities"))
    tables = [Table("manifest", pd.DataFrame([row]), checks, [SITE_FILE], file=SITE_FILE)]
    if index is not None and {"task", "split"} <= set(index.columns):
        tables.append(_manifest_counts_table(manifest, index))
    return tables


def _manifest_counts_table(manifest: SiteManifest, index: pd.DataFrame) -> Table:
    observed = count_samples(index)
    keys = sorted({(t, s) for counts in (manifest.counts, observed) for t in counts for s in counts[t]})
    frame = pd.DataFrame([{"task": t, "split": s, "manifest_n": manifest.counts.get(t, {}).get(s, 0),
                           "index_n": observed.get(t, {}).get(s, 0)} for t, s in keys],
                         columns=["task", "split", "manifest_n", "index_n"])
    check = _rule("manifest.counts", GX.ExpectColumnPairValuesToBeEqual,
                  "site.yaml counts differ from the index", shown="counts", column_A="manifest_n",
                  column_B="index_n")
    return Table("manifest_counts", _gx_frame(frame), [check], [f"{t}/{s}" for t, s in keys], file=SITE_FILE)


# ------------------------------------------------------------------------------------------------- the gate
def _steps(site: Path, manifest: SiteManifest | None, index: pd.DataFrame | None,
           rules: GateParams) -> list[tuple[str, Callable[[], list[Table]]]]:
    """(name, build the tables) for what the loaded files allow; built lazily, one at a time."""
    steps: list[tuple[str, Callable[[], list[Table]]]] = []
    if index is not None:
        columns = set(index.columns)
        steps.append(("index", lambda: [_index_table(index, rules)]))
        if "image_path" in columns:
            steps.append(("image", lambda: [_image_table(site, _paths(index, "image_path"), rules)]))
        if "ecg_path" in columns:
            steps.append(("ecg", lambda: [_ecg_table(site, _paths(index, "ecg_path"), rules)]))
        if "clinical_path" in columns:
            steps.append(("clinical", lambda: _clinical_tables(site, index, rules)))
        if "text_path" in columns:
            steps.append(("text", lambda: _text_tables(site, index)))
        steps.append(("counts", lambda: _counts_table(index, rules)))
    if manifest is not None:
        steps.append(("manifest", lambda: _manifest_tables(site, manifest, index)))
    return steps


def validate_site(site_dir: str | Path, rules: GateParams | None = None, *,
                  write_docs: bool = True) -> ValidationReport:
    """Run the gate on one site directory. Bad data becomes findings; this never raises for it."""
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
    for name, build in _steps(site, manifest, index, rules):
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


def _write_reports(report: ValidationReport, gate: _Gate, reports: Path) -> None:
    """GX data docs and validation.json; a failure to write them is noted in stats, never raised."""
    try:
        reports.mkdir(exist_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report.docs_path = gate.build_docs()
    except Exception as exc:
        report.stats["docs_error"] = f"{exc.__class__.__name__}: {exc}"
    try:
        (reports / REPORT_FILE).write_text(report.model_dump_json(indent=2))
    except OSError as exc:
        report.stats["report_error"] = str(exc)
