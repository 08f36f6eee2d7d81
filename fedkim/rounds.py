"""One federated round as idempotent steps around the artifact store: what Prefect flows, DVC stages and plain
Python all call (the orchestrators only decide where and when each step runs).

Store layout of a round (keys relative to the store root):

    rounds/<r>/global/encoders.safetensors       the global model the sites start from
    rounds/<r>/sites/<site>/...                  each site's knowledge package (manifest.json + tensors)
    rounds/<r>/sites/<site>/validation.json      each site's data gate summary (orchestrated rounds)
    rounds/<r>/aggregate/                        the screened, aggregated model (+ aggregate.json, FedAdam's moments)
    rounds/<r>/central/                          M3OE experts, gate, projectors and encoders after injection
    rounds/<r>/evaluation/metrics.json           per-task metrics of the injected model
    rounds/LATEST.json                           the last completed round (where the next one starts)

Every step first looks for its own output in the store and returns it when present, so re-running a round id
never trains, uploads or aggregates twice. LATEST only moves forward (fedkim.round_chain), and run_round and the
flow hold the round id's lock while they run (fedkim.round_lock).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
import zlib
from collections.abc import Callable, Collection, Mapping
from dataclasses import asdict, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fedkim.central.evaluate import CALIBRATION, evaluate, gate_table
from fedkim.central.inject import inject
from fedkim.central.model import CentralModel
from fedkim.central.variants import VARIANTS, build_central
from fedkim.config import Params
from fedkim.data.catalogue import catalogue_of
from fedkim.data.siteformat import SITE_FILE, compute_fingerprint
from fedkim.data.validate import gate_reason, gate_summary
from fedkim.federation.aggregate import ServerOptimizerState, aggregate
from fedkim.federation.checks import screen_packages
from fedkim.federation import signing
from fedkim.federation.package import ValidationSummary, finite_metrics, read_manifest, write_package
from fedkim.federation.store import ArtifactStore, package_prefix
from fedkim.federation.weights import verified_counts
from fedkim.members import site_dir, split_dir
from fedkim.outcomes import REPORTED, AggregateOutcome, SiteOutcome
from fedkim.progress import PhaseTimer
from fedkim.round_chain import advance, base_key, read_latest
from fedkim.round_lock import round_lock
from fedkim.site.model import global_model
from fedkim.site.privacy import PrivacyBudgetError, PrivacyLedger
from fedkim.site.train import LocalResult, train_site

LATEST_KEY = "rounds/LATEST.json"
OPTIMIZER_FILE = "server_optimizer.safetensors"  # FedAdam's moments, beside the aggregate
Trainer = Callable[[Path, dict, int], LocalResult]  # (site folder, global state, seed) -> local training result


class QuorumError(RuntimeError):
    """Fewer sites than `federation.quorum` delivered an acceptable package."""


class SplitGateError(RuntimeError):
    """A server split (public or test) failed the data gate: the round cannot inject or evaluate on it."""


def round_key(round_id: str, *parts: str) -> str:
    return "/".join(["rounds", str(round_id), *parts])


def validation_key(round_id: str, site_id: str) -> str:
    """Where a site's gate summary goes: in the site's own prefix, the only one its store role may write
    (fedkim.federation.policies). Not part of the package: the package is its manifest and the files it names."""
    return f"{package_prefix(round_id, site_id)}/validation.json"


def round_seed(round_id: str, base: int) -> int:
    """Numeric round ids keep the seeds of `fedkim experiment`; other ids (e.g. dates) hash to a seed."""
    text = str(round_id)
    return base + (int(text) if text.isdigit() else zlib.crc32(text.encode()) % 100_000)


# ------------------------------------------------------------------------------------------ tensors in the store
def put_state(store: ArtifactStore, key: str, state: dict[str, torch.Tensor], *, overwrite: bool = False) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "state.safetensors"
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(path))
        return store.put_file(key, path, overwrite=overwrite)


def get_state(store: ArtifactStore, key: str) -> dict[str, torch.Tensor]:
    with tempfile.TemporaryDirectory() as tmp:
        return load_file(str(store.get_file(key, Path(tmp) / "state.safetensors")))


def put_json(store: ArtifactStore, key: str, payload: dict, *, overwrite: bool = False) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "payload.json"
        path.write_text(json.dumps(payload, indent=2, sort_keys=True, default=float))
        return store.put_file(key, path, overwrite=overwrite)


def get_json(store: ArtifactStore, key: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        return json.loads(store.get_file(key, Path(tmp) / "payload.json").read_text())


# ------------------------------------------------------------------------------------------ steps
def start_round(params: Params, store: ArtifactStore, round_id: str, *, seed: int = 0) -> str:
    """Publish the global model of this round: the previous round's encoders after injection, or the initial
    model. Returns its key. Idempotent: an existing global model of this round is kept as it is. `seed` shifts
    the initial model's seed (a trial of `fedkim experiment --seeds`)."""
    key = round_key(round_id, "global", "encoders.safetensors")
    if store.exists(key):
        return signing.verified_key(params, store, key, signing.GLOBAL_MODEL, round_id)  # refuses a forged one
    catalogue_of(params.data).check_sites(params.federation.members)
    state = global_model(params.site, params.data, seed=params.data.seed + seed).state_dict()
    previous = latest_round(store, params)
    if previous is not None and previous != str(round_id):
        state = {**state, **get_state(store, signing.verified_key(params, store, round_key(
                     previous, "aggregate", "encoders.safetensors"), signing.AGGREGATE, previous)),
                 **get_state(store, central_key(params, store, previous, "encoders.safetensors"))}
    put_json(store, base_key(round_id), {"previous": previous}, overwrite=True)  # what finish_round checks
    put_state(store, key, state)
    signing.sign_objects(params, store, key, signing.GLOBAL_MODEL, round_id, round_nonce=signing.new_round_nonce(),
                         also=("base.json",))
    return key


