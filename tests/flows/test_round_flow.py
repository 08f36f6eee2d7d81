"""The Prefect round flow end to end: real Prefect (test harness API), GX gate, local store, MLflow on SQLite
under tmp, the tiny FM on the small federation."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterId, FlowRunFilterTags, TaskRunFilter,
                                            TaskRunFilterName)

from fedkim.config import load_params
from fedkim.federation.store import LocalStore, package_key, package_prefix
from fedkim.rounds import LATEST_KEY, QuorumError, get_json, round_key, run_round, validation_key
from fedkim.round_lock import RoundLockedError, lock_key, round_lock
from flows.round import fedkim_flow
from tests.helpers import TINY, small_params_dict

pytestmark = [pytest.mark.slow, pytest.mark.integration]

# One retry without delay keeps the crash scenario short while still proving that retries happen. The small
# federation has fewer than the default 5 samples per (task, split, label): the gate's minimum follows it.
FAST = {**TINY, "federation.retries": 1, "federation.retry_delay_s": 0, "federation.site_timeout_s": 600,
        "data.gate.min_samples_per_class": 1}


@pytest.fixture(scope="module")
def federation(small_federation, tmp_path_factory) -> Path:
    """A private copy: the gate writes its reports into the site folders, and some tests corrupt a site."""
    return Path(shutil.copytree(small_federation.root, tmp_path_factory.mktemp("flow") / "federation"))


@pytest.fixture(autouse=True)
def no_tracking_env(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # would override tracking.uri


def write_params(folder: Path, federation_root: Path, **extra) -> Path:
    """A params file whose store, MLflow database, reports and scratch all live in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    raw = small_params_dict(federation_root, **{
        **FAST, "tracking.uri": f"sqlite:///{folder / 'mlflow.db'}", "store.root": str(folder / "store"),
        "report.root": str(folder / "reports"), "federation.work_dir": str(folder / "work"),
        "report.comparison": None, **extra})  # the baselines: the newest comparison.json beside the reports
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def mlflow_client(folder: Path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{folder / 'mlflow.db'}"
    return MlflowClient(uri, registry_uri=uri)


def runs(folder: Path, round_id: str, kind: str):
    client = mlflow_client(folder)
    experiment = client.get_experiment_by_name("fedkim")
    return client.search_runs([experiment.experiment_id],
                              f"tags.`fedkim.round_id` = '{round_id}' and tags.`fedkim.kind` = '{kind}'")


def versions(folder: Path) -> list:
    return mlflow_client(folder).search_model_versions("name = 'fedkim-foundation'")


def store_snapshot(store: LocalStore) -> dict[str, str]:
    return {k: store.sha256(k) for k in store.list("rounds/")}


def block_upload(store_root: Path, round_id: str, site_id: str) -> None:
    """Make the site's package upload fail: a folder where its tensor file must go (as a full or read-only bucket
    would). Its gate (whose summary goes beside it) and training run normally; the upload raises, on every
    attempt."""
    blocker = store_root / package_prefix(round_id, site_id) / "encoders.safetensors" / "not-a-file"
    blocker.mkdir(parents=True)


# ------------------------------------------------------------------------------------ (a) and (d): a clean round
@pytest.fixture(scope="module")
def clean_round(prefect_api, federation, tmp_path_factory):
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # an earlier module's flow exported it (mlflow.set_tracking_uri)
    folder = tmp_path_factory.mktemp("clean")
    params = write_params(folder, federation, **{"federation.parallel_sites": 1})  # bit-reproducible
    return folder, params, fedkim_flow(round_id="1", params_path=str(params))


def test_a_simulation_round_registers_a_version_and_writes_its_report(clean_round):
    folder, _, summary = clean_round
    sites = ["site-a", "site-b", "site-c", "site-d"]
    assert summary["status"] == "completed" and summary["mode"] == "simulation"
    assert summary["included"] == sites and summary["excluded"] == {} and summary["failed"] == {}
    assert all(summary["sites"][s]["status"] == "trained" for s in sites)

    store = LocalStore(folder / "store")
    for site in sites:  # each site's package and gate summary travelled through the store
        assert store.exists(package_key("1", site, "manifest.json"))
        assert get_json(store, validation_key("1", site))["success"] is True
    assert get_json(store, LATEST_KEY)["round_id"] == "1"
    stored = get_json(store, round_key("1", "round.json"))
    assert stored["status"] == "completed"
    # Wall seconds per phase (the orchestration benchmark's breakdown): every phase ran, none outlasts the round.
    phases = {"setup", "tracking", "start", "sites", "aggregate", "gate", "inject", "evaluate", "register",
              "report"}
    assert set(stored["timings"]) == phases and all(0 <= t <= stored["seconds"] for t in stored["timings"].values())

    model = summary["model"]
    assert model["version"] == 1 and {"challenger", "champion"} <= set(model["aliases"])  # first: no champion yet
    assert [int(v.version) for v in versions(folder)] == [1]

    parent = runs(folder, "1", "round")
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    # The server's splits passed the gate before injection and evaluation; logged as the sites' gates are.
    assert all(stored["splits"][s]["success"] for s in ("public", "test", "validation"))
    assert {r.data.tags["fedkim.site_id"] for r in runs(folder, "1", "split")} == {"public", "test", "validation"}
    # promotion decided on the validation split; the test split's figures are the reported ones
    assert model["decided_on"] == "validation" and "on the validation split" in model["reason"]
    injection = runs(folder, "1", "injection")[0].data.metrics
    assert "val.lung_opacity.primary" in injection and "eval.lung_opacity.primary" in injection
    assert parent[0].data.tags["fedkim.registered_version"] == "1"
    assert len(runs(folder, "1", "site")) == 4 and len(runs(folder, "1", "injection")) == 1

    report = Path(summary["report"])
    text = report.read_text()
    for name in ("task_metrics.png", "gate_heatmap.png", "loss_curve.png", "summary.json"):
        assert (report.parent / name).stat().st_size > 0, name
    assert "| lung_opacity | train |" in text and "| site-d | trained |" in text and "first registered" in text
    assert not (folder / "work" / "1").exists()  # injection checkpoints are removed once the round is done


def test_d_rerunning_a_round_id_reuses_everything(clean_round):
    folder, params, first = clean_round
    store = LocalStore(folder / "store")
    before = {k: v for k, v in store_snapshot(store).items() if not k.endswith("round.json")}

    again = fedkim_flow(round_id="1", params_path=str(params))

    assert again["status"] == "completed" and {s["status"] for s in again["sites"].values()} == {"reused"}
    assert again["aggregate"]["reused"] and again["model"]["version"] == first["model"]["version"]
    after = {k: v for k, v in store_snapshot(store).items() if not k.endswith("round.json")}
    assert after == before  # nothing retrained, re-uploaded or overwritten
    assert len(versions(folder)) == 1  # no second registry version
    assert len(runs(folder, "1", "round")) == 1  # the parent run was resumed, not duplicated
    assert len(runs(folder, "1", "site")) == 4 and len(runs(folder, "1", "injection")) == 1


def test_a_second_trigger_is_refused_before_it_opens_a_run_or_waits_and_reuses_it(clean_round):
    folder, params, _ = clean_round
    store = LocalStore(folder / "store")
    record = get_json(store, round_key("1", "round.json"))
    with round_lock(store, "1", owner="prefect flow run first"):  # a run of round 1 is going on
        with pytest.raises(RoundLockedError, match="round 1 is already running: held by prefect flow run first"):
            fedkim_flow(round_id="1", params_path=str(params))
    assert get_json(store, round_key("1", "round.json")) == record  # refused before it wrote anything
    assert len(runs(folder, "1", "round")) == 1

    held = threading.Event()

    def hold():
        with round_lock(store, "1", owner="prefect flow run first"):
            held.set()
            time.sleep(3)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(10)
    started = time.monotonic()
    again = fedkim_flow(round_id="1", params_path=str(params),
                        overrides={"federation.round_lock.mode": "wait", "federation.round_lock.poll_s": 0.2})
    holder.join()
    assert time.monotonic() - started > 2  # it waited for the holder
    assert again["status"] == "completed" and again["aggregate"]["reused"]
    assert len(runs(folder, "1", "round")) == 1  # one parent run, resumed
    assert store.read_marker(lock_key("1")) is None


def test_the_flow_computes_exactly_what_run_round_computes(clean_round, tmp_path):
    """Orchestration adds gate, tracking and registry, never a different model: same round id, same tensors."""
    folder, params, _ = clean_round
    plain = LocalStore(tmp_path / "store")
    run_round(load_params(params), plain, "1", tmp_path / "work")
    flow = LocalStore(folder / "store")
    keys = [package_key("1", s, "encoders.safetensors") for s in ("site-a", "site-b", "site-c", "site-d")]
    keys += [round_key("1", "aggregate", "encoders.safetensors"), round_key("1", "central", "trainable.safetensors")]
    assert {k: flow.sha256(k) for k in keys} == {k: plain.sha256(k) for k in keys}
    metrics = [json.dumps(get_json(store, round_key("1", "evaluation", "metrics.json"))["tasks"], sort_keys=True)
               for store in (flow, plain)]
    assert metrics[0] == metrics[1]  # through JSON, where NaN (AUROC of a one-class task) equals NaN


def test_the_next_round_is_judged_against_the_champion_and_reported_with_the_baselines(clean_round):
    folder, params, first = clean_round
    # What `fedkim experiment` writes (comparison.json), found as the newest one under the reports' parent folder.
    rows = {t: {"primary": 0.123, "role": "train"} for t in ("lung_opacity", "covid")}
    experiment = folder / "experiment" / "comparison.json"
    experiment.parent.mkdir()
    experiment.write_text(json.dumps({"variants": {"no_injection": {"tasks": rows}}, "foundation_model": "tiny",
                                      "rounds": 1}))

    second = fedkim_flow(round_id="2", params_path=str(params))

    model = second["model"]
    assert model["version"] == 2 and "challenger" in model["aliases"]
    assert model["decision"] in ("promoted", "kept") and ("champion" in model["aliases"]) == (
        model["decision"] == "promoted") and "v1" in model["reason"]  # judged against champion v1
    assert get_json(LocalStore(folder / "store"), LATEST_KEY)["round_id"] == "2"
    text = Path(second["report"]).read_text()
    assert "| champion v1 | baseline no_injection |" in text and "| lung_opacity | train |" in text
    assert "0.123" in text and str(experiment) in text


# ------------------------------------------------------------------------------- (b) and (c): failing sites
@pytest.fixture(scope="module")
def broken_federation(federation, tmp_path_factory) -> Path:
    """site-b fails the data gate: its index.parquet is gone."""
    root = Path(shutil.copytree(federation, tmp_path_factory.mktemp("broken") / "federation"))
    (root / "site-b" / "index.parquet").unlink()
    return root


def task_run_count(flow_run_id: str, name: str) -> int:
    with get_client(sync_client=True) as client:
        found = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                                      task_run_filter=TaskRunFilter(name=TaskRunFilterName(any_=[name])))
    assert len(found) == 1, [t.name for t in found]
    return found[0].run_count


