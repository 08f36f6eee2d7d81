"""Small, valid site directories for tests, written with the real format writers.

    build_site(tmp_path)                                hospital site: lung_opacity, ecg_abnormal, mortality
    build_site(tmp_path, modalities=("image", "text"))  test-role site, test split: + medical_qa, cxr_vqa

Every (task, split, label) gets `n_per_class` samples, so the default (5) passes the default gate
(min_samples_per_class 5, min_samples_per_site 20). `refinalize` rewrites site.yaml after a test edited
the data on purpose; `write_clinical_rows` writes ICU rows as a hospital exports them (a unit column, duplicates).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from fedkim.data.catalogue import load_catalogue
from fedkim.data.formats.clinical import VARIABLES, write_long
from fedkim.data.formats.ecg import LEADS, write_wfdb
from fedkim.data.formats.image import write_dicom, write_png
from fedkim.data.formats.text import write_jsonl
from fedkim.data.siteformat import finalize_site, read_manifest, write_index

TASKS = load_catalogue().tasks  # the shipped catalogue
CLINICAL_N = 6  # stays per (task, split, label) of the clinical test sites: one above the default minimum

TRAIN_TASK = {"image": "lung_opacity", "ecg": "ecg_abnormal", "clinical": "mortality"}
VITALS = ("heart_rate", "sbp", "dbp", "resp_rate", "spo2", "temperature")  # hourly; labs every 6 h
HOURS = 24
ECG_FS, ECG_SECONDS = 250, 10


def build_site(tmp_dir: Path, *, n_per_class: int = 5, image_format: str = "png",
               modalities: tuple[str, ...] = ("image", "ecg", "clinical"), site_id: str = "site-t",
               role: str | None = None, splits: tuple[str, ...] | None = None, seed: int = 0) -> Path:
    """Write a valid site under tmp_dir/site_id and return its path."""
    role = role or ("test" if "text" in modalities else "hospital")
    splits = splits or (("test",) if role == "test" else ("train", "val"))
    site = Path(tmp_dir) / site_id
    for sub in ("images", "ecg", "clinical", "text"):
        (site / sub).mkdir(parents=True, exist_ok=True)
    ext = "dcm" if image_format == "dicom" else "png"
    rows: list[dict] = []
    for modality in (m for m in modalities if m in TRAIN_TASK):
        rows += _binary_rows(TRAIN_TASK[modality], splits, n_per_class, ext)
    if "text" in modalities:
        rows += _choice_rows("medical_qa", 2 * n_per_class, ext)
        if "image" in modalities:
            rows += _choice_rows("cxr_vqa", 2 * n_per_class, ext)
    index = pd.DataFrame(rows)
    _write_files(site, index, site_id, np.random.default_rng(seed))
    write_index(site, index)
    finalize_site(site, site_id=site_id, role=role, description="test fixture")
    return site


def refinalize(site: Path) -> None:
    """Rewrite site.yaml (fingerprint, counts) after a test changed the data on purpose."""
    manifest = read_manifest(site)
    finalize_site(site, site_id=manifest.site_id, role=manifest.role, description=manifest.description)


def _binary_rows(task: str, splits: tuple[str, ...], n: int, ext: str) -> list[dict]:
    return [_row(f"{task}-{split}-{label}-{i}", task, split, label, "Yes" if label else "No", ext)
            for split in splits for label in (0, 1) for i in range(n)]


def _choice_rows(task: str, n: int, ext: str) -> list[dict]:
    answers = TASKS[task].answers
    return [_row(f"{task}-{i}", task, "test", None, answers[i % len(answers)], ext) for i in range(n)]


def _row(sid: str, task: str, split: str, label: int | None, answer: str, ext: str) -> dict:
    inputs = TASKS[task].inputs
    return {
        "sample_id": sid, "task": task, "modality": TASKS[task].modality, "split": split, "label": label,
        "answer": answer,
        "image_path": f"images/{sid}.{ext}" if "image" in inputs else None,
        "ecg_path": f"ecg/{sid}.hea" if "ecg" in inputs else None,
        "clinical_path": f"clinical/{split}.parquet" if "clinical" in inputs else None,
        "text_path": "text/questions.jsonl" if "text" in inputs else None,
    }


def _write_files(site: Path, index: pd.DataFrame, site_id: str, rng) -> None:
    for sid, rel in zip(index["sample_id"], index["image_path"]):
        if isinstance(rel, str):
            write_image(site / rel, synthetic_image(rng), sample_id=sid, site_id=site_id)
    for rel in index["ecg_path"].dropna():
        write_wfdb((site / rel).with_suffix(""), synthetic_ecg(rng), ECG_FS)
    clinical = index[index["clinical_path"].notna()]
    for rel, group in clinical.groupby("clinical_path"):
        write_long(site / rel, pd.concat([synthetic_vitals(sid, rng) for sid in group["sample_id"]]))
    text = index[index["text_path"].notna()]
    if len(text):
        write_jsonl(site / "text" / "questions.jsonl", [_question(r) for r in text.itertuples()])


def write_image(path: Path, image01: np.ndarray, *, sample_id: str = "s", site_id: str = "site-t") -> None:
    if path.suffix == ".dcm":
        write_dicom(path, image01, sample_id=sample_id, site_id=site_id)
    else:
        write_png(path, image01)


def synthetic_image(rng, side: int = 128) -> np.ndarray:
    """A smooth gradient with noise, in [0, 1]."""
    y, x = np.mgrid[0:side, 0:side] / side
    return np.clip(0.3 + 0.4 * y + 0.1 * np.sin(6 * x) + rng.normal(0, 0.03, (side, side)), 0, 1)


def synthetic_ecg(rng, fs: int = ECG_FS, seconds: float = ECG_SECONDS, leads: int = len(LEADS)) -> np.ndarray:
    """(samples, leads) sinusoids plus noise, about 0.5 mV peak."""
    t = np.arange(int(fs * seconds)) / fs
    phases = rng.uniform(0, 2 * np.pi, leads)
    return 0.5 * np.sin(2 * np.pi * 1.2 * t[:, None] + phases) + rng.normal(0, 0.02, (t.size, leads))


def synthetic_vitals(sample_id: str, rng, hours: int = HOURS) -> pd.DataFrame:
    """Long rows well inside the physiological limits: vitals hourly, labs every 6 hours."""
    rows = []
    for variable, (_, low, high) in VARIABLES.items():
        every = 1 if variable in VITALS else 6
        for hour in range(0, hours, every):
            value = low + (high - low) * rng.uniform(0.35, 0.65)
            rows.append({"sample_id": sample_id, "hour": hour, "variable": variable, "value": value})
    return pd.DataFrame(rows)


def _question(row) -> dict:
    return {"sample_id": row.sample_id, "question": f"Question about {row.sample_id}?",
            "options": list(TASKS[row.task].answers), "answer": row.answer}


CLINICAL_TYPES = {"sample_id": pa.string(), "hour": pa.int16(), "variable": pa.string(), "value": pa.float32(),
                  "unit": pa.string()}


def write_clinical_rows(path: Path, frame: pd.DataFrame) -> None:
    """ICU long rows with whatever columns the frame has (e.g. a unit column), in the format's types."""
    schema = pa.schema([(c, CLINICAL_TYPES[c]) for c in frame.columns])
    pq.write_table(pa.Table.from_pandas(frame, schema=schema, preserve_index=False), path)