def latest_round(store: ArtifactStore, params: Params | None = None) -> str | None:
    """The last completed round; LatestError (naming the key) when rounds/LATEST.json cannot be trusted.
    `params`: its signature is verified as federation.signatures says (the steps always pass them)."""
    latest = read_latest(store, params=params)
    return latest.round_id if latest is not None else None


def central_key(params: Params, store: ArtifactStore, round_id: str, name: str) -> str:
    """The key of a file of a round's injected model, once inject.json's signature (which covers it) verifies."""
    return signing.verified_key(params, store, round_key(round_id, "central", name), signing.CENTRAL, round_id,
                                signed_with=round_key(round_id, "central", "inject.json"))


_GATE_REPORTS: dict[tuple, tuple] = {}  # (directory, content, gate params) -> (ValidationReport, docs written)


def _gate(directory: Path, params: Params, *, write_docs: bool, reports_dir: Path | None = None):
    """The GX gate on one directory, its report reused within this process while the directory's content (files
    and site.yaml) and the gate params are unchanged: an experiment's many rounds pay for GX once per site, and a
    site's training finds what its gate quarantined. Hashing the content still reads every file, so a changed
    directory is always gated again."""
    from fedkim.data.validate import validate_site

    try:
        manifest = hashlib.sha256((directory / SITE_FILE).read_bytes()).hexdigest()
        key = (str(directory.resolve()), compute_fingerprint(directory), manifest, params.data.gate.model_dump_json(),
               params.data.icu_hours, catalogue_of(params.data).digest)
    except OSError:  # no directory or no site.yaml: the gate reports it
        key = None
    cached = _GATE_REPORTS.get(key) if key is not None else None
    if cached is None or (write_docs and not cached[1]):
        report = validate_site(directory, params.data.gate, write_docs=write_docs, reports_dir=reports_dir,
                               icu_hours=params.data.icu_hours, catalogue=catalogue_of(params.data))
        if key is None:
            return report
        _GATE_REPORTS[key] = (report, write_docs)
    return _GATE_REPORTS[key][0]


def validate_site_step(params: Params, site_id: str, *, write_docs: bool = True):
    """The GX gate on one member's data (runs at the site). Returns the ValidationReport; never raises for bad
    data. A provided (real) site directory is only read: its report files go to federation.work_dir/gate/<id>."""
    provided = params.member(site_id).data == "provided"
    reports = params.federation.work_dir / "gate" / site_id if provided else None
    return _gate(site_dir(params, site_id), params, write_docs=write_docs, reports_dir=reports)