def test_b_c_a_gate_failure_and_a_crash_leave_the_round_to_the_quorum(prefect_api, broken_federation, tmp_path):
    params = write_params(tmp_path, broken_federation)
    block_upload(tmp_path / "store", "2", "site-c")

    summary = fedkim_flow(round_id="2", params_path=str(params))

    assert summary["status"] == "completed" and summary["included"] == ["site-a", "site-d"]
    # (b) excluded by the gate, with the rule and file that failed; its summary (no examples) is in the store
    assert set(summary["excluded"]) == {"site-b"} and "index.parquet" in summary["excluded"]["site-b"]
    gate = get_json(LocalStore(tmp_path / "store"), validation_key("2", "site-b"))
    assert gate["success"] is False and gate["findings"] and "examples" not in gate["findings"][0]
    # (c) crashed on upload, retried once, recorded as failed with the error
    assert set(summary["failed"]) == {"site-c"}
    assert "after 2 attempt(s)" in summary["failed"]["site-c"] and "IsADirectoryError" in summary["failed"]["site-c"]
    assert task_run_count(summary["prefect_flow_run_id"], "train-site-c") == 2
    site_runs = {r.data.tags["fedkim.site_id"]: r for r in runs(tmp_path, "2", "site")}
    assert set(site_runs) == {"site-a", "site-b", "site-c", "site-d"}
    assert site_runs["site-b"].data.tags["fedkim.validation.success"] == "false"
    assert summary["model"]["version"] == 1
    assert "| site-b | excluded |" in Path(summary["report"]).read_text()


