"""The whole method in plain Python: federated rounds (sites train → knowledge packages → checks → aggregation →
injection → encoders back to the sites), evaluation, and every baseline and ablation as a variant.

Flows and pipelines call these same functions; `fedkim experiment --out DIR` runs all variants in one process.
"""

from __future__ import annotations

import hashlib
import json
import math
import resource
import shutil
import statistics
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fedkim.central.evaluate import (evaluate, gate_distance, gate_table, plot_gate_heatmap, summarise,
                                     write_metrics)
from fedkim.central.model import CentralModel
from fedkim.central.variants import VARIANTS, build_central
from fedkim.config import Params
from fedkim.data.catalogue import Catalogue, catalogue_of, load_catalogue
from fedkim.federation.store import LocalStore
from fedkim.members import site_dir, split_dir
from fedkim.rounds import (Trainer, aggregate_step, finish_round, gated_site, get_state, inject_step,
                           package_validation, round_key, start_round, train_site_step, validate_split_step)
from fedkim.site.model import global_model
from fedkim.site.train import LocalResult, train_site


@dataclass
class RoundRecord:
    round_id: str
    sites: dict[str, dict] = field(default_factory=dict)  # site -> sample counts, metrics, seconds
    rejected: dict[str, list[str]] = field(default_factory=dict)
    injection: dict = field(default_factory=dict)
    excluded: dict[str, str] = field(default_factory=dict)  # site -> why the data gate left it out


@dataclass
class RunResult:
    variant: str
    metrics: dict
    rounds: list[RoundRecord]
    seconds: float
    model: CentralModel | None = None


