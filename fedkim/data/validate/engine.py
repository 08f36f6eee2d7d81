"""The Great Expectations engine: rules and tables, the runner that turns failed expectations into findings,
and the writing of the GX data docs and validation.json."""

from __future__ import annotations

import logging
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import great_expectations as gx
import numpy as np
import pandas as pd
from great_expectations.data_context.types.base import (DataContextConfig, InMemoryStoreBackendDefaults,
                                                         ProgressBarsConfig)

from fedkim.data.validate.report import REPORT_FILE, Finding, ValidationReport, action_of

# GX logs at INFO and sets one module's logger to INFO itself; a gate run should be quiet
for _name in ("great_expectations", "great_expectations.data_context.types.base"):
    logging.getLogger(_name).setLevel(logging.ERROR)

GX = gx.expectations
MAX_EXAMPLES = 5
# A first pass only says pass/fail (about twice as fast); failed expectations run again for their examples.
FIRST_PASS = {"result_format": "BOOLEAN_ONLY"}
# COMPLETE: every unexpected row, so that a quarantine names every sample it leaves out
DETAILS = {"result_format": "COMPLETE", "partial_unexpected_count": MAX_EXAMPLES}
DOCS_DIR = "gx"


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
    samples: list[list[str]] | None = None  # the sample ids each row stands for (a file: all that use it)


# ------------------------------------------------------------------------------------------------ the runner
def _context_config(docs_dir: Path | None) -> DataContextConfig:
    """GX's ephemeral defaults (stores in memory) with analytics and progress bars off. analytics_enabled in
    the context's own config takes precedence over GX_ANALYTICS_ENABLED, so no analytics event is sent
    whatever the environment or the order of imports."""
    docs_sites = None
    if docs_dir is not None:
        docs_sites = {"local_site": {
            "class_name": "SiteBuilder",
            "show_how_to_buttons": False,
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        }}
    return DataContextConfig(analytics_enabled=False, progress_bars=ProgressBarsConfig(globally=False),
                             data_docs_sites=docs_sites,
                             store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=True))


class _Gate:
    """An ephemeral GX context (nothing on disk); data docs go to `docs_dir` when given."""

    def __init__(self, docs_dir: Path | None):
        self.context = gx.get_context(mode="ephemeral", project_config=_context_config(docs_dir))
        self.docs_dir = docs_dir
        self.source = self.context.data_sources.add_pandas("site")
        self.expectations = 0

    def run(self, table: Table, actions: dict[str, str] | None = None) -> list[Finding]:
        rules = [r for r in table.rules if r.runnable(set(table.frame.columns))]
        self.expectations += len(rules)
        failed = [rules[n] for n, _ in self._validate(table.name, table.frame, rules, FIRST_PASS)]
        if not failed:
            return []
        details = self._validate(f"{table.name}_failures", table.frame, failed, DETAILS)
        return [_finding(table, failed[n], result, action_of(failed[n].id, actions)) for n, result in details]

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


def _finding(table: Table, rule: Rule, result: Any, action: str = "block") -> Finding:
    """A quarantine must know what it leaves out: a sample-level finding that cannot name its samples (a check
    that could not run, a table without sample ids) blocks."""
    column = rule.shown or next(iter(rule.checked()), None)
    error = _exception_message(result.exception_info)
    if error:
        return Finding(rule=rule.id, file=table.file, column=column, count=len(table.frame),
                       message=f"{rule.message}: could not be checked ({error})",
                       action="block" if action == "quarantine" else action)
    res = result.result or {}
    rows = list(res.get("partial_unexpected_index_list") or [])
    if not rows and "observed_value" in res:  # a table-level expectation (row count)
        return Finding(rule=rule.id, file=table.file, column=column, action=action,
                       message=f"{rule.message} (observed {res['observed_value']})")
    every = list(res.get("unexpected_index_list") or rows)
    samples = sorted({s for i in every for s in table.samples[i]}) if table.samples is not None else []
    if action == "quarantine" and not samples:  # rows of no indexed sample are never read
        action = "block" if table.samples is None else "warn"
    file = table.file
    if file is None and table.file_column and rows:
        file = str(table.frame.at[rows[0], table.file_column])
    return Finding(rule=rule.id, file=file, column=column, message=rule.message, action=action,
                   count=max(int(res.get("unexpected_count") or len(rows)), 1), samples=samples,
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


def _write_reports(report: ValidationReport, gate: _Gate, reports: Path) -> None:
    """GX data docs (when the gate keeps them) and validation.json; a failure to write them is noted in stats,
    never raised."""
    try:
        reports.mkdir(parents=True, exist_ok=True)
        if gate.docs_dir is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                report.docs_path = gate.build_docs()
    except Exception as exc:
        report.stats["docs_error"] = f"{exc.__class__.__name__}: {exc}"
    try:
        (reports / REPORT_FILE).write_text(report.model_dump_json(indent=2))
    except OSError as exc:
        report.stats["report_error"] = str(exc)
