"""Compare injection settings on the same federations: every arm of one trial starts from the same site training
(shared through the experiment's SiteCache), so the arms differ only in what the server does with the aggregate.
Cheaper than one `fedkim experiment` per setting, which would train the sites again each time.

    python -m benchmarks.injection_study --out DIR --seeds 3 \\
        --arm default:fedkim --arm lora:fedplug_lora \\
        --arm shared:fedkim:inject.shared_experts=1,inject.balance_scope=tasks,inject.balance_weight=0.02

An arm is NAME:VARIANT[:KEY=VALUE,...]; overrides may touch inject.* and eval.* only (site training is shared).
Writes DIR/study.json after every run (per arm: each trial's headline figures and per-task primary figures,
their means, and in how many trials the first arm is ahead) and prints it at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from fedkim.config import load_params, parse_overrides
from fedkim.central.variants import VARIANTS
from fedkim.experiment import HEADLINE, SiteCache, run_variant

SHAREABLE = ("inject.", "eval.")


def parse_arm(text: str) -> tuple[str, str, dict]:
    name, _, rest = text.partition(":")
    variant, _, settings = rest.partition(":")
    if not name or variant not in VARIANTS:
        raise SystemExit(f"--arm {text!r}: expected NAME:VARIANT[:KEY=VALUE,...] with VARIANT in {list(VARIANTS)}")
    overrides = parse_overrides([s for s in settings.split(",") if s])
    outside = [k for k in overrides if not k.startswith(SHAREABLE)]
    if outside:
        raise SystemExit(f"--arm {name}: {outside} would change site training, which the arms share; "
                         f"only {SHAREABLE} settings may differ")
    return name, variant, overrides


def summary(runs: dict[str, list[dict]]) -> dict:
    first = next(iter(runs))
    out = {}
    for arm, trials in runs.items():
        if not trials:
            continue
        row = {k: round(statistics.mean(t[k] for t in trials), 3) for k in HEADLINE}
        row["trials"] = trials
        if arm != first:
            pairs = list(zip(runs[first], trials))  # same seeds, in order
            row[f"{first}_ahead"] = {k: sum(a[k] > b[k] for a, b in pairs) for k in HEADLINE}
        out[arm] = row
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--arm", action="append", required=True)
    parser.add_argument("--set", action="append", default=[], help="a setting for every arm (any section)")
    args = parser.parse_args()
    arms = [parse_arm(a) for a in args.arm]
    base = parse_overrides(args.set)
    cache = SiteCache()
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in arms}
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for name, variant, overrides in arms:
            params = load_params(overrides=base | overrides)
            result = run_variant(params, variant, args.out / f"seed-{seed}" / name, cache=cache, seed=seed)
            m = result.metrics
            runs[name].append({"seed": seed, **{k: round(m[k], 3) for k in HEADLINE},
                               "seconds": round(result.seconds, 1),
                               "tasks": {t: round(v["primary"], 3) for t, v in m["tasks"].items()},
                               "auroc": {t: round(v["auroc"], 3) for t, v in m["tasks"].items() if "auroc" in v}})
            study = {"arms": {n: {"variant": v, "overrides": o} for n, v, o in arms}, "settings": base,
                     "results": summary(runs)}
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "study.json").write_text(json.dumps(study, indent=2))
    print(json.dumps(study["results"], indent=2))


if __name__ == "__main__":
    main()
