"""What a round step reports: a site's part (trained, reused, or why it has none) and the aggregation's."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

REPORTED = ("trained", "reused")  # a site with one of these statuses has its package in the store


@dataclass
class SiteOutcome:
    """A site's part of a round: what its package reports, or why it has none (reason)."""

    site_id: str
    status: str  # trained | reused | excluded (data gate) | refused (privacy budget) | failed
    reason: str = ""
    sample_counts: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    data_fingerprint: str = ""
    seconds: float = 0.0
    validation: dict | None = None  # the data gate's summary (no examples), when the gate ran
    privacy: dict | None = None  # DP training: ε this round and cumulative, δ, accountant (fedkim.site.privacy)

    @classmethod
    def from_manifest(cls, manifest, status: str, *, validation: dict | None = None) -> "SiteOutcome":
        return cls(manifest.site_id, status, sample_counts=dict(manifest.sample_counts),
                   metrics=dict(manifest.local_metrics), data_fingerprint=manifest.data_fingerprint,
                   validation=validation,
                   privacy=manifest.privacy.model_dump() if manifest.privacy else None)

    def as_dict(self) -> dict:
        """Everything but the gate summary, which travels on its own (store, MLflow)."""
        return {k: v for k, v in asdict(self).items() if k != "validation"}


@dataclass
class AggregateOutcome:
    round_id: str
    accepted: list[str]
    rejected: dict[str, list[str]]
    strategy: str
    reused: bool = False
    findings: dict[str, list[str]] = field(default_factory=dict)  # site -> why its weight was capped
