"""What every params section is built from: the error a bad params file raises and the strict base model (unknown
keys are errors, values are frozen). fedkim.config re-exports both."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

Modality = Literal["image", "ecg", "clinical"]


class ConfigError(ValueError):
    """A params file that cannot be used; the message names the file, the key and what is allowed."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
