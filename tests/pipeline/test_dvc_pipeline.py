"""The DVC pipeline for real: `dvc repro` of one tiny round in a copy of the repo, a no-op second repro, and
`dvc exp run -S` varying the injection. No mocks: real DVC, git, MLflow (SQLite) and the fedkim stages."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fedkim.data.catalogue import load_catalogue
from tests.helpers import REPO, TINY, keep_members, small_params_dict

pytestmark = [pytest.mark.slow, pytest.mark.integration]
# The small federation's validation splits hold 2-4 samples per class: below the default gate's 5.
GATE = {"data.gate.min_samples_per_class": 1}
# Two of its four sites keep the run short (every stage is a process that imports torch and the library): site-a
# holds every modality, site-b a subset, and two packages meet the default quorum.
SITES = ("site-a", "site-b")
STAGES = ("generate", *(f"validate@{i}" for i in range(len(SITES))), "start_round",
          *(f"train_site@{i}" for i in range(len(SITES))), "aggregate", "inject", "evaluate", "register")
TASK_COUNT = 12


def run(args, cwd, env, timeout=600):
    """Run a command; on failure the assertion message carries its full stdout and stderr."""
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (f"`{' '.join(map(str, args))}` exited {proc.returncode}\n"
                                  f"--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    return proc.stdout + proc.stderr


def dvc(*args, cwd, env, timeout=600):
    return run([sys.executable, "-m", "dvc", *args], cwd, env, timeout)


def git(*args, cwd, env):
    return run(["git", *args], cwd, env)


def working_tree_files() -> list[str]:
    """The repo's files as they are now: tracked ones plus untracked ones git does not ignore."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    return sorted({f for f in out.split("\0") if f and (REPO / f).is_file()})


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Subprocess environment: no user config, no analytics, a git identity, one thread, nothing pointing outside."""
    home = tmp_path_factory.mktemp("home")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DVC_", "GIT_", "FEDKIM_", "MLFLOW_TRACKING", "MLFLOW_REGISTRY"))}
    env.update({
        "DVC_NO_ANALYTICS": "1", "DVC_GLOBAL_CONFIG_DIR": str(home / "dvc-global"),
        "DVC_SYSTEM_CONFIG_DIR": str(home / "dvc-system"), "DVC_SITE_CACHE_DIR": str(home / "dvc-site"),
        "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": str(home / "gitconfig"),
        "GIT_AUTHOR_NAME": "fedkim test", "GIT_AUTHOR_EMAIL": "test@fedkim.invalid",
        "GIT_COMMITTER_NAME": "fedkim test", "GIT_COMMITTER_EMAIL": "test@fedkim.invalid",
        "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg", "PYTHONDONTWRITEBYTECODE": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "HF_HUB_OFFLINE": "1",
        "GX_ANALYTICS_ENABLED": "false",
        # Stage commands say `python`: make it this interpreter (the venv), whatever PATH the tests started with.
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
    })
    return env


@pytest.fixture(scope="module")
def repo(tmp_path_factory, env):
    """A copy of the working tree as its own git repo, with the small federation and the tiny model in params.yaml,
    after one `dvc repro`; returns (folder, output of that repro)."""
    repo = tmp_path_factory.mktemp("dvc-repo")
    for rel in working_tree_files():
        target = repo / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, target)
    for stale in ("dvc.lock", "reports"):  # results of a run in the source tree are not this run's
        path = repo / stale
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    assert (repo / ".dvc" / "config").is_file(), "the repo has no .dvc/: run `dvc init` in it"
    raw = small_params_dict("data/federation", **TINY, **GATE)  # relative paths resolve inside the copy
    keep_members(raw, SITES)
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    git("init", "-q", "-b", "main", cwd=repo, env=env)
    git("add", "-A", cwd=repo, env=env)
    git("commit", "-q", "-m", "tiny round", cwd=repo, env=env)
    out = dvc("repro", cwd=repo, env=env)
    return repo, out


def test_repro_runs_every_stage_and_records_the_round(repo):
    repo, out = repo
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage '")}
    assert ran == set(STAGES), out

    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(STAGES)
    # Params are recorded per stage, and only the keys each stage reads.
    assert set(lock["stages"]["inject"]["params"]["params.yaml"]) == {
        "federation.round_id", "data.seed", "data.ecg_seconds", "data.icu_hours", "site", "inject"}
    assert "inject" not in lock["stages"]["train_site@0"]["params"]["params.yaml"]

    metrics = json.loads((repo / "reports" / "metrics.json").read_text())
    assert len(metrics["tasks"]) == TASK_COUNT
    for task, figures in metrics["tasks"].items():
        assert {"accuracy", "primary"} <= set(figures), task
    assert {"train_mean_f1", "zeroshot_mean", "mean_auroc"} <= set(metrics) and "gate" not in metrics

    with (repo / "reports" / "plots" / "tasks.csv").open() as f:
        assert len(list(csv.DictReader(f))) == TASK_COUNT
    with (repo / "reports" / "plots" / "inject_loss.csv").open() as f:
        steps = list(csv.DictReader(f))
    assert steps and all(float(s["loss"]) > 0 for s in steps)
    assert (repo / "reports" / "plots" / "gate_heatmap.png").read_bytes()[:4] == b"\x89PNG"

    # The round lives in the DVC round store with the layout of fedkim.rounds; no LATEST marker (no chaining).
    store = repo / "artifacts" / "dvc" / "store" / "rounds"
    for site in SITES:
        manifest = json.loads((store / "1" / "sites" / site / "manifest.json").read_text())
        assert manifest["site_id"] == site and manifest["round_id"] == "1"
    assert sorted(json.loads((store / "1" / "aggregate" / "aggregate.json").read_text())["accepted"]) == list(SITES)
    assert (store / "1" / "central" / "trainable.safetensors").is_file()
    assert not (store / "LATEST.json").exists()

    registry = json.loads((repo / "reports" / "registry.json").read_text())
    assert registry["version"] == 1 and registry["decision"] == "promoted"
    assert registry["decided_on"] == "validation"  # the test split's figures are reported, never decided on
    validation = json.loads((repo / "reports" / "validation_metrics.json").read_text())
    assert set(validation["tasks"]) == set(load_catalogue().train) and "calibration" not in metrics
    assert set(registry["aliases"]) == {"champion", "challenger"}
    assert (repo / "mlruns" / "mlflow.db").is_file()


def test_second_repro_has_nothing_to_do(repo, env):
    repo, _ = repo
    out = dvc("repro", cwd=repo, env=env)
    assert "Running stage" not in out and "Data and pipelines are up to date" in out, out
    assert json.loads(dvc("status", "--json", cwd=repo, env=env)) == {}
    # The validate stage leaves the generated site folders as they were (no GX docs inside the data) ...
    assert not list((repo / "data" / "federation").glob("*/reports"))
    # ... and what `fedkim data validate` writes there is .dvcignore'd, while any other new file is a change.
    site = repo / "data" / "federation" / SITES[0]
    (site / "reports" / "gx").mkdir(parents=True)
    (site / "reports" / "validation.json").write_text("{}")
    assert json.loads(dvc("status", "--json", cwd=repo, env=env)) == {}
    shutil.rmtree(site / "reports")
    (site / "extra.csv").write_text("a,b\n")
    assert "generate" in json.loads(dvc("status", "--json", cwd=repo, env=env))
    (site / "extra.csv").unlink()


def test_metrics_and_plots_are_declared(repo, env, tmp_path):
    repo, _ = repo
    shown = json.loads(dvc("metrics", "show", "--json", cwd=repo, env=env))
    (workspace,) = shown.values()  # DVC 3.67 keys the workspace as ""
    assert len(workspace["data"]["reports/metrics.json"]["data"]["tasks"]) == TASK_COUNT

    plots = json.loads(dvc("plots", "show", "--json", "-o", tmp_path / "plots", cwd=repo, env=env))["data"]
    assert set(plots) == {"reports/plots/inject_loss.csv", "reports/plots/tasks.csv",
                          "reports/plots/gate_heatmap.png"}
    (loss,) = plots["reports/plots/inject_loss.csv"]
    assert loss["type"] == "vega" and loss["content"]["encoding"]["x"]["field"] == "step"
    assert len(loss["content"]["data"]["values"]) >= 1 and "loss" in loss["content"]["data"]["values"][0]
    (tasks,) = plots["reports/plots/tasks.csv"]
    assert len(tasks["content"]["data"]["values"]) == TASK_COUNT
    assert [p["type"] for p in plots["reports/plots/gate_heatmap.png"]] == ["image"]


def test_register_again_finds_the_same_version(repo, env):
    repo, _ = repo
    before = json.loads((repo / "reports" / "registry.json").read_text())
    out = dvc("repro", "--force", "--single-item", "register", cwd=repo, env=env)
    assert "Running stage 'register'" in out
    assert json.loads((repo / "reports" / "registry.json").read_text()) == before  # same version, same decision


def test_exp_run_varies_the_injection_only(repo, env):
    repo, _ = repo
    git("add", "-A", cwd=repo, env=env)  # the baseline: the first round's lock, metrics and plots
    git("commit", "-q", "-m", "round 1", cwd=repo, env=env)
    out = dvc("exp", "run", "-n", "two-experts", "-S", "inject.num_experts=2", cwd=repo, env=env)
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage '")}
    assert ran == {"inject", "evaluate", "register"}, out

    rows = json.loads(dvc("exp", "show", "--json", cwd=repo, env=env))
    (baseline,) = [r for r in rows if r["rev"] != "workspace"]  # the commit the experiment branched from
    (experiment,) = [e["revs"][0] for e in baseline["experiments"] or [] if e["name"] == "two-experts"]
    base, exp = baseline["data"], experiment["data"]

    def experts(rev: dict) -> int:
        return rev["params"]["params.yaml"]["data"]["inject"]["num_experts"]

    assert experts(base) == TINY["inject.num_experts"] and experts(exp) == 2
    assert len(exp["metrics"]["reports/metrics.json"]["data"]["tasks"]) == TASK_COUNT
    round_dir = "artifacts/dvc/store/rounds/1"
    assert exp["deps"][f"{round_dir}/sites"]["hash"] == base["deps"][f"{round_dir}/sites"]["hash"]
    assert exp["deps"][f"{round_dir}/central"]["hash"] != base["deps"][f"{round_dir}/central"]["hash"]
    exp_lock = yaml.safe_load(git("show", f"{experiment['rev']}:dvc.lock", cwd=repo, env=env))
    assert exp_lock["stages"]["inject"]["params"]["params.yaml"]["inject"]["num_experts"] == 2

    # The experiment is a new model version under its own tracked round, next to the baseline's.
    registry = json.loads((repo / "reports" / "registry.json").read_text())
    assert registry["version"] == 2 and registry["round_id"] == "1"
    assert registry["tracked_round_id"].startswith("dvc-1-") and "challenger" in registry["aliases"]


def test_a_provided_member_inside_the_data_root_is_gated_and_never_removed_or_cached(repo, env):
    """A hospital's folder placed inside data.root joins as a provided member: rerunning `generate` (DVC would
    delete a cached, non-persistent out first) leaves every byte and mtime of it, nothing of it reaches the DVC
    cache, its validate stage gates it, and a failing gate stops `dvc repro` there."""
    from fedkim.data.siteformat import finalize_site

    repo, _ = repo
    root = repo / "data" / "federation"
    hospital = root / "hospital-x"
    shutil.copytree(root / SITES[1], hospital)
    finalize_site(hospital, site_id="hospital-x", role="hospital", description="a provided export")
    files = {p.relative_to(hospital): (p.read_bytes(), p.stat().st_mtime_ns) for p in hospital.rglob("*")
             if p.is_file()}
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    source = next(m for m in raw["federation"]["members"] if m["id"] == SITES[1])
    raw["federation"]["members"].append({"id": "hospital-x", "description": "a provided export", "data": "provided",
                                         "path": "data/federation/hospital-x", "modalities": source["modalities"]})
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))

    out = dvc("repro", "--force", "--single-item", "generate", cwd=repo, env=env)
    assert "Running stage 'generate'" in out
    assert {p.relative_to(hospital): (p.read_bytes(), p.stat().st_mtime_ns) for p in hospital.rglob("*")
            if p.is_file()} == files
    cached = {p.parent.name + p.name for p in (repo / ".dvc" / "cache").rglob("*") if p.is_file()}
    index_md5 = hashlib.md5((hospital / "index.parquet").read_bytes()).hexdigest()
    assert index_md5 not in cached  # hospital data never enters the DVC cache (nor a remote)

    stage = f"validate@{len(raw['federation']['members']) - 1}"
    dvc("repro", "--single-item", stage, cwd=repo, env=env)
    report = json.loads((repo / "reports" / "validation" / "hospital-x.json").read_text())
    assert report["success"] and report["site_id"] == "hospital-x"

    next(hospital.rglob("*.parquet")).write_bytes(b"not parquet")  # changed data: the fingerprint no longer holds
    failed = subprocess.run([sys.executable, "-m", "dvc", "repro", "--single-item", stage], cwd=repo, env=env,
                            capture_output=True, text=True, timeout=600)
    assert failed.returncode != 0 and "FAIL hospital-x" in failed.stdout + failed.stderr


# ------------------------------------------------------------------------------- stage scripts, in process
def test_start_round_refuses_a_store_with_chained_rounds(tmp_path, monkeypatch, capsys):
    from fedkim.federation.store import LocalStore
    from fedkim.rounds import LATEST_KEY, put_json
    from pipelines import start_round

    put_json(LocalStore(tmp_path / "store"), LATEST_KEY, {"round_id": "7"})
    monkeypatch.setenv("FEDKIM_PARAMS", str(REPO / "params.yaml"))
    assert start_round.main(["--store", str(tmp_path / "store")]) == 1
    assert "LATEST.json exists" in capsys.readouterr().err
    assert not (tmp_path / "store" / "rounds" / "1").exists()  # no global model published


def test_a_site_missing_from_params_is_a_clear_error(tmp_path, monkeypatch):
    from pipelines import validate

    monkeypatch.setenv("FEDKIM_PARAMS", str(REPO / "params.yaml"))
    with pytest.raises(SystemExit, match=r"--site 'site-z' is not in params.yaml federation.members; known sites: \["):
        validate.main(["--site", "site-z", "--out", str(tmp_path / "report.json")])
    assert not (tmp_path / "report.json").exists()


def test_generate_stage_depends_on_every_source_of_the_federation_cache_key():
    """The generator reuses a federation whose recorded hash covers these files; if DVC did not rerun `generate`
    when one of them changes, the next library call would regenerate the tracked data behind DVC's back."""
    from fedkim.data.synth.federation import generator_sources

    deps = [REPO / d for d in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["generate"]["deps"]]
    uncovered = [str(p.relative_to(REPO)) for p in generator_sources()
                 if not any(p == d or d in p.parents for d in deps)]
    assert generator_sources() and not uncovered, f"dvc.yaml generate deps miss {uncovered}"
