"""The knowledge package: the only thing a site uploads.

    <folder>/encoders.safetensors   modality encoders and task heads (keys `encoders.<m>.*`, `heads.<task>.*`)
    <folder>/manifest.json          `PackageManifest`: who, which round, how many samples, hashes, metrics

Never samples and never per-sample outputs: `write_package` refuses any tensor that is not an encoder or head
parameter, so a training loop cannot leak a batch or a prediction vector into the upload by accident.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import uuid
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, NamedTuple, get_args

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from safetensors.torch import load_file, save_file

import fedkim
from fedkim.config import Modality
from fedkim.data.catalogue import Catalogue, load_catalogue
from fedkim.digests import sha256_file

SCHEMA_VERSION = 1
SUPPORTED_SCHEMA_VERSIONS = (1,)
TENSORS_FILE = "encoders.safetensors"
MANIFEST_FILE = "manifest.json"
MODALITIES: tuple[str, ...] = get_args(Modality)
KEY_PREFIXES = ("encoders.", "heads.")


class PackageError(ValueError):
    """A package that cannot be written or read; the message names the folder, file, key or field."""


class ValidationSummary(BaseModel):
    model_config = ConfigDict(extra="forbid")

    success: bool
    findings: int = Field(0, ge=0, description="number of failed expectations / findings of the data gate")


class PrivacyReport(BaseModel):
    """What a site's DP training spent (fedkim.site.privacy): carried in the manifest, so the site signs it."""
    model_config = ConfigDict(extra="forbid")

    epsilon_round: float = Field(ge=0)
    epsilon_total: float = Field(ge=0, description="cumulative over every round this site trained with DP")
    epsilon_spent_before: float = Field(ge=0)
    epsilon_max: float = Field(gt=0)
    delta: float = Field(gt=0, lt=1)
    accountant: str
    max_grad_norm: float = Field(gt=0)
    tasks: dict[str, list[float]] = Field(description="task -> [noise multiplier, sample rate, steps] this round")


class PackageManifest(BaseModel):
    # NaN metrics (e.g. AUROC on a one-class validation split) must survive the JSON round trip.
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")

    schema_version: int
    site_id: str = Field(min_length=1)
    round_id: str = Field(min_length=1)
    sample_counts: dict[Modality, int] = Field(description="modality -> training samples used")
    task_counts: dict[str, int] = Field(description="training task -> training samples used")
    data_fingerprint: str = Field(pattern=r"^[0-9a-f]{64}$", description="the site's data fingerprint")
    tensors_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    code_version: str
    local_metrics: dict[str, dict[str, float]] = Field(default_factory=dict,
                                                       description="task -> metric -> value")
    validation_summary: ValidationSummary
    created_at: datetime
    round_nonce: str | None = Field(None, description="the nonce the coordinator published with the round's global "
                                                      "model (federation.signatures: required; absent otherwise)")
    privacy: PrivacyReport | None = Field(None, description="differential privacy of the local training (absent: "
                                                            "trained without)")

    @field_validator("schema_version")
    @classmethod
    def _supported(cls, v: int) -> int:
        if v not in SUPPORTED_SCHEMA_VERSIONS:
            raise ValueError(f"unsupported schema_version {v} (supported: {list(SUPPORTED_SCHEMA_VERSIONS)})")
        return v

    @field_validator("round_id", mode="before")
    @classmethod
    def _round_as_text(cls, v: Any) -> Any:
        # Flows may count rounds as integers; the manifest and store keys always carry text.
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v

    @field_validator("sample_counts", "task_counts")
    @classmethod
    def _non_negative(cls, v: dict[str, int]) -> dict[str, int]:
        negative = {k: n for k, n in v.items() if n < 0}
        if negative:
            raise ValueError(f"counts must be >= 0, got {negative}")
        return v

    @field_validator("task_counts", "local_metrics")
    @classmethod
    def _training_tasks(cls, v: dict, info: ValidationInfo) -> dict:
        """Against the training tasks of the catalogue in force (validation context `catalogue`; else the
        shipped one)."""
        train = _catalogue(info.context).train
        unknown = sorted(set(v) - set(train))
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; training tasks: {list(train)}")
        return v


def _catalogue(context: dict | None) -> Catalogue:
    return (context or {}).get("catalogue") or load_catalogue()


class KnowledgePackage(NamedTuple):
    """A loaded package; unpacks as `(manifest, state_dict)`."""

    manifest: PackageManifest
    state_dict: dict[str, torch.Tensor]


