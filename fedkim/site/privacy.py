"""Differential privacy of a site's local training, with Opacus: per-sample clipping and Gaussian noise
(DPOptimizer over GradSampleModule), Poisson-sampled batches (DPDataLoader), an accountant (RDP or PRV) that
turns what was released into ε for the site's δ, and a ledger the site keeps of what it has spent.

Sample-level DP per training task: each task's samples are its own (a sample is one row of the site index), so
one round's tasks compose in parallel and the site's ε is the largest of its tasks' ε, each task's noise set so
that it reaches `epsilon` in one round. Across rounds each task's releases compose (the accountant's history).
Models Opacus cannot wrap as they are (nn.MultiheadAttention in the ICU encoder) go through its ModuleValidator;
parameters outside its known layers (DeiT's tokens, the ECG lead embedding) get per-sample gradients from its
functorch fallback. Packages keep nn.MultiheadAttention's keys (standard_state), so DP and non-DP sites aggregate.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from opacus import GradSampleModule
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.data_loader import DPDataLoader
from opacus.layers import DPMultiheadAttention
from opacus.optimizers import DPOptimizer
from opacus.validators import ModuleValidator
from torch import nn

from fedkim.config import SiteTrainingParams
from fedkim.privacy_params import PrivacyParams

QKV = ("qlinear", "klinear", "vlinear")  # opacus' DPMultiheadAttention: one Linear each where MHA packs them
# RDP orders: Opacus' defaults stop at 63, where small datasets (large q) and many rounds still find their optimum
RDP_ALPHAS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [80, 128, 256, 512, 1024]
# Opacus' hooks on a model whose inputs need no gradient: torch's notice, not a fault
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with respect "
                                          "to module outputs", category=UserWarning)


class PrivacyBudgetError(RuntimeError):
    """A site that would spend more than its budget refuses to train; the message names the site and the figures."""


@dataclass(frozen=True)
class TaskRelease:
    """What one task's training releases in a round: noise multiplier σ, sampling rate q, and steps."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    def as_list(self) -> list:
        return [self.noise_multiplier, self.sample_rate, self.steps]


def plan_releases(task_counts: Mapping[str, int], p: SiteTrainingParams) -> dict[str, TaskRelease]:
    """The noise of each task so that one round of its local training reaches site.privacy.epsilon."""
    privacy, plan = p.privacy, {}
    for task, n in task_counts.items():
        rate, steps = min(1.0, p.batch_size / n), p.epochs * math.ceil(n / p.batch_size)
        sigma = get_noise_multiplier(target_epsilon=privacy.epsilon, target_delta=privacy.delta, sample_rate=rate,
                                     steps=steps, accountant=privacy.accountant, **_orders(privacy))
        plan[task] = TaskRelease(float(sigma), rate, steps)
    return plan


def epsilon_of(history: Mapping[str, list], privacy: PrivacyParams) -> float:
    """ε for δ of per-task histories [[σ, q, steps], ...]: the largest task's (their samples are disjoint)."""
    spent = 0.0
    for releases in history.values():
        accountant = create_accountant(privacy.accountant)
        accountant.history = [tuple(r) for r in releases]
        spent = max(spent, float(accountant.get_epsilon(delta=privacy.delta, **_orders(privacy))))
    return spent


def _orders(privacy: PrivacyParams) -> dict:
    return {"alphas": RDP_ALPHAS} if privacy.accountant == "rdp" else {}


class PrivacyLedger:
    """A site's record of every round it trained with DP (`<ledger>/<site>.json`): kept at the site, never uploaded.
    Every completed training counts, uploaded or not (the accountant's rule: whatever could have been released)."""

    def __init__(self, privacy: PrivacyParams, site_id: str, *, epsilon_max: float | None = None,
                 round_id: str = ""):
        self.privacy, self.site_id, self.round_id = privacy, site_id, str(round_id)
        self.epsilon_max = epsilon_max if epsilon_max is not None else privacy.epsilon_max
        self.path = Path(privacy.ledger) / f"{site_id}.json"

    def rounds(self) -> list[dict]:
        if not self.path.exists():
            return []
        try:
            entries = json.loads(self.path.read_text())["rounds"]
            assert isinstance(entries, list)
            return entries
        except (ValueError, KeyError, TypeError, AssertionError):
            raise PrivacyBudgetError(f"{self.site_id}: privacy ledger {self.path} is unreadable; a site that cannot "
                                     f"count what it spent does not train (restore it from a backup)") from None

    def history(self) -> dict[str, list]:
        history: dict[str, list] = {}
        for entry in self.rounds():
            for task, release in entry["tasks"].items():
                history.setdefault(task, []).append(release)
        return history

    def check(self, plan: Mapping[str, TaskRelease]) -> dict:
        """ε of this round and the cumulative ε after it; PrivacyBudgetError when that exceeds the budget."""
        before = self.history()
        after = {t: [*before.get(t, []), *([plan[t].as_list()] if t in plan else [])] for t in {*before, *plan}}
        spent, total = epsilon_of(before, self.privacy), epsilon_of(after, self.privacy)
        this_round = epsilon_of({t: [r.as_list()] for t, r in plan.items()}, self.privacy)
        if total > self.epsilon_max:
            raise PrivacyBudgetError(
                f"{self.site_id}: privacy budget exhausted: ε spent {spent:.2f} + this round {this_round:.2f} would "
                f"make {total:.2f} > epsilon_max {self.epsilon_max:g} (δ {self.privacy.delta:g}); the site does "
                f"not train")
        return {"epsilon_round": this_round, "epsilon_total": total, "epsilon_spent_before": spent,
                "epsilon_max": self.epsilon_max, "delta": self.privacy.delta, "accountant": self.privacy.accountant,
                "max_grad_norm": self.privacy.max_grad_norm,
                "tasks": {t: r.as_list() for t, r in sorted(plan.items())}}

    def record(self, report: Mapping) -> None:
        """Append a completed training (atomic write: the ledger is never half written)."""
        entries = [*self.rounds(), {"round_id": self.round_id, "tasks": report["tasks"],
                                    "epsilon_round": report["epsilon_round"],
                                    "epsilon_total": report["epsilon_total"]}]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"site_id": self.site_id, "delta": self.privacy.delta,
                                   "accountant": self.privacy.accountant, "rounds": entries}, indent=2))
        os.replace(tmp, self.path)