def _state_key(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class SiteCache:
    """Local training results keyed by (site, starting global state): variants that start a round from the same
    global model reuse one training run instead of repeating it (the comparison stays fair: same inputs)."""

    def __init__(self):
        self._store: dict[tuple[str, str], LocalResult] = {}

    def train(self, site_dir, global_state, params: Params, seed: int, exclude: Collection[str] = (),
              ledger=None) -> LocalResult:
        """`ledger`: the site's DP budget record; a training served from the cache spent nothing more."""
        key = (str(site_dir), _state_key(global_state) + str(seed) + ",".join(sorted(exclude)))
        if key not in self._store:
            self._store[key] = train_site(site_dir, global_state, params.site, params.data, seed=seed,
                                          exclude=exclude, ledger=ledger)
        return self._store[key]

    def trainer(self, params: Params) -> Trainer:
        """This cache as a round step's trainer (`exclude`: the samples the site's gate quarantined)."""
        return lambda site_dir, global_state, seed, exclude=(), ledger=None: self.train(
            site_dir, global_state, params, seed, exclude, ledger)


def federated_round(params: Params, store: LocalStore, round_id: str, cache: SiteCache | None = None,
                    seed: int = 0) -> RoundRecord:
    """Every member that passes the data gate trains from the global state and uploads its package; the server
    screens and aggregates: the round steps the Prefect flow and the DVC stages run, here one after another in one
    process. A member that fails the gate is left out with its reason (the quorum decides)."""
    start_round(params, store, round_id, seed=seed)
    trainer = cache.trainer(params) if cache else None
    outcomes, excluded, summaries = [], {}, {}
    for site_id in params.member_ids():
        summary, left_out = gated_site(params, site_id)
        summaries[site_id] = summary
        if left_out is not None:
            excluded[site_id] = left_out.reason
            continue
        outcome = train_site_step(params, store, round_id, site_id, seed=seed, trainer=trainer,
                                  validation=package_validation(summary))
        if outcome.status == "refused":  # its privacy budget is spent
            excluded[site_id] = outcome.reason
        else:
            outcomes.append(outcome)
    aggregated = aggregate_step(params, store, round_id, [o.site_id for o in outcomes], gate_summaries=summaries)
    sites = {o.site_id: {"sample_counts": o.sample_counts, "metrics": o.metrics, "seconds": o.seconds,
                         **({"privacy": o.privacy} if o.privacy else {})}
             for o in outcomes}
    return RoundRecord(round_id, sites, aggregated.rejected, excluded=excluded)


def run_variant(params: Params, name: str, work_dir: Path, *, cache: SiteCache | None = None,
                progress: bool = False, keep_model: bool = False, seed: int = 0) -> RunResult:
    """One variant, all rounds, then the test split. `seed` (a trial of `fedkim experiment --seeds`) shifts every
    training seed: encoder initialisation, site training, injection batches and dropout. The data stay as they are."""
    variant = VARIANTS[name]
    started = time.perf_counter()
    work_dir = Path(work_dir) / name
    shutil.rmtree(work_dir / "rounds", ignore_errors=True)  # a run trains afresh: nothing reused from an older one
    store = LocalStore(work_dir)  # rounds/<r>/... as in the shared store of a deployed round
    if seed:
        params = params.model_copy(update={"inject": params.inject.model_copy(
            update={"seed": params.inject.seed + seed})})
    global_state = global_model(params.site, params.data, seed=params.data.seed + seed).state_dict()
    model = build_central(params, variant, seed=seed)
    rounds: list[RoundRecord] = []
    for r in range(params.federation.rounds):
        round_id = str(r + 1)
        record = RoundRecord(round_id)
        if variant.federated:
            record = federated_round(params, store, round_id, cache, seed)
            model.load_encoders(get_state(store, round_key(round_id, "aggregate", "encoders.safetensors")))
        elif variant.pooled:
            sites = [site_dir(params, s) for s in params.member_ids() if gated_site(params, s)[1] is None]
            pooled = train_site(sites, global_state, params.site, params.data, seed=params.data.seed + seed + r)
            global_state = {**global_state, **pooled.state_dict}
            model.load_encoders(global_state)
        validate_split_step(params, "public")
        model, injection = inject_step(params, store, round_id, work_dir, model=model, progress=progress)
        losses = injection["losses"]
        record.injection = {"steps": len(losses), "seconds": injection["seconds"],
                            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None}
        global_state = {**global_state, **model.encoder_state()}  # encoders go back to the sites
        if variant.federated:  # the next round starts from this one's encoders (the others chain in memory)
            finish_round(store, round_id, params)
        rounds.append(record)
    validate_split_step(params, "test")
    metrics = evaluate(model, split_dir(params, "test"), params.eval, params.site, params.data,
                       public_dir=split_dir(params, "public"), progress=progress)
    metrics["gate"] = gate_table(model)  # per (task, modality): which experts the gate mixes
    metrics["gate_distance"] = gate_distance(metrics["gate"])
    plot_gate_heatmap(metrics["gate"], work_dir / "gate_heatmap.png", model.catalogue)
    write_metrics(metrics, work_dir / "metrics.json")
    return RunResult(name, metrics, rounds, time.perf_counter() - started, model if keep_model else None)


HEADLINE = ("train_mean_f1", "zeroshot_mean", "mean_auroc")


def run_experiment(params: Params, out: Path, variants: list[str] | None = None, progress: bool = False,
                   seeds: int = 1, first_seed: int = 0) -> dict:
    """All variants in one process, each over `seeds` trials (training seeds shifted by first_seed ..
    first_seed + seeds - 1, same data); writes out/comparison.json and out/comparison.md. A variant's
    figures are the means over its trials, with their standard deviations and each trial's figures beside
    them. A trial is the same whichever run holds it: `first_seed` adds trials to an earlier run's."""
    out = Path(out)
    names = variants or list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; allowed: {list(VARIANTS)}")
    if seeds < 1 or first_seed < 0:
        raise ValueError(f"seeds must be at least 1 and first_seed at least 0, got {seeds} and {first_seed}")
    cache = SiteCache()
    trials: dict[str, list[RunResult]] = {name: [] for name in names}
    trial_seeds = list(range(first_seed, first_seed + seeds))
    for done, seed in enumerate(trial_seeds, 1):  # seed-major, written after each trial: a stop keeps them
        for name in names:
            trials[name].append(run_variant(params, name, _trial_folder(out, seed, trial_seeds), cache=cache,
                                            progress=progress, seed=seed))
        comparison = _write_comparison(params, out, trials, trial_seeds[:done])
    return comparison


def _trial_folder(out: Path, seed: int, trial_seeds: list[int]) -> Path:
    """A lone trial 0 writes straight into `out`; any other trial into out/seed-<seed>."""
    return out if trial_seeds == [0] else out / f"seed-{seed}"


def rescore_experiment(params: Params, out: Path, tasks: tuple[str, ...] | None = None) -> dict:
    """Re-evaluate a finished `fedkim experiment` folder without retraining, after the evaluation protocol changed:
    each variant's last injection checkpoint of each trial is loaded, `tasks` (default: all) are scored again on
    the same test samples (the run's max_per_task) and merged into its metrics.json, and the comparison is
    rewritten. Training seconds, rounds and gate figures stay the run's."""
    out = Path(out)
    path = out / "comparison.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no comparison to rescore (run `fedkim experiment --out {out}` first)")
    old = json.loads(path.read_text())
    params = params.model_copy(update={  # the run's FM, rounds and test samples; the evaluation protocol is params'
        "eval": params.eval.model_copy(update={"max_per_task": old["max_per_task"]}),
        "inject": params.inject.model_copy(update={"foundation_model": old["foundation_model"]}),
        "federation": params.federation.model_copy(update={"rounds": old["rounds"]})})
    unknown = [v for v in old["variants"] if v not in VARIANTS]
    if unknown:
        raise ValueError(f"{path}: unknown variant(s) {unknown}")
    validate_split_step(params, "test")
    trials: dict[str, list[RunResult]] = {}
    trial_seeds = list(range(old.get("first_seed", 0), old.get("first_seed", 0) + old["seeds"]))
    for name, row in old["variants"].items():
        trials[name] = []
        for i, seed in enumerate(trial_seeds):
            folder = _trial_folder(out, seed, trial_seeds) / name
            checkpoint = folder / "checkpoints" / f"inject-{old['rounds']}.pt"
            if not checkpoint.is_file():
                raise FileNotFoundError(f"{checkpoint}: the last round's injection checkpoint is missing")
            metrics = json.loads((folder / "metrics.json").read_text())
            model = build_central(params, VARIANTS[name], seed=seed)
            model.load_trainable_state(torch.load(checkpoint, map_location="cpu", weights_only=False)["state"])
            fresh = evaluate(model, split_dir(params, "test"), params.eval, params.site, params.data,
                             public_dir=split_dir(params, "public"), tasks=tasks)
            metrics["tasks"].update(fresh["tasks"])
            metrics |= summarise(metrics["tasks"])
            write_metrics(metrics, folder / "metrics.json")
            rounds = [RoundRecord(**record) for record in row["rounds"]]
            trials[name].append(RunResult(name, metrics, rounds, row["trials"][i]["seconds"]))
    rescored = {"tasks": list(tasks) if tasks else "all", "peak_rss_mb": _peak_rss_mb()}
    return _write_comparison(params, out, trials, trial_seeds,
                             meta={"peak_rss_mb": old.get("peak_rss_mb"), "rescored": rescored})


