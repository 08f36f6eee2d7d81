"""ICU time series in Parquet long format: one row per measurement (sample_id, hour, variable, value)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from fedkim.data.formats import FormatError

LONG_SCHEMA = pa.schema(
    [("sample_id", pa.string()), ("hour", pa.int16()), ("variable", pa.string()), ("value", pa.float32())]
)
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


def write_long(path: Path, frame: pd.DataFrame) -> None:
    table = pa.Table.from_pandas(frame[list(LONG_SCHEMA.names)], schema=LONG_SCHEMA, preserve_index=False)
    pq.write_table(table, path)


def read_long(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise FormatError(path, "file not found")
    try:
        frame = pq.read_table(path).to_pandas()
    except Exception as exc:
        raise FormatError(path, f"not a readable Parquet file ({exc.__class__.__name__}: {exc})") from None
    missing = [c for c in LONG_SCHEMA.names if c not in frame.columns]
    if missing:
        raise FormatError(path, f"missing column(s) {missing}; required: {LONG_SCHEMA.names}")
    return frame


def to_grid(frame: pd.DataFrame, hours: int, variables: tuple[str, ...] = tuple(VARIABLES)) -> np.ndarray:
    """One sample's long rows -> (hours, variables) float32 grid with NaN where nothing was measured."""
    grid = np.full((hours, len(variables)), np.nan, dtype=np.float32)
    column = {v: i for i, v in enumerate(variables)}
    hour = frame["hour"].to_numpy()
    keep = (hour >= 0) & (hour < hours) & frame["variable"].isin(column).to_numpy()
    rows = frame[keep]
    grid[rows["hour"].to_numpy(), rows["variable"].map(column).to_numpy()] = rows["value"].to_numpy()
    return grid
