"""Served queries built from a split's real files: each input carried as data (base64 bytes, ECG JSON, clinical
JSON), as a client without access to the server's disk sends it."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pandas as pd
import wfdb

from fedkim.data.formats.clinical import read_long
from fedkim.data.formats.text import read_jsonl
from fedkim.data.siteformat import read_index, resolve


def b64(path: Path) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


def ecg_json(path: Path) -> str:
    """The WFDB record as the JSON ECG form: fs, lead names and the signal in mV (samples × leads)."""
    record = wfdb.rdrecord(str(Path(path).with_suffix("")))
    return json.dumps({"fs": record.fs, "leads": list(record.sig_name), "signal": record.p_signal.tolist()})


def ecg_wfdb(path: Path) -> str:
    stem = Path(path).with_suffix("")
    return json.dumps({"wfdb": {"hea": b64(stem.with_suffix(".hea")), "dat": b64(stem.with_suffix(".dat"))}})


def clinical_json(path: Path, sample_id: str) -> str:
    frame = read_long(path)
    rows = frame[frame["sample_id"] == sample_id].drop(columns="sample_id")
    return json.dumps({"rows": json.loads(rows.to_json(orient="records"))})


def data_query(split_dir: Path, tasks: list[str], n: int, *, ecg_as: str = "json") -> pd.DataFrame:
    """The first n samples of each task in a split (index order, as evaluation reads them), inputs as data."""
    index = read_index(split_dir)
    out = []
    for task in tasks:
        for _, row in index[index["task"] == task].head(n).iterrows():
            query = {"task": task, "sample_id": row["sample_id"], "answer": row["answer"]}
            if isinstance(row["image_path"], str):
                query["image"] = b64(resolve(split_dir, row["image_path"]))
            if isinstance(row["ecg_path"], str):
                path = resolve(split_dir, row["ecg_path"])
                query["ecg"] = ecg_json(path) if ecg_as == "json" else ecg_wfdb(path)
            if isinstance(row["clinical_path"], str):
                query["clinical"] = clinical_json(resolve(split_dir, row["clinical_path"]), row["sample_id"])
            if isinstance(row["text_path"], str):
                record = read_jsonl(resolve(split_dir, row["text_path"]))[row["sample_id"]]
                query |= {"question": record["question"], "options": json.dumps(record["options"])}
                if record.get("choices"):
                    query["choices"] = json.dumps([record["choices"][o] for o in record["options"]])
            out.append(query)
    return pd.DataFrame(out)