SETTING = ("foundation_model", "rounds", "max_per_task")  # what makes two experiments' trials comparable
COPIED = ("metrics.json", "gate_heatmap.png")  # a trial's small outputs (not its checkpoints or packages)


def combine_experiments(out: Path, sources: list[Path | tuple[Path, list[str]]]) -> dict:
    """One comparison from the trials of several finished `fedkim experiment` folders, without re-running any:
    e.g. variants a change touches, run again, beside the untouched variants of an earlier run. The sources must
    share the FM, rounds and test samples, and every variant must end with the same consecutive seeds (a trial of
    a variant and seed is a fixed run: `first_seed` documents this); a variant and seed given twice is an error.
    Each trial's metrics.json and gate heatmap are copied into `out` in the experiment layout; `out` must not
    hold a comparison yet (nothing stored is overwritten). A source is a folder (all its variants) or a
    (folder, variants) pair: only those variants are taken from it."""
    out = Path(out)
    chosen = [(Path(s), None) if isinstance(s, (str, Path)) else (Path(s[0]), list(s[1])) for s in sources]
    if (out / "comparison.json").exists():
        raise FileExistsError(f"{out / 'comparison.json'} exists: combine into a new folder")
    found: dict[str, dict[int, tuple[RunResult, Path]]] = {}
    setting: dict = {}
    peaks = []
    for source, wanted in chosen:
        path = source / "comparison.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not a finished experiment (no comparison.json)")
        saved = json.loads(path.read_text())
        missing = [v for v in wanted or () if v not in saved["variants"]]
        if missing:
            raise ValueError(f"{path}: has no variant(s) {missing}; it has {list(saved['variants'])}")
        for key in SETTING:
            if setting.setdefault(key, saved[key]) != saved[key]:
                raise ValueError(f"{path}: {key} is {saved[key]!r}, another source has {setting[key]!r}")
        peaks.append(saved.get("peak_rss_mb") or 0)
        seeds = list(range(saved.get("first_seed", 0), saved.get("first_seed", 0) + saved["seeds"]))
        for name, row in saved["variants"].items():
            if wanted is not None and name not in wanted:
                continue
            if name not in VARIANTS:
                raise ValueError(f"{path}: unknown variant {name!r}")
            for i, seed in enumerate(seeds):
                folder = _trial_folder(source, seed, seeds) / name
                if seed in found.setdefault(name, {}):
                    raise ValueError(f"{path}: {name} seed {seed} is also in {found[name][seed][1]}")
                metrics_path = folder / "metrics.json"
                if not metrics_path.is_file():
                    raise FileNotFoundError(f"{metrics_path}: the trial's metrics are missing")
                rounds = [RoundRecord(**record) for record in row["rounds"]]
                result = RunResult(name, json.loads(metrics_path.read_text()), rounds, row["trials"][i]["seconds"])
                found[name][seed] = (result, folder)
    if not found:
        raise ValueError("no sources to combine")
    seed_sets = {name: sorted(by_seed) for name, by_seed in found.items()}
    trial_seeds = next(iter(seed_sets.values()))
    for name, seeds in seed_sets.items():
        if seeds != trial_seeds or seeds != list(range(seeds[0], seeds[0] + len(seeds))):
            raise ValueError(f"variant {name} has seeds {seeds}, but every variant needs the same consecutive "
                             f"seeds ({next(iter(seed_sets))} has {trial_seeds})")
    trials: dict[str, list[RunResult]] = {}
    for name in [n for n in VARIANTS if n in found]:  # the usual order: fedkim first, then the baselines
        trials[name] = [found[name][seed][0] for seed in trial_seeds]
        for seed in trial_seeds:
            target = _trial_folder(out, seed, trial_seeds) / name
            target.mkdir(parents=True, exist_ok=True)
            for file in COPIED:
                if (found[name][seed][1] / file).is_file():
                    shutil.copy2(found[name][seed][1] / file, target / file)
    meta = setting | {"peak_rss_mb": max(peaks),
                      "combined_from": [str(s) + (f" ({', '.join(w)})" if w else "") for s, w in chosen]}
    return _write_comparison(None, out, trials, trial_seeds, meta=meta)


