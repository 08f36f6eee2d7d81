"""Typed parameters read from params.yaml, the single tunable surface shared by the CLI, DVC and Prefect.

Every section forbids unknown keys, so a typo fails at start-up with a message that names the key and the keys
that are allowed there. Relative paths are resolved against the directory that holds params.yaml (the repo root).

Environment overrides: FEDKIM_PARAMS (path of the params file), FEDKIM_DATA_ROOT (data.root: where the generated
members and splits live), FEDKIM_SITE_DIR_<ID> (a provided member's path, e.g. FEDKIM_SITE_DIR_SITE_A),
FEDKIM_STORE_KIND (store.kind: `fedkim stack up` switches its workers to its S3 server this way).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, ValidationInfo, field_validator, model_validator

from fedkim.digests import short_digest
from fedkim.aggregation_params import AggregationSettings
from fedkim.gate_rules import GateParams
from fedkim.signature_params import SignatureSettings, check_signature_keys
from fedkim.members import (SERVER_SPLITS, MemberSpec, ServerSplits, apply_site_dir_env, check_member_ids,
                            check_profiles, find_member)
from fedkim.params_base import ConfigError, Modality, Strict, format_validation_error
from fedkim.privacy_params import PrivacyParams
from fedkim.round_lock import RoundLockParams

PACKAGE_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_ROOT.parent

ImageFormat = Literal["png", "dicom"]
OpacityZone = Literal["upper", "middle", "lower"]
EcgAbnormality = Literal["af", "wide_qrs", "t_inversion"]
DeteriorationKind = Literal["shock", "respiratory", "renal"]
# A round id is part of store keys (rounds/<id>/...) and MLflow tags and names: e.g. 7 or 2026-05-01.
ROUND_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


# --------------------------------------------------------------------------------------------- data section
class ImageAcquisition(Strict):
    """How a site's X-ray equipment renders the same anatomy (its domain shift)."""

    exposure: float = Field(1.0, gt=0.2, lt=3.0, description="multiplies the attenuation image")
    gamma: float = Field(1.0, gt=0.2, lt=5.0)
    monochrome1: bool = Field(False, description="stored inverted (DICOM MONOCHROME1); readers undo it")
    noise: float = Field(0.0, ge=0.0, le=0.5, description="extra quantum noise on top of difficulty.image_noise")
    blur: float = Field(0.0, ge=0.0, le=3.0, description="Gaussian blur sigma in pixels")
    rotation_deg: float = Field(3.0, ge=0.0, le=20.0, description="max absolute patient rotation")


class EcgAcquisition(Strict):
    sampling_rate: Literal[250, 500] = 500
    powerline_hz: Literal[50, 60] = 50
    lead_gain: float = Field(1.0, gt=0.2, lt=5.0, description="amplifier gain error, multiplies every lead")


class SiteProfile(Strict):
    """The generator's profile of a generated member (data.sites.<id>): conditions, acquisition and size."""

    size_factor: float = Field(1.0, gt=0.0, le=10.0, description="multiplies data.sizes.site_train")
    image_format: ImageFormat = "png"
    image: ImageAcquisition = ImageAcquisition()
    ecg: EcgAcquisition = EcgAcquisition()
    prevalence: float = Field(0.4, gt=0.05, lt=0.95, description="share of positive labels at this site")
    signal_scale: float = Field(1.0, gt=0.0, le=2.0, description="effect size of findings here (weak site < 1)")
    opacity_zones: list[OpacityZone] = Field(default_factory=lambda: ["upper", "middle", "lower"], min_length=1)
    ecg_abnormalities: list[EcgAbnormality] = Field(
        default_factory=lambda: ["af", "wide_qrs", "t_inversion"], min_length=1
    )
    lab_interval_h: float = Field(6.0, ge=1.0, le=48.0, description="hours between lab draws for stable patients")
    deterioration: list[DeteriorationKind] = Field(
        default_factory=lambda: ["shock", "respiratory", "renal"], min_length=1
    )


class SiteSpec(SiteProfile):
    """A generated member as the generator sees it: its id, description, modalities and profile."""

    id: str
    description: str = ""
    modalities: list[Modality] = Field(min_length=1)


