"""How much each site weighs in a round's average: the sample counts its package reports, capped by what its own
data gate verified and by the largest share of the weight one site may take.

A site reports its training samples per modality in its manifest; nothing stops it from claiming 10^9. Two caps
keep such a claim from taking over a round:

- the **verified count**: a modality's count is at most the samples its manifest lists for that modality's tasks
  (`task_counts`), and at most the samples its data gate counted at the site less those it quarantined, and the
  index rows of that modality the gate checked (the gate summary the round holds: counts only);
- the **share cap** (`federation.max_weight_share`): no site takes more than that share of a key's weight; the
  excess goes to the others in proportion to their counts.

A count above the verified one is a finding naming the site, recorded with the round's aggregate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

from fedkim.data.catalogue import Catalogue, load_catalogue
from fedkim.federation.package import PackageManifest


@dataclass
class SiteWeights:
    """The counts each site is weighed by (site -> modality -> count), and why any was lowered."""

    counts: dict[str, dict[str, int]]
    findings: dict[str, list[str]] = field(default_factory=dict)  # site -> reasons its counts were capped
    unverified: list[str] = field(default_factory=list)  # sites without a gate summary (task counts cap only)


def gate_verified_samples(summary: Mapping | None, modality: str | None = None) -> int | None:
    """The samples a site's gate summary vouches for (counted less quarantined; for `modality`, at most the
    index rows of that modality the gate checked); None without a usable summary."""
    try:
        verified = int(summary["stats"]["samples"]) - int(summary.get("quarantined", {}).get("samples", 0))
    except (KeyError, TypeError, ValueError):
        return None
    per_modality = summary["stats"].get("modalities")
    if modality is not None and isinstance(per_modality, Mapping):
        try:
            verified = min(verified, int(per_modality.get(modality, 0)))
        except (TypeError, ValueError):
            return None
    return verified


def verified_counts(manifests: Sequence[PackageManifest], gate_summaries: Mapping[str, Mapping | None],
                    catalogue: Catalogue | None = None) -> SiteWeights:
    """Each site's per-modality count capped by its task counts and by its gate summary (in `gate_summaries`)."""
    catalogue = catalogue or load_catalogue()
    result = SiteWeights(counts={})
    for manifest in manifests:
        site = manifest.site_id
        summary = gate_summaries.get(site)
        if gate_verified_samples(summary) is None:
            result.unverified.append(site)
        used = {}
        for modality, reported in manifest.sample_counts.items():
            verified = gate_verified_samples(summary, modality)
            in_tasks = sum(n for task, n in manifest.task_counts.items() if catalogue[task].modality == modality)
            count = min(reported, in_tasks)
            if reported > in_tasks:
                result.findings.setdefault(site, []).append(
                    f"site {site!r}: sample_counts[{modality!r}] = {reported} exceeds the {in_tasks} its "
                    f"task_counts list for {modality}; weighed as {in_tasks}")
            if verified is not None and count > verified:
                result.findings.setdefault(site, []).append(
                    f"site {site!r}: sample_counts[{modality!r}] = {reported} exceeds the {verified} samples its "
                    f"data gate verified; weighed as {verified}")
                count = verified
            used[modality] = max(count, 0)
        result.counts[site] = used
    return result


def capped_shares(counts: Mapping[str, float], max_share: float = 1.0) -> dict[str, float]:
    """Normalised weights (site -> share) from counts, no share above `max_share`: capped sites get exactly
    `max_share`, the rest is spread over the others by their counts. With fewer than 1/max_share sites the cap
    cannot hold, and every site weighs the same. Uncapped, a share is `count / total` exactly (as FedAvg's)."""
    total = sum(counts.values())
    if total <= 0:
        raise ValueError(f"no positive sample count among sites {sorted(counts)}")
    shares = {site: n / total for site, n in counts.items()}
    if max_share >= 1 or all(w <= max_share for w in shares.values()):
        return shares
    if len(counts) * max_share <= 1:
        return {site: 1 / len(counts) for site in counts}
    capped: set[str] = set()
    while True:
        free = [site for site in counts if site not in capped]
        rest, free_total = 1 - max_share * len(capped), sum(counts[site] for site in free)
        shares = {site: max_share if site in capped else
                  rest * (counts[site] / free_total if free_total > 0 else 1 / len(free)) for site in counts}
        over = {site for site in free if shares[site] > max_share}
        if not over:
            return shares
        capped |= over