def test_c_a_crash_below_the_quorum_fails_the_round_with_the_reasons(prefect_api, broken_federation, tmp_path):
    params = write_params(tmp_path, broken_federation, **{"federation.quorum": 3})
    block_upload(tmp_path / "store", "3", "site-c")

    state = fedkim_flow(round_id="3", params_path=str(params), return_state=True)

    assert state.is_failed()
    with pytest.raises(QuorumError) as failure:
        state.result()
    message = str(failure.value)
    assert "2 acceptable package(s), below the quorum of 3" in message
    assert "site-b excluded: data gate failed" in message and "site-c failed: training/upload failed" in message
    store = LocalStore(tmp_path / "store")
    assert get_json(store, round_key("3", "round.json"))["status"] == "failed"
    assert not store.exists(round_key("3", "aggregate", "encoders.safetensors")) and not store.exists(LATEST_KEY)
    assert versions(tmp_path) == []  # nothing registered
    assert [r.info.status for r in runs(tmp_path, "3", "round")] == ["FAILED"]


def test_c_sites_that_time_out_are_recorded_as_failed(prefect_api, federation, tmp_path):
    params = write_params(tmp_path, federation, **{"federation.site_timeout_s": 0.01})  # the gate alone takes seconds

    state = fedkim_flow(round_id="5", params_path=str(params), return_state=True)

    assert state.is_failed()
    with pytest.raises(QuorumError) as failure:
        state.result()
    message = str(failure.value)
    assert "0 acceptable package(s)" in message
    # A small site's gate can finish inside the limit on a fast machine; its training then times out instead.
    stages = ("failed: data gate did not finish", "failed: training/upload failed")
    assert all(any(f"{s} {stage}" in message for stage in stages) for s in ("site-a", "site-b", "site-c", "site-d"))
    assert "timed out after 0.01 second(s)" in message.lower()