class Sizes(Strict):
    site_train: int = Field(160, ge=8, le=100_000, description="samples per training task per site (x size_factor)")
    val_fraction: float = Field(0.2, ge=0.05, le=0.5)
    public: int = Field(64, ge=8, le=100_000, description="server public split, per training task")
    test: int = Field(160, ge=8, le=100_000, description="test split, per task")
    validation: int = Field(64, ge=8, le=100_000, description="server validation split (promotion decides on it), "
                                                               "per training task")


class Difficulty(Strict):
    image_contrast: float = Field(0.1, gt=0.0, le=1.0)
    image_noise: float = Field(0.08, ge=0.0, le=0.5)
    covid_contrast: float = Field(0.3, gt=0.0, le=2.0, description="COVID ground glass: amplitude as a fraction of "
                                                                      "image_contrast (faint, bilateral, many blobs)")
    ecg_effect: float = Field(0.2, gt=0.0, le=1.5)
    ecg_variability: float = Field(0.5, ge=0.0, le=1.0)
    ecg_noise: float = Field(0.06, ge=0.0, le=1.0, description="mV of broadband noise")
    ecg_artifacts: float = Field(0.2, ge=0.0, le=1.0, description="share of the labelled tasks' ECGs recorded with "
                                                                  "powerline, baseline drift or burst noise")
    icu_drift: float = Field(0.5, gt=0.0, le=5.0, description="deterioration drift in between-patient SDs")
    label_noise: float = Field(0.03, ge=0.0, le=0.3)


class DataParams(Strict):
    root: Path = Path("data/federation")
    seed: int = 42
    image_size: int = Field(128, ge=32, le=1024, description="stored image side in pixels")
    ecg_seconds: int = Field(10, ge=2, le=60)
    icu_hours: int = Field(24, ge=6, le=168, description="mortality window; sepsis uses twice this")
    workers: int = Field(2, ge=1, le=64, description="processes used to synthesise ECGs")
    sizes: Sizes = Sizes()
    difficulty: Difficulty = Difficulty()
    gate: GateParams = Field(GateParams(), validate_default=True)
    sites: dict[str, SiteProfile] = Field(default_factory=dict, description="generator profile per generated "
                                                                         "member id; missing: the defaults")
    catalogue: Path | None = Field(None, description="task catalogue YAML (fedkim.data.catalogue); null: the "
                                                     "shipped fedkim/data/tasks.yaml")

    @field_validator("gate")
    @classmethod
    def _ecg_window(cls, gate: GateParams, info: ValidationInfo) -> GateParams:
        """The gate checks the ECG window the model reads unless told otherwise."""
        seconds = info.data.get("ecg_seconds")
        if gate.ecg_window_seconds is None and seconds is not None:
            return gate.model_copy(update={"ecg_window_seconds": float(seconds)})
        return gate


