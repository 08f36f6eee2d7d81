"""`fedkim stack`: real Prefect, MLflow and S3 (rclone, or moto enforcing the store roles) servers and process
workers on 127.0.0.1; a federated round started with the real `prefect deployment run fedkim/round`; then `fedkim
stack down`. No mocks."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from fedkim.ops import processes, stack
from fedkim.cli import app
from tests.helpers import TINY, keep_members, small_params_dict

pytestmark = [pytest.mark.slow, pytest.mark.integration]

BIN = Path(sys.executable).parent
FEDKIM = [sys.executable, "-m", "fedkim.cli"]
SITES = ["site-a", "site-b"]  # two sites keep it short; site-a alone holds every training modality
ROUND = "stack-1"
SLEEP = "import time; time.sleep(300)"


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for sock in socks:
            sock.bind((processes.HOST, 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def write_project(folder: Path, federation: Path) -> Path:
    """params.yaml in `folder`: its relative paths (MLflow db, reports, scratch) all land in `folder`."""
    raw = small_params_dict(federation, **TINY, **{
        # The small federation has fewer than the default 5 samples per (task, split, label).
        "data.gate.min_samples_per_class": 1, "federation.retries": 0, "federation.site_start_s": 120,
        "federation.site_timeout_s": 300})
    keep_members(raw, SITES)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(raw))
    return folder / "params.yaml"


def stack_env(tmp: Path) -> dict[str, str]:
    env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect-home"),
           "PREFECT_WORKER_QUERY_SECONDS": "1",  # pick runs up at once: every worker here polls loopback
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "FEDKIM_PARAMS", "FEDKIM_STORE_KIND"):
        env.pop(key, None)
    return env


def run(args: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)


def process_tree(state: dict) -> list[tuple[int, int | None]]:
    roots = [(e["pid"], e["ticks"]) for e in state["services"].values()]
    return roots + [d for pid, ticks in roots for d in processes.descendants(pid, ticks)]


def proc_env(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


# ---------------------------------------------------------------------------------------------- integration
@pytest.fixture
def project(small_federation, tmp_path) -> Path:
    """A project on a private copy of two sites of the federation (the gate writes into site folders)."""
    federation = tmp_path / "federation"
    federation.mkdir()
    for part in ["federation.yaml", "public", "validation", "test", *SITES]:
        source = small_federation.root / part
        (shutil.copytree if source.is_dir() else shutil.copy)(source, federation / part)
    params = write_project(tmp_path / "project", federation)
    yield params
    stack.down(params, grace_s=5, log=lambda _: None)  # whatever failed above: leave no process behind


@pytest.mark.parametrize("s3_server", ["rclone", "moto"])
def test_stack_up_runs_a_federated_round_and_down_leaves_nothing_running(project, tmp_path, s3_server):
    started = time.monotonic()
    env = stack_env(tmp_path)
    prefect_port, mlflow_port, s3_port = free_ports(3)
    up = run([*FEDKIM, "stack", "up", "--params", str(project), "--prefect-port", str(prefect_port),
              "--mlflow-port", str(mlflow_port), "--s3-port", str(s3_port), "--s3", s3_server], env, 300)
    assert up.returncode == 0, up.stdout + up.stderr
    for line in (f"http://127.0.0.1:{prefect_port}", f"http://127.0.0.1:{mlflow_port}",
                 f"http://127.0.0.1:{s3_port}", "prefect deployment run fedkim/round"):
        assert line in up.stdout
    assert ("roles NOT enforced" in up.stdout) == (s3_server == "rclone")

    # The state file: pids, ports and logs of everything started; owner-only, as it holds the S3 secret.
    state_file = project.parent / ".fedkim" / "stack" / "state.json"
    assert stat.S_IMODE(state_file.stat().st_mode) == 0o600
    state = json.loads(state_file.read_text())
    services = state["services"]
    assert set(services) == {"prefect", "mlflow", "s3", "worker-central", "worker-site-a", "worker-site-b"}
    assert {n: services[n]["port"] for n in ("prefect", "mlflow", "s3")} == {
        "prefect": prefect_port, "mlflow": mlflow_port, "s3": s3_port}
    assert all(processes.alive(e["pid"], e["ticks"]) and Path(e["log"]).is_file() for e in services.values())
    assert state["pools"] == ["central", *SITES]
    # A key pair per role, kept owner-only in credentials.json; each worker holds its own role's pair only.
    keys = state["s3"]["keys"]
    credentials = project.parent / ".fedkim" / "stack" / "credentials.json"
    assert stat.S_IMODE(credentials.stat().st_mode) == 0o600
    assert json.loads(credentials.read_text())["roles"] == keys
    assert set(keys) == {"coordinator", "site.site-a", "site.site-b"}
    assert len({k["secret_access_key"] for k in keys.values()}) == 3
    secret = keys["coordinator"]["secret_access_key"]
    for pair in keys.values():
        assert pair["secret_access_key"] not in up.stdout + up.stderr  # printed only by `fedkim stack env`
        assert pair["secret_access_key"] not in Path(f"/proc/{services['s3']['pid']}/cmdline").read_text()
    # A site worker holds what a hospital's would: the Prefect API and the object store, never MLflow.
    site_env = proc_env(services["worker-site-a"]["pid"])
    assert site_env["PREFECT_API_URL"] == f"http://127.0.0.1:{prefect_port}/api"
    assert site_env["FEDKIM_S3_ENDPOINT_URL"] == f"http://127.0.0.1:{s3_port}"
    assert site_env["FEDKIM_STORE_KIND"] == "s3" and site_env["FEDKIM_STORE_ROLE"] == "site.site-a"
    assert site_env["AWS_SECRET_ACCESS_KEY"] == keys["site.site-a"]["secret_access_key"]
    assert "MLFLOW_TRACKING_URI" not in site_env
    central_env = proc_env(services["worker-central"]["pid"])
    assert central_env["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{mlflow_port}"
    assert central_env["AWS_SECRET_ACCESS_KEY"] == secret

    # The round through the served API, as a user starts it; each site's part runs on its own pool.
    round_ = run([str(BIN / "prefect"), "deployment", "run", "fedkim/round", "--watch", "--watch-timeout",
                  "400", "-p", "mode=federated", "-p", f"round_id={ROUND}"],
                 {**env, "PREFECT_API_URL": state["prefect_api_url"]}, 450)
    assert round_.returncode == 0 and "Completed" in round_.stdout, (
        round_.stdout[-4000:] + round_.stderr[-2000:] + "\n".join(
            f"--- {n}\n{processes.log_tail(Path(e['log']), 40)}"
            for n, e in services.items() if "worker" in n))

    from mlflow import MlflowClient

    from fedkim import tracking

    client = MlflowClient(state["mlflow_url"], registry_uri=state["mlflow_url"])
    aliases = client.get_registered_model("fedkim-foundation").aliases
    assert {"challenger", "champion"} & set(aliases)
    version = client.get_model_version("fedkim-foundation", aliases.get("challenger") or aliases["champion"])
    assert version.tags[tracking.ROUND] == ROUND

    import boto3
    from botocore.config import Config

    s3 = state["s3"]
    bucket = boto3.session.Session().client(
        "s3", endpoint_url=s3["endpoint"], aws_access_key_id=keys["coordinator"]["access_key_id"],
        aws_secret_access_key=secret, region_name=s3["region"],
        config=Config(s3={"addressing_style": "path"}))
    for site in SITES:
        listed = bucket.list_objects_v2(Bucket=s3["bucket"], Prefix=f"rounds/{ROUND}/sites/{site}/")
        names = {o["Key"].rsplit("/", 1)[1] for o in listed.get("Contents", [])}
        # each object with its sha256 sidecar (kept because rclone forgets object metadata on restart)
        assert names == {"manifest.json", "encoders.safetensors", "validation.json", "manifest.json.sha256",
                         "encoders.safetensors.sha256", "validation.json.sha256"}
    assert not (project.parent / "artifacts").exists()  # the round's store was S3, not the local default

    tree = process_tree(state)
    assert len(tree) > len(services)  # the servers' helper processes are found too
    down = run([*FEDKIM, "stack", "down", "--params", str(project)], env, 120)
    assert down.returncode == 0 and "stopped prefect" in down.stdout, down.stdout + down.stderr
    assert [pid for pid, ticks in tree if processes.alive(pid, ticks)] == []
    assert not state_file.exists()
    assert not any(processes.port_in_use(p) for p in (prefect_port, mlflow_port, s3_port))
    again = run([*FEDKIM, "stack", "down", "--params", str(project)], env, 60)
    assert again.returncode == 0 and "no stack running" in again.stdout
    print(f"stack up + federated round + down: {time.monotonic() - started:.0f} s")


# ----------------------------------------------------------------------------------------------------- unit
@pytest.fixture
def params_file(tmp_path) -> Path:
    return write_project(tmp_path / "project", tmp_path / "no-federation")  # nothing here reads the data


def test_a_taken_port_fails_before_anything_starts_naming_service_and_port(params_file):
    prefect_port, mlflow_port, s3_port = free_ports(3)
    ports = ["--prefect-port", str(prefect_port), "--mlflow-port", str(mlflow_port),
             "--s3-port", str(s3_port)]
    with socket.socket() as taken:
        taken.bind((processes.HOST, mlflow_port))
        taken.listen()
        message = f"port {mlflow_port} on 127.0.0.1 for the MLflow server is already in use"
        with pytest.raises(stack.StackError, match=message):
            stack.up(params_file, ports=stack.Ports(prefect_port, mlflow_port, s3_port))
        result = CliRunner().invoke(app, ["stack", "up", "--params", str(params_file), *ports])
    assert result.exit_code == 1 and message in result.output and "--mlflow-port" in result.output
    assert not (stack.stack_dir(params_file.parent) / "logs").exists()  # nothing was started
    assert not stack.state_path(params_file.parent).exists()


def test_a_service_that_dies_while_starting_is_named_with_its_log(tmp_path):
    crash = "print('no such backend store'); raise SystemExit(3)"
    entry = processes.launch("mlflow", [sys.executable, "-c", crash], dict(os.environ), tmp_path / "logs",
                          tmp_path)
    with pytest.raises(stack.StackError) as failure:
        processes.wait_ready("MLflow server on port 5999", lambda: False, entry, timeout_s=60)
    message = str(failure.value)
    assert message.startswith("MLflow server on port 5999 exited before it was ready")
    assert str(tmp_path / "logs" / "mlflow.log") in message and "no such backend store" in message


def test_down_and_status_with_nothing_running(params_file):
    runner = CliRunner()
    down = runner.invoke(app, ["stack", "down", "--params", str(params_file)])
    assert down.exit_code == 0 and "no stack running" in down.output
    assert stack.down(params_file, log=lambda _: None) == []
    status = runner.invoke(app, ["stack", "status", "--params", str(params_file)])
    assert status.exit_code == 1 and "no stack running" in status.output


def launch_with_child(logs: Path, name: str, detached: bool, **extra) -> dict:
    """A process with a child, in a session of its own (as a worker's flow run) or in the parent's (a
    server's helper)."""
    code = (f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {SLEEP!r}], "
            f"start_new_session={detached}); time.sleep(300)")
    entry = processes.launch(name, [sys.executable, "-c", code], dict(os.environ), logs, logs, **extra)
    deadline = time.monotonic() + 20
    while not processes.descendants(entry["pid"], entry["ticks"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return entry


def test_the_state_file_lists_pids_and_ports_and_down_stops_each_process_tree(params_file):
    project = params_file.parent
    logs = stack.stack_dir(project) / "logs"
    worker = launch_with_child(logs, "worker-central", detached=True, pool="central")
    server = launch_with_child(logs, "s3", detached=False, port=free_ports(1)[0], url="http://127.0.0.1:1")
    state = {"services": {"s3": server, "worker-central": worker}}
    processes.write_private(stack.state_path(project), state)
    tree = process_tree(state)
    assert len(tree) == 4 and all(processes.alive(pid, ticks) for pid, ticks in tree)

    recorded = json.loads(stack.state_path(project).read_text())
    assert stat.S_IMODE(stack.state_path(project).stat().st_mode) == 0o600
    assert {n: (e["pid"], e.get("port")) for n, e in recorded["services"].items()} == {
        "s3": (server["pid"], server["port"]), "worker-central": (worker["pid"], None)}
    listed, rows = stack.status(params_file)
    assert listed == recorded
    assert [(r.name, r.running) for r in rows] == [("s3", True), ("worker-central", True)]
    with pytest.raises(stack.StackError, match="already running"):  # one stack per project
        stack.up(params_file, ports=stack.Ports(*free_ports(3)))

    os.kill(server["pid"], signal.SIGKILL)  # a server that died and left its helper behind
    while processes.alive(server["pid"], server["ticks"]):
        time.sleep(0.05)
    lines: list[str] = []
    assert stack.down(params_file, grace_s=5, log=lines.append) == ["worker-central"]
    assert [pid for pid, ticks in tree if processes.alive(pid, ticks)] == []  # children and orphans too
    assert not stack.state_path(project).exists()
    assert lines == [f"stopped worker-central (pid {worker['pid']}); already gone: s3"]


def test_a_recorded_pid_now_used_by_another_process_is_left_alone(params_file):
    """The state holds each process's start time: a pid now used by someone else is never signalled."""
    other = subprocess.Popen([sys.executable, "-c", SLEEP])
    try:
        entry = {"pid": other.pid, "ticks": processes.start_ticks(other.pid) - 1, "log": "x.log"}
        processes.write_private(stack.state_path(params_file.parent), {"services": {"s3": entry}})
        assert stack.down(params_file, grace_s=1, log=lambda _: None) == []
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


def test_site_workers_get_the_api_and_the_store_but_not_mlflow():
    from fedkim.members import site_pool

    assert [site_pool(s) for s in ("site-a", "charite")] == ["site-a", "site-charite"]
    state = {"prefect_api_url": "http://127.0.0.1:1/api", "repo": "/repo", "params": "/p/params.yaml",
             "mlflow_url": "http://127.0.0.1:2",
             "s3": {"endpoint": "http://127.0.0.1:3", "region": "us-east-1",
                    "pool_roles": {"central": "coordinator", "site-a": "site.site-a"},
                    "keys": {"coordinator": {"access_key_id": "kc", "secret_access_key": "sc"},
                             "site.site-a": {"access_key_id": "ka", "secret_access_key": "sa"}}}}
    base = {"AWS_PROFILE": "prod", "MLFLOW_TRACKING_URI": "sqlite:///x.db", "PATH": "/bin"}
    site, central = stack.worker_env(state, "site-a", base), stack.worker_env(state, "central", base)
    assert "MLFLOW_TRACKING_URI" not in site and central["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:2"
    assert (site["AWS_ACCESS_KEY_ID"], site["AWS_SECRET_ACCESS_KEY"], site["FEDKIM_STORE_ROLE"]) == (
        "ka", "sa", "site.site-a")
    assert (central["AWS_ACCESS_KEY_ID"], central["AWS_SECRET_ACCESS_KEY"], central["FEDKIM_STORE_ROLE"]) == (
        "kc", "sc", "coordinator")
    for env in (site, central):
        assert env["PREFECT_API_URL"] == "http://127.0.0.1:1/api" and env["FEDKIM_STORE_KIND"] == "s3"
        assert env["FEDKIM_S3_ENDPOINT_URL"] == "http://127.0.0.1:3"
        assert "AWS_PROFILE" not in env and env["FEDKIM_HOME"] == "/repo" and env["PATH"] == "/bin"
    with pytest.raises(processes.StackError, match="no store key for work pool 'site-z'"):
        stack.worker_env(state, "site-z", base)


def test_each_pool_gets_its_sites_role_and_enforced_roles_need_a_pool_per_site(params_file):
    from fedkim.config import load_params

    params = load_params(params_file)
    assert stack.pool_roles(params, "moto") == {"central": "coordinator", "site-a": "site.site-a",
                                                "site-b": "site.site-b"}
    raw = yaml.safe_load(params_file.read_text())
    for member in raw["federation"]["members"]:
        member["work_pool"] = "berlin"
    params_file.write_text(yaml.safe_dump(raw))
    shared = load_params(params_file)
    with pytest.raises(processes.StackError, match="work pool 'berlin' of member 'site-b'"):
        stack.pool_roles(shared, "moto")
    assert stack.pool_roles(shared, "rclone") == {"central": "coordinator", "berlin": "site.site-a"}


def test_credentials_are_generated_once_per_role_and_an_older_single_pair_becomes_the_coordinators(tmp_path):
    from fedkim.ops.store_roles import rclone_credentials

    path = tmp_path / "credentials.json"
    path.write_text(json.dumps({"access_key_id": "old", "secret_access_key": "old-secret"}))
    first = rclone_credentials(path, ["coordinator", "site.site-a"])
    assert first["coordinator"] == {"access_key_id": "old", "secret_access_key": "old-secret"}
    assert first["site.site-a"]["secret_access_key"] != "old-secret"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = rclone_credentials(path, ["coordinator", "site.site-a", "site.site-b"])
    assert {k: again[k] for k in first} == first and len(again) == 3


def test_the_store_kind_env_override_switches_the_flows_to_s3(params_file, monkeypatch):
    from fedkim.config import load_params

    assert load_params(params_file).store.kind == "local"
    monkeypatch.setenv("FEDKIM_STORE_KIND", "s3")
    assert load_params(params_file).store.kind == "s3"


def test_stack_env_prints_the_pools_own_key_and_no_other(params_file):
    keys = {"coordinator": {"access_key_id": "kc", "secret_access_key": "coordinator-secret"},
            "site.site-a": {"access_key_id": "ka", "secret_access_key": "site-a-secret"},
            "site.site-b": {"access_key_id": "kb", "secret_access_key": "site-b-secret"}}
    state = {"prefect_api_url": "http://127.0.0.1:1/api", "repo": "/repo", "params": str(params_file),
             "mlflow_url": "http://127.0.0.1:2", "pools": ["central", "site-a", "site-b"], "services": {},
             "s3": {"endpoint": "http://127.0.0.1:3", "region": "us-east-1", "keys": keys,
                    "pool_roles": {"central": "coordinator", "site-a": "site.site-a", "site-b": "site.site-b"}}}
    processes.write_private(stack.state_path(params_file.parent), state)
    out = CliRunner().invoke(app, ["stack", "env", "--params", str(params_file), "--pool", "site-a"]).output
    assert "export AWS_SECRET_ACCESS_KEY=site-a-secret" in out and "FEDKIM_STORE_ROLE=site.site-a" in out
    assert "coordinator-secret" not in out and "site-b-secret" not in out and "MLFLOW_TRACKING_URI" not in out
    central = CliRunner().invoke(app, ["stack", "env", "--params", str(params_file)]).output
    assert "AWS_SECRET_ACCESS_KEY=coordinator-secret" in central and "site-a-secret" not in central
