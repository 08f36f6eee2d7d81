"""torch Datasets over a site data directory, shared by site training, the server and evaluation.

Files are read from disk when an item is requested (clinical Parquet files once per file, then kept), and
brought to one shape per modality: images resized to `image_size`, ECGs resampled to `ecg_hz` and cut or
padded to `ecg_seconds`, ICU series gridded to `hours` with a measurement mask.
"""

from __future__ import annotations

from math import gcd
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
import torch
from PIL import Image
from scipy.signal import resample_poly
from torch.utils.data import Dataset

from fedkim.data.formats.clinical import VARIABLES, read_long, to_grid
from fedkim.data.formats.ecg import read_ecg
from fedkim.data.formats.image import read_image
from fedkim.data.formats.text import read_jsonl
from fedkim.data.siteformat import read_index, resolve
from fedkim.data.synth.icu import BASELINE

_MEAN = np.array([BASELINE[v][0] for v in VARIABLES], dtype=np.float32)
_SCALE = np.array([BASELINE[v][1] * 2 for v in VARIABLES], dtype=np.float32)


def load_image(path: Path, size: int) -> torch.Tensor:
    """(1, size, size) float in [0, 1]."""
    pixels = read_image(path)
    if pixels.shape != (size, size):
        pixels = np.asarray(Image.fromarray(pixels).resize((size, size), Image.BILINEAR), dtype=np.float32)
    return torch.from_numpy(np.array(pixels, dtype=np.float32))[None]


def load_ecg(path: Path, hz: int, seconds: float) -> torch.Tensor:
    """(12, hz*seconds) float in mV, resampled and cut or zero-padded at the end."""
    record = read_ecg(path)
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


class SiteDataset(Dataset):
    """One item per index row: its inputs (whatever its modality needs) plus task, label and answer.

    Item keys: sample_id, task, modality, split, label (int, -1 for choice tasks), answer, and where present
    image (1,S,S), ecg (12,T), clinical (H,V) with clinical_mask (H,V), question and options.
    """

    modality_filter: tuple[str, ...] | None = None

    def __init__(self, site_dir: str | Path, *, split: str | Iterable[str] | None = None,
                 tasks: Iterable[str] | None = None, image_size: int = 64, ecg_hz: int = 250,
                 ecg_seconds: float = 10.0, hours: int | dict[str, int] | None = None):
        self.site_dir = Path(site_dir)
        index = read_index(self.site_dir)
        if split is not None:
            index = index[index["split"].isin([split] if isinstance(split, str) else list(split))]
        if tasks is not None:
            index = index[index["task"].isin(list(tasks))]
        if self.modality_filter is not None:
            index = index[index["modality"].isin(self.modality_filter)]
        self.index = index.reset_index(drop=True)
        self.image_size, self.ecg_hz, self.ecg_seconds, self.hours = image_size, ecg_hz, ecg_seconds, hours
        self._clinical: dict[str, dict[str, pd.DataFrame]] = {}
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
        if rows is None:
            raise KeyError(f"{self.site_dir / path}: no rows for sample {row['sample_id']!r}")
        hours = self.hours if isinstance(self.hours, int) else (self.hours or DEFAULT_HOURS).get(
            row["task"], int(rows["hour"].max()) + 1)
        return standardise_clinical(to_grid(rows, hours))

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
    """Stack tensors, keep strings and lists as lists. A batch holds one modality: group by task to batch."""
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

