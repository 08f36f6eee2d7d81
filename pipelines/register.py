"""DVC stage `register`: log the round to MLflow, register the injected model and run the promotion gate.

Reads <store>/rounds/<round>/{sites,aggregate,central,evaluation}/; logs a round run (nested runs per site and for
the injection: loss curve, evaluation, gate, comparison with the champion), saves the model bundle, registers it
as `tracking.registered_model` with alias `challenger`, promotes it to `champion` when it beats the champion on the
validation split (evaluation/validation_metrics.json; the test split's for a federation without one), and
writes --out (registry.json: version, aliases, decision).

MLflow keys a round by its id (one run and one registered version per id) and refuses one id with two sets of
params, while `dvc exp run -S ...` varies the params of one `federation.round_id`. So the round is tracked as
`dvc-<round>-<digest>`, the digest over the settings that decide the model and the round's weights and figures:
re-running the stage on the same outputs finds the same run and version again; an experiment, or new data or code,
gets its own.
"""

import sys
from pathlib import Path

from fedkim import tracking
from fedkim.config import Params
from fedkim.data.catalogue import catalogue_of
from fedkim.digests import settings_digest, short_digest
from fedkim.errors import run_stage
from fedkim.federation import signing
from fedkim.members import server_splits
from fedkim.federation.store import package_prefix
from fedkim.outcomes import SiteOutcome
from fedkim.rounds import evaluate_step, get_json, load_central, read_manifest_from_store, round_key
from pipelines.common import params_path, parser, setup, write_json

PRODUCED = ("aggregate/encoders.safetensors", "central/trainable.safetensors", "central/encoders.safetensors")


def tracked_round(params: Params, store, round_id: str, metrics: dict) -> tuple[str, str]:
    """(the MLflow round id, the params digest). The id carries a digest of the settings that decide the model and
    of what the round produced (weights and figures): the same round finds its run and version again, while new
    params, data or code give a new id (and so a new version)."""
    produced = {key: store.sha256(round_key(round_id, *key.split("/"))) for key in PRODUCED}
    figures = {k: v for k, v in metrics.items() if k not in ("seconds", "calibration")}
    settings = settings_digest(params)
    return f"dvc-{round_id}-{short_digest({'params': settings, 'files': produced, 'metrics': figures})[:8]}", settings


def main(argv: list[str] | None = None) -> None:
    cli = parser(__doc__)
    cli.add_argument("--out", required=True, type=Path, help="registry.json: the registered version and decision")
    args = cli.parse_args(argv)
    params, store, round_id = setup(args)
    tracking.configure(params.tracking, base_dir=params_path().resolve().parent)
    metrics = get_json(store, signing.verified_key(params, store, round_key(round_id, "evaluation", "metrics.json"),
                                                   signing.EVALUATION, round_id))
    tracked_id, digest = tracked_round(params, store, round_id, metrics)

    version = tracking.find_version(tracked_id)  # this round's outputs were registered before: log nothing twice
    if version is None:
        version = log_and_register(params, store, round_id, tracked_id, digest, metrics)
    decided_on = validation_metrics(params, store, round_id)
    decision = tracking.promote(version, decided_on or metrics, tasks=catalogue_of(params.data).train,
                                split="validation" if decided_on else "test")

    aliases = next((row["aliases"] for row in tracking.registry_show(version.name)
                    if row["version"] == int(version.version)), [])
    write_json(args.out, {
        "round_id": round_id, "tracked_round_id": tracked_id, "params_digest": digest,
        "registered_model": version.name, "version": int(version.version), "aliases": aliases,
        "decision": decision.decision, "decided_on": "validation" if decided_on else "test",
        "reason": decision.reason, "champion": decision.champion,
        "previous_champion": decision.previous_champion, "run_id": version.run_id,
        "round_run_id": version.tags.get(tracking.ROUND_RUN_TAG, ""), "tracking_uri": params.tracking.uri,
    })
    print(f"round {round_id} ({tracked_id}): {version.name} v{version.version} {aliases}, {decision.decision}: "
          f"{decision.reason}")


def validation_metrics(params: Params, store, round_id: str) -> dict | None:
    """The injected model's metrics on the validation split, recomputed here from the model (promotion decides
    on them; the evaluate stage's stored file is reported, never trusted); None without a validation split."""
    if "validation" not in server_splits(params):
        return None
    model = load_central(params, store, round_id, injected=True)
    metrics = evaluate_step(params, store, round_id, model, split="validation", recompute=True)
    if metrics.get("stored_differs"):
        print(f"warning: rounds/{round_id}/evaluation/validation_metrics.json differs from the model's own "
              "validation figures; promotion uses the recomputed ones", file=sys.stderr)
    return metrics


def log_and_register(params: Params, store, round_id: str, tracked_id: str, digest: str, metrics: dict):
    """Log the round as `tracked_id` (round run, a run per accepted site, the injection run) and register and judge
    its model: fedkim.tracking.log_round over what the earlier stages left in the store."""
    accepted = get_json(store, signing.verified_key(params, store, round_key(round_id, "aggregate", "aggregate.json"),
                                                    signing.AGGREGATE, round_id, signed_with=round_key(
                                                        round_id, "aggregate", "encoders.safetensors")))["accepted"]
    catalogue = catalogue_of(params.data)
    manifests = [read_manifest_from_store(store, package_prefix(round_id, site), catalogue) for site in accepted]
    sites = [SiteOutcome.from_manifest(m, "trained", validation=m.validation_summary.model_dump(mode="json"))
             for m in manifests]
    fingerprints = {s.site_id: s.data_fingerprint for s in sites}

    decided_on = validation_metrics(params, store, round_id)

    def injected():
        return (load_central(params, store, round_id, injected=True),
                get_json(store, round_key(round_id, "central", "inject.json")))

    with tracking.round_run(params, tracked_id, sites=fingerprints, params_hash=digest) as parent:
        tracking.log_sites(parent, sites)
        logged = tracking.log_round(parent, params, tracked_id, sites=fingerprints, inject=injected,
                                    evaluate=lambda model: metrics,
                                    validate=(lambda model: decided_on) if decided_on else None, outcomes=sites)
    return logged.version


if __name__ == "__main__":
    sys.exit(run_stage(main))