# ------------------------------------------------------------------------------------------------ training
class BatchFirstDPMultiheadAttention(DPMultiheadAttention):
    """Opacus' DPMultiheadAttention for batch-first inputs, computing what nn.MultiheadAttention computes. Its own
    batch-first path (opacus 1.6) hands out_proj the heads' outputs reshaped without moving the heads axis,
    which mixes heads and positions; a pre-hook on out_proj puts them back. The path itself stays batch-first:
    Opacus reads each Linear's per-sample gradients along the first axis."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.out_proj.register_forward_pre_hook(self._heads_in_place)

    def _heads_in_place(self, _module, args):
        (x,) = args  # memory laid out (batch, head, position, head_dim), viewed as (batch, position, embed)
        b, t, e = x.shape
        return (x.reshape(b, self.num_heads, t, e // self.num_heads).transpose(1, 2).reshape(b, t, e),)


def _dp_attention(module: nn.MultiheadAttention) -> DPMultiheadAttention:
    attention = BatchFirstDPMultiheadAttention(
        module.embed_dim, module.num_heads, dropout=module.dropout, bias=module.in_proj_bias is not None,
        add_bias_kv=module.bias_k is not None, add_zero_attn=module.add_zero_attn, kdim=module.kdim,
        vdim=module.vdim, batch_first=True)
    attention.load_state_dict(module.state_dict())  # Opacus' loader unpacks nn.MultiheadAttention's weights
    return attention


def private_model(model: nn.Module) -> tuple[nn.Module, GradSampleModule]:
    """Opacus' own fixes (nn.MultiheadAttention -> DPMultiheadAttention, weights carried over), checked, then
    wrapped for per-sample gradients. Returns (the fixed model, its GradSampleModule)."""
    fixed = ModuleValidator.fix(model)  # a fixed copy: `model` keeps its own modules
    for name, module in list(model.named_modules()):  # the batch-first attentions again, computed as they were
        if isinstance(module, nn.MultiheadAttention) and module.batch_first:
            parent, _, leaf = name.rpartition(".")
            setattr(fixed.get_submodule(parent), leaf, _dp_attention(module))
    ModuleValidator.validate(fixed, strict=True)
    return fixed, GradSampleModule(fixed, loss_reduction="mean")


def private_optimizer(optimizer: torch.optim.Optimizer, p: SiteTrainingParams, seed: int) -> DPOptimizer:
    """Clips each sample's gradient to max_grad_norm and adds noise (its multiplier is set per task: use_release)."""
    return DPOptimizer(optimizer, noise_multiplier=0.0, max_grad_norm=p.privacy.max_grad_norm,
                       expected_batch_size=p.batch_size, loss_reduction="mean",
                       generator=torch.Generator().manual_seed(seed + 11))


def poisson_loader(loader, seed: int) -> DPDataLoader:
    """Each sample joins each batch with probability batch_size / n: the sampling the accountant assumes."""
    return DPDataLoader.from_data_loader(loader, generator=torch.Generator().manual_seed(seed))


def use_release(optimizer: DPOptimizer, heads: Mapping[str, nn.Module], task: str, release: TaskRelease) -> None:
    """Switch a modality's optimizer to one task: its noise, and only its head trainable, so that the other heads
    (no per-sample gradients this step) are neither clipped nor noised; stale per-sample gradients are dropped."""
    for head in heads.values():
        head.requires_grad_(True)
    optimizer.zero_grad(set_to_none=True)
    for name, head in heads.items():
        head.requires_grad_(name == task)
    optimizer.noise_multiplier = release.noise_multiplier


def fill_unused(optimizer: DPOptimizer) -> None:
    """A trained parameter the batch did not reach (the static-covariate projection of a batch without them) has
    zero per-sample gradients; the step still noises it, as DP requires whatever the batch held."""
    samples = [q.grad_sample for q in optimizer.params if getattr(q, "grad_sample", None) is not None]
    if samples:
        for q in optimizer.params:
            if getattr(q, "grad_sample", None) is None:
                q.grad_sample = torch.zeros(samples[0].shape[0], *q.shape, dtype=q.dtype, device=q.device)


def standard_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A fixed model's state under nn.MultiheadAttention's keys (in_proj_weight/bias packs q, k, v)."""
    out, packed = {}, set()
    for key, value in state.items():
        stem, _, tail = key.rpartition(".")
        owner, _, layer = stem.rpartition(".")
        if layer in QKV:
            if (owner, tail) not in packed:
                packed.add((owner, tail))
                out[f"{owner}.in_proj_{tail}"] = torch.cat([state[f"{owner}.{q}.{tail}"] for q in QKV])
        else:
            out[key] = value
    return out
