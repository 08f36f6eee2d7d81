"""A served query's inputs, carried as data, turned into the item the test loaders would give for the same sample.

Columns of a query row (strings; see docs/operations.md#serving for examples):

    image      base64 of a PNG, JPEG or DICOM file (told apart by their magic bytes)
    ecg        JSON {"fs": 500, "leads": ["I", ..., "V6"], "signal": [[mV per lead], ...]} (one row per sample),
               or JSON {"wfdb": {"hea": base64, "dat": base64}}, or base64 of a DICOM 12-lead waveform
    clinical   JSON {"rows": [{"hour", "variable", "value", "unit"}, ...], "static": [{"variable", "value",
               "unit"}, ...]} (static optional), or the list of rows alone
    question, options ("A|B" or a JSON list), choices (the options' texts, same forms)

Bytes are decoded by the site format's own readers: they are written to a private temporary folder under the
name a site file would have and read with fedkim.data.loaders (a JSON ECG as a WFDB record at the site format's
1 µV resolution). Path columns (image_path, ecg_path, clinical_path, text_path) read files on the serving machine,
so they are refused unless the server's operator names a folder in FEDKIM_SERVING_DATA_DIR; a path must then
resolve inside it.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from fedkim.config import Params
from fedkim.data.catalogue import Catalogue
from fedkim.data.formats import FormatError

DATA_DIR_ENV = "FEDKIM_SERVING_DATA_DIR"
DATA_COLUMNS = ("image", "ecg", "clinical", "choices")
PATH_COLUMNS = ("image_path", "ecg_path", "clinical_path", "text_path")


class QueryError(ValueError):
    """A query row the model cannot read; the message names the row and the column."""

    def __init__(self, row: int, column: str | None, reason: str):
        where = f"row {row}" + (f", column {column!r}" if column else "")
        super().__init__(f"{where}: {reason}")


def present(value) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value)) and value != ""


def listed(value) -> list[str]:
    """options / choices as "A|B" or a JSON list."""
    if isinstance(value, str):
        return [str(v) for v in json.loads(value)] if value.startswith("[") else [o.strip() for o in value.split("|")]
    return [str(v) for v in value]


def query_item(row: dict, task: str, params: Params, i: int, catalogue: Catalogue) -> dict:
    """One sample shaped like the test loaders' items (same readers, same sizes as the bundle's params)."""
    spec = catalogue[task]
    item: dict = {"task": task, "modality": spec.modality}
    with tempfile.TemporaryDirectory(prefix="fedkim-query-") as tmp:
        folder = Path(tmp)
        for kind in spec.inputs:
            if kind == "text":
                item |= _question(row, spec, i)
                continue
            try:
                item |= _READERS[kind](row, i, task, params, folder)
            except FormatError as exc:  # the site format's readers name the file: name the row and column
                column = kind if present(row.get(kind)) else f"{kind}_path"
                raise QueryError(i, column, exc.reason) from None
    return item


def _need(row: dict, i: int, task: str, kind: str) -> tuple[str, str]:
    """(column, value): the data column, else its path column; one of them is required."""
    for column in (kind, f"{kind}_path"):
        if present(row.get(column)):
            return column, str(row[column])
    raise QueryError(i, kind, f"task {task!r} needs its {kind} input: send it in column {kind!r} "
                              f"(see docs/operations.md#serving)")


def allowed_path(value: str, i: int, column: str) -> Path:
    """A path column's file, only inside the folder the operator allows (FEDKIM_SERVING_DATA_DIR)."""
    root = os.environ.get(DATA_DIR_ENV)
    if not root:
        raise QueryError(i, column, f"path inputs are disabled on this server ({DATA_DIR_ENV} is not set); send "
                                    f"the data itself in column {column.removesuffix('_path')!r}")
    path = Path(value).resolve()
    if not path.is_relative_to(Path(root).resolve()):
        raise QueryError(i, column, f"{value} is outside the folder this server reads ({DATA_DIR_ENV})")
    return path