def validate_split_step(params: Params, split: str) -> dict:
    """The gate on a server split (`public` before injection, `test` and `validation` before evaluation): its
    summary, or
    SplitGateError naming the split and the failed rules. Report files are not written into the split."""
    summary = gate_summary(_gate(split_dir(params, split), params, write_docs=False))
    if not summary["success"]:
        raise SplitGateError(f"server split {split!r} ({split_dir(params, split)}): {gate_reason(summary)}")
    return summary


def split_quarantine(params: Params, split: str) -> list[str]:
    """The samples of a server split that its gate quarantined (left out of injection and evaluation); the gate's
    report is reused when it ran in this process."""
    return _gate(split_dir(params, split), params, write_docs=False).quarantined


def package_validation(summary: dict) -> ValidationSummary:
    """What a knowledge package says of its site's gate, from the gate's summary (fedkim.data.validate)."""
    return ValidationSummary(success=summary["success"], findings=len(summary["findings"]))


def gated_site(params: Params, site_id: str) -> tuple[dict, SiteOutcome | None]:
    """The gate summary of a member, and its `excluded` outcome (with the reason) when it failed the gate. No data
    docs: the summary is what a plain-Python round or an experiment keeps."""
    summary = gate_summary(validate_site_step(params, site_id, write_docs=False))
    if summary["success"]:
        return summary, None
    return summary, SiteOutcome(site_id, "excluded", gate_reason(summary), validation=summary)


def train_site_step(params: Params, store: ArtifactStore, round_id: str, site_id: str, *,
                    validation: ValidationSummary, progress: bool = False, seed: int = 0,
                    trainer: Trainer | None = None, quarantined: Collection[str] | None = None) -> SiteOutcome:
    """Train at one site from the round's global model and upload its knowledge package (runs at the site).
    `validation`: what the data gate found for this site (package_validation), carried by the package.
    `quarantined`: the samples the gate left out (default: what the site's gate report says, reused from this
    process when the gate ran here). `seed` shifts the training seed (a trial); `trainer` replaces `train_site`
    (the experiment's shared cache) and is given `exclude=` when the gate quarantined samples."""
    if not isinstance(validation, ValidationSummary):
        raise ValueError(f"{site_id}: train_site_step needs the data gate's summary of the site (got {validation!r})")
    prefix = package_prefix(round_id, site_id)
    if store.exists(f"{prefix}/manifest.json"):  # this site already reported for this round
        return SiteOutcome.from_manifest(read_manifest_from_store(store, prefix, catalogue_of(params.data)),
                                         "reused")
    global_key = round_key(round_id, "global", "encoders.safetensors")
    global_state, nonce = get_state(store, global_key), signing.round_nonce(params, store, global_key, round_id)
    train = trainer or (lambda site_dir_, state, seed_, **kw: train_site(site_dir_, state, params.site, params.data,
                                                                         seed=seed_, progress=progress, **kw))
    if quarantined is None:
        quarantined = validate_site_step(params, site_id, write_docs=False).quarantined
    extra = {"exclude": sorted(quarantined)} if quarantined else {}
    if params.site.privacy.enabled:  # the site's own record of its budget (members[].epsilon_max: its own budget)
        extra["ledger"] = PrivacyLedger(params.site.privacy, site_id, round_id=round_id,
                                        epsilon_max=params.member(site_id).epsilon_max)
    try:
        local = train(site_dir(params, site_id), global_state, round_seed(round_id, params.data.seed + seed), **extra)
    except PrivacyBudgetError as exc:  # the site refuses: nothing trained, nothing uploaded; the round says why
        return SiteOutcome(site_id, "refused", str(exc))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / site_id
        write_package(folder, local.state_dict, site_id=site_id, round_id=str(round_id),
                      sample_counts=local.sample_counts, task_counts=local.task_counts,
                      data_fingerprint=local.data_fingerprint, local_metrics=finite_metrics(local.metrics),
                      validation_summary=validation, catalogue=catalogue_of(params.data), round_nonce=nonce,
                      privacy=local.privacy)
        signing.upload_package(params, store, prefix, folder, nonce, lambda s: _gate_summaries(store, round_id, [s])[s])
    return SiteOutcome(site_id, "trained", sample_counts=local.sample_counts,
                       metrics=finite_metrics(local.metrics), data_fingerprint=local.data_fingerprint,
                       seconds=round(local.seconds, 1), privacy=local.privacy)