# ------------------------------------------------------------- sections the later stages fill (typed already)
class SiteTrainingParams(Strict):
    """Local training at a hospital, and the size of the modality encoders it trains."""

    epochs: int = Field(2, ge=1, description="local epochs per modality per round")
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-2, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    fedprox_mu: float = Field(0.0, ge=0, description="FedProx proximal term (0 = FedAvg clients)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    image_input: int = Field(64, ge=16, le=1024, description="loader resizes images to this side")
    ecg_hz: int = Field(200, ge=50, le=1000, description="loader resamples ECGs to this rate (>= 150 keeps the 50/60 "
                                                         "Hz mains that the ECG noise question asks about)")
    image_patch: int = Field(8, ge=2, description="DeiT patch size")
    image_hidden: int = Field(64, ge=8, description="DeiT width (paper scale: 192)")
    image_layers: int = Field(2, ge=1, description="DeiT depth (paper scale: 12)")
    image_heads: int = Field(2, ge=1)
    image_stem: Literal["patch", "conv"] = Field(
        "patch", description="patch: DeiT's single patch projection; conv: stride-2 3x3 convolutions make the patch "
                             "tokens (needs a power-of-2 patch)")
    image_augment: bool = Field(False, description="local training: random shifts, rotations and gamma of "
                                                   "radiographs (never flips)")
    token_dim: int = Field(64, ge=8, description="width of ECG and clinical tokens")
    clinical_heads: int = Field(4, ge=1)
    head_hidden: int = Field(64, ge=4, description="hidden width of the task heads")
    decode_cache_mb: float = Field(1024, ge=0, description="local training keeps decoded samples in memory across "
                                                           "epochs, up to this many MB per modality (0: decode every "
                                                           "epoch)")
    privacy: PrivacyParams = Field(PrivacyParams(), description="differential privacy of local training (Opacus)")

    @model_validator(mode="after")
    def _shapes(self) -> "SiteTrainingParams":
        if self.image_input % self.image_patch:
            raise ValueError(f"image_input {self.image_input} must be a multiple of image_patch {self.image_patch}")
        if self.image_stem == "conv" and self.image_patch & (self.image_patch - 1):
            raise ValueError(f"image_stem conv needs a power-of-2 image_patch, got {self.image_patch}")
        if self.image_hidden % self.image_heads or self.token_dim % self.clinical_heads:
            raise ValueError("image_hidden must divide by image_heads and token_dim by clinical_heads")
        if self.privacy.enabled and self.fedprox_mu > 0:  # its gradient is not per sample: Opacus would drop it
            raise ValueError("site.fedprox_mu must be 0 with site.privacy.enabled (DP trains FedAvg clients)")
        return self


class FederationParams(Strict, AggregationSettings, SignatureSettings):  # + aggregation and signature settings
    strategy: Literal["fedavg", "fedprox", "fedadam", "median", "trimmed_mean"] = "fedavg"
    rounds: int = Field(1, ge=1)
    quorum: int = Field(2, ge=1)
    max_update_norm: float = Field(1e3, gt=0)
    # How the Prefect round flow (flows/round.py) runs the sites' work.
    mode: Literal["simulation", "federated"] = Field(
        "simulation", description="simulation: site tasks in the central process; federated: deployments "
                                  "fedkim-site/<site> on the work pools site-<site>")
    site_timeout_s: float = Field(3600.0, gt=0, description="limit of one attempt of a site's gate or training")
    retries: int = Field(2, ge=0, le=20, description="extra attempts of a site's training + upload")
    retry_delay_s: float = Field(10.0, ge=0, description="wait before the first retry; doubles at each retry")
    site_start_s: float = Field(300.0, ge=0, description="federated: allowance for a site worker to start a run")
    parallel_sites: int = Field(1, ge=0, description="simulation: site trainings at once (0: all; 1: bit-reproducible)")
    work_dir: Path = Field(Path(".cache/rounds"), description="central scratch (injection checkpoints to resume)")
    round_id: str = Field("1", pattern=ROUND_ID_PATTERN,
                          description="the round `dvc repro` runs: names its store keys and seeds its training")
    round_lock: RoundLockParams = Field(RoundLockParams(), description="a second run of a running round id")
    members: list[MemberSpec] = Field(default_factory=list, description="the hospitals of the federation")
    splits: ServerSplits = Field(ServerSplits(), description="the server's public and test splits")

    @field_validator("round_id", mode="before")
    @classmethod
    def _round_id_text(cls, v: Any) -> Any:
        # YAML reads `round_id: 3` as an int; a round id is a name (`2026-05-01` works too).
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v

    _members = field_validator("members")(check_member_ids)


class ReportParams(Strict):
    """The round report the Prefect flow writes (Markdown + PNGs)."""

    root: Path = Field(Path("reports/rounds"), description="<root>/<round id>/report.md")
    comparison: Path | None = Field(None, description="comparison.json of `fedkim experiment` for the baseline "
                                                      "rows; None: the newest one under the report root's parent")


class InjectParams(Strict):
    """Server-side injection: the FM, M3OE, and how experts, gate, projectors (and encoders) are trained."""

    foundation_model: str = Field("smollm2", description="'smollm2', 'tiny' (tests) or a local HF model folder")
    num_experts: int = Field(12, ge=1)
    shared_experts: int = Field(1, ge=0, description="always-on experts (gate weight 1) beside the routed ones: "
                                                     "a path every task trains, while the routed experts specialise")
    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.1, ge=0, lt=1)
    scale_one: bool = Field(False, description="reproduce the reference code's LoRA scale 1.0 instead of alpha/r")
    gate: Literal["xattn", "id", "single"] = "xattn"
    top_k: int | None = Field(None, ge=1)
    balance_weight: float = Field(0.02, ge=0)
    balance_scope: Literal["batch", "tasks"] = Field(
        "tasks", description="load-balancing loss over the batch's samples (one task per batch), or over every "
                             "training task's gate, so that the tasks together use every expert")
    gate_norm: Literal["train", "catalogue", "layer", "none"] = Field(
        "train", description="xattn: place the gate's pooled description vector relative to the training tasks' "
                             "descriptions (train: centred on their mean, one scale), standardise it per feature "
                             "against all 12 catalogue descriptions, zero-shot ones included (catalogue: "
                             "transductive), on its own (layer), or not at all (none: the paper's gate, uniform "
                             "at start on a pretrained FM)")
    lm_head: bool = Field(False, description="experts on the LM head too")
    train_encoders: bool = Field(True, description="fine-tune the injected encoders on the public split")
    icu_window: Literal["recent", "full"] = Field(
        "recent", description="how the central model reads an ICU series longer than the window it learns on "
                              "(data.icu_hours): recent = its most recent data.icu_hours hours, full = every hour")
    epochs: int = Field(1, ge=1, description="passes over the public split per round")
    batch_size: int = Field(8, ge=1)
    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    warmup: float = Field(0.1, ge=0, lt=1, description="share of steps of linear warm-up, then linear decay")
    grad_clip: float = Field(1.0, gt=0)
    checkpoint_every: int = Field(16, ge=1, description="injection steps between checkpoints a crash resumes from")
    task_order: Literal["sequential", "interleaved"] = "sequential"
    seed: int = 42
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @model_validator(mode="after")
    def _gate(self) -> "InjectParams":
        if self.gate == "single" and (self.num_experts != 1 or self.shared_experts):
            raise ValueError("gate 'single' is a plain LoRA: set num_experts to 1 and shared_experts to 0")
        if self.top_k is not None and self.top_k > self.num_experts:
            raise ValueError(f"top_k {self.top_k} exceeds num_experts {self.num_experts}")
        return self