def _bytes(value: str, i: int, column: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise QueryError(i, column, "not valid base64") from None


def _suffix(data: bytes, i: int, column: str, accepted: tuple[str, ...]) -> str:
    kind = (".png" if data.startswith(b"\x89PNG") else ".jpg" if data.startswith(b"\xff\xd8\xff")
            else ".dcm" if data[128:132] == b"DICM" else None)
    if kind not in accepted:
        names = {".png": "PNG", ".jpg": "JPEG", ".dcm": "DICOM"}
        raise QueryError(i, column, f"the bytes are not {' or '.join(names[a] for a in accepted)} "
                                    f"(starts with {data[:8]!r})")
    return kind


def _image(row: dict, i: int, task: str, params: Params, folder: Path) -> dict:
    from fedkim.data.loaders import load_image

    column, value = _need(row, i, task, "image")
    if column == "image_path":
        return {"image": load_image(allowed_path(value, i, column), params.site.image_input)}
    data = _bytes(value, i, column)
    path = folder / f"image{_suffix(data, i, column, ('.png', '.jpg', '.dcm'))}"
    path.write_bytes(data)
    return {"image": load_image(path, params.site.image_input)}


def _ecg(row: dict, i: int, task: str, params: Params, folder: Path) -> dict:
    from fedkim.data.loaders import load_ecg

    column, value = _need(row, i, task, "ecg")
    if column == "ecg_path":
        path = allowed_path(value, i, column)
    elif value.lstrip().startswith("{"):
        path = _ecg_json(_json(value, i, column), i, column, folder)
    else:
        data = _bytes(value, i, column)
        path = folder / f"ecg{_suffix(data, i, column, ('.dcm',))}"
        path.write_bytes(data)
    return {"ecg": load_ecg(path, params.site.ecg_hz, params.data.ecg_seconds)}


def _ecg_json(record: dict, i: int, column: str, folder: Path) -> Path:
    """A JSON ECG written as the WFDB record the site format would hold (or the WFDB files it carries)."""
    import wfdb

    if not isinstance(record, dict):
        raise QueryError(i, column, "an ECG in JSON is an object with fs, leads and signal, or with wfdb")
    if "wfdb" in record:
        files = record["wfdb"] if isinstance(record["wfdb"], dict) else {}
        if not {"hea", "dat"} <= set(files):
            raise QueryError(i, column, "wfdb needs both files: {\"hea\": base64, \"dat\": base64}")
        header = _bytes(files["hea"], i, column).decode("utf-8", "replace")
        names = re.findall(r"^(\S+\.dat)\s", header, flags=re.M) or ["record.dat"]
        if any("/" in n or "\\" in n or n.startswith(".") for n in names) or len(set(names)) != 1:
            raise QueryError(i, column, f"the WFDB header must name one plain .dat file, names {sorted(set(names))}")
        stem = header.split()[0] if header.split() else "record"
        if not re.fullmatch(r"[\w-]+", stem):
            raise QueryError(i, column, f"the WFDB header's record name {stem!r} is not a plain name")
        (folder / f"{stem}.hea").write_text(header)
        (folder / names[0]).write_bytes(_bytes(files["dat"], i, column))
        return folder / f"{stem}.hea"
    missing = [k for k in ("fs", "leads", "signal") if k not in record]
    if missing:
        raise QueryError(i, column, f"an ECG in JSON needs {missing} (fs in Hz, lead names, signal in mV with one "
                                    "row per sample and one column per lead)")
    try:
        signal = np.asarray(record["signal"], dtype=np.float64)
        fs = float(record["fs"])
    except (TypeError, ValueError) as exc:
        raise QueryError(i, column, f"fs and signal must be numbers ({exc})") from None
    leads = [str(lead) for lead in record["leads"]]
    if signal.ndim != 2 or signal.shape[1] != len(leads) or signal.shape[0] < 2 or not fs > 0:
        raise QueryError(i, column, f"signal must be (samples, {len(leads)} leads) with fs > 0; got shape "
                                    f"{signal.shape}, fs {fs}")
    if not np.isfinite(signal).all() or np.abs(signal).max() >= 32.0:
        raise QueryError(i, column, "signal values must be finite millivolts within ±32 mV")
    wfdb.wrsamp("ecg", fs=fs, units=["mV"] * len(leads), sig_name=leads, p_signal=signal, fmt=["16"] * len(leads),
                adc_gain=[1000.0] * len(leads), baseline=[0] * len(leads), write_dir=str(folder))
    return folder / "ecg.hea"


def _clinical(row: dict, i: int, task: str, params: Params, folder: Path) -> dict:
    from fedkim.data.batches import icu_windows
    from fedkim.data.formats.clinical import read_long, to_canonical, to_grid
    from fedkim.data.loaders import standardise_clinical, static_vectors

    column, value = _need(row, i, task, "clinical")
    static = None
    if column == "clinical_path":
        frame = read_long(allowed_path(value, i, column))
        if present(row.get("sample_id")):
            frame = frame[frame["sample_id"] == row["sample_id"]]
        if frame.empty or frame["sample_id"].nunique() != 1:
            raise QueryError(i, column, f"{value} must hold exactly one sample (give sample_id to pick one)")
    else:
        record = _json(value, i, column)
        rows, static = (record.get("rows"), record.get("static")) if isinstance(record, dict) else (record, None)
        frame = _records(rows, ("hour", "variable", "value"), i, column, "rows")
        if static is not None:
            static = _records(static, ("variable", "value"), i, column, "static")
    where = f"row {i} column {column}"
    frame = to_canonical(frame, where)
    # as task_dataset windows them (a new task: the series' own length); the model reads the recent part
    hours = icu_windows(params.data).get(task, int(pd.to_numeric(frame["hour"]).max()) + 1 if len(frame) else 1)
    item = dict(zip(("clinical", "clinical_mask"), standardise_clinical(
        to_grid(frame, hours, duplicates=params.data.gate.clinical_duplicates))))
    if static is not None:
        vectors = static_vectors(static, Path(where))
        item["static"], item["static_mask"] = next(iter(vectors.values()))
    return item


def _records(value, required: tuple[str, ...], i: int, column: str, key: str) -> pd.DataFrame:
    if not isinstance(value, list) or not value or not all(isinstance(r, dict) for r in value):
        raise QueryError(i, column, f"{key} must be a non-empty list of objects with {list(required)} (+ unit)")
    frame = pd.DataFrame(value)
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise QueryError(i, column, f"{key} lacks {missing}")
    return frame.assign(sample_id="query")


def _json(value: str, i: int, column: str):
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise QueryError(i, column, f"not valid JSON ({exc})") from None


def _question(row: dict, spec, i: int) -> dict:
    from fedkim.data.formats.text import read_jsonl

    if present(row.get("question")):
        options = listed(row["options"]) if present(row.get("options")) else list(spec.answers)
        choices = listed(row["choices"]) if present(row.get("choices")) else None
        if choices is not None and len(choices) != len(options):
            raise QueryError(i, "choices", f"{len(choices)} choice text(s) for {len(options)} option(s)")
        return {"question": str(row["question"]), "options": options, "choices": choices}
    column, value = "text_path", row.get("text_path")
    if not present(value):
        raise QueryError(i, "question", f"task {spec.name!r} needs its question in column 'question'")
    questions = read_jsonl(allowed_path(str(value), i, column))
    sample = row.get("sample_id")
    if sample not in questions:
        raise QueryError(i, column, f"{value} has no question for sample {sample!r}")
    record = questions[sample]
    choices = record.get("choices")
    return {"question": record["question"], "options": list(record["options"]),
            "choices": [choices[o] for o in record["options"]] if choices else None}


_READERS = {"image": _image, "ecg": _ecg, "clinical": _clinical}
