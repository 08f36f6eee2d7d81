"""Factories shared by the tests: the small federation's params, the tiny foundation model's settings.

    small_params_dict(root, **overrides)   params.yaml as a dict, over a small federation at `root`
    keep_members(raw, ids)                  only these members (and their generator profiles) in a params dict
    write_params(folder, raw)               write params.yaml into folder and load it
    TINY                                    overrides for the tiny FM and short training

Model helpers are in tests.helpers.models, site directories in tests.helpers.sites, package stand-ins in
tests.helpers.packages.
"""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]

# A federation small enough for tests: same sites and knobs as the default, fewer and shorter samples.
SMALL = {
    "data.sizes": {"site_train": 24, "val_fraction": 0.25, "public": 12, "test": 12, "validation": 12},
    "data.image_size": 64,
    "data.ecg_seconds": 6,
    "data.workers": 1,
    # Its validation splits hold 2-4 samples per (task, split, label): below the default gate's 5. Rounds and
    # experiments gate every member and split, so the small federation's gate minimum follows its size.
    "data.gate.min_samples_per_class": 1,
}

# The tiny foundation model (no weights to ship) and one short epoch: what model, round and tracking tests run.
TINY = {"inject.foundation_model": "tiny", "inject.num_experts": 4, "inject.rank": 4, "inject.batch_size": 8,
        "site.epochs": 1, "site.batch_size": 16, "eval.max_per_task": 6, "eval.batch_size": 6}


def small_params_dict(root: Path, **extra) -> dict:
    """The repository's params.yaml with SMALL, data.root and `extra` (dotted keys) applied."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for dotted, value in {**SMALL, "data.root": str(root), **extra}.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = copy.deepcopy(value)
    return raw


def keep_members(raw: dict, ids) -> dict:
    """`raw` (a params dict) with only the members `ids` in federation.members and their profiles in data.sites."""
    raw["federation"]["members"] = [m for m in raw["federation"]["members"] if m["id"] in ids]
    raw["data"]["sites"] = {k: v for k, v in raw["data"]["sites"].items() if k in ids}
    return raw


def write_params(folder: Path, raw: dict):
    """Write `raw` as folder/params.yaml and load it (relative paths resolve against the folder)."""
    from fedkim.config import load_params

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(raw))
    return load_params(folder / "params.yaml")