class EvalParams(Strict):
    tasks: Literal["all", "train", "zero_shot"] = "all"
    batch_size: int = Field(16, ge=1)
    max_per_task: int | None = Field(None, ge=1, description="evaluate at most this many test samples per task")
    generate: bool = Field(False, description="also report greedy generation (slower)")
    calibration: Literal["public_median", "none"] = Field(
        "public_median", description="label-free calibration on unlabelled public inputs of the task's modality: "
                                     "the yes/no threshold is their median score, and a question's options are "
                                     "scored relative to their mean log-probability on them (text-only: on 'N/A'); "
                                     "none: log p(Yes) > log p(No) and the raw best option")
    calibration_samples: int = Field(48, ge=2, description="public inputs scored per task for the threshold")
    choice_scoring: Literal["text", "label"] = Field(
        "text", description="lettered multiple choice with the choices' texts: text scores each choice's text "
                            "after the question stem (mean log-probability per token, lm-eval's continuation "
                            "form); label scores the letter after the whole question")


class TrackingParams(Strict):
    uri: str = "sqlite:///mlruns/mlflow.db"
    experiment: str = "fedkim"
    registered_model: str = "fedkim-foundation"
    bundle_adapters: Literal["all", "train", "none"] = Field(
        "train", description="merged peft adapters in the registered bundle: every task, the training tasks, none")


