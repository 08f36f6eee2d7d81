"""Which comparison.json gives the round report its baseline rows (plain Python: no Prefect, no model)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from fedkim.report import find_comparison, load_baselines
from tests.helpers import REPO


def comparison(path: Path, primary: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = {"lung_opacity": {"primary": primary, "role": "train"}}
    path.write_text(json.dumps({"variants": {"fedplug": {"tasks": rows}}, "foundation_model": "tiny", "rounds": 1}))
    return path


def test_a_configured_comparison_wins_over_a_newer_one(tmp_path):
    pinned = comparison(tmp_path / "a" / "comparison.json", 0.1)
    newer = comparison(tmp_path / "b" / "comparison.json", 0.2)
    os.utime(pinned, (1, 1))  # older than `newer` by decades
    assert find_comparison(None, tmp_path) == newer
    assert find_comparison(pinned, tmp_path) == pinned
    assert load_baselines(pinned)[0] == {"fedplug": {"lung_opacity": 0.1}}


def test_a_configured_comparison_that_is_missing_is_named_not_replaced(tmp_path):
    comparison(tmp_path / "b" / "comparison.json", 0.2)
    missing = tmp_path / "gone" / "comparison.json"
    assert find_comparison(missing, tmp_path) == missing
    rows, meta = load_baselines(missing)
    assert rows == {} and meta["path"] == str(missing) and "FileNotFoundError" in meta["error"]


def test_the_shipped_params_pin_the_repository_comparison():
    """A fresh clone gives every comparison.json under reports/ the same mtime: "newest" would be arbitrary."""
    pinned = yaml.safe_load((REPO / "params.yaml").read_text())["report"]["comparison"]
    assert pinned and (REPO / pinned).is_file()
    rows, meta = load_baselines(REPO / pinned)
    assert "fedkim" in rows and {"no_injection", "fedplug", "fedplug_lora", "fedkim_pub"} <= set(rows)