def _peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _write_comparison(params: Params | None, out: Path, trials: dict[str, list[RunResult]], trial_seeds: list[int],
                      meta: dict | None = None) -> dict:
    """trial_seeds: the seeds of the trials done, in order (consecutive). params None: meta holds the SETTING."""
    catalogue = catalogue_of(params.data) if params is not None else load_catalogue()
    comparison = {name: _summarise(runs, trial_seeds, catalogue) | {"description": VARIANTS[name].description}
                  for name, runs in trials.items()}
    setting = {} if params is None else {"foundation_model": params.inject.foundation_model,
                                         "rounds": params.federation.rounds,
                                         "max_per_task": params.eval.max_per_task}
    comparison_meta = {"peak_rss_mb": _peak_rss_mb(), **setting,
                       "seeds": len(trial_seeds), "first_seed": trial_seeds[0]} | (meta or {})
    if "fedkim" in comparison:
        comparison_meta["fedkim_wins"] = fedkim_wins(trials)
    (out / "comparison.json").write_text(json.dumps({"variants": comparison, **comparison_meta}, indent=2,
                                                    default=float))
    (out / "comparison.md").write_text(comparison_markdown(comparison, comparison_meta))
    return comparison


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation of the finite values (0 for a single one, NaN for none)."""
    finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else 0.0


def _summarise(runs: list[RunResult], trial_seeds: list[int], catalogue: Catalogue) -> dict:
    """Means (and sample standard deviations) over a variant's trials; per-task metrics averaged key by key."""
    row: dict = {"seconds": round(sum(r.seconds for r in runs), 1)}
    for key in HEADLINE:
        row[key], row[f"{key}_std"] = _mean_std([r.metrics[key] for r in runs])
    tasks = {}
    stored = runs[0].metrics["tasks"]  # catalogue order (a metrics.json read back is sorted by name)
    for task in [t for t in catalogue.tasks if t in stored] + [t for t in stored if t not in catalogue]:
        keys = {k for r in runs for k, v in r.metrics["tasks"][task].items() if isinstance(v, (int, float))}
        tasks[task] = {k: _mean_std([r.metrics["tasks"][task].get(k, math.nan) for r in runs])[0] for k in sorted(keys)}
        if len(runs) > 1:
            tasks[task]["primary_std"] = _mean_std([r.metrics["tasks"][task].get("primary", math.nan) for r in runs])[1]
    row["gate_distance"] = _mean_std([r.metrics.get("gate_distance", math.nan) for r in runs])[0]
    row["tasks"] = tasks
    row["trials"] = [{"seed": seed, **{k: r.metrics[k] for k in HEADLINE}, "seconds": round(r.seconds, 1)}
                     for seed, r in zip(trial_seeds, runs)]
    row["rounds"] = [rec.__dict__ for rec in runs[0].rounds]
    return row


