"""A self-contained folder holding one injected central model: what the registry stores and the pyfunc serves.

    params.yaml              the full params the model was built with (rebuilds the FM, encoders and M3OE shapes)
    trainable.safetensors    M3OE experts and gate, projectors, and the FM's modality-tag embedding rows
    encoders.safetensors     the injected modality encoders (and task heads)
    adapters/<task>/         per catalogue task: the mixture for its (task, modality) pair as a plain peft LoRA
    catalogue.yaml           the task catalogue the model was trained with (its tasks, questions and answers)
    calibration.json         per task what evaluation decided its answers with (threshold, option priors): the
                             served model decides the same way
    MODEL_CARD.md            what it is, where it came from, how it scores, what it must not be used for
    DATA_CARD.md             the data behind it: sites (fingerprints, samples per task), the gate's verdicts per
    data_card.json           site and server split, the task catalogue (fedkim.central.datacard)
    bundle.json              schema version, variant, round id, sites, the gate's reference descriptions, sha256
                             of every other file

The frozen FM itself is not copied: `inject.foundation_model` names its offline source, and `load_bundle` rebuilds
it. The tag rows are stored because the FM's mean-resizing samples them from a (tiny-variance) random draw. The
gate's reference descriptions (inject.gate_norm 'train' / 'catalogue') are stored too: a model scored or served on
a catalogue with new tasks routes the tasks it knows exactly as it was trained to.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import torch
import yaml
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from fedkim.central.datacard import data_card, data_record
from fedkim.central.model import TAGS, CentralModel
from fedkim.central.variants import VARIANTS, build_central
from fedkim.config import ConfigError, Params, format_validation_error
from fedkim.data.catalogue import catalogue_of
from fedkim.digests import sha256_file
from fedkim.federation.package import current_code_version
from fedkim.members import split_source

SCHEMA_VERSION = 1
MANIFEST = "bundle.json"
CATALOGUE = "catalogue.yaml"
CALIBRATION_FILE = "calibration.json"
DATA_CARD, DATA_CARD_JSON = "DATA_CARD.md", "data_card.json"
TAG_INPUT, TAG_OUTPUT = "fm_tags.input_embeddings", "fm_tags.output_embeddings"


class BundleError(RuntimeError):
    """A bundle folder that cannot be loaded; the message names the file and what is wrong with it."""


# ----------------------------------------------------------------------------------------------------- saving
def save_bundle(model: CentralModel, params: Params, folder: str | Path, *, variant: str = "fedkim",
                round_id: str | None = None, sites: list[str] | dict[str, str] | None = None,
                metrics: dict | None = None, adapters: bool | str | None = None, data: dict | None = None) -> Path:
    """Write the bundle to `folder` (replaced as a whole, so no stale file survives) and return it.

    sites: the site ids that contributed (or site id -> data fingerprint). metrics: `evaluate()`'s dict, for the
    model card. adapters: which (task, modality) pairs get a merged peft adapter — "all", "train" (the training
    tasks), "none"/False; default `tracking.bundle_adapters`. Each is rank (P+S)·r on every adapted linear
    (about 127 MB for SmolLM2 with 12 + 1 shared experts of rank 8), so the default keeps to the training tasks;
    the others can be exported from the bundle's M3OE weights at any time. data: the data card's record
    (fedkim.central.datacard.data_record; None: one from `sites` alone)."""
    folder = Path(folder)
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    sites = dict(sites) if isinstance(sites, dict) else {s: "" for s in (sites or [])}

    (staging / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
    state = model.trainable_state()
    trainable = {k: v.contiguous() for k, v in state.items() if not k.startswith("encoders.")}
    trainable |= _tag_rows(model)
    save_file(trainable, str(staging / "trainable.safetensors"), metadata={"format": "pt"})
    save_file({k: v.contiguous() for k, v in model.encoder_state().items()}, str(staging / "encoders.safetensors"),
              metadata={"format": "pt"})
    choice = params.tracking.bundle_adapters if adapters is None else adapters
    choice = {True: "all", False: "none"}.get(choice, choice)
    catalogue = catalogue_of(params.data)
    (staging / CATALOGUE).write_bytes(_catalogue_bytes(params))
    exported = {"all": list(catalogue.tasks), "train": list(catalogue.train), "none": []}[choice]
    if model.m3oe is not None:
        for task in exported:
            model.m3oe.export_peft(staging / "adapters" / task, *model.gate_mode.pair(catalogue[task]))
    data = data if data is not None else data_record(params, fingerprints=sites)
    (staging / DATA_CARD_JSON).write_text(json.dumps(data, indent=2))
    (staging / DATA_CARD).write_text(data_card(data))
    (staging / CALIBRATION_FILE).write_text(json.dumps(
        {"eval": params.eval.model_dump(mode="json"), "tasks": (metrics or {}).get("calibration") or {}}, indent=2))
    (staging / "MODEL_CARD.md").write_text(model_card(params, variant=variant, round_id=round_id, sites=sites,
                                                      metrics=metrics, has_adapters=(staging / "adapters").is_dir(),
                                                      catalogue=catalogue))
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "variant": variant,
        "round_id": round_id,
        "sites": sites,
        "foundation_model": params.inject.foundation_model,
        "code_version": current_code_version(),
        "tag_tokens": _tag_tokens(model),
        "gate_reference": model.gate_reference(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "files": {rel: sha256_file(staging / rel) for rel in _files(staging)},
    }
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return folder


def _catalogue_bytes(params: Params) -> bytes:
    """The catalogue file params select, as it is (None: the shipped one)."""
    from fedkim.data.catalogue import SHIPPED

    return Path(params.data.catalogue or SHIPPED).read_bytes()


def _tag_tokens(model: CentralModel) -> dict[str, int]:
    return {t: model.tokenizer.convert_tokens_to_ids(t) for pair in TAGS.values() for t in pair}


def _tag_rows(model: CentralModel) -> dict[str, torch.Tensor]:
    ids = torch.tensor(list(_tag_tokens(model).values()))
    rows = {TAG_INPUT: model.fm.get_input_embeddings().weight[ids].detach().cpu().clone()}
    output = _output_weight(model)
    if output is not None and output.data_ptr() != model.fm.get_input_embeddings().weight.data_ptr():
        rows[TAG_OUTPUT] = output[ids].detach().cpu().clone()  # an untied LM head has its own tag rows
    return rows


def _output_weight(model: CentralModel) -> torch.Tensor | None:
    head = model.fm.get_output_embeddings()
    return None if head is None else head.weight  # M3OELinear exposes its base weight as .weight


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


# ------------------------------------------------------------------------------------------------- model card
def model_card(params: Params, *, variant: str, round_id: str | None, sites: dict[str, str], metrics: dict | None,
               has_adapters: bool, catalogue=None) -> str:
    p = params.inject
    catalogue = catalogue or catalogue_of(params.data)
    lines = [
        f"# FedKIM central model{f' (round {round_id})' if round_id else ''}", "",
        "## Model", "",
        f"- Foundation model: `{p.foundation_model}` (frozen; rebuilt from its offline source, not stored here)",
        f"- Variant: `{variant}`; M3OE experts: {p.num_experts} routed + {p.shared_experts} shared, "
        f"rank {p.rank}, alpha {p.alpha}, gate `{p.gate}`"
        f"{', LoRA scale 1.0' if p.scale_one else ''}",
        f"- Federation: strategy `{params.federation.strategy}`, {params.federation.rounds} round(s) configured",
        f"- Round: {round_id or 'not recorded'}",
        f"- Sites that contributed: {', '.join(sorted(sites)) or 'not recorded'}",
        f"- Per-task peft adapters: {'adapters/<task>/' if has_adapters else 'not exported'}", "",
        f"## Evaluation ({_provenance(params, 'test')} test split)", "",
    ]
    lines += _metrics_table(metrics) if metrics and metrics.get("tasks") else ["No evaluation recorded.", ""]
    lines += [
        "## Intended use", "",
        "Research and MLOps demonstration of federated knowledge injection: answering the "
        f"{len(catalogue.tasks)} catalogue tasks ({len(catalogue.train)} trained, {len(catalogue.zero_shot)} "
        "zero-shot) on inputs in the fedkim site format.", "",
        "## Limitations", "",
        "- " + _data_limitation(params),
        "- **Not for clinical use**: not validated, not a medical device, not to inform any diagnosis or treatment.",
        "- Zero-shot tasks were never trained on; their figures can sit at chance.", "",
    ]
    return "\n".join(lines)


def _provenance(params: Params, split: str) -> str:
    source = split_source(params, split)
    return "provided" if source is not None and source.data == "provided" else "synthetic"


def _data_limitation(params: Params) -> str:
    provided = [m.id for m in params.federation.members if m.data == "provided"]
    if not provided and _provenance(params, "test") == "synthetic":
        return ("Trained and evaluated only on synthetic, offline data (procedural radiographs, simulated ECGs and "
                "ICU series, generated questions); the figures say nothing about real patients.")
    return (f"Trained on data provided by {', '.join(provided) or 'no member'} (DATA_CARD.md: fingerprints, counts, "
            "the gate's verdicts); the figures hold for the test split described there, not for other populations.")


def _metrics_table(metrics: dict) -> list[str]:
    lines = ["| task | role | primary | F1 | AUROC | accuracy |", "|---|---|---|---|---|---|"]
    for task, m in metrics["tasks"].items():
        cells = [_fmt(m.get(k)) for k in ("primary", "f1", "auroc", "accuracy")]
        lines.append(f"| {task} | {m.get('role', '')} | " + " | ".join(cells) + " |")
    summary = {k: metrics.get(k) for k in ("train_mean_f1", "zeroshot_mean", "mean_auroc")}
    lines += ["", "Summary: " + ", ".join(f"{k} {_fmt(v)}" for k, v in summary.items()), ""]
    return lines


def _fmt(value) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{float(value):.3f}"


# ---------------------------------------------------------------------------------------------------- loading
def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise BundleError(f"{path}: not found; {folder} is not a model bundle") from None
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path}: not valid JSON ({exc})") from None
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise BundleError(f"{path}: schema_version {manifest.get('schema_version')!r}, this fedkim reads "
                          f"{SCHEMA_VERSION}")
    return manifest


def verify_bundle(folder: str | Path) -> dict:
    """Check every file listed in bundle.json against its sha256; return the manifest."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    for rel, expected in manifest["files"].items():
        path = folder / rel
        if not path.is_file():
            raise BundleError(f"{path}: listed in {MANIFEST} but missing")
        actual = sha256_file(path)
        if actual != expected:
            raise BundleError(f"{path}: sha256 mismatch (bundle.json says {expected[:12]}…, file has "
                              f"{actual[:12]}…); the bundle was modified or copied incompletely")
    return manifest


