"""`fedkim deploy`: the Prefect deployments of this federation, built from params.yaml's member list.

    fedkim/round              flow `fedkim` on the central pool: a daily 02:00 UTC schedule, inactive until
                              resumed (a redeploy keeps it resumed); one round at a time (limit 1, further
                              runs ENQUEUE)
    fedkim-site/<member id>   flow `fedkim-site` on the member's work pool (federation.members[].work_pool,
                              default site-<id>), one run at a time

Adding a hospital is one member entry in params.yaml and a rerun (deploying again updates what is there). No
machine path is stored: each worker changes into its own checkout, $FEDKIM_HOME, before it loads the flow, and
flow runs get the offline, telemetry-off environment.

    python -m flows.deploy [--params params.yaml]      (what `fedkim deploy` runs)
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Prefect before fedkim: importing mlflow, GX or transformers first replaces Prefect's log format.
from prefect import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.exceptions import ObjectNotFound
from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron

from fedkim.config import Params, default_params_path, load_params
from fedkim.errors import run_stage
from fedkim.ops.stack import CENTRAL_POOL, QUIET
from flows.round import fedkim_flow
from flows.site import site_flow

ROUND_ENTRYPOINT = "flows/round.py:fedkim_flow"
SITE_ENTRYPOINT = "flows/site.py:site_flow"
ROUND_CRON = "0 2 * * *"
OFFLINE_JOB = {"env": dict(QUIET)}  # flow-run processes stay offline and send no telemetry


@dataclass
class CheckoutDirectory:
    """Prefect runner storage whose pull step changes into the worker's own fedkim checkout ($FEDKIM_HOME,
    resolved by each worker at run time): the code is already there, nothing is stored or pulled."""

    directory: str = "{{ $FEDKIM_HOME }}"

    def set_base_path(self, path: Path) -> None:
        pass

    @property
    def pull_interval(self) -> int | None:
        return None

    @property
    def destination(self) -> Path:
        return Path.cwd()

    async def pull_code(self) -> None:
        pass

    def to_pull_step(self) -> dict[str, Any]:
        return {"prefect.deployments.steps.set_working_directory": {"directory": self.directory}}


def build_deployments(params: Params, schedule_active: bool = False) -> list[tuple[RunnerDeployment, str]]:
    """(deployment, work pool) of the round and of each member, in params order."""
    round_ = RunnerDeployment.from_flow(
        fedkim_flow, name="round", description="One federated round (gate, local training, aggregation, "
                                               "injection, evaluation, registry).",
        schedules=[Cron(ROUND_CRON, timezone="UTC", active=schedule_active, slug="daily")],
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
        job_variables=OFFLINE_JOB, work_pool_name=CENTRAL_POOL)
    built = [(_from_checkout(round_, ROUND_ENTRYPOINT), CENTRAL_POOL)]
    for member in params.federation.members:
        site = RunnerDeployment.from_flow(
            site_flow, name=member.id, parameters={"site_id": member.id}, concurrency_limit=1,
            description=f"Site {member.id}'s part of a round (data gate, local training, package upload).",
            job_variables=OFFLINE_JOB, work_pool_name=member.pool)
        built.append((_from_checkout(site, SITE_ENTRYPOINT), member.pool))
    return built


def _from_checkout(deployment: RunnerDeployment, entrypoint: str) -> RunnerDeployment:
    """Load the flow from the worker's checkout: a repo-relative entrypoint, the $FEDKIM_HOME pull step."""
    deployment.entrypoint = entrypoint
    deployment.storage = CheckoutDirectory()
    return deployment


def deploy(params: Params) -> list[str]:
    """Create or update every deployment, and any missing work pool (a process pool; an existing pool keeps what
    its owner configured); returns the deployments' names (flow/deployment). A daily schedule an operator resumed
    stays active."""
    with get_client(sync_client=True) as client:
        try:
            existing = client.read_deployment_by_name(f"{fedkim_flow.name}/round")
            active = any(s.active for s in existing.schedules if s.slug == "daily")
        except ObjectNotFound:
            active = False
        built = build_deployments(params, schedule_active=active)
        for pool in dict.fromkeys(pool for _, pool in built):
            try:
                client.read_work_pool(pool)
            except ObjectNotFound:
                client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
    names = []
    for deployment, pool in built:
        deployment.apply(work_pool_name=pool)
        names.append(f"{deployment.flow_name}/{deployment.name}")
    return names


def main(argv: list[str] | None = None) -> int:
    cli = argparse.ArgumentParser(prog="python -m flows.deploy", description=__doc__.splitlines()[0])
    cli.add_argument("--params", type=Path, help="params.yaml (default: FEDKIM_PARAMS or the repo's)")
    args = cli.parse_args(argv)
    params = load_params(args.params or default_params_path())
    for name in deploy(params):
        print(f"deployed {name}")
    return 0


if __name__ == "__main__":
    sys.exit(run_stage(main))