def read_manifest_from_store(store: ArtifactStore, prefix: str, catalogue=None):
    with tempfile.TemporaryDirectory() as tmp:
        store.get_file(f"{prefix}/manifest.json", Path(tmp) / "manifest.json")
        return read_manifest(tmp, catalogue)


def _gate_summaries(store: ArtifactStore, round_id: str, sites: list[str], given: Mapping | None = None) -> dict:
    """Each site's gate summary: the caller's, else the one its site run stored (orchestrated rounds), else None."""
    keys = {site: validation_key(round_id, site) for site in sites}
    return {site: (given or {}).get(site) or (get_json(store, key) if store.exists(key) else None)
            for site, key in keys.items()}


def _previous_optimizer(params: Params, store: ArtifactStore, round_id: str) -> ServerOptimizerState | None:
    """FedAdam's moments after the last completed round (None: the first FedAdam round starts from zero), once
    that round's aggregate signature (which covers them) verifies."""
    previous = latest_round(store, params)
    key = previous and round_key(previous, "aggregate", OPTIMIZER_FILE)
    if previous is None or previous == str(round_id) or not store.exists(key):
        return None
    signing.verified(params, store, key, signing.AGGREGATE, previous,
                     signed_with=round_key(previous, "aggregate", "encoders.safetensors"))
    with tempfile.TemporaryDirectory() as tmp:
        return ServerOptimizerState.load(store.get_file(key, Path(tmp) / OPTIMIZER_FILE))


def aggregate_step(params: Params, store: ArtifactStore, round_id: str, site_ids: list[str], *,
                   gate_summaries: Mapping[str, dict | None] | None = None) -> AggregateOutcome:
    """Collect the reporting sites' packages, screen them, check the quorum and aggregate (runs at the server).
    A site weighs by its sample counts capped by its gate summary (`gate_summaries`, else the one in the store;
    fedkim.federation.weights) and by `federation.max_weight_share`; FedAdam continues from the last completed
    round's moments."""
    key = round_key(round_id, "aggregate", "encoders.safetensors")
    if store.exists(key):
        signing.verified(params, store, key, signing.AGGREGATE, round_id)  # refuses an unsigned or forged one
        saved = get_json(store, round_key(round_id, "aggregate", "aggregate.json"))
        return AggregateOutcome(str(round_id), saved["accepted"], saved["rejected"], saved["strategy"], reused=True,
                                findings=saved.get("weight_findings", {}))
    fed, catalogue = params.federation, catalogue_of(params.data)
    global_state = get_state(store, global_key := round_key(round_id, "global", "encoders.safetensors"))
    with tempfile.TemporaryDirectory() as tmp:
        folders, missing = [], {}
        for site in site_ids:
            prefix = package_prefix(round_id, site)
            if not store.exists(f"{prefix}/manifest.json"):
                missing[site] = [f"no package in the store at {prefix}/"]
                continue
            folders.append(store.get_dir(prefix, Path(tmp) / site))
        folders, unsigned = signing.screen_signatures(params, store, global_key, folders, str(round_id),
                                                      lambda site: _gate_summaries(store, round_id, [site])[site])
        accepted, rejected = screen_packages(folders, global_state, max_update_norm=fed.max_update_norm,
                                             expected_round=str(round_id), catalogue=catalogue,
                                             norm_multiple=fed.norm_multiple)
        rejected = {**missing, **unsigned, **rejected}
        if len(accepted) < fed.quorum:
            raise QuorumError(f"round {round_id}: {len(accepted)} acceptable package(s), below the quorum of "
                              f"{fed.quorum}; rejected or missing: {rejected}")
        names = [p.manifest.site_id for p in accepted]
        weighing = verified_counts([p.manifest for p in accepted],
                                   _gate_summaries(store, round_id, names, gate_summaries), catalogue)
        hparams = {"fedprox": {"mu": params.site.fedprox_mu},
                   "trimmed_mean": {"trim_fraction": fed.trim_fraction}}.get(fed.strategy, {})
        optimizer = _previous_optimizer(params, store, round_id) if fed.strategy == "fedadam" else None
        result = aggregate(fed.strategy, global_state, accepted, catalogue=catalogue, state=optimizer,
                           counts=weighing.counts, max_weight_share=fed.max_weight_share, **hparams)
    put_json(store, round_key(round_id, "aggregate", "aggregate.json"),
             {"accepted": names, "rejected": rejected, "strategy": fed.strategy, "weights": result.weights,
              "weight_findings": weighing.findings, "unverified_counts": weighing.unverified})
    if fed.strategy == "fedadam":
        with tempfile.TemporaryDirectory() as tmp:
            store.put_file(round_key(round_id, "aggregate", OPTIMIZER_FILE),
                           result.optimizer_state.save(Path(tmp) / OPTIMIZER_FILE))
    put_state(store, key, result.state_dict)  # last: marks the aggregation as done
    signing.sign_objects(params, store, key, signing.AGGREGATE, round_id, also=("aggregate.json", OPTIMIZER_FILE))
    return AggregateOutcome(str(round_id), names, rejected, fed.strategy, findings=weighing.findings)


