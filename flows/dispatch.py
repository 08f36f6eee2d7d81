"""How the round flow reaches its sites: every site's gate and training as tasks in the flow's own process
(mode `simulation`), or each site as a run of its deployment `fedkim-site/<site>` on its own work pool (mode
`federated`). Either way each site ends as a fedkim.rounds.SiteOutcome: a site that fails the gate is excluded,
one that crashes or times out is failed.
"""

from __future__ import annotations

import concurrent.futures
import time
from dataclasses import replace

from prefect import runtime, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed

from fedkim.config import Params
from fedkim.members import site_pool
from fedkim.federation.store import ArtifactStore, package_prefix
from fedkim.orchestration import failure_text, site_wait_s
from fedkim.data.catalogue import load_catalogue
from fedkim.outcomes import SiteOutcome
from fedkim.rounds import get_json, read_manifest_from_store, validation_key
from fedkim.data.validate import gate_reason
from flows.site import site_tasks


def run_sites_here(params: Params, store: ArtifactStore, round_id: str, progress: bool) -> dict[str, SiteOutcome]:
    """Simulation: every site's gate as a concurrent task in this process, then its training, which starts as soon
    as its own gate passes.

    With federation.parallel_sites 1 (the default) the trainings run one at a time in the flow's own thread. Torch
    then keeps one OpenMP team, whose threads spin between operations: every further thread that runs torch makes
    the OpenMP runtime cut that spinning process-wide, which slowed the injection and the evaluation after the
    sites by 10-25 % (measured), and Prefect enforces a sync task's timeout promptly only in the main thread.
    With 0 (all) or more than 1, trainings run concurrently in the task pool, at most that many at once; the limit
    is applied here, before submission, so that waiting never counts against a task's timeout."""
    validate, train = site_tasks(params)
    limit = params.federation.parallel_sites or len(params.federation.members)
    attempts = params.federation.retries + 1
    outcomes: dict[str, SiteOutcome] = {}
    gates = {validate.submit(params, store, round_id, s.id): s.id for s in params.federation.members}

    def gate_passed(future, site: str) -> dict | None:
        """The gate summary when the site may train; otherwise its outcome is recorded and None returned."""
        try:
            summary = future.result()
        except Exception as exc:  # the gate itself crashed or timed out (bad data only makes findings)
            outcomes[site] = SiteOutcome(site, "failed", f"data gate did not finish: {failure_text(exc)}")
            return None
        if not summary["success"]:
            outcomes[site] = SiteOutcome(site, "excluded", gate_reason(summary), validation=summary)
            return None
        return summary

    def trained(site: str, summary: dict, run) -> None:
        try:
            outcomes[site] = replace(run(), validation=summary)
        except Exception as exc:
            outcomes[site] = SiteOutcome(site, "failed", f"training/upload failed after {attempts} attempt(s): "
                                                         f"{failure_text(exc)}", validation=summary)

    if limit == 1:
        for future in as_completed(list(gates)):
            site = gates[future]
            if (summary := gate_passed(future, site)) is not None:
                trained(site, summary, lambda: train(params, store, round_id, site, summary, progress=progress))
        return {s.id: outcomes[s.id] for s in params.federation.members}

    ready: list[tuple[str, dict]] = []  # passed the gate, waiting for a training slot
    running: dict = {}
    while gates or running or ready:
        while ready and len(running) < limit:
            site, summary = ready.pop(0)
            running[train.submit(params, store, round_id, site, summary, progress=progress)] = (site, summary)
        by_wrapped = {f.wrapped_future: f for f in [*gates, *running]}
        done, _ = concurrent.futures.wait(list(by_wrapped), return_when=concurrent.futures.FIRST_COMPLETED)
        for future in (by_wrapped[w] for w in done):
            if future in gates:
                site = gates.pop(future)
                if (summary := gate_passed(future, site)) is not None:
                    ready.append((site, summary))
                continue
            site, summary = running.pop(future)
            trained(site, summary, future.result)
    return {s.id: outcomes[s.id] for s in params.federation.members}


@task(name="site-deployment", task_run_name="site-{site_id}", cache_policy=NO_CACHE)
def remote_site_task(store: ArtifactStore, round_id: str, site_id: str, parameters: dict, start_s: float,
                     wait_s: float, key: str, catalogue: str | None = None) -> SiteOutcome:
    """Federated: start `fedkim-site/<site>` on the site's pool, wait for it, read its results from the store.
    A run no worker picks up within start_s, or that is not done within wait_s, is cancelled and counts as failed."""
    from prefect import get_client
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Cancelled, Cancelling

    name = f"fedkim-site/{site_id}"
    try:
        run = run_deployment(name, parameters={"site_id": site_id, "round_id": round_id, **parameters},
                             timeout=0, idempotency_key=key, tags=[f"round:{round_id}"])
    except ObjectNotFound:
        return SiteOutcome(site_id, "failed", f"deployment {name} not found: run `fedkim deploy` "
                                              f"(one deployment per member of params.yaml)")
    began = time.monotonic()
    with get_client(sync_client=True) as client:
        while not (state := client.read_flow_run(run.id).state) or not state.is_final():
            waited = time.monotonic() - began
            unclaimed = state is None or state.is_scheduled()  # Scheduled or Late: no worker has taken it
            if (unclaimed and waited > start_s) or waited > wait_s:
                # Never leave it to start into a later round; one that runs is stopped by its worker (Cancelling).
                message = f"round {round_id} stopped waiting"
                client.set_flow_run_state(run.id, Cancelled(message=message) if unclaimed else
                                          Cancelling(message=message), force=True)
                why = (f"no worker picked up site run {run.name} within {start_s:.0f} s (is a worker running on "
                       f"work pool {site_pool(site_id)}?)" if unclaimed else
                       f"site run {run.name} not done within {wait_s:.0f} s (was {state.name})")
                return SiteOutcome(site_id, "failed", why + "; cancelled")
            time.sleep(2)
    gate_key = validation_key(round_id, site_id)
    validation = get_json(store, gate_key) if store.exists(gate_key) else None
    if state.is_completed():
        manifest = read_manifest_from_store(store, package_prefix(round_id, site_id), load_catalogue(catalogue))
        return replace(SiteOutcome.from_manifest(manifest, "trained", validation=validation), site_id=site_id)
    if validation is not None and not validation["success"]:
        return SiteOutcome(site_id, "excluded", gate_reason(validation), validation=validation)
    return SiteOutcome(site_id, "failed", f"site run {run.name} ended {state.name}: {state.message}",
                       validation=validation)


def run_sites_remote(params: Params, store: ArtifactStore, round_id: str, params_path: str | None,
                     overrides: dict | None, progress: bool) -> dict[str, SiteOutcome]:
    """Federated: all site deployments at once, each given site_wait_s to finish."""
    # Sites read their own data root and store settings; only what the caller chose explicitly travels.
    parameters = {"params_path": params_path, "overrides": overrides or {}, "progress": progress}
    flow_run = runtime.flow_run.id or "local"
    futures = {remote_site_task.submit(store, round_id, s.id, parameters, params.federation.site_start_s,
                                       site_wait_s(params), f"{flow_run}/{s.id}",
                                       None if params.data.catalogue is None else str(params.data.catalogue)): s.id
               for s in params.federation.members}
    outcomes = {}
    for future in as_completed(list(futures)):
        site = futures[future]
        try:
            outcomes[site] = future.result()
        except Exception as exc:
            outcomes[site] = SiteOutcome(site, "failed", f"site dispatch failed: {failure_text(exc)}")
    return {s.id: outcomes[s.id] for s in params.federation.members}
