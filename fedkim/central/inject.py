"""Knowledge injection, once per round: the aggregated encoders go into the central model, then experts, gate,
projectors (and the encoders, by flag) train on the server's public split with warm-up then linear decay.

Seeded and deterministic on CPU; bf16 autocast on CUDA. A checkpoint per round lets a crashed round resume; within
the injection, a step checkpoint every `inject.checkpoint_every` steps (weights, optimizer, schedule, RNG, the
loss curve so far) lets a crash resume from the last one, with the same result as an uninterrupted run on CPU.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from fedkim.central.model import CentralModel
from fedkim.config import DataParams, InjectParams, SiteTrainingParams
from fedkim.data.catalogue import Catalogue, catalogue_of
from fedkim.data.loaders import collate
from fedkim.data.batches import pick_device, task_dataset, to_device
from fedkim.progress import Progress

log = logging.getLogger(__name__)

# The reference code's server order: ECG, clinical, then the image tasks (each in catalogue order).
MODALITY_ORDER = ("ecg", "clinical", "image")


def task_order(catalogue: Catalogue) -> list[str]:
    """The training tasks in the server's order: by MODALITY_ORDER, catalogue order within a modality."""
    return sorted(catalogue.train, key=lambda t: MODALITY_ORDER.index(catalogue[t].modality))


@dataclass
class InjectResult:
    round_id: str
    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)  # task of each step
    seconds: float = 0.0
    resumed: bool = False


def _batches(public_dir: Path, p: InjectParams, site: SiteTrainingParams, data: DataParams, seed: int,
             exclude: Collection[str] = ()):
    """(task, batch) pairs for one pass over the public split, in the configured task order."""
    loaders = {}
    for task in task_order(catalogue_of(data)):
        dataset = task_dataset(public_dir, task, None, site, data, exclude=exclude)
        if len(dataset):
            loaders[task] = DataLoader(dataset, batch_size=p.batch_size, shuffle=True, collate_fn=collate,
                                       generator=torch.Generator().manual_seed(seed + len(loaders)))
    if p.task_order == "sequential":
        return [(task, batch) for task, loader in loaders.items() for batch in loader]
    streams = [[(task, b) for b in loader] for task, loader in loaders.items()]
    return [pair for group in itertools.zip_longest(*streams) for pair in group if pair is not None]


def warmup_decay(total: int, warmup: float):
    warm = max(1, int(round(total * warmup)))
    return lambda step: min((step + 1) / warm, max(0.0, (total - step) / max(1, total - warm)))


def inject(model: CentralModel, public_dir: str | Path, p: InjectParams, site: SiteTrainingParams, data: DataParams,
           *, round_id: str = "0", checkpoint_dir: Path | None = None, progress: bool = False,
           exclude: Collection[str] = ()) -> InjectResult:
    """Train the model's injected parts on the public split (`exclude`: samples its data gate quarantined)."""
    started = time.perf_counter()
    ckpt = Path(checkpoint_dir) / f"inject-{round_id}.pt" if checkpoint_dir else None
    if ckpt is not None and ckpt.is_file():  # resume: this round's injection already finished
        saved = torch.load(ckpt, map_location="cpu", weights_only=False)
        model.load_trainable_state(saved["state"])
        result = saved["result"]
        result.resumed = True
        return result
    torch.manual_seed(p.seed)
    device = pick_device(p.device)
    model.to(device).train()
    model.fm.eval()  # the FM's own dropout stays off: it is frozen
    if model.m3oe is not None:
        model.m3oe.train()
        for layer in model.m3oe.layers.values():
            layer.train()
    params = model.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=p.lr, betas=(0.9, 0.95), weight_decay=p.weight_decay)
    plan = [pair for epoch in range(p.epochs)
            for pair in _batches(Path(public_dir), p, site, data, p.seed + epoch, exclude)]
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_decay(len(plan), p.warmup))
    result = InjectResult(str(round_id))
    steps = ckpt.with_suffix(".steps.pt") if ckpt is not None else None
    start = _resume(steps, model, optimizer, schedule, len(plan)) if steps is not None else None
    if start is not None:
        start, result = start
        log.info("round %s injection resumes after step %d of %d", round_id, start, len(plan))
    with Progress(f"round {round_id} injection", len(plan), logger=log, bar=progress) as bar:
        bar.advance(start or 0)
        for step, (task, batch) in enumerate(plan[start or 0:], start or 0):
            batch = to_device(batch, device)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = model.loss(batch, task, batch["answer"])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, p.grad_clip)
            optimizer.step()
            result.lrs.append(schedule.get_last_lr()[0])
            schedule.step()
            result.losses.append(float(loss.detach()))
            result.tasks.append(task)
            bar.advance(description=f"{task} loss {result.losses[-1]:.3f}")
            if steps is not None and (step + 1) % p.checkpoint_every == 0 and step + 1 < len(plan):
                _save(steps, {"step": step + 1, "total": len(plan), "state": model.trainable_state(),
                              "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                              "rng": torch.get_rng_state(), "result": result})
    model.eval()
    result.seconds = time.perf_counter() - started
    if ckpt is not None:
        _save(ckpt, {"state": model.trainable_state(), "result": result})
        steps.unlink(missing_ok=True)  # the finished injection's checkpoint supersedes the step checkpoint
    return result


def _save(path: Path, payload: dict) -> None:
    """Write atomically: a crash during the write leaves the previous checkpoint, never half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    torch.save(payload, partial)
    partial.rename(path)


def _resume(path: Path, model: CentralModel, optimizer, schedule, total: int) -> tuple[int, InjectResult] | None:
    """(steps done, the result so far) from a step checkpoint of this injection, its states restored; None when
    there is none. A checkpoint of another plan (settings changed since) is set aside, not used."""
    if not path.is_file():
        return None
    saved = torch.load(path, map_location="cpu", weights_only=False)
    if saved.get("total") != total:
        log.warning("%s: a step checkpoint of %s steps, this injection has %d: starting over", path,
                    saved.get("total"), total)
        return None
    model.load_trainable_state(saved["state"])
    optimizer.load_state_dict(saved["optimizer"])
    schedule.load_state_dict(saved["schedule"])
    torch.set_rng_state(saved["rng"])
    saved["result"].resumed = True
    return saved["step"], saved["result"]
