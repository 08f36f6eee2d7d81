"""The tables of the index itself, of the counts and of site.yaml, and the index helpers that the per-file
tables share."""

from __future__ import annotations

from pathlib import Path
from typing import Collection

import pandas as pd
from great_expectations.expectations.row_conditions import Column

from fedkim.config import GateParams
from fedkim.data.catalogue import Catalogue, load_catalogue
from fedkim.data.siteformat import (INDEX_COLUMNS, INDEX_FILE, SITE_FILE, SPLITS, SiteManifest,
                                     compute_fingerprint, count_samples)
from fedkim.data.validate.engine import GX, Rule, Table, _gx_frame, _rule

INT_TYPES = ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
             "Int8", "Int16", "Int32", "Int64"]
NUMERIC_TYPES = [*INT_TYPES, "float32", "float64", "Float32", "Float64"]
INPUT_KINDS = ("image", "ecg", "clinical", "text")


# ------------------------------------------------------------------------------------------ index helpers
def _relative(message: str, site: Path) -> str:
    """Messages name files relative to the site."""
    return message.replace(f"{site}/", "").replace(str(site), ".")


def _strings(values) -> list[str]:
    return [v for v in values if isinstance(v, str)]


def _paths(index: pd.DataFrame, column: str) -> list[str]:
    """The distinct files a path column references: each is read once however many samples share it."""
    return sorted(set(_strings(index[column])))


def _needing(index: pd.DataFrame, kind: str, catalogue: Catalogue | None = None) -> pd.DataFrame:
    """Index rows whose task needs an input of `kind` (in `catalogue`; None: the shipped one), with string
    sample_id and path."""
    column = f"{kind}_path"
    if not {"task", "sample_id", column} <= set(index.columns):
        return index.iloc[0:0]
    tasks = (catalogue or load_catalogue()).tasks
    rows = index[index["task"].isin([n for n, t in tasks.items() if kind in t.inputs])]
    is_text = rows[[column, "sample_id"]].map(lambda v: isinstance(v, str))
    return rows[is_text.all(axis=1)]


# ------------------------------------------------------------------------------------------------ index suite
def _index_table(index: pd.DataFrame, rules: GateParams, catalogue: Catalogue) -> Table:
    tasks = sorted(set(_strings(index["task"])) & set(catalogue.tasks)) if "task" in index.columns else []
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
              column="task", value_set=list(catalogue.tasks)),
    ]
    labels = [_row_label(index, i) for i in range(len(index))]
    return Table("index", index, checks + _task_rules(tasks, catalogue), labels, file=INDEX_FILE)


