"""ICU data in Parquet long format: one row per measurement (sample_id, hour, variable, value[, unit]), and the
static covariates of a stay (sample_id, variable, value[, unit]) in <site>/clinical/static.parquet.

Units are data: each variable has a canonical unit (what the model and the gate's limits use) and the units a
hospital may export it in, with their conversions (canonical = value * scale + offset). A file without a `unit`
column is in the canonical units; a null unit in a `unit` column means the canonical unit too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from fedkim.data.formats import FormatError

LONG_SCHEMA = pa.schema(
    [("sample_id", pa.string()), ("hour", pa.int16()), ("variable", pa.string()), ("value", pa.float32())]
)
LONG_UNIT_SCHEMA = LONG_SCHEMA.append(pa.field("unit", pa.string()))  # an export's values in their own units
STATIC_SCHEMA = pa.schema(
    [("sample_id", pa.string()), ("variable", pa.string()), ("value", pa.float32()), ("unit", pa.string())]
)
STATIC_FILE = "clinical/static.parquet"  # relative to the site; optional
# variable -> (unit, physiological lower limit, upper limit): values outside are recording errors.
VARIABLES: dict[str, tuple[str, float, float]] = {
    "heart_rate": ("bpm", 20, 250),
    "sbp": ("mmHg", 40, 260),
    "dbp": ("mmHg", 15, 180),
    "resp_rate": ("/min", 3, 70),
    "spo2": ("%", 50, 100),
    "temperature": ("degC", 30, 43),
    "lactate": ("mmol/L", 0.2, 25),
    "wbc": ("10^9/L", 0.1, 100),
    "creatinine": ("mg/dL", 0.1, 20),
}
# static covariate -> (unit, lower limit, upper limit, population mean, scale used to standardise it)
STATIC: dict[str, tuple[str, float, float, float, float]] = {
    "age": ("years", 0, 120, 65.0, 30.0),
    "sex": ("0=female,1=male", 0, 1, 0.5, 1.0),
    "weight": ("kg", 1, 350, 80.0, 40.0),
    "height": ("cm", 30, 250, 170.0, 20.0),
}
_KPA_TO_MMHG = 7.50062
_F_TO_C = (5 / 9, -32 * 5 / 9)
# variable -> accepted unit -> (scale, offset) to the canonical unit; the canonical unit maps to (1, 0).
UNITS: dict[str, dict[str, tuple[float, float]]] = {
    "heart_rate": {"bpm": (1, 0), "/min": (1, 0), "beats/min": (1, 0)},
    "sbp": {"mmHg": (1, 0), "kPa": (_KPA_TO_MMHG, 0)},
    "dbp": {"mmHg": (1, 0), "kPa": (_KPA_TO_MMHG, 0)},
    "resp_rate": {"/min": (1, 0), "breaths/min": (1, 0), "insp/min": (1, 0)},
    "spo2": {"%": (1, 0)},
    "temperature": {"degC": (1, 0), "°C": (1, 0), "C": (1, 0), "degF": _F_TO_C, "°F": _F_TO_C, "F": _F_TO_C},
    "lactate": {"mmol/L": (1, 0), "mg/dL": (1 / 9.01, 0)},
    "wbc": {"10^9/L": (1, 0), "10^3/uL": (1, 0), "K/uL": (1, 0), "/nL": (1, 0)},
    "creatinine": {"mg/dL": (1, 0), "umol/L": (1 / 88.4, 0), "µmol/L": (1 / 88.4, 0)},
    "age": {"years": (1, 0), "y": (1, 0)},
    "sex": {"0=female,1=male": (1, 0)},
    "weight": {"kg": (1, 0), "lb": (0.45359237, 0)},
    "height": {"cm": (1, 0), "m": (100, 0), "in": (2.54, 0)},
}
# Several values for one (sample, hour, variable): how they become the one cell the model reads.
Duplicates = Literal["mean", "last", "first", "max", "min"]


def write_long(path: Path, frame: pd.DataFrame) -> None:
    """sample_id, hour, variable, value, and unit when the frame has that column (else canonical units)."""
    schema = LONG_UNIT_SCHEMA if "unit" in frame.columns else LONG_SCHEMA
    table = pa.Table.from_pandas(frame[list(schema.names)], schema=schema, preserve_index=False)
    pq.write_table(table, path)


def write_static(path: Path, frame: pd.DataFrame) -> None:
    """sample_id, variable, value, unit (unit may be left out: canonical units)."""
    frame = frame.assign(unit=frame["unit"] if "unit" in frame.columns else None)
    table = pa.Table.from_pandas(frame[list(STATIC_SCHEMA.names)], schema=STATIC_SCHEMA, preserve_index=False)
    pq.write_table(table, path)


def _read(path: str | Path, required: list[str]) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise FormatError(path, "file not found")
    try:
        frame = pq.read_table(path).to_pandas()
    except Exception as exc:
        raise FormatError(path, f"not a readable Parquet file ({exc.__class__.__name__}: {exc})") from None
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise FormatError(path, f"missing column(s) {missing}; required: {required} (optional: unit)")
    return frame


def read_long(path: str | Path) -> pd.DataFrame:
    """The rows as stored (a `unit` column kept as it is: `to_canonical` converts)."""
    return _read(path, list(LONG_SCHEMA.names))


def read_static(path: str | Path) -> pd.DataFrame:
    return _read(path, ["sample_id", "variable", "value"])


def unit_factors(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scale, offset, known) per row from its variable and unit; unknown variables pass unchanged (their own
    finding), an unknown unit has known=False."""
    n = len(frame)
    scale, offset, known = np.ones(n), np.zeros(n), np.ones(n, dtype=bool)
    if "unit" not in frame.columns:
        return scale, offset, known
    units = np.array([None if pd.isna(u) else str(u).strip() for u in frame["unit"].tolist()], dtype=object)
    variables = frame["variable"].to_numpy(dtype=object)
    for variable, unit in set(zip(variables.tolist(), units.tolist())):
        if unit is None or variable not in UNITS:
            continue
        rows = (variables == variable) & (units == unit)
        factor = UNITS[variable].get(unit)
        if factor is None:
            known[rows] = False
        else:
            scale[rows], offset[rows] = factor
    return scale, offset, known


