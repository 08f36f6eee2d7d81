"""What orchestration costs: one round through the Prefect flow `fedkim` (Prefect's ephemeral API, the GX gate at
every site, MLflow tracking + bundle + registry + promotion, the store, the round report) against the same compute
through `fedkim.rounds.run_round` (no Prefect, no gate, no MLflow), in ONE process, same params and round id.

Each side gets its own fresh store, work folder, MLflow database and report folder, so nothing is reused. Imports
and the FM's offline cache are warmed before either is timed; the plain round runs first. Prefect's state goes to
$PREFECT_HOME as usual (scripts/env.sh: .prefect/).

    python -m benchmarks.orchestration [--quick | --fm tiny] [--params params.yaml]   -> one JSON object on stdout

--quick: tiny FM, 1 local epoch, at most 6 test samples per task (a fast check); --fm tiny only swaps the FM.
The default is params.yaml as it is (SmolLM2). Needs the federation of data.root (`fedkim data generate`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

QUICK = {"inject.foundation_model": "tiny", "inject.num_experts": 4, "inject.rank": 4, "site.epochs": 1,
         "eval.max_per_task": 6}


def _rss_mb(who: int) -> float:
    return round(resource.getrusage(who).ru_maxrss / 1024, 1)


def _children_cpu() -> float:
    import psutil

    total = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            times = child.cpu_times()
            total += times.user + times.system
        except psutil.Error:  # exited meanwhile
            pass
    return round(total, 1)


def _same(a: dict, b: dict) -> bool:
    """Equal per-task metrics (through JSON, where NaN equals NaN)."""
    return json.dumps(a, sort_keys=True, default=float) == json.dumps(b, sort_keys=True, default=float)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=None, help="params.yaml (default: FEDKIM_PARAMS or the repo's)")
    parser.add_argument("--fm", default=None, help="override inject.foundation_model (e.g. tiny)")
    parser.add_argument("--quick", action="store_true", help="tiny FM, 1 epoch, 6 test samples per task")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch CPU threads")
    parser.add_argument("--parallel-sites", type=int, default=None,
                        help="override federation.parallel_sites (1: the flow reproduces the plain round exactly)")
    parser.add_argument("--round-id", default="bench")
    args = parser.parse_args()

    # Prefect first (its log format), then the flow, which pulls in the library, MLflow and torch.
    from flows.round import fedkim_flow
    import great_expectations  # noqa: F401  (imported lazily by the gate: warm it so neither side pays it)
    import mlflow.pyfunc  # noqa: F401
    import torch

    from fedkim.central.foundation import load_foundation
    from fedkim.config import default_params_path, load_params
    from fedkim.federation.store import LocalStore
    from fedkim.members import split_dir
    from fedkim.rounds import get_json, round_key, run_round

    torch.set_num_threads(args.threads)
    params_path = Path(args.params) if args.params else default_params_path()
    base = {**(QUICK if args.quick else {}), **({"inject.foundation_model": args.fm} if args.fm else {})}
    if args.parallel_sites is not None:
        base["federation.parallel_sites"] = args.parallel_sites
    with tempfile.TemporaryDirectory(prefix="fedkim-bench-") as tmp:
        def overrides(side: str) -> dict:
            folder = Path(tmp) / side
            return {**base, "store.root": str(folder / "store"), "federation.work_dir": str(folder / "work"),
                    "tracking.uri": f"sqlite:///{folder / 'mlflow.db'}", "report.root": str(folder / "reports")}

        plain_params = load_params(params_path, overrides("plain"))
        if not split_dir(plain_params, "public").is_dir():
            raise SystemExit(f"{split_dir(plain_params, 'public')}: no public split there; run `fedkim data "
                             "generate` first")
        load_foundation(plain_params.inject.foundation_model)  # the one-off GGUF dequantisation is not the subject

        started, cpu = time.perf_counter(), time.process_time()
        plain = run_round(plain_params, LocalStore(plain_params.store.root), args.round_id,
                          plain_params.federation.work_dir / args.round_id)
        plain_seconds = time.perf_counter() - started
        plain_cpu = time.process_time() - cpu
        rss_after_plain = _rss_mb(resource.RUSAGE_SELF)

        started, cpu = time.perf_counter(), time.process_time()
        flow = fedkim_flow(round_id=args.round_id, params_path=str(params_path), overrides=overrides("flow"),
                           mode="simulation")
        flow_seconds = time.perf_counter() - started
        flow_cpu = time.process_time() - cpu
        helpers_cpu = _children_cpu()  # Prefect's ephemeral API server runs as a subprocess
        flow_metrics = get_json(LocalStore(Path(tmp) / "flow" / "store"),
                                round_key(args.round_id, "evaluation", "metrics.json"))

    result = {
        "flow_vs_plain": round(flow_seconds / plain_seconds, 3),
        "flow_seconds": round(flow_seconds, 1),
        "plain_seconds": round(plain_seconds, 1),
        "overhead_seconds": round(flow_seconds - plain_seconds, 1),
        "flow_body_seconds": flow["seconds"],  # inside the flow function: without Prefect's engine and API start
        "peak_rss_mb": _rss_mb(resource.RUSAGE_SELF),
        "peak_rss_mb_after_plain": rss_after_plain,
        "gate_seconds": {s: info.get("gate_seconds") for s, info in flow["sites"].items()},  # concurrent
        # Where the time goes: wall seconds per phase on each side, each site's training alone, and CPU seconds
        # of this process (all threads) and of its child processes (Prefect's API server).
        "phases": {"plain": plain["timings"], "flow": flow.get("timings", {})},
        "site_train_seconds": {"plain": {s["site_id"]: s["seconds"] for s in plain["sites"]},
                               "flow": {s: info.get("seconds") for s, info in flow["sites"].items()}},
        "inject_seconds": {"plain": plain["injection"].get("seconds"), "flow": flow["injection"].get("seconds")},
        "evaluate_seconds": {"plain": plain["metrics"].get("seconds"), "flow": flow_metrics.get("seconds")},
        "cpu_seconds": {"plain": round(plain_cpu, 1), "flow": round(flow_cpu, 1),
                        "flow_child_processes": helpers_cpu},
        "foundation_model": plain_params.inject.foundation_model,
        "sites": {"plain": [s["site_id"] for s in plain["sites"]], "flow": flow["included"]},
        "flow_excluded": flow["excluded"], "flow_failed": flow["failed"],
        "metrics": {"plain": {k: plain["metrics"].get(k) for k in ("train_mean_f1", "mean_auroc")},
                    "flow": {k: flow["metrics"].get(k) for k in ("train_mean_f1", "mean_auroc")}},
        "same_metrics": _same(plain["metrics"]["tasks"], flow_metrics["tasks"]),
        "parallel_sites": plain_params.federation.parallel_sites,
        "registered_version": flow["model"]["version"],
        "device": "cuda" if torch.cuda.is_available() else "cpu", "threads": torch.get_num_threads(),
        "quick": args.quick, "round_id": args.round_id,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