def _task_rules(tasks: list[str], catalogue: Catalogue) -> list[Rule]:
    """Rules for the rows of some tasks, built only for the tasks present: row conditions are GX's slowest
    expectations, and one that selects no row checks nothing."""
    binary = [t for t in tasks if catalogue[t].kind == "binary"]
    choice = [t for t in tasks if catalogue[t].kind == "choice"]
    zero_shot = [t for t in tasks if t in catalogue.zero_shot]
    is_binary = Column("task").is_in(binary)
    checks = []
    if binary:
        checks += [
            _rule("index.label_set", GX.ExpectColumnValuesToBeInSet, "binary task label must be 0 or 1",
                  column="label", value_set=[0, 1], row_condition=is_binary, uses=("task",)),
            _rule("index.label_set", GX.ExpectColumnValuesToNotBeNull, "binary task label missing",
                  column="label", row_condition=is_binary, uses=("task",)),
        ]
        by_answers: dict[tuple[str, ...], list[str]] = {}  # binary tasks sharing (negative, positive) answers
        for t in binary:
            by_answers.setdefault(catalogue[t].answers, []).append(t)
        checks += [_rule("index.answer_label", GX.ExpectColumnValuesToBeInSet,
                         f"label {label} needs answer {answer!r}", column="answer", value_set=[answer],
                         row_condition=(is_binary if len(by_answers) == 1 else Column("task").is_in(names))
                         & (Column("label") == label), uses=("task", "label"))
                   for answers, names in by_answers.items() for label, answer in enumerate(answers)]
    if choice:
        checks.append(_rule("index.label_set", GX.ExpectColumnValuesToBeNull,
                            "choice task label must be null", column="label",
                            row_condition=Column("task").is_in(choice), uses=("task",)))
    if zero_shot:
        checks.append(_rule("index.zero_shot_split", GX.ExpectColumnValuesToBeInSet,
                            "zero-shot task outside the test split", column="split", value_set=["test"],
                            row_condition=Column("task").is_in(zero_shot), uses=("task",)))
    for name in tasks:
        task, is_task = catalogue[name], Column("task") == name
        checks += [
            _rule("index.modality", GX.ExpectColumnValuesToBeInSet,
                  f"{name} needs modality {task.modality!r}", column="modality", value_set=[task.modality],
                  row_condition=is_task, uses=("task",)),
            _rule("index.answer_set", GX.ExpectColumnValuesToBeInSet,
                  f"{name} answer not in {list(task.answers)}", column="answer",
                  value_set=list(task.answers), row_condition=is_task, uses=("task",)),
        ]
    for kind in INPUT_KINDS:
        needing = [t for t in tasks if kind in catalogue[t].inputs]
        if needing:
            checks.append(_rule("index.paths", GX.ExpectColumnValuesToNotBeNull,
                                f"{kind}_path needed by the task", column=f"{kind}_path",
                                row_condition=Column("task").is_in(needing), uses=("task",)))
    return checks


def _row_label(index: pd.DataFrame, row: int) -> str:
    sample = index["sample_id"].iat[row] if "sample_id" in index.columns else None
    return f"{sample} (row {row})" if isinstance(sample, str) else f"row {row}"


# --------------------------------------------------------------------------------------- counts and manifest
def _counts_table(index: pd.DataFrame, rules: GateParams, catalogue: Catalogue,
                  quarantined: Collection[str] = ()) -> list[Table]:
    """The minimum counts, judged on the samples the quarantine leaves (a group it empties counts 0)."""
    kept = ~index["sample_id"].isin(list(quarantined)) if "sample_id" in index.columns and quarantined \
        else pd.Series(True, index=index.index)
    after = f" (after {int((~kept).sum())} quarantined)" if not kept.all() else ""
    site = _gx_frame(pd.DataFrame({"n": [int(kept.sum())]}))
    tables = [Table("counts_site", site, [_rule(
        "counts.per_site", GX.ExpectColumnValuesToBeBetween,
        f"fewer than {rules.min_samples_per_site} samples in the site{after}", shown="sample_id", column="n",
        min_value=rules.min_samples_per_site)], ["site"], file=INDEX_FILE)]
    if not {"task", "split", "label"} <= set(index.columns):
        return tables
    binary = [n for n, t in catalogue.tasks.items() if t.kind == "binary"]
    rows = index[index["task"].isin(binary) & index["split"].isin(list(SPLITS))]
    labels = pd.to_numeric(rows["label"], errors="coerce").where(kept.loc[rows.index])
    records = [{"task": task, "split": split, "label": label,
                "n": int((labels.loc[group.index] == label).sum())}
               for (task, split), group in rows.groupby(["task", "split"], sort=True) for label in (0, 1)]
    frame = _gx_frame(pd.DataFrame(records, columns=["task", "split", "label", "n"]))
    check = _rule("counts.per_class", GX.ExpectColumnValuesToBeBetween,
                  f"fewer than {rules.min_samples_per_class} samples for a (task, split, label){after}",
                  shown="label", column="n", min_value=rules.min_samples_per_class)
    names = [f"{t}/{s}/label {lab}" for t, s, lab in zip(frame["task"], frame["split"], frame["label"])]
    return tables + [Table("counts", frame, [check], names, file=INDEX_FILE)]


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

