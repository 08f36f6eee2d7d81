"""The differential-privacy settings of local training: `site.privacy` in params.yaml (fedkim.site.privacy uses them).

Off by default: local training, its models and every figure are then what they always were. A site's budget
`epsilon_max` bounds the ε it spends over all rounds; `members[].epsilon_max` gives one hospital its own.
(A top-level module: fedkim.config imports it.)"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from fedkim.params_base import Strict


class PrivacyParams(Strict):
    """Opacus at the sites: per-sample clipping, Gaussian noise calibrated to `epsilon` per round, an accountant."""

    enabled: bool = Field(False, description="train the site models with differential privacy (Opacus)")
    epsilon: float = Field(3.0, gt=0, description="target ε of one round's local training, per site")
    delta: float = Field(1e-5, gt=0, lt=1, description="δ of (ε, δ)-DP; below 1 / (a site's samples of a task)")
    max_grad_norm: float = Field(1.0, gt=0, description="per-sample gradient clipping bound")
    accountant: Literal["rdp", "prv"] = Field("rdp", description="Opacus' privacy accountant")
    epsilon_max: float = Field(10.0, gt=0, description="a site's budget: the cumulative ε it may spend; a round "
                                                      "that would exceed it is refused by the site")
    ledger: Path = Field(Path(".cache/privacy"), description="where each site keeps what it has spent "
                                                            "(<ledger>/<site id>.json; site-local, never uploaded)")

    @model_validator(mode="after")
    def _budget(self) -> "PrivacyParams":
        if self.enabled and self.epsilon > self.epsilon_max:
            raise ValueError(f"site.privacy.epsilon {self.epsilon} exceeds site.privacy.epsilon_max "
                             f"{self.epsilon_max}: no round could train")
        return self