# ------------------------------------------------------------------------------------------ federated mode
@contextlib.contextmanager
def serving_sites(site_ids: list[str]):
    """Deployments fedkim-site/<site> served from this process, each flow run in its own subprocess, as a site's
    worker would run them: the round reaches the sites only through the Prefect API and the store."""
    from prefect.runner import Runner

    from flows.site import site_flow

    runner = Runner(name="fedkim-test-sites", query_seconds=1, pause_on_shutdown=False, limit=len(site_ids))

    async def serve():
        for site in site_ids:
            await runner.aadd_flow(site_flow, name=site, parameters={"site_id": site})
        await runner.start()

    thread = threading.Thread(target=lambda: asyncio.run(serve()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not runner.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the site runner did not start"
        time.sleep(0.2)
    try:
        yield
    finally:
        runner.execute_in_background(runner.astop).result(60)
        thread.join(60)


def test_federated_round_runs_each_site_as_its_own_deployment(prefect_api, broken_federation, tmp_path):
    from flows.site import site_flow

    params = write_params(tmp_path, broken_federation, **{"federation.site_start_s": 20})
    site_flow.to_deployment(name="site-d", parameters={"site_id": "site-d"}).apply()  # deployed; its worker is down
    with serving_sites(["site-a", "site-b", "site-c"]):
        summary = fedkim_flow(round_id="4", params_path=str(params), mode="federated")

    assert summary["mode"] == "federated" and summary["included"] == ["site-a", "site-c"]
    assert "index.parquet" in summary["excluded"]["site-b"]  # its site run failed on the gate, summary uploaded
    assert "no worker picked up" in summary["failed"]["site-d"] and "work pool site-d" in summary["failed"]["site-d"]
    with get_client(sync_client=True) as client:  # the sites' work ran as runs of their own deployments
        site_runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=["round:4"])))
    states = {client_run.parameters["site_id"]: client_run.state.type.value for client_run in site_runs}
    assert states == {"site-a": "COMPLETED", "site-b": "FAILED", "site-c": "COMPLETED",
                      "site-d": "CANCELLED"}  # so that it cannot start into a later round
    store = LocalStore(tmp_path / "store")
    assert all(store.exists(package_key("4", s, "manifest.json")) for s in ("site-a", "site-c"))
    assert summary["model"]["version"] == 1


def test_d_a_round_that_crashed_mid_way_reruns_into_the_same_mlflow_records(prefect_api, federation, tmp_path):
    """The crash comes after the parent, site and injection runs are open (the evaluation cannot be stored): the
    re-run resumes the parent, keeps the site runs, reopens and finishes the injection run, and logs and registers
    one model."""
    params = write_params(tmp_path, federation)
    blocker = tmp_path / "store" / round_key("5", "evaluation")
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("not a folder")  # as a full or read-only store would: storing the evaluation fails

    state = fedkim_flow(round_id="5", params_path=str(params), return_state=True)

    assert state.is_failed()
    with pytest.raises(OSError):
        state.result()
    (parent,), (injection,) = runs(tmp_path, "5", "round"), runs(tmp_path, "5", "injection")
    assert parent.info.status == "FAILED" and injection.info.status == "FAILED" and versions(tmp_path) == []

    blocker.unlink()
    summary = fedkim_flow(round_id="5", params_path=str(params))

    assert summary["status"] == "completed" and summary["aggregate"]["reused"]
    (parent_again,), (injection_again,) = runs(tmp_path, "5", "round"), runs(tmp_path, "5", "injection")
    assert (parent_again.info.run_id, parent_again.info.status) == (parent.info.run_id, "FINISHED")
    assert (injection_again.info.run_id, injection_again.info.status) == (injection.info.run_id, "FINISHED")
    assert len(runs(tmp_path, "5", "site")) == 4 and len(runs(tmp_path, "5", "split")) == 3
    assert all(r.info.status == "FINISHED" for r in runs(tmp_path, "5", "site"))
    assert [int(v.version) for v in versions(tmp_path)] == [1]
    client = mlflow_client(tmp_path)
    logged = client.search_logged_models([client.get_experiment_by_name("fedkim").experiment_id])
    assert len(logged) == 1 and versions(tmp_path)[0].source == f"models:/{logged[0].model_id}"
