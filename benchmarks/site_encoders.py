"""How good are the sites' encoders on their own? Local training exactly as in a round (fedkim.site.train), one
site at a time and all sites pooled, scored by each task head's AUROC on the site's validation split and on the
federation's test split. The knowledge the foundation model can absorb is bounded by these encoders.

    python -m benchmarks.site_encoders [--modality image] [--seeds 1] [--set site.image_stem=patch ...]
        -> one JSON object on stdout
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from fedkim.config import load_params, parse_overrides
from fedkim.data.catalogue import catalogue_of
from fedkim.members import site_dir, split_dir
from fedkim.site.model import global_model
from fedkim.data.batches import pick_device
from fedkim.site.train import evaluate_head, train_site


def probe(params, modality: str, seed: int) -> dict:
    p, data = params.site, params.data
    tasks = [t.name for t in catalogue_of(data).for_modality(modality)]
    sites = [m.id for m in params.federation.members if modality in m.modalities]
    test_dir = split_dir(params, "test")
    start = global_model(p, data, seed=seed).state_dict()
    out = {}
    for who, dirs in [*((s, site_dir(params, s)) for s in sites), ("pooled", [site_dir(params, s) for s in sites])]:
        result = train_site(dirs, start, p, data, seed=seed, only_tasks=tasks)
        model = global_model(p, data, seed=seed)
        model.load_state_dict(result.state_dict, strict=False)
        model.to(pick_device(p.device))
        out[who] = {t: {"val_auroc": round(result.metrics[t].get("auroc", float("nan")), 3),
                        "test_auroc": round(evaluate_head(model, test_dir, t, p, data, pick_device(p.device),
                                                          split="test")["auroc"], 3)}
                    for t in tasks if t in result.metrics}
        out[who]["seconds"] = round(result.seconds, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modality", default="image", choices=["image", "ecg", "clinical"])
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="params override")
    args = parser.parse_args()
    params = load_params(overrides=parse_overrides(args.set))
    started = time.perf_counter()
    trials = [probe(params, args.modality, seed) for seed in range(args.seeds)]
    summary = {}
    for who in trials[0]:
        for task in trials[0][who]:
            if task == "seconds":
                continue
            values = [t[who][task]["test_auroc"] for t in trials]
            summary.setdefault(who, {})[task] = round(statistics.fmean(values), 3)
    print(json.dumps({"overrides": args.set, "mean_test_auroc": summary, "trials": trials,
                      "seconds": round(time.perf_counter() - started, 1),
                      "threads": torch.get_num_threads()}, indent=1))


if __name__ == "__main__":
    main()