def to_canonical(frame: pd.DataFrame, path: str | Path = "") -> pd.DataFrame:
    """Values converted to each variable's canonical unit; an unknown unit is a FormatError naming file,
    variable and unit. A frame without a `unit` column is returned as it is (already canonical)."""
    if "unit" not in frame.columns:
        return frame
    scale, offset, known = unit_factors(frame)
    if not known.all():
        bad = frame[~known][["variable", "unit"]].drop_duplicates().head(3)
        pairs = ", ".join(f"{v} in {u!r}" for v, u in zip(bad["variable"], bad["unit"]))
        raise FormatError(Path(path), f"unknown unit(s): {pairs}; accepted: see fedkim.data.formats.clinical.UNITS")
    values = pd.to_numeric(frame["value"], errors="coerce").to_numpy(dtype=np.float64) * scale + offset
    return frame.drop(columns="unit").assign(value=values.astype(np.float32))


def to_grid(frame: pd.DataFrame, hours: int, variables: tuple[str, ...] = tuple(VARIABLES),
            duplicates: Duplicates = "mean") -> np.ndarray:
    """One sample's long rows -> (hours, variables) float32 grid with NaN where nothing was measured. Rows
    without an hour or a value measure nothing; several values in one cell are combined by `duplicates`."""
    grid = np.full((hours, len(variables)), np.nan, dtype=np.float32)
    column = {v: i for i, v in enumerate(variables)}
    hour = pd.to_numeric(frame["hour"], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    value = pd.to_numeric(frame["value"], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    keep = (hour >= 0) & (hour < hours) & ~np.isnan(value) & frame["variable"].isin(column).to_numpy()
    rows = hour[keep].astype(np.int64)
    cols = frame["variable"].to_numpy()[keep]
    cols = pd.Series(cols, dtype=object).map(column).to_numpy(dtype=np.int64)
    values = value[keep]
    cell = rows * len(variables) + cols
    if len(np.unique(cell)) < len(cell):
        cells = combine_duplicates(pd.DataFrame({"hour": rows, "variable": cols, "value": values}), duplicates)
        rows, cols, values = (cells[c].to_numpy() for c in ("hour", "variable", "value"))
    grid[rows, cols] = values
    return grid


def combine_duplicates(rows: pd.DataFrame, rule: Duplicates) -> pd.DataFrame:
    """One row per (hour, variable); first/last follow the file's order."""
    grouped = rows.groupby(["hour", "variable"], sort=False)["value"]
    return getattr(grouped, rule)().reset_index()


def task_windows(icu_hours: int) -> dict[str, int]:
    """Hours of ICU series each clinical task observes (sepsis: twice the mortality window, as generated)."""
    return {"mortality": icu_hours, "sepsis": 2 * icu_hours}