# ------------------------------------------------------------------------------------------------ helpers
@lru_cache(maxsize=1)
def current_code_version() -> str:
    """`<fedkim version>+g<git sha>` inside a checkout, `<version>+unknown` in an installed wheel."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(fedkim.__file__).parent,
                             capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{fedkim.__version__}+g{sha[:12]}" if sha else f"{fedkim.__version__}+unknown"


def key_modality(key: str, catalogue: Catalogue | None = None) -> str:
    """The modality a parameter belongs to: `encoders.<m>.*` -> m, `heads.<task>.*` -> the modality of that
    training task in `catalogue` (None: the shipped one)."""
    kind, _, rest = key.partition(".")
    name = rest.split(".", 1)[0]
    if kind == "encoders" and name in MODALITIES:
        return name
    catalogue = catalogue or load_catalogue()
    if kind == "heads" and name in catalogue.train and catalogue[name].modality in MODALITIES:
        return catalogue[name].modality
    raise KeyError(f"tensor {key!r}: not `encoders.<{'|'.join(MODALITIES)}>.*` or `heads.<training task>.*`")


def guard_tensors(state_dict: Mapping[str, Any]) -> None:
    """The never-samples guard: only encoder and head parameters may leave a site."""
    bad = [k for k in state_dict if not (isinstance(k, str) and k.startswith(KEY_PREFIXES))]
    if bad:
        raise PackageError(f"refusing to package tensor(s) {bad[:5]}{' ...' if len(bad) > 5 else ''}: "
                           f"only 'encoders.*' and 'heads.*' parameters may leave a site "
                           f"(never samples or outputs)")
    not_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise PackageError(f"refusing to package non-tensor value(s) {not_tensors[:5]}")
    if not state_dict:
        raise PackageError("refusing to write an empty package")


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# -------------------------------------------------------------------------------------------- write / read
def write_package(
    folder: str | Path,
    state_dict: Mapping[str, torch.Tensor],
    *,
    site_id: str,
    round_id: str | int,
    sample_counts: Mapping[str, int],
    task_counts: Mapping[str, int],
    data_fingerprint: str,
    validation_summary: ValidationSummary | Mapping[str, Any],
    local_metrics: Mapping[str, Mapping[str, float]] | None = None,
    code_version: str | None = None,
    created_at: datetime | None = None,
    catalogue: Catalogue | None = None,
    round_nonce: str | None = None,
    privacy: Mapping[str, Any] | None = None,
) -> PackageManifest:
    """Write `encoders.safetensors`, then `manifest.json` last: a manifest means a complete package. Task names
    are checked against `catalogue`'s training tasks (None: the shipped catalogue)."""
    guard_tensors(state_dict)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # Copies: safetensors refuses shared storage (tied weights) and non-contiguous views.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    tensors_path = folder / TENSORS_FILE
    tmp = folder / f".{TENSORS_FILE}.{uuid.uuid4().hex}.tmp"
    save_file(tensors, str(tmp))
    digest = sha256_file(tmp)
    try:
        manifest = PackageManifest.model_validate(dict(
            schema_version=SCHEMA_VERSION, site_id=site_id, round_id=round_id,
            sample_counts=dict(sample_counts), task_counts=dict(task_counts),
            data_fingerprint=data_fingerprint, tensors_sha256=digest,
            code_version=code_version or current_code_version(),
            local_metrics={k: dict(v) for k, v in (local_metrics or {}).items()},
            validation_summary=validation_summary, created_at=created_at or datetime.now(timezone.utc),
            **({"round_nonce": round_nonce} if round_nonce is not None else {}),
            **({"privacy": dict(privacy)} if privacy is not None else {}),
        ), context={"catalogue": catalogue})
    except ValidationError as exc:
        tmp.unlink(missing_ok=True)
        raise PackageError(f"{folder}: invalid manifest: {_problems(exc)}") from None
    os.replace(tmp, tensors_path)
    _atomic_write_bytes(folder / MANIFEST_FILE, manifest.model_dump_json(indent=2, exclude_none=True).encode() + b"\n")
    return manifest


def _problems(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}" for e in exc.errors())


def read_manifest(folder: str | Path, catalogue: Catalogue | None = None) -> PackageManifest:
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        raise PackageError(f"{path}: manifest missing")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PackageError(f"{path}: not valid JSON ({exc})") from None
    try:
        return PackageManifest.model_validate(raw, context={"catalogue": catalogue})
    except ValidationError as exc:
        raise PackageError(f"{path}: invalid manifest: {_problems(exc)}") from None


def read_tensors(folder: str | Path) -> dict[str, torch.Tensor]:
    path = Path(folder) / TENSORS_FILE
    if not path.is_file():
        raise PackageError(f"{path}: tensor file missing")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for a damaged file
        raise PackageError(f"{path}: not a readable safetensors file ({exc})") from None


def read_package(folder: str | Path, *, verify: bool = True, catalogue: Catalogue | None = None) -> KnowledgePackage:
    """Load a package. With `verify`, a tensor file whose sha256 differs from the manifest's raises."""
    folder = Path(folder)
    manifest = read_manifest(folder, catalogue)
    if verify:
        actual = sha256_file(folder / TENSORS_FILE) if (folder / TENSORS_FILE).is_file() else "missing"
        if actual != manifest.tensors_sha256:
            raise PackageError(f"{folder / TENSORS_FILE}: sha256 {actual} does not match the manifest's "
                               f"tensors_sha256 {manifest.tensors_sha256}")
    return KnowledgePackage(manifest, read_tensors(folder))


def finite_metrics(metrics: dict) -> dict:
    """Per-task metrics without NaN/inf (an AUROC of a one-class split): what a manifest or JSON can carry."""
    return {t: {k: v for k, v in m.items() if isinstance(v, (int, float)) and math.isfinite(v)}
            for t, m in metrics.items()}