def load_central(params: Params, store: ArtifactStore, round_id: str, *, injected: bool) -> CentralModel:
    """The central model for a round: aggregated encoders, plus this round's injected weights (injected=True) or
    the previous round's (the experts keep learning across rounds). Each signature is verified first."""
    model = build_central(params, VARIANTS["fedkim"])
    aggregated = signing.verified_key(params, store, round_key(round_id, "aggregate", "encoders.safetensors"),
                                      signing.AGGREGATE, round_id)
    model.load_encoders(get_state(store, aggregated))
    source = str(round_id) if injected else latest_round(store, params)
    if source is not None and (injected or source != str(round_id)):
        model.load_trainable_state(get_state(store, central_key(params, store, source, "trainable.safetensors")))
        if not injected:  # the previous round's trained experts, but this round's aggregated encoders
            model.load_encoders(get_state(store, aggregated))
    return model.eval()  # inference by default (dropout off); injection switches training on itself


def inject_step(params: Params, store: ArtifactStore, round_id: str, work_dir: Path, *,
                model: CentralModel | None = None, progress: bool = False) -> tuple[CentralModel, dict]:
    """M3OE injection on the server's public split (runs on the central pool; uses CUDA when present).
    `model`: inject into this model as it is (the experiment's variants) instead of the round's fedkim model."""
    done = round_key(round_id, "central", "inject.json")
    if store.exists(done) and model is None:
        return load_central(params, store, round_id, injected=True), get_json(store, central_key(
            params, store, round_id, "inject.json"))
    model = model if model is not None else load_central(params, store, round_id, injected=False)
    result = inject(model, split_dir(params, "public"), params.inject, params.site, params.data,
                    round_id=str(round_id), checkpoint_dir=Path(work_dir) / "checkpoints", progress=progress,
                    exclude=split_quarantine(params, "public"))
    model.to("cpu")
    summary = {"round_id": str(round_id), "losses": result.losses, "lrs": result.lrs, "tasks": result.tasks,
               "seconds": round(result.seconds, 1), "steps": len(result.losses)}
    put_state(store, round_key(round_id, "central", "trainable.safetensors"), model.trainable_state(), overwrite=True)
    put_state(store, round_key(round_id, "central", "encoders.safetensors"), model.encoder_state(), overwrite=True)
    put_json(store, done, summary, overwrite=True)  # last: marks the injection as done
    signing.sign_objects(params, store, done, signing.CENTRAL, round_id, replace=True,
                         also=("trainable.safetensors", "encoders.safetensors"))
    return model, summary