class StoreParams(Strict):
    """Where packages and aggregates travel (fedkim.federation.store.open_store). S3 credentials come from the
    standard AWS env vars / ~/.aws, never from here; FEDKIM_S3_ENDPOINT_URL overrides endpoint_url and
    FEDKIM_STORE_KIND overrides kind."""

    kind: Literal["local", "s3"] = "local"
    root: Path = Path("artifacts")
    endpoint_url: str | None = Field(None, description="S3-compatible server, e.g. http://127.0.0.1:9000")
    bucket: str = Field("fedkim", pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", description="S3 bucket name")
    prefix: str = Field("", pattern=r"^([^/]+(/[^/]+)*)?$", description="key prefix in the bucket, no '/' ends")
    region: str = "us-east-1"
    create_bucket: bool = Field(False, description="create the bucket when missing (self-hosted servers)")
    max_attempts: int = Field(5, ge=1, le=20, description="S3 request attempts, retried with backoff")


class Params(Strict):
    data: DataParams
    site: SiteTrainingParams = SiteTrainingParams()
    federation: FederationParams
    inject: InjectParams = InjectParams()
    eval: EvalParams = EvalParams()
    tracking: TrackingParams = TrackingParams()
    store: StoreParams = StoreParams()
    report: ReportParams = ReportParams()

    _generator_profiles = model_validator(mode="after")(check_profiles)
    _signature_keys = model_validator(mode="after")(check_signature_keys)

    def member_ids(self) -> list[str]:
        return [m.id for m in self.federation.members]

    def member(self, site_id: str) -> MemberSpec:
        return find_member(self, site_id)

    def generated_sites(self) -> list[SiteSpec]:
        """The generated members with their generator profiles (defaults where data.sites has none)."""
        return [SiteSpec(id=m.id, description=m.description, modalities=m.modalities,
                         **self.data.sites.get(m.id, SiteProfile()).model_dump())
                for m in self.federation.members if m.data == "generated"]


# ------------------------------------------------------------------------------------------------ loading
def default_params_path() -> Path:
    return Path(os.environ.get("FEDKIM_PARAMS", REPO_ROOT / "params.yaml"))


def load_params(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Params:
    """Read and validate params.yaml. `overrides` uses dotted keys: {"data.seed": 7}."""
    path = Path(path) if path is not None else default_params_path()
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: params file not found (set FEDKIM_PARAMS or pass --params)") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(raw).__name__}")
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value)
    if os.environ.get("FEDKIM_DATA_ROOT"):
        raw.setdefault("data", {})["root"] = os.environ["FEDKIM_DATA_ROOT"]
    if os.environ.get("FEDKIM_STORE_KIND"):
        raw.setdefault("store", {})["kind"] = os.environ["FEDKIM_STORE_KIND"]
    apply_site_dir_env(raw)
    try:
        params = Params.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(path, exc, Params)) from None
    return _resolve_paths(params, path.resolve().parent)


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`key=value` strings (dotted keys, YAML values: 3 -> int, true -> bool, [a, b] -> list) -> overrides."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value with a dotted key (e.g. inject.rank=4), got {pair!r}")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {pair!r}: the value is not valid YAML: {exc}") from None
    return out


def _set_dotted(raw: dict, dotted: str, value: Any) -> None:
    node = raw
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is not a section")
    node[leaf] = value


def _resolve_paths(params: Params, base: Path) -> Params:
    def absolute(p: Path) -> Path:
        return p if p.is_absolute() else (base / p)

    catalogue = params.data.catalogue
    data = params.data.model_copy(update={"root": absolute(params.data.root),
                                          "catalogue": None if catalogue is None else absolute(catalogue)})
    store = params.store.model_copy(update={"root": absolute(params.store.root)})
    site = params.site.model_copy(update={"privacy": params.site.privacy.model_copy(
        update={"ledger": absolute(params.site.privacy.ledger)})})
    members = [_absolute_source(m, absolute) for m in params.federation.members]
    splits = params.federation.splits
    splits = splits.model_copy(update={n: _absolute_source(getattr(splits, n), absolute) for n in SERVER_SPLITS
                                       if getattr(splits, n) is not None})
    federation = params.federation.model_copy(update={"work_dir": absolute(params.federation.work_dir),
                                                      "members": members, "splits": splits})
    comparison = params.report.comparison
    report = params.report.model_copy(update={"root": absolute(params.report.root),
                                              "comparison": None if comparison is None else absolute(comparison)})
    return params.model_copy(update={"data": data, "site": site, "store": store, "federation": federation,
                                     "report": report})


def _absolute_source(source, absolute):
    return source if source.path is None else source.model_copy(update={"path": absolute(source.path)})


def params_hash(section: BaseModel) -> str:
    """Stable short hash of a section (paths excluded so that moving the repo keeps caches valid)."""
    return short_digest(section.model_dump(mode="json", exclude={"root"}))
