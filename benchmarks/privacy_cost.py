"""The cost of differential privacy at the sites: one FedKIM round (`fedkim experiment --variants fedkim`) without DP
and with site.privacy at each target ε, same data, seeds and settings otherwise; the test split's train mean F1,
zero-shot mean and mean AUROC, each site's ε and local training seconds, and the DP / non-DP training-time ratio.

    python -m benchmarks.privacy_cost --out runs/privacy [--epsilons none,8,3,1] [--set KEY=VALUE ...]
        -> out/privacy_cost.json and out/privacy_cost.md (a Markdown table), the JSON also on stdout
    python -m benchmarks.privacy_cost --out runs/privacy-time --sites-only [--epsilons none,3]
        -> out/site_training_time.json: each member's local training from the initial global model, timed
           one after another in one process (no injection, no evaluation), and the DP / non-DP ratio

Each setting runs in out/<none | eps-<ε>>/ with its own privacy ledger there, so every DP run starts from a budget
nothing has spent (epsilon_max is raised to the target where the target exceeds it). Needs the federation of
data.root (`fedkim data generate`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import time

from fedkim.config import load_params, parse_overrides
from fedkim.experiment import HEADLINE, run_experiment
from fedkim.members import site_dir
from fedkim.site.model import global_model
from fedkim.site.train import train_site


def setting_overrides(epsilon: float | None, folder: Path) -> dict:
    if epsilon is None:
        return {}
    return {"site.privacy.enabled": True, "site.privacy.epsilon": epsilon,
            "site.privacy.epsilon_max": max(epsilon, 10.0), "site.privacy.ledger": str(folder / "ledger")}


def row_of(name: str, epsilon: float | None, comparison: dict) -> dict:
    fedkim = comparison["fedkim"]
    sites = fedkim["rounds"][0]["sites"]
    return {"setting": name, "epsilon_target": epsilon, **{k: fedkim[k] for k in HEADLINE},
            "site_seconds": {s: v["seconds"] for s, v in sites.items()},
            "site_training_seconds": round(sum(v["seconds"] for v in sites.values()), 1),
            "epsilon_round": {s: round(v["privacy"]["epsilon_round"], 3) for s, v in sites.items() if "privacy" in v},
            "round_seconds": fedkim["seconds"]}


def markdown(rows: list[dict]) -> str:
    base = next((r for r in rows if r["epsilon_target"] is None), None)
    lines = ["| setting | train mean F1 | zero-shot mean | mean AUROC | ε per site (this round) | site training s | "
             "DP / non-DP time |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        spent = ", ".join(f"{s} {e:.2f}" for s, e in r["epsilon_round"].items()) or "no DP"
        ratio = f"{r['site_training_seconds'] / base['site_training_seconds']:.2f}" if base else "n/a"
        lines.append(f"| {r['setting']} | {r['train_mean_f1']:.3f} | {r['zeroshot_mean']:.3f} | "
                     f"{r['mean_auroc']:.3f} | {spent} | {r['site_training_seconds']} | {ratio} |")
    return "\n".join(lines) + "\n"


def site_training_seconds(params) -> dict[str, float]:
    """Each member's local training from the initial global model (the round's first step), in turn."""
    start, seconds = global_model(params.site, params.data).state_dict(), {}
    for site_id in params.member_ids():
        began = time.perf_counter()
        train_site(site_dir(params, site_id), start, params.site, params.data, seed=params.data.seed)
        seconds[site_id] = round(time.perf_counter() - began, 1)
    return seconds


def main(argv: list[str] | None = None) -> int:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--out", type=Path, required=True)
    cli.add_argument("--params", type=Path, default=None)
    cli.add_argument("--epsilons", default="none,8,3,1", help="comma-separated targets; 'none' trains without DP")
    cli.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE")
    cli.add_argument("--sites-only", action="store_true", help="time local training only")
    args = cli.parse_args(argv)
    base = parse_overrides(args.settings)
    if args.sites_only:
        timed = {}
        for text in args.epsilons.split(","):
            epsilon = None if text.strip() == "none" else float(text)
            name = "none" if epsilon is None else f"eps-{epsilon:g}"
            seconds = site_training_seconds(load_params(args.params, base | setting_overrides(
                epsilon, args.out / name)))
            timed[name] = {"sites": seconds, "total": round(sum(seconds.values()), 1)}
        if "none" in timed:
            for row in timed.values():
                row["ratio_to_none"] = round(row["total"] / timed["none"]["total"], 2)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "site_training_time.json").write_text(json.dumps(timed, indent=2))
        print(json.dumps(timed, indent=2))
        return 0
    rows = []
    for text in args.epsilons.split(","):
        epsilon = None if text.strip() == "none" else float(text)
        name = "none" if epsilon is None else f"eps-{epsilon:g}"
        folder = args.out / name
        params = load_params(args.params, base | setting_overrides(epsilon, folder))
        rows.append(row_of(name, epsilon, run_experiment(params, folder, ["fedkim"], progress=True)))
        (args.out / "privacy_cost.json").write_text(json.dumps({"rows": rows}, indent=2))  # after each setting
    (args.out / "privacy_cost.md").write_text(markdown(rows))
    print(json.dumps({"rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