def fedkim_wins(trials: dict[str, list[RunResult]]) -> dict:
    """Per baseline and headline figure: in how many trials full FedKIM is ahead (same seed, same data)."""
    mine = trials["fedkim"]
    return {name: {key: sum(m.metrics[key] > t.metrics[key] for m, t in zip(mine, runs)) for key in HEADLINE}
            for name, runs in trials.items() if name != "fedkim"}


def comparison_markdown(comparison: dict, meta: dict) -> str:
    tasks = list(next(iter(comparison.values()))["tasks"]) if comparison else []
    seeds = meta.get("seeds", 1)

    def headline(row: dict, key: str) -> str:
        return f"{row[key]:.3f}" + (f" ± {row[key + '_std']:.3f}" if seeds > 1 else "")

    first = meta.get("first_seed", 0)
    title = f"# FedKIM comparison ({meta['foundation_model']}, {meta['rounds']} round(s)"
    title += f", mean ± sd over {seeds} seeds" if seeds > 1 else ""
    if first:
        title += f", seed {first}" if seeds == 1 else f", seeds {first}–{first + seeds - 1}"
    title += ")"
    lines = [title, "",
             "| variant | train mean F1 | zero-shot mean | mean AUROC | " + " | ".join(tasks) + " | seconds |",
             "|---" * (len(tasks) + 5) + "|"]
    for name, row in comparison.items():
        cells = [f"{row['tasks'][t]['primary']:.3f}" for t in tasks]
        lines.append(f"| {name} | {headline(row, 'train_mean_f1')} | {headline(row, 'zeroshot_mean')} | "
                     f"{headline(row, 'mean_auroc')} | " + " | ".join(cells) + f" | {row['seconds']} |")
    lines += ["", "Primary figure per task: F1 for yes/no tasks, accuracy for multiple-answer questions. "
              "Zero-shot mean: mean primary figure over the 8 zero-shot tasks.", ""]
    routed = {n: r["gate_distance"] for n, r in comparison.items() if math.isfinite(r.get("gate_distance", math.nan))}
    if routed:
        lines += ["Gate: mean total-variation distance between the 12 tasks' expert weights (0: every task routes "
                  "alike, the experts act as one wide LoRA; 1: disjoint experts): "
                  + ", ".join(f"{n} {d:.3f}" for n, d in routed.items()), ""]
    wins = meta.get("fedkim_wins")
    if wins and seeds > 1:
        lines += [f"Trials (of {seeds}) in which full FedKIM is ahead of each variant, same seed:", "",
                  "| variant | train mean F1 | zero-shot mean | mean AUROC |", "|---|---|---|---|"]
        lines += [f"| {name} | " + " | ".join(str(w[k]) for k in HEADLINE) + " |" for name, w in wins.items()]
        lines.append("")
    if meta.get("combined_from"):
        lines += ["Trials combined from: " + ", ".join(f"`{s}`" for s in meta["combined_from"]) + ".", ""]
    return "\n".join(lines)
