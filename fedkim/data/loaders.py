"""torch Datasets over a site data directory, shared by site training, the server and evaluation.

Files are read from disk when an item is requested (clinical Parquet files once per file, then kept), and
brought to one shape per modality: images resized to `image_size`, ECGs cut to their first `ecg_seconds`,
resampled to `ecg_hz` and zero-padded when shorter, ICU series converted to canonical units and gridded to `hours`
with a measurement mask (several values in one cell combined by `duplicates`), plus the stay's static covariates
where the site has clinical/static.parquet. Samples the data gate quarantined are left out (`exclude`).
"""

from __future__ import annotations

from math import gcd
from pathlib import Path
from typing import Collection, Iterable

import numpy as np
import pandas as pd
import torch
from PIL import Image
from scipy.signal import resample_poly
from torch.utils.data import Dataset

from fedkim.data.formats.clinical import (STATIC, STATIC_FILE, VARIABLES, Duplicates, read_long, read_static,
                                          to_canonical, to_grid)
from fedkim.data.formats.ecg import read_ecg
from fedkim.data.formats.image import read_image
from fedkim.data.formats.text import read_jsonl
from fedkim.data.siteformat import read_index, resolve
from fedkim.data.synth.icu import BASELINE

_MEAN = np.array([BASELINE[v][0] for v in VARIABLES], dtype=np.float32)
_SCALE = np.array([BASELINE[v][1] * 2 for v in VARIABLES], dtype=np.float32)
_STATIC_MEAN = np.array([STATIC[v][3] for v in STATIC], dtype=np.float32)
_STATIC_SCALE = np.array([STATIC[v][4] for v in STATIC], dtype=np.float32)


def load_image(path: Path, size: int) -> torch.Tensor:
    """(1, size, size) float in [0, 1]."""
    pixels = read_image(path)
    if pixels.shape != (size, size):
        pixels = np.asarray(Image.fromarray(pixels).resize((size, size), Image.BILINEAR), dtype=np.float32)
    return torch.from_numpy(np.array(pixels, dtype=np.float32))[None]


