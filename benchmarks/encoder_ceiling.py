"""How much of the encoders' knowledge reaches the foundation model? For one finished variant run of
`fedkim experiment`, the sites' knowledge packages of a round are aggregated again (FedAvg) and the aggregate's
own task heads are scored on the test split, beside each site's own model and the injected FM's AUROC from the
run's metrics.json. When the FM matches the aggregate's heads, injection has absorbed what the encoders know and
the adapter (M3OE or a single LoRA) cannot be the bottleneck; the federation is.

    python -m benchmarks.encoder_ceiling RUN_DIR [--seed N] [--round R]   -> one JSON object on stdout
    (RUN_DIR: e.g. OUT/seed-0/fedkim; --seed: the trial's seed, which set the encoders' initialisation)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from fedkim.config import load_params, parse_overrides
from fedkim.data.catalogue import catalogue_of
from fedkim.federation.aggregate import aggregate
from fedkim.federation.package import read_package
from fedkim.members import split_dir
from fedkim.site.model import global_model
from fedkim.site.train import evaluate_head


def head_aurocs(params, state: dict[str, torch.Tensor], modalities: set[str] | None = None) -> dict[str, float]:
    """Test AUROC of each training task's head; a task whose modality the state was not trained on is left out."""
    model = global_model(params.site, params.data, seed=params.data.seed)
    model.load_state_dict(state, strict=False)
    model.eval()
    out = {}
    catalogue = catalogue_of(params.data)
    for task in catalogue.train:
        if modalities is not None and catalogue[task].modality not in modalities:
            continue
        metrics = evaluate_head(model, split_dir(params, "test"), task, params.site, params.data,
                                torch.device("cpu"), split="test")
        out[task] = round(metrics["auroc"], 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--round", default=None, help="round id (default: the last)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="params override")
    args = parser.parse_args()
    params = load_params(overrides=parse_overrides(args.set))
    rounds = sorted((args.run_dir / "rounds").iterdir(), key=lambda d: int(d.name))
    round_dir = args.run_dir / "rounds" / args.round if args.round else rounds[-1]
    start = global_model(params.site, params.data, seed=params.data.seed + args.seed).state_dict()
    packages = [read_package(d) for d in sorted((round_dir / "sites").iterdir())]
    merged = aggregate(params.federation.strategy, start, packages, catalogue=catalogue_of(params.data)).state_dict
    report = {"run": args.run_dir.name, "round": round_dir.name, "seed": args.seed,
              "aggregate_heads": head_aurocs(params, merged)}
    for package in packages:
        counts = package.manifest.sample_counts
        report[f"{package.manifest.site_id}_heads"] = head_aurocs(
            params, {**start, **package.state_dict}, {m for m, n in counts.items() if n})
    metrics = args.run_dir / "metrics.json"
    if metrics.is_file():
        tasks = json.loads(metrics.read_text())["tasks"]
        report["foundation_model"] = {t: round(tasks[t]["auroc"], 3) for t in catalogue_of(params.data).train if t in tasks}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
