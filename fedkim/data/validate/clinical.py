"""The clinical tables: one row per clinical Parquet file, their long rows (known variable and unit, hour,
physiological limits after unit conversion), one row per sample on the grid the model reads (empty sample,
missingness), and the static covariates file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from great_expectations.expectations.row_conditions import Column

from fedkim.config import GateParams
from fedkim.data.formats import FormatError
from fedkim.data.formats import clinical as clinical_fmt
from fedkim.data.validate.engine import GX, Rule, Table, _fmt, _gx_frame, _rule
from fedkim.data.validate.files import _exists, _facts_table, _failed, _locate
from fedkim.data.catalogue import Catalogue
from fedkim.data.validate.tables import INT_TYPES, NUMERIC_TYPES, _needing, _paths, _relative


# ------------------------------------------------------------------------------------------------- clinical
def _clinical_tables(site: Path, index: pd.DataFrame, rules: GateParams, icu_hours: int,
                     catalogue: Catalogue | None = None) -> list[Table]:
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
        needing = _needing(index, "clinical", catalogue)
        long = _long_frame(frames)
        samples = set(needing["sample_id"])
        tables += [_values_table(long, samples),
                   _missingness_table(long, needing, rules, clinical_fmt.task_windows(icu_hours), icu_hours)]
    return tables


def _long_frame(frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """All files' long rows with comparable types: numbers coerced (unparseable -> NaN) and converted to the
    canonical units (an unknown unit -> NaN, its own finding), names as text."""
    parts = []
    for rel, frame in frames.items():
        scale, offset, known = clinical_fmt.unit_factors(frame)
        value = pd.to_numeric(frame["value"], errors="coerce").to_numpy(dtype="float64", na_value=np.nan)
        units = frame["unit"].map(_text) if "unit" in frame.columns else pd.Series(None, index=frame.index)
        parts.append(pd.DataFrame({
            "file": rel,
            "sample_id": frame["sample_id"].map(_text).astype(object),
            "hour": pd.to_numeric(frame["hour"], errors="coerce").astype("float64"),
            "variable": frame["variable"].map(_text).astype(object),
            "value": np.where(known, value * scale + offset, np.nan),
            "unit": units.astype(object).to_numpy(),
            "unit_known": known,
        }))
    long = pd.concat(parts, ignore_index=True)
    long["unit_detail"] = [f"{v} in unit {u!r}" for v, u in zip(long["variable"], long["unit"])]
    return long


def _text(value: Any) -> str | None:
    return None if value is None or (np.ndim(value) == 0 and pd.isna(value)) else str(value)


def _ranges(table: str, limits: dict[str, tuple], message: str) -> list[Rule]:
    return [_rule(table, GX.ExpectColumnValuesToBeBetween,
                  f"{variable} outside {message} [{low:g}, {high:g}] {unit}", shown=variable,
                  column="value", min_value=float(low), max_value=float(high),
                  row_condition=Column("variable") == variable, uses=("variable",))
            for variable, (unit, low, high, *_) in limits.items()]


def _values_table(long: pd.DataFrame, samples: set[str]) -> Table:
    checks = [
        _rule("clinical.variables", GX.ExpectColumnValuesToBeInSet, "unknown variable",
              column="variable", value_set=list(clinical_fmt.VARIABLES)),
        _rule("clinical.units", GX.ExpectColumnValuesToBeInSet, "unit not accepted for the variable",
              shown="unit", column="unit_known", value_set=[True], detail="unit_detail"),
        _rule("clinical.hours", GX.ExpectColumnValuesToNotBeNull, "hour missing", column="hour"),
        _rule("clinical.hours", GX.ExpectColumnValuesToBeBetween, "negative hour", column="hour",
              min_value=0),
        *_ranges("clinical.physiological_range", clinical_fmt.VARIABLES, "physiological limits"),
    ]
    labels = [f"{f}: {s} hour {_fmt(h)}" for f, s, h in zip(long["file"], long["sample_id"], long["hour"])]
    table = Table("clinical_values", long, checks, labels, file_column="file")
    table.samples = [[s] if s in samples else [] for s in long["sample_id"]]
    return table


def _missingness_table(long: pd.DataFrame, needing: pd.DataFrame, rules: GateParams, windows: dict[str, int],
                       default_window: int) -> Table:
    """Per sample, on the grid the model reads (hours 0 .. its task's window - 1): whether it has any
    measurement at all (clinical.empty_sample), and which recorded variables are measured in fewer than
    clinical_min_hours of those hours (clinical.missingness). A variable never recorded is no finding: the model
    reads it as masked."""
    keys = ["file", "sample_id"]
    samples = pd.DataFrame({"file": list(needing["clinical_path"]), "sample_id": list(needing["sample_id"]),
                            "task": list(needing["task"])})
    samples = samples[samples["file"].isin(set(long["file"]))].drop_duplicates(keys, ignore_index=True)
    samples["window"] = [windows.get(t, default_window) for t in samples["task"]]
    valid = long[long["variable"].isin(list(clinical_fmt.VARIABLES)) & long["value"].notna()
                 & long["hour"].notna() & (long["hour"] >= 0)]
    valid = valid.merge(samples[[*keys, "window"]], on=keys)
    seen = valid[valid["hour"] < valid["window"]].drop_duplicates([*keys, "hour", "variable"])
    hours = seen.groupby([*keys, "variable"]).size()
    recorded = valid.groupby([*keys, "variable"]).size()
    counts = pd.DataFrame({"recorded": recorded, "hours": hours}).fillna(0).reset_index()
    short = counts[counts["hours"] < rules.clinical_min_hours]
    named: dict[tuple, list[str]] = {}
    for f, sid, variable, n in zip(short["file"], short["sample_id"], short["variable"], short["hours"]):
        named.setdefault((f, sid), []).append(f"{variable} in {int(n)} h")
    detail = pd.Series({k: ", ".join(v) for k, v in named.items()}, dtype=object)
    detail.index = pd.MultiIndex.from_tuples(list(named), names=keys) if named else \
        pd.MultiIndex.from_tuples([], names=keys)
    samples = samples.join(valid.groupby(keys).size().rename("measurements"), on=keys)
    samples = samples.join(short.groupby(keys).size().rename("short_variables"), on=keys)
    samples = samples.join(detail.rename("detail"), on=keys)
    samples["measurements"] = samples["measurements"].fillna(0).astype("int64")
    # an empty sample is only clinical.empty_sample's finding
    samples["short_variables"] = samples["short_variables"].fillna(0).where(samples["measurements"] > 0)
    samples["detail"] = [f"{d} of the {w} h read" if isinstance(d, str) else "" for d, w in
                         zip(samples["detail"], samples["window"])]
    checks = [
        _rule("clinical.empty_sample", GX.ExpectColumnValuesToBeBetween, "no measurement for the sample",
              column="measurements", min_value=1),
        _rule("clinical.missingness", GX.ExpectColumnValuesToBeBetween,
              f"recorded variable(s) measured in fewer than {rules.clinical_min_hours} of the hours the model "
              f"reads", column="short_variables", max_value=0, detail="detail"),
    ]
    labels = [f"{f}: {s}" for f, s in zip(samples["file"], samples["sample_id"])]
    table = Table("clinical_samples", _gx_frame(samples), checks, labels, file_column="file")
    table.samples = [[s] for s in samples["sample_id"]]
    return table


def _static_tables(site: Path, index: pd.DataFrame, catalogue: Catalogue | None = None) -> list[Table]:
    """clinical/static.parquet, when the site has one: readable, known covariates and units, within limits."""
    path = site / clinical_fmt.STATIC_FILE
    if not path.exists():
        return []
    row = {"file": clinical_fmt.STATIC_FILE, "decodes": True, "value_type": None, "detail": ""}
    try:
        frame = clinical_fmt.read_static(path)
        row["value_type"] = str(frame["value"].dtype)
    except Exception as exc:
        frame = None
        row.update(decodes=False, detail=_relative(exc.reason if isinstance(exc, FormatError) else str(exc), site))
    schema = [
        _rule("clinical.static_schema", GX.ExpectColumnValuesToBeInSet, "not a readable static covariates file",
              column="decodes", value_set=[True], detail="detail"),
        _rule("clinical.static_schema", GX.ExpectColumnValuesToBeInSet, "value must be a numeric column",
              column="value_type", value_set=NUMERIC_TYPES),
    ]
    tables = [Table("static_file", _gx_frame(pd.DataFrame([row])), schema, [row["file"]],
                    file=clinical_fmt.STATIC_FILE)]
    if frame is None or not len(frame) or row["value_type"] not in NUMERIC_TYPES:
        return tables
    long = _long_frame({clinical_fmt.STATIC_FILE: frame.assign(hour=0)})
    checks = [
        _rule("clinical.static_variables", GX.ExpectColumnValuesToBeInSet, "unknown static covariate",
              column="variable", value_set=list(clinical_fmt.STATIC)),
        _rule("clinical.units", GX.ExpectColumnValuesToBeInSet, "unit not accepted for the covariate",
              shown="unit", column="unit_known", value_set=[True], detail="unit_detail"),
        *_ranges("clinical.static_range", clinical_fmt.STATIC, "the limits"),
    ]
    ids = set(_needing(index, "clinical", catalogue)["sample_id"])
    table = Table("static_values", long, checks, [f"{s}: {v}" for s, v in zip(long["sample_id"], long["variable"])],
                  file=clinical_fmt.STATIC_FILE)
    table.samples = [[s] if s in ids else [] for s in long["sample_id"]]
    return tables + [table]
