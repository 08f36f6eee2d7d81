"""The aggregation settings of `federation` in params.yaml: how far one site's weight and update may go, and the
robust strategies' trim. FederationParams (fedkim.config) inherits them, so the keys stay `federation.<key>`.
(A top-level module: fedkim.federation imports fedkim.config.)"""

from __future__ import annotations

from pydantic import BaseModel, Field

# The defaults leave the shipped federation's aggregate as it was: its largest per-modality share is 0.4, its
# update norms stay within 2x of the round's median.
DEFAULT_MAX_WEIGHT_SHARE = 0.5
DEFAULT_NORM_MULTIPLE = 5.0
DEFAULT_TRIM_FRACTION = 0.2


class AggregationSettings(BaseModel):
    """Bounds on what one site can do to a round, and the trimmed mean's trim."""

    max_weight_share: float = Field(
        DEFAULT_MAX_WEIGHT_SHARE, gt=0, le=1,
        description="the largest share of a modality's weight one site may take (1: no cap); with fewer than "
                    "1/share sites holding a modality, they weigh equally")
    norm_multiple: float = Field(
        DEFAULT_NORM_MULTIPLE, gt=1,
        description="reject an update whose norm in a modality exceeds this multiple of the round's median norm "
                    "of that modality (besides max_update_norm)")
    trim_fraction: float = Field(
        DEFAULT_TRIM_FRACTION, ge=0, lt=0.5,
        description="trimmed_mean: the share of sites dropped at each end of every coordinate (floor of "
                    "fraction x sites)")

    def non_default(self) -> dict[str, float]:
        """The settings that differ from the defaults (a digest includes only these, so defaults keep theirs)."""
        defaults = AggregationSettings()
        return {k: getattr(self, k) for k in AggregationSettings.model_fields
                if getattr(self, k) != getattr(defaults, k)}