def read_params(folder: str | Path) -> Params:
    path = Path(folder) / "params.yaml"
    try:
        return Params.model_validate(yaml.safe_load(path.read_text()))  # exactly as stored: no env overrides
    except ValidationError as exc:
        raise ConfigError(format_validation_error(path, exc, Params)) from None


def catalogue_file(folder: str | Path) -> Path | None:
    """The task catalogue the bundle was trained with: its own copy (None, the shipped catalogue, for a bundle
    without one). params' data.catalogue names a file on the machine that trained it."""
    stored = Path(folder) / CATALOGUE
    return stored if stored.is_file() else None


def read_calibration(folder: str | Path) -> dict:
    """{task: calibration record} (fedkim.central.evaluate.calibration_record) of a verified bundle; {} for a
    bundle saved without evaluation's calibration (its answers are then decided label-free)."""
    path = Path(folder) / CALIBRATION_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())["tasks"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise BundleError(f"{path}: not a calibration file ({exc.__class__.__name__}: {exc})") from None


def load_bundle(folder: str | Path) -> tuple[CentralModel, Params]:
    """Verify the bundle, rebuild its model (FM from its source, same variant) and load the weights; eval mode."""
    folder = Path(folder)
    manifest = verify_bundle(folder)
    params = read_params(folder)
    variant = manifest.get("variant", "fedkim")
    if variant not in VARIANTS:
        raise BundleError(f"{folder / MANIFEST}: unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
    own = params.model_copy(update={"data": params.data.model_copy(update={"catalogue": catalogue_file(folder)})})
    model = build_central(own, VARIANTS[variant], gate_reference=manifest.get("gate_reference"))
    trainable = load_file(str(folder / "trainable.safetensors"))
    tags = {k: trainable.pop(k) for k in (TAG_INPUT, TAG_OUTPUT) if k in trainable}
    parts = [("encoders", model.encoders, load_file(str(folder / "encoders.safetensors")), "encoders.safetensors"),
             ("projectors", model.projectors, trainable, "trainable.safetensors"),
             ("m3oe", model.m3oe, trainable, "trainable.safetensors")]
    for prefix, module, state, file in parts:
        if module is not None:
            _load_part(module, prefix, state, folder / file, manifest)
    _restore_tags(model, tags, manifest, folder)
    return model.eval(), params


def _load_part(module: torch.nn.Module, prefix: str, state: dict[str, torch.Tensor], path: Path,
               manifest: dict) -> None:
    part = {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}
    try:
        module.load_state_dict(part)  # strict: a key or shape mismatch is an error, never a partial load
    except RuntimeError as exc:
        raise BundleError(f"{path}: {prefix} do not fit the model that params.yaml builds with this code "
                          f"(bundle written by fedkim {manifest.get('code_version', 'unknown')}): {exc}") from None


def _restore_tags(model: CentralModel, rows: dict[str, torch.Tensor], manifest: dict, folder: Path) -> None:
    if manifest.get("tag_tokens") != _tag_tokens(model):
        raise BundleError(f"{folder / MANIFEST}: modality tag ids {manifest.get('tag_tokens')} differ from the "
                          f"rebuilt tokenizer's {_tag_tokens(model)}; is inject.foundation_model the same FM?")
    ids = torch.tensor(list(_tag_tokens(model).values()))
    with torch.no_grad():
        if TAG_INPUT in rows:
            model.fm.get_input_embeddings().weight[ids] = rows[TAG_INPUT]
        if TAG_OUTPUT in rows:
            _output_weight(model)[ids] = rows[TAG_OUTPUT]
