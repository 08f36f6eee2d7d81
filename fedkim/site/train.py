"""Local training at one hospital: start from the global model, train each held modality's encoder and heads on
the site's train split (modalities in turn, as the reference code), report validation metrics.

AdamW, gradient clipping, bf16 autocast on CUDA, optional FedProx proximal term on the parameters being trained.
With site.privacy.enabled: differential privacy through Opacus (fedkim.site.privacy), in float32.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Collection

import numpy as np
import torch
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score
from torch.utils.data import DataLoader

from fedkim.config import DataParams, SiteTrainingParams
from fedkim.data.batches import pick_device, task_loader, to_device
from fedkim.data.catalogue import catalogue_of
from fedkim.data.siteformat import read_index, read_manifest
from fedkim.progress import Progress
from fedkim.site import privacy as dp
from fedkim.site.model import SiteModel, load_subset

log = logging.getLogger(__name__)


@dataclass
class LocalResult:
    site_id: str
    state_dict: dict[str, torch.Tensor]
    sample_counts: dict[str, int]  # modality -> training samples used
    task_counts: dict[str, int]
    metrics: dict[str, dict[str, float]]  # task -> validation metrics
    seconds: float
    data_fingerprint: str = ""
    losses: list[float] = field(default_factory=list)
    privacy: dict | None = None  # ε of this round and cumulative, δ, accountant, noise per task (DP only)


def train_site(site_dir: str | Path | list[Path], global_state: dict[str, torch.Tensor], p: SiteTrainingParams,
               data: DataParams, *, seed: int = 0, progress: bool = False,
               only_tasks: list[str] | None = None, exclude: Collection[str] = (),
               ledger: dp.PrivacyLedger | None = None) -> LocalResult:
    """Train at one site; given a list of site folders, train on their data pooled (the centralised oracle).
    `only_tasks` restricts training to those tasks (a probe of one modality's encoder); `exclude` names the
    samples the data gate quarantined, left out of training and validation. With DP, `ledger` is the site's
    record of its spent budget (default: site.privacy.ledger, site.privacy.epsilon_max): PrivacyBudgetError before
    any training when this round would exceed it; the completed training is recorded in it."""
    if isinstance(site_dir, (list, tuple)):
        import pandas as pd

        site_dir = [Path(d) for d in site_dir]
        site_id, fingerprint = "pooled", ""
        index = pd.concat([read_index(d) for d in site_dir], ignore_index=True)
    else:
        site_dir = Path(site_dir)
        manifest = read_manifest(site_dir)
        site_id, fingerprint = manifest.site_id, manifest.fingerprint
        index = read_index(site_dir)
    if exclude:
        index = index[~index["sample_id"].isin(list(exclude))]
    started = time.perf_counter()
    catalogue = catalogue_of(data)
    tasks = [t for t in catalogue.train if (index["task"] == t).any() and (index[index.task == t].split == "train").any()
             and (only_tasks is None or t in only_tasks)]
    modalities = sorted({catalogue[t].modality for t in tasks})
    device = pick_device(p.device)
    model = SiteModel(modalities, p, data, seed=seed)
    load_subset(model, global_state)
    model.to(device)
    anchor = {k: v.detach().clone().to(device) for k, v in model.state_dict().items()} if p.fedprox_mu > 0 else None

    task_counts = {t: int(((index.task == t) & (index.split == "train")).sum()) for t in tasks}
    sample_counts = {m: sum(n for t, n in task_counts.items() if catalogue[t].modality == m) for m in modalities}
    private = p.privacy.enabled
    if private:
        ledger = ledger or dp.PrivacyLedger(p.privacy, site_id)
        releases = dp.plan_releases(task_counts, p)
        report = ledger.check(releases)  # refuses before anything is trained
        model, net = dp.private_model(model)
    else:
        net = model
    losses: list[float] = []
    augment = torch.Generator().manual_seed(seed + 7) if p.image_augment else None
    steps = p.epochs * sum(-(-n // p.batch_size) for n in task_counts.values())
    with Progress(f"{site_id} training", steps, logger=log, bar=progress) as bar:
        for modality in modalities:
            modality_tasks = [t for t in tasks if catalogue[t].modality == modality]
            params = [*model.encoders[modality].parameters(),
                      *(q for t in modality_tasks for q in model.heads[t].parameters())]
            optimizer = torch.optim.AdamW(params, lr=p.lr, weight_decay=p.weight_decay)
            loaders = {t: task_loader(site_dir, t, "train", p, data, shuffle=True, seed=seed, exclude=exclude,
                                      cache_mb=p.decode_cache_mb / len(modality_tasks)) for t in modality_tasks}
            if private:
                optimizer = dp.private_optimizer(optimizer, p, seed)
                loaders = {t: dp.poisson_loader(loader, seed + i) for i, (t, loader) in enumerate(loaders.items())}
            model.train()
            for epoch in range(p.epochs):
                epoch_losses = []
                for task, loader in loaders.items():
                    if private:
                        dp.use_release(optimizer, {t: model.heads[t] for t in modality_tasks}, task, releases[task])
                    for batch in loader:
                        if private and len(batch["label"]) == 0:  # Poisson sampling drew nobody: nothing to fit
                            continue
                        if augment is not None and "image" in batch:
                            batch["image"] = augment_images(batch["image"], augment)
                        loss = _step(net, optimizer, to_device(batch, device), task, params, p, anchor)
                        losses.append(loss)
                        epoch_losses.append(loss)
                        bar.advance(description=f"{modality} epoch {epoch + 1}/{p.epochs} "
                                                f"loss {np.mean(epoch_losses):.3f}")
    for head in model.heads.values():
        head.requires_grad_(True)
    metrics = {t: evaluate_head(model, site_dir, t, p, data, device, exclude=exclude) for t in tasks}
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if private:
        state = dp.standard_state(state)
        ledger.record(report)
    return LocalResult(site_id, state, sample_counts, task_counts, metrics,
                       time.perf_counter() - started, fingerprint, losses, report if private else None)


def augment_images(images: torch.Tensor, generator: torch.Generator, shift: float = 0.1, degrees: float = 6.0,
                   gamma: float = 0.25) -> torch.Tensor:
    """Label-preserving jitter of a (B, 1, S, S) batch in [0, 1]: shift (fraction of the half-width), rotation and
    gamma, as positioning and exposure vary between patients and sites. No flips: which side a finding lies on is
    something the zero-shot questions ask."""
    n = images.shape[0]
    angle = (torch.rand(n, generator=generator) * 2 - 1) * degrees * torch.pi / 180
    move = (torch.rand(n, 2, generator=generator) * 2 - 1) * shift
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos, -sin, move[:, 0]], 1), torch.stack([sin, cos, move[:, 1]], 1)], 1)
    grid = torch.nn.functional.affine_grid(theta, list(images.shape), align_corners=False)
    moved = torch.nn.functional.grid_sample(images, grid, padding_mode="border", align_corners=False)
    power = torch.exp((torch.rand(n, 1, 1, 1, generator=generator) * 2 - 1) * gamma)
    return moved.clamp(0, 1) ** power


def _step(model, optimizer, batch, task, params, p: SiteTrainingParams, anchor) -> float:
    optimizer.zero_grad(set_to_none=True)
    private = isinstance(optimizer, dp.DPOptimizer)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=batch["label"].is_cuda and not private):
        logits = model(batch, task)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), batch["label"].float())
    if anchor is not None:  # FedProx: stay close to the global model on what this step trains
        named = dict(model.named_parameters())
        trained = {id(q) for q in params}
        prox = sum(((q - anchor[k]) ** 2).sum() for k, q in named.items() if id(q) in trained)
        loss = loss + 0.5 * p.fedprox_mu * prox
    loss.backward()
    if not private:  # DP clips each sample's gradient instead
        torch.nn.utils.clip_grad_norm_(params, p.grad_clip)
    if private:
        dp.fill_unused(optimizer)
    optimizer.step()
    return float(loss.detach())


@torch.no_grad()
def predict(model: SiteModel, loader: DataLoader, task: str, device) -> tuple[np.ndarray, np.ndarray]:
    model.eval()
    scores, labels = [], []
    for batch in loader:
        batch = to_device(batch, device)
        scores.append(torch.sigmoid(model(batch, task).float()).cpu().numpy())
        labels.append(batch["label"].cpu().numpy())
    return np.concatenate(scores), np.concatenate(labels)


def binary_metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    predicted = (scores >= 0.5).astype(int)
    out = {"accuracy": float(accuracy_score(labels, predicted)),
           "f1": float(f1_score(labels, predicted, zero_division=0)), "n": int(len(labels))}
    out["auroc"] = float(roc_auc_score(labels, scores)) if len(set(labels.tolist())) == 2 else float("nan")
    return out


def evaluate_head(model, site_dir, task, p, data, device, split: str = "val",
                  exclude: Collection[str] = ()) -> dict[str, float]:
    loader = task_loader(site_dir, task, split, p, data, shuffle=False, seed=0, exclude=exclude)
    if len(loader.dataset) == 0:
        return {}
    scores, labels = predict(model, loader, task, device)
    return binary_metrics(labels, scores)
