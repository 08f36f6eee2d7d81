"""Server-side admission checks for knowledge packages.

A package that fails any check is excluded from the round with its reasons recorded (for the round manifest);
it is never averaged in. Every check runs, so a site sees all of its problems at once.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import torch

from fedkim.data.catalogue import Catalogue
from fedkim.federation.package import (
    KEY_PREFIXES,
    TENSORS_FILE,
    KnowledgePackage,
    PackageError,
    key_modality,
    read_manifest,
    read_tensors,
    sha256_file,
)

PackageLike = str | Path | KnowledgePackage | tuple


@dataclass
class CheckResult:
    accepted: bool
    reasons: list[str] = field(default_factory=list)
    site_id: str | None = None
    package: KnowledgePackage | None = None  # the loaded package, when it could be read
    update_norm: float | None = None
    modality_norms: dict[str, float] = field(default_factory=dict)  # modality -> norm of its part of the update


def check_package(
    package: PackageLike,
    global_state: Mapping[str, torch.Tensor],
    *,
    max_update_norm: float,
    expected_round: str | int | None = None,
    catalogue: Catalogue | None = None,
) -> CheckResult:
    """Check one package (a folder, or an already loaded `(manifest, state_dict)`) against the global model and
    the training tasks of `catalogue` (None: the shipped one).

    The tensor file's sha256 is checked only for a folder; a loaded package was verified when it was read.
    """
    reasons: list[str] = []
    if isinstance(package, (str, Path)):
        folder = Path(package)
        try:
            manifest = read_manifest(folder, catalogue)
        except PackageError as exc:
            return CheckResult(False, [f"bad manifest schema: {exc}"], site_id=folder.name)
        if (folder / TENSORS_FILE).is_file():
            actual = sha256_file(folder / TENSORS_FILE)
            if actual != manifest.tensors_sha256:
                reasons.append(f"{TENSORS_FILE}: sha256 {actual} does not match manifest tensors_sha256 "
                               f"{manifest.tensors_sha256} (file altered or corrupted)")
        try:
            state = read_tensors(folder)
        except PackageError as exc:
            return CheckResult(False, reasons + [str(exc)], site_id=manifest.site_id)
    else:
        manifest, state = package

    if expected_round is not None and manifest.round_id != str(expected_round):
        reasons.append(f"round_id {manifest.round_id!r} does not match the current round "
                       f"{str(expected_round)!r}")
    if not state:
        reasons.append("package holds no tensors")

    comparable: list[str] = []  # keys whose values can be compared with the global model
    present: set[str] = set()
    modality_of: dict[str, str] = {}
    for key, value in state.items():
        if not key.startswith(KEY_PREFIXES):
            reasons.append(f"tensor {key!r}: not an encoder or head parameter (never samples or outputs)")
            continue
        if key not in global_state:
            reasons.append(f"tensor {key!r}: unknown key, not in the global model")
            continue
        try:
            modality_of[key] = key_modality(key, catalogue)
            present.add(modality_of[key])
        except KeyError as exc:
            reasons.append(str(exc.args[0]))
        ref = global_state[key]
        ok = True
        if tuple(value.shape) != tuple(ref.shape):
            reasons.append(f"tensor {key!r}: shape {tuple(value.shape)} differs from the global "
                           f"{tuple(ref.shape)}")
            ok = False
        if value.dtype != ref.dtype:
            reasons.append(f"tensor {key!r}: dtype {value.dtype} differs from the global {ref.dtype}")
            ok = False
        if value.is_floating_point():
            bad = int((~torch.isfinite(value)).sum())
            if bad:
                reasons.append(f"tensor {key!r}: {bad} non-finite value(s) (NaN/inf)")
                ok = False
        if ok and value.is_floating_point():
            comparable.append(key)

    # Integer buffers (BatchNorm step counters) are excluded: the server never takes them from sites.
    squares = {k: float((state[k].double() - global_state[k].double()).square().sum()) for k in comparable}
    norm = math.sqrt(sum(squares[k] for k in comparable))
    by_modality: dict[str, float] = {}
    for key in comparable:
        if key in modality_of:
            by_modality[modality_of[key]] = by_modality.get(modality_of[key], 0.0) + squares[key]
    if not norm <= max_update_norm:
        reasons.append(f"update norm {norm:.4g} exceeds max_update_norm {max_update_norm:g}")

    for modality in sorted(present):
        if manifest.sample_counts.get(modality, 0) <= 0:
            count = manifest.sample_counts.get(modality, "missing")
            reasons.append(f"sample_counts[{modality!r}] is {count}, "
                           f"must be positive: the package carries {modality} parameters")
    return CheckResult(not reasons, reasons, site_id=manifest.site_id,
                       package=KnowledgePackage(manifest, dict(state)), update_norm=norm,
                       modality_norms={m: math.sqrt(v) for m, v in sorted(by_modality.items())})


def adaptive_norm_findings(norms: Mapping[str, Mapping[str, float]], multiple: float) -> dict[str, list[str]]:
    """Sites whose update norm in a modality exceeds `multiple` x the median of that modality's norms this round
    (site -> reasons). Per modality, because sites hold different modalities: a site's whole-update norm grows
    with the modalities it trains, while one modality's norm is comparable across the sites holding it. The
    median is the lower one, so with two sites an oversized update is judged against the genuine one; a zero
    median (most sites sent that modality unchanged) gives no scale, and no bound."""
    findings: dict[str, list[str]] = {}
    for modality in sorted({m for site_norms in norms.values() for m in site_norms}):
        values = {site: site_norms[modality] for site, site_norms in norms.items() if modality in site_norms}
        median = statistics.median_low(values.values())
        bound = multiple * median
        for site, value in sorted(values.items()):
            if median > 0 and value > bound:
                findings.setdefault(site, []).append(
                    f"site {site!r}: update norm {value:.4g} of its {modality} parameters exceeds {multiple:g} x "
                    f"the round's median {median:.4g} (bound {bound:.4g}, federation.norm_multiple)")
    return findings


def screen_packages(
    packages: Iterable[PackageLike],
    global_state: Mapping[str, torch.Tensor],
    *,
    max_update_norm: float,
    expected_round: str | int | None = None,
    catalogue: Catalogue | None = None,
    norm_multiple: float | None = None,
) -> tuple[list[KnowledgePackage], dict[str, list[str]]]:
    """Split packages into (accepted, rejected site_id -> reasons).

    One package per site: when a site sent two, both are rejected. With `norm_multiple`, a package that passed
    every other check is rejected too when its update is oversized against the round's others
    (`adaptive_norm_findings`).
    """
    norms: dict[str, dict[str, float]] = {}
    accepted: list[KnowledgePackage] = []
    rejected: dict[str, list[str]] = {}
    seen: set[str] = set()
    for package in packages:
        result = check_package(package, global_state, max_update_norm=max_update_norm,
                               expected_round=expected_round, catalogue=catalogue)
        site = result.site_id or "<unknown>"
        reasons = list(result.reasons)
        if site in seen:
            reasons.append(f"duplicate package for site {site!r} in this round")
        if reasons:
            rejected.setdefault(site, []).extend(reasons)
            # Two packages from one site are ambiguous: neither is used.
            accepted = [p for p in accepted if p.manifest.site_id != site]
        else:
            accepted.append(result.package)
            norms[site] = result.modality_norms
        seen.add(site)
    if norm_multiple is not None:
        oversized = adaptive_norm_findings({p.manifest.site_id: norms[p.manifest.site_id] for p in accepted},
                                           norm_multiple)
        accepted = [p for p in accepted if p.manifest.site_id not in oversized]
        for site, reasons in oversized.items():
            rejected.setdefault(site, []).extend(reasons)
    return accepted, rejected