def load_ecg(path: Path, hz: int, seconds: float) -> torch.Tensor:
    """(12, hz*seconds) float in mV: the record's first `seconds` (read_ecg's window), resampled, zero-padded at
    the end when shorter."""
    record = read_ecg(path, seconds)
    signal = record.signal.T
    fs = int(round(record.fs))
    if fs != hz:
        g = gcd(fs, hz)
        signal = resample_poly(signal, hz // g, fs // g, axis=1)
    n = int(round(hz * seconds))
    out = np.zeros((12, n), dtype=np.float32)
    out[:, : min(n, signal.shape[1])] = signal[:, :n]
    return torch.from_numpy(out)


def standardise_clinical(grid: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(hours, variables) with NaN -> (values standardised with population constants, 0 where missing; mask)."""
    mask = ~np.isnan(grid)
    values = np.where(mask, (grid - _MEAN) / _SCALE, 0.0).astype(np.float32)
    return torch.from_numpy(values), torch.from_numpy(mask.astype(np.float32))


def static_vectors(frame: pd.DataFrame, path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """clinical/static.parquet -> sample id -> (standardised covariates, mask), in STATIC order; covariates
    converted to canonical units (an unknown unit is a FormatError), unknown covariates ignored."""
    frame = to_canonical(frame, path)
    frame = frame[frame["variable"].isin(list(STATIC))]
    column = {v: i for i, v in enumerate(STATIC)}
    out = {}
    for sample, rows in frame.groupby("sample_id"):
        values = np.full(len(STATIC), np.nan, dtype=np.float32)
        values[rows["variable"].map(column).to_numpy()] = pd.to_numeric(rows["value"], errors="coerce")
        mask = ~np.isnan(values)
        standard = np.where(mask, (values - _STATIC_MEAN) / _STATIC_SCALE, 0.0).astype(np.float32)
        out[str(sample)] = (torch.from_numpy(standard), torch.from_numpy(mask.astype(np.float32)))
    return out


class SiteDataset(Dataset):
    """One item per index row: its inputs (whatever its modality needs) plus task, label and answer.

    Item keys: sample_id, task, modality, split, label (int, -1 for choice tasks), answer, and where present
    image (1,S,S), ecg (12,T), clinical (H,V) with clinical_mask (H,V), static (C,) with static_mask (C,) (sites
    with clinical/static.parquet), question and options. A clinical sample without rows reads as all-missing.
    """

    modality_filter: tuple[str, ...] | None = None

    def __init__(self, site_dir: str | Path, *, split: str | Iterable[str] | None = None,
                 tasks: Iterable[str] | None = None, image_size: int = 64, ecg_hz: int = 250,
                 ecg_seconds: float = 10.0, hours: int | dict[str, int] | None = None,
                 exclude: Collection[str] = (), duplicates: Duplicates = "mean"):
        self.site_dir = Path(site_dir)
        index = read_index(self.site_dir)
        if exclude:
            index = index[~index["sample_id"].isin(list(exclude))]
        if split is not None:
            index = index[index["split"].isin([split] if isinstance(split, str) else list(split))]
        if tasks is not None:
            index = index[index["task"].isin(list(tasks))]
        if self.modality_filter is not None:
            index = index[index["modality"].isin(self.modality_filter)]
        self.index = index.reset_index(drop=True)
        self.image_size, self.ecg_hz, self.ecg_seconds, self.hours = image_size, ecg_hz, ecg_seconds, hours
        self.duplicates = duplicates
        self._clinical: dict[str, dict[str, pd.DataFrame]] = {}
        self._static: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None  # read on first use
        self._has_static = False
        self._text: dict[str, dict[str, dict]] = {}

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        row = self.index.iloc[i]
        label = row["label"]
        item = {
            "sample_id": row["sample_id"], "task": row["task"], "modality": row["modality"], "split": row["split"],
            "label": -1 if pd.isna(label) else int(label), "answer": row["answer"],
        }
        if isinstance(row["image_path"], str):
            item["image"] = load_image(resolve(self.site_dir, row["image_path"]), self.image_size)
        if isinstance(row["ecg_path"], str):
            item["ecg"] = load_ecg(resolve(self.site_dir, row["ecg_path"]), self.ecg_hz, self.ecg_seconds)
        if isinstance(row["clinical_path"], str):
            item["clinical"], item["clinical_mask"] = self._clinical_item(row)
            static = self._static_item(row["sample_id"])
            if static is not None:
                item["static"], item["static_mask"] = static
        if isinstance(row["text_path"], str):
            question = self._question(row)
            item["question"], item["options"] = question["question"], list(question["options"])
            choices = question.get("choices")  # lettered multiple choice: each label's text, in option order
            item["choices"] = [choices[o] for o in question["options"]] if choices else None
        return item

    def _clinical_item(self, row) -> tuple[torch.Tensor, torch.Tensor]:
        path = row["clinical_path"]
        if path not in self._clinical:
            frame = read_long(resolve(self.site_dir, path))
            self._clinical[path] = dict(tuple(frame.groupby("sample_id")))
        rows = self._clinical[path].get(row["sample_id"])
        if rows is None:  # the gate quarantines it by default (clinical.empty_sample); read as all-missing
            rows = pd.DataFrame({"sample_id": [], "hour": [], "variable": [], "value": []})
        rows = to_canonical(rows, self.site_dir / path)
        hours = self.hours if isinstance(self.hours, int) else (self.hours or DEFAULT_HOURS).get(
            row["task"], int(rows["hour"].max()) + 1 if len(rows) else 1)
        return standardise_clinical(to_grid(rows, hours, duplicates=self.duplicates))

    def _static_item(self, sample_id: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """None when the site has no static covariates file; zeros with an empty mask for a sample it lacks."""
        if self._static is None:
            path = self.site_dir / STATIC_FILE
            self._static = static_vectors(read_static(path), path) if path.is_file() else {}
            self._has_static = path.is_file()
        if not self._has_static:
            return None
        empty = (torch.zeros(len(STATIC)), torch.zeros(len(STATIC)))
        return self._static.get(sample_id, empty)

    def question_at(self, i: int) -> dict | None:
        """Sample i's question record (question, options, ...) without loading its other inputs; None when the
        sample has no text."""
        row = self.index.iloc[i]
        return self._question(row) if isinstance(row["text_path"], str) else None

    def _question(self, row) -> dict:
        path = row["text_path"]
        if path not in self._text:
            self._text[path] = read_jsonl(resolve(self.site_dir, path))
        return self._text[path][row["sample_id"]]


# Window per task at the default data.icu_hours (pass `hours` to follow another setting).
DEFAULT_HOURS = {"mortality": 24, "sepsis": 48}


class ImageDataset(SiteDataset):
    modality_filter = ("image", "image+text")


class EcgDataset(SiteDataset):
    modality_filter = ("ecg", "ecg+text")


class ClinicalDataset(SiteDataset):
    modality_filter = ("clinical",)


class TextDataset(SiteDataset):
    modality_filter = ("text",)


class DecodedCache(Dataset):
    """A dataset whose items are kept after their first read, up to a memory budget; past it, items are read again
    on every access. Local training reads every sample once per epoch, and decoding (WFDB records resampled,
    DICOM/PNG radiographs resized) costs more than the small encoders' steps: 35 of site-a's 41 s on the 2-core
    CPU at 20 epochs. Items are deterministic, so training on cached items equals training on fresh ones."""

    def __init__(self, dataset: Dataset, budget_mb: float):
        self.dataset = dataset
        self.budget = int(budget_mb * 2**20)
        self.used = 0  # bytes of the tensors held
        self._items: dict[int, dict] = {}

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        item = self._items.get(i)
        if item is None:
            item = self.dataset[i]
            size = sum(v.nbytes for v in item.values() if isinstance(v, torch.Tensor))
            if self.used + size <= self.budget:
                self._items[i] = item
                self.used += size
        return dict(item)  # a caller may rebind keys without touching the kept item

    @property
    def cached(self) -> int:
        return len(self._items)


def collate(items: list[dict]) -> dict:
    """Stack tensors, keep strings and lists as lists. A batch holds one modality: group by task to batch.
    Pooled sites with and without static covariates: the samples without read as all-missing covariates."""
    if any("static" in item for item in items) and not all("static" in item for item in items):
        empty = {"static": torch.zeros(len(STATIC)), "static_mask": torch.zeros(len(STATIC))}
        items = [item if "static" in item or "clinical" not in item else {**item, **empty} for item in items]
    keys = set(items[0])
    if any(set(item) != keys for item in items):
        modalities = sorted({item["modality"] for item in items})
        raise ValueError(f"cannot batch samples of different modalities {modalities}; batch one task at a time")
    batch: dict = {}
    for key in items[0]:
        values = [item[key] for item in items]
        if isinstance(values[0], torch.Tensor):
            batch[key] = torch.stack(values)
        elif key == "label":
            batch[key] = torch.tensor(values, dtype=torch.long)
        else:
            batch[key] = values
    return batch

