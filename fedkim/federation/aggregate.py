"""Server-side aggregation of accepted knowledge packages into the new global encoders and heads.

Averages are taken **per modality**: a key is averaged over the packages that carry it, each weighted by that
site's `sample_counts[modality of the key]`, so a site without ECG data does not dilute the ECG encoder.
Keys that no package carries keep the global value; non-float tensors (integer buffers such as BatchNorm's
`num_batches_tracked`) always come from the global state. Call these only with packages that passed
`screen_packages`. The weighted strategies (fedavg, fedprox, fedadam) take the counts capped by
`fedkim.federation.weights`; median and trimmed_mean are coordinate-wise and unweighted, robust to a minority of
poisoned sites.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fedkim.data.catalogue import Catalogue
from fedkim.federation.package import PackageManifest, key_modality
from fedkim.federation.weights import capped_shares

Packages = Sequence[tuple[PackageManifest, Mapping[str, torch.Tensor]]]


@dataclass
class ServerOptimizerState:
    """FedAdam's first and second moments, carried from round to round."""

    m: dict[str, torch.Tensor] = field(default_factory=dict)
    v: dict[str, torch.Tensor] = field(default_factory=dict)
    step: int = 0

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        tensors = {f"m.{k}": t.contiguous() for k, t in self.m.items()}
        tensors |= {f"v.{k}": t.contiguous() for k, t in self.v.items()}
        save_file(tensors, str(path), metadata={"step": str(self.step)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> "ServerOptimizerState":
        with safe_open(str(path), framework="pt") as fh:
            step = int((fh.metadata() or {}).get("step", 0))
        tensors = load_file(str(path))
        m = {k[2:]: t for k, t in tensors.items() if k.startswith("m.")}
        v = {k[2:]: t for k, t in tensors.items() if k.startswith("v.")}
        return cls(m, v, step)


@dataclass
class AggregateResult:
    state_dict: dict[str, torch.Tensor]
    contributors: dict[str, list[str]]  # modality -> site ids whose parameters entered the average
    weights: dict[str, dict[str, float]]  # modality -> site id -> normalised weight (sample share)
    optimizer_state: ServerOptimizerState | None = None
    strategy: str = "fedavg"
    hparams: dict[str, Any] = field(default_factory=dict)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # fp16/bf16 sums would lose precision


SiteCounts = Mapping[str, Mapping[str, int]]  # site -> modality -> count (fedkim.federation.weights)


def _holders_by_key(global_state: Mapping[str, torch.Tensor], packages: Packages):
    """(key, [(manifest, value), ...]) for every float key some package carries, after checking the packages."""
    if not packages:
        raise ValueError("no accepted packages to aggregate")
    sites = [manifest.site_id for manifest, _ in packages]
    if len(set(sites)) != len(sites):
        raise ValueError(f"more than one package per site among {sorted(sites)}; screen packages before aggregating")
    for manifest, state in packages:
        unknown = sorted(set(state) - set(global_state))
        if unknown:
            raise ValueError(f"site {manifest.site_id!r}: key(s) {unknown[:5]} not in the global state; "
                             f"screen packages before aggregating")
    for key, ref in global_state.items():
        holders = [(manifest, state[key]) for manifest, state in packages if key in state]
        if ref.is_floating_point() and holders:
            yield key, holders


def weighted_average(global_state: Mapping[str, torch.Tensor], packages: Packages,
                     catalogue: Catalogue | None = None, *, counts: SiteCounts | None = None,
                     max_weight_share: float = 1.0):
    """Per-modality weighted average of the float keys the packages carry: each site weighs by its count of the
    key's modality (`counts`, e.g. capped by `verified_counts`; None: the manifests' sample_counts), no site above
    `max_weight_share` of a key's weight.

    Returns (averages for those keys, modality -> contributing sites, modality -> site -> weight).
    """
    def count(manifest: PackageManifest, modality: str) -> int:
        source = manifest.sample_counts if counts is None else counts.get(manifest.site_id, {})
        return source.get(modality, 0)

    averages: dict[str, torch.Tensor] = {}
    contributors: dict[str, set[str]] = {}
    for key, holders in _holders_by_key(global_state, packages):
        modality = key_modality(key, catalogue)
        if sum(count(manifest, modality) for manifest, _ in holders) <= 0:
            raise ValueError(f"{key}: no positive sample_counts[{modality!r}] among its packages")
        shares = capped_shares({m.site_id: count(m, modality) for m, _ in holders}, max_weight_share)
        acc = torch.zeros(global_state[key].shape, dtype=_acc_dtype(global_state[key].dtype))
        for manifest, value in holders:
            acc += value.to(acc.dtype) * shares[manifest.site_id]
        averages[key] = acc
        contributors.setdefault(modality, set()).update(m.site_id for m, _ in holders)
    by_site = {m.site_id: m for m, _ in packages}
    weights = {modality: dict(sorted(capped_shares({s: count(by_site[s], modality) for s in sites},
                                                   max_weight_share).items()))
               for modality, sites in contributors.items()}
    return averages, {m: sorted(s) for m, s in contributors.items()}, weights


def coordinate_trimmed_mean(global_state: Mapping[str, torch.Tensor], packages: Packages,
                            catalogue: Catalogue | None = None, *, trim: float | None = None):
    """Per coordinate, the mean of the packages' values after dropping the floor(trim x k) lowest and highest of
    the k sites carrying the key; trim=None drops all but the middle one or two: the coordinate-wise median.
    Unweighted: a site's sample count buys it nothing here. Returns what `weighted_average` returns (each
    contributor's nominal weight 1/k)."""
    averages: dict[str, torch.Tensor] = {}
    contributors: dict[str, set[str]] = {}
    for key, holders in _holders_by_key(global_state, packages):
        k = len(holders)
        dropped = (k - 1) // 2 if trim is None else math.floor(trim * k + 1e-9)  # 0.29 x 100 is 28.99...
        stacked = torch.stack([value.to(_acc_dtype(value.dtype)) for _, value in holders])
        averages[key] = stacked.sort(dim=0).values[dropped:k - dropped].mean(dim=0)
        contributors.setdefault(key_modality(key, catalogue), set()).update(m.site_id for m, _ in holders)
    weights = {modality: {s: 1 / len(sites) for s in sorted(sites)} for modality, sites in contributors.items()}
    return averages, {m: sorted(s) for m, s in contributors.items()}, weights


def _assemble(global_state: Mapping[str, torch.Tensor], updated: Mapping[str, torch.Tensor]):
    # Untouched keys are copied so the result never aliases the caller's global tensors.
    return {k: updated[k].to(g.dtype) if k in updated else g.detach().clone()
            for k, g in global_state.items()}


def fedavg(global_state: Mapping[str, torch.Tensor], packages: Packages, *,
           catalogue: Catalogue | None = None, counts: SiteCounts | None = None,
           max_weight_share: float = 1.0) -> AggregateResult:
    """FedAvg (McMahan et al.) with per-modality sample weights (a head weighs by its task's modality in
    `catalogue`; None: the shipped one); `counts` and `max_weight_share` as in `weighted_average`."""
    averages, contributors, weights = weighted_average(global_state, packages, catalogue, counts=counts,
                                                       max_weight_share=max_weight_share)
    return AggregateResult(_assemble(global_state, averages), contributors, weights, strategy="fedavg")


def fedprox(global_state: Mapping[str, torch.Tensor], packages: Packages, *,
            mu: float = 0.0, catalogue: Catalogue | None = None, counts: SiteCounts | None = None,
            max_weight_share: float = 1.0) -> AggregateResult:
    """FedProx (Li et al.): identical to FedAvg on the server.

    The proximal term mu/2 ||w - w_global||^2 acts in the sites' local training (`site.fedprox_mu`); `mu` is
    accepted here only so the round records it.
    """
    result = fedavg(global_state, packages, catalogue=catalogue, counts=counts, max_weight_share=max_weight_share)
    result.strategy, result.hparams = "fedprox", {"mu": mu}
    return result


def fedadam(
    global_state: Mapping[str, torch.Tensor],
    packages: Packages,
    *,
    state: ServerOptimizerState | None = None,
    lr: float = 1e-2,
    beta1: float = 0.9,
    beta2: float = 0.99,
    tau: float = 1e-3,
    catalogue: Catalogue | None = None,
    counts: SiteCounts | None = None,
    max_weight_share: float = 1.0,
) -> AggregateResult:
    """FedAdam (Reddi et al. 2021, Alg. 2): Adam on the pseudo-gradient delta = average - global.

    m = b1 m + (1-b1) delta;  v = b2 v + (1-b2) delta^2;  global += lr m / (sqrt(v) + tau).
    Moments start at 0; no bias correction (as in the paper). Keys that no package carries this round are
    left alone, moments included, so a modality nobody reported does not drift on old momentum.
    """
    averages, contributors, weights = weighted_average(global_state, packages, catalogue, counts=counts,
                                                       max_weight_share=max_weight_share)
    state = ServerOptimizerState() if state is None else state
    m, v = dict(state.m), dict(state.v)
    updated = {}
    for key, avg in averages.items():
        ref = global_state[key]
        g = ref.to(avg.dtype)
        delta = avg - g
        m_prev = m.get(key, torch.zeros_like(delta)).to(delta.dtype)
        v_prev = v.get(key, torch.zeros_like(delta)).to(delta.dtype)
        if m_prev.shape != delta.shape or v_prev.shape != delta.shape:
            raise ValueError(f"{key}: optimizer state shape {tuple(m_prev.shape)} does not match the global "
                             f"{tuple(delta.shape)}")
        m[key] = beta1 * m_prev + (1 - beta1) * delta
        v[key] = beta2 * v_prev + (1 - beta2) * delta.square()
        updated[key] = g + lr * m[key] / (v[key].sqrt() + tau)
    new_state = ServerOptimizerState(m, v, state.step + 1)
    return AggregateResult(_assemble(global_state, updated), contributors, weights, new_state, "fedadam",
                           {"lr": lr, "beta1": beta1, "beta2": beta2, "tau": tau})


def median(global_state: Mapping[str, torch.Tensor], packages: Packages, *,
           catalogue: Catalogue | None = None) -> AggregateResult:
    """Coordinate-wise median (Yin et al. 2018) of the sites carrying each key: one poisoned site out of three
    or more cannot move a coordinate beyond the genuine sites' values."""
    averages, contributors, weights = coordinate_trimmed_mean(global_state, packages, catalogue)
    return AggregateResult(_assemble(global_state, averages), contributors, weights, strategy="median")


def trimmed_mean(global_state: Mapping[str, torch.Tensor], packages: Packages, *, trim_fraction: float = 0.2,
                 catalogue: Catalogue | None = None) -> AggregateResult:
    """Coordinate-wise trimmed mean (Yin et al. 2018): floor(trim_fraction x k) values dropped at each end."""
    if not 0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
    averages, contributors, weights = coordinate_trimmed_mean(global_state, packages, catalogue, trim=trim_fraction)
    return AggregateResult(_assemble(global_state, averages), contributors, weights, strategy="trimmed_mean",
                           hparams={"trim_fraction": trim_fraction})


STRATEGIES = {"fedavg": fedavg, "fedprox": fedprox, "fedadam": fedadam, "median": median,
              "trimmed_mean": trimmed_mean}
WEIGHTING = ("counts", "max_weight_share")  # what the sample-weighted strategies take besides hyperparameters


def aggregate(
    strategy: str,
    global_state: Mapping[str, torch.Tensor],
    packages: Packages,
    *,
    state: ServerOptimizerState | None = None,
    catalogue: Catalogue | None = None,
    counts: SiteCounts | None = None,
    max_weight_share: float = 1.0,
    **hparams: Any,
) -> AggregateResult:
    """Run one named strategy. `state` is FedAdam's optimizer state (the others pass it through untouched);
    `counts` and `max_weight_share` weigh the sample-weighted strategies (the coordinate-wise ones ignore them)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown aggregation strategy {strategy!r}; allowed: {sorted(STRATEGIES)}")
    fn = STRATEGIES[strategy]
    parameters = inspect.signature(fn).parameters
    allowed = [p for p in parameters if p not in ("global_state", "packages", "state", "catalogue", *WEIGHTING)]
    unknown = sorted(set(hparams) - set(allowed))
    if unknown:
        raise ValueError(f"{strategy} takes no hyperparameter(s) {unknown}; allowed: {allowed}")
    if "counts" in parameters:
        hparams |= {"counts": counts, "max_weight_share": max_weight_share}
    if strategy == "fedadam":
        return fn(global_state, packages, state=state, catalogue=catalogue, **hparams)
    result = fn(global_state, packages, catalogue=catalogue, **hparams)
    result.optimizer_state = state
    return result
