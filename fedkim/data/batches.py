"""Batches for the site and the server alike: one task's samples from a site folder (or several pooled) shaped by
the params, their loader, the ICU windows each clinical task observes, and moving a batch to the device."""

from __future__ import annotations

from pathlib import Path
from typing import Collection

import torch
from torch.utils.data import ConcatDataset, DataLoader

from fedkim.config import DataParams, SiteTrainingParams
from fedkim.data.formats.clinical import task_windows
from fedkim.data.loaders import DecodedCache, SiteDataset, collate


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def icu_windows(data: DataParams) -> dict[str, int]:
    """Hours of ICU series each clinical task observes (sepsis: twice the mortality window, as generated)."""
    return task_windows(data.icu_hours)


def task_dataset(site_dirs: Path | list[Path], task: str, split: str | None, p: SiteTrainingParams,
                 data: DataParams, limit: int | None = None, exclude: Collection[str] = ()):
    """One task's samples from one site, or from several pooled (the centralised oracle), shaped by params;
    `exclude`: sample ids the data gate quarantined."""
    parts = []
    for d in ([site_dirs] if isinstance(site_dirs, (str, Path)) else site_dirs):
        part = SiteDataset(d, split=split, tasks=[task], image_size=p.image_input, ecg_hz=p.ecg_hz,
                           ecg_seconds=data.ecg_seconds, hours=icu_windows(data), exclude=exclude,
                           duplicates=data.gate.clinical_duplicates)
        if limit is not None and len(part) > limit:
            part.index = part.index.iloc[:limit].reset_index(drop=True)
        parts.append(part)
    return parts[0] if len(parts) == 1 else ConcatDataset(parts)


def task_loader(site_dirs: Path | list[Path], task: str, split: str, p: SiteTrainingParams, data: DataParams, *,
                shuffle: bool, seed: int, cache_mb: float = 0, exclude: Collection[str] = ()) -> DataLoader:
    """cache_mb > 0: keep decoded samples in memory (up to that many MB) for loaders read for several epochs."""
    generator = torch.Generator().manual_seed(seed)
    dataset = task_dataset(site_dirs, task, split, p, data, exclude=exclude)
    if cache_mb > 0:
        dataset = DecodedCache(dataset, cache_mb)
    return DataLoader(dataset, batch_size=p.batch_size, shuffle=shuffle, collate_fn=collate, generator=generator)
