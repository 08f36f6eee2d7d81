"""`fedkim deploy` against a real Prefect server on 127.0.0.1: the round and one site deployment per member, on
the right pools, with no machine path stored; a member added to params.yaml appears on the next run."""

from __future__ import annotations

import pytest
import yaml
from prefect.client.orchestration import get_client
from typer.testing import CliRunner

from fedkim.cli import app
from tests.helpers import small_params_dict
from tests.helpers.servers import prefect_server

pytestmark = [pytest.mark.slow, pytest.mark.integration]


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-home")
    with prefect_server(home) as url, pytest.MonkeyPatch.context() as env:
        env.setenv("PREFECT_API_URL", url)  # what `fedkim deploy`'s own process reads
        env.setenv("PREFECT_HOME", str(home))
        yield url


def deployments() -> dict:
    with get_client(sync_client=True) as client:
        found = client.read_deployments()
        flows = {f.id: f.name for f in client.read_flows()}
        pools = {p.name: p.type for p in client.read_work_pools()}
    return {f"{flows[d.flow_id]}/{d.name}": d for d in found}, pools


def test_deploy_makes_the_round_and_one_deployment_per_member_and_follows_the_member_list(api, tmp_path):
    raw = small_params_dict(tmp_path / "fed")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    first = CliRunner().invoke(app, ["deploy", "--params", str(params)])
    assert first.exit_code == 0, first.output

    found, pools = deployments()
    assert set(found) == {"fedkim/round", *(f"fedkim-site/{s}" for s in ("site-a", "site-b", "site-c", "site-d"))}
    round_ = found["fedkim/round"]
    assert round_.work_pool_name == "central" and round_.entrypoint == "flows/round.py:fedkim_flow"
    assert round_.global_concurrency_limit.limit == 1
    assert round_.concurrency_options.collision_strategy.value == "ENQUEUE"
    (schedule,) = round_.schedules
    assert schedule.schedule.cron == "0 2 * * *" and schedule.schedule.timezone == "UTC" and not schedule.active
    assert round_.job_variables["env"]["HF_HUB_OFFLINE"] == "1"
    for name, deployment in found.items():
        # No machine path: each worker changes into its own checkout ($FEDKIM_HOME) before loading the flow.
        assert deployment.pull_steps == [
            {"prefect.deployments.steps.set_working_directory": {"directory": "{{ $FEDKIM_HOME }}"}}]
        assert str(tmp_path) not in deployment.model_dump_json() and deployment.path is None
        if name != "fedkim/round":
            site = name.split("/")[1]
            assert deployment.work_pool_name == site and deployment.parameters == {"site_id": site}
            assert deployment.entrypoint == "flows/site.py:site_flow"
    assert {p: pools[p] for p in ("central", "site-a", "site-d")} == dict.fromkeys(("central", "site-a", "site-d"),
                                                                                  "process")

    with get_client(sync_client=True) as client:  # an operator resumes the daily schedule
        client.update_deployment_schedule(round_.id, schedule.id, active=True)

    # A hospital joins: one member entry (provided data, its own pool name), then the same command again.
    raw["federation"]["members"].append({"id": "charite", "modalities": ["image"], "data": "provided",
                                         "path": "hospitals/charite", "work_pool": "berlin"})
    params.write_text(yaml.safe_dump(raw))
    again = CliRunner().invoke(app, ["deploy", "--params", str(params)])
    assert again.exit_code == 0, again.output
    updated, pools = deployments()
    assert set(updated) == set(found) | {"fedkim-site/charite"}
    assert updated["fedkim-site/charite"].work_pool_name == "berlin" and pools["berlin"] == "process"
    assert updated["fedkim/round"].id == round_.id and len(updated["fedkim/round"].schedules) == 1  # updated
    assert updated["fedkim/round"].schedules[0].active  # the redeploy kept the operator's resumed schedule