def evaluate_step(params: Params, store: ArtifactStore, round_id: str, model: CentralModel, *,
                  progress: bool = False, split: str = "test", recompute: bool = False) -> dict:
    """The injected model's metrics on a server split: `test` (the reported figures, with the gate table and the
    calibration the served model decides with) or `validation` (the figures promotion decides on). recompute: what
    a decision rests on is computed from the model, never read from the store (an object there may be planted);
    a stored file that disagrees is left as it is and flagged (`stored_differs`)."""
    key = round_key(round_id, "evaluation", "metrics.json" if split == "test" else f"{split}_metrics.json")
    if store.exists(key) and not recompute:
        return get_json(store, signing.verified_key(params, store, key, signing.EVALUATION, round_id))
    calibration: dict = {}
    metrics = evaluate(model, split_dir(params, split), params.eval, params.site, params.data,
                       public_dir=split_dir(params, "public"), progress=progress, split=split,
                       calibration=calibration, tasks=None if split == "test" else catalogue_of(params.data).train,
                       exclude=[*split_quarantine(params, split), *split_quarantine(params, "public")])
    if split == "test":
        metrics["gate"] = gate_table(model)
        metrics[CALIBRATION] = calibration  # what the served model decides with (the bundle's calibration.json)
    if store.exists(key):  # recomputed: compare the task figures, keep the stored object untouched
        try:
            stored = get_json(store, key)
        except ValueError:
            stored = None
        stored = stored.get("tasks") if isinstance(stored, dict) else None
        return metrics | {"stored_differs": json.dumps(stored, sort_keys=True)
                          != json.dumps(json.loads(json.dumps(metrics["tasks"])), sort_keys=True)}
    put_json(store, key, metrics)
    signing.sign_objects(params, store, key, signing.EVALUATION, round_id)
    return metrics


def finish_round(store: ArtifactStore, round_id: str, params: Params | None = None) -> bool:
    """Mark the round complete: the next round starts from its encoders. Only forward: an old round finished
    again, or one that did not start from the current LATEST, leaves it (fedkim.round_chain). True when moved.
    `params`: LATEST and the history are verified and signed as federation.signatures says."""
    moved = advance(store, round_id, params)
    if moved is not None:
        payload = moved.payload() if params is None else signing.sign_record(params, moved.payload(), signing.LATEST)
        put_json(store, LATEST_KEY, payload, overwrite=True)
    return moved is not None


def run_round(params: Params, store: ArtifactStore, round_id: str, work_dir: Path, *,
              progress: bool = False, owner: str = "") -> dict:
    """The whole round in plain Python, sites one after another (the orchestration-free baseline): each member's
    data gate, then its training (a member that fails the gate is left out with its reason; the quorum decides);
    the public split's gate before injection, the test split's before evaluation (SplitGateError stops the round).
    Holds the round's lock throughout (RoundLockedError when another run holds it; `owner` names this one)."""
    with round_lock(store, str(round_id), params.federation.round_lock, owner=owner):
        return _round_steps(params, store, round_id, work_dir, progress=progress)


def _round_steps(params: Params, store: ArtifactStore, round_id: str, work_dir: Path, *, progress: bool) -> dict:
    started = time.perf_counter()
    timer = PhaseTimer()
    with timer("start"):
        start_round(params, store, round_id)
    sites = []
    for site_id in params.member_ids():
        with timer(f"site:{site_id}"):
            summary, excluded = gated_site(params, site_id)
            sites.append(excluded or replace(train_site_step(params, store, round_id, site_id, progress=progress,
                                                             validation=package_validation(summary)),
                                             validation=summary))
    with timer("aggregate"):
        agg = aggregate_step(params, store, round_id, [s.site_id for s in sites if s.status in REPORTED],
                             gate_summaries={s.site_id: s.validation for s in sites})
    with timer("inject"):
        splits = {"public": validate_split_step(params, "public")}
        model, injection = inject_step(params, store, round_id, work_dir, progress=progress)
    with timer("evaluate"):
        splits["test"] = validate_split_step(params, "test")
        metrics = evaluate_step(params, store, round_id, model, progress=progress)
    with timer("finish"):
        finish_round(store, round_id, params)
    return {"round_id": str(round_id), "sites": [s.as_dict() for s in sites], "aggregate": asdict(agg),
            "data_gate": {**{s.site_id: s.validation for s in sites}, **splits},
            "injection": {k: v for k, v in injection.items() if k not in ("losses", "lrs", "tasks")},
            "metrics": metrics, "seconds": round(time.perf_counter() - started, 1), "timings": timer.seconds}
