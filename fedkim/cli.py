"""`fedkim ...`: thin command-line wrappers over the library. Exit codes: 0 ok, 1 the data failed a check,
2 bad usage, bad params or an unusable data directory (one line names the file, key, directory or rule; never a
bare traceback: every command's ConfigError, GenerationError and SiteFormatError end here, see UsageErrors)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from typer.core import TyperGroup

from fedkim.config import load_params
from fedkim.errors import USAGE_EXIT, usage_error


class UsageErrors(TyperGroup):
    """Every command's usage errors (fedkim.errors: bad params, an unusable or foreign data directory) as one
    line on stderr and exit status 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except Exception as exc:
            message = usage_error(exc)
            if message is None:
                raise
            err_console.print("[red]error:[/red] ", end="")
            err_console.print(message, markup=False, highlight=False)
            raise typer.Exit(USAGE_EXIT) from None


app = typer.Typer(help="Federated knowledge injection into medical foundation models.", no_args_is_help=True,
                  pretty_exceptions_enable=False, cls=UsageErrors)
data_app = typer.Typer(help="Site data: generate the offline federation, validate a site.", no_args_is_help=True)
app.add_typer(data_app, name="data")

console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)

@app.callback()
def _console_progress() -> None:
    """Long commands (generation, experiments) show their progress lines off a terminal too."""
    from fedkim.progress import log_to_console

    log_to_console()


ParamsOption = typer.Option(None, "--params", "-p", help="params.yaml to read (default: FEDKIM_PARAMS or repo's)")


def _params(path: Optional[Path], overrides: Optional[dict] = None):
    """The params, checked (every training task has a member that holds its modality); ConfigError: exit 2."""
    from fedkim.data.catalogue import catalogue_of

    params = load_params(path, overrides)
    catalogue_of(params.data).check_sites(params.federation.members)
    return params


@data_app.command("generate")
def data_generate(
    params: Optional[Path] = ParamsOption,
    out: Optional[Path] = typer.Option(None, "--out", help="write here instead of data.root"),
    seed: Optional[int] = typer.Option(None, help="override data.seed"),
    force: bool = typer.Option(False, "--force", help="regenerate even if the cache matches"),
) -> None:
    """Generate the federation's generated members and server splits (provided directories are only checked),
    cached by a hash of their params."""
    from fedkim.data.synth.federation import generate_federation

    overrides = {"data.seed": seed} if seed is not None else {}
    if out is not None:
        overrides["data.root"] = str(out.resolve())
    cfg = _params(params, overrides)
    result = generate_federation(cfg, force=force, progress=True)
    if not result.sites:
        console.print("nothing to generate: every member and server split is provided", highlight=False)
        return
    state = "reused cached" if result.cached else f"generated in {result.seconds:.1f} s"
    console.print(f"federation {result.params_hash} {state}: {result.root}")
    for site in result.sites:
        total = sum(n for splits in site.counts.values() for n in splits.values())
        console.print(f"  {site.site_id:<8} {site.role:<9} {total:>5} samples  {', '.join(site.modalities)}")


@data_app.command("validate")
def data_validate(
    site_dir: Path = typer.Argument(..., help="a site data directory (site.yaml + index.parquet + files)"),
    params: Optional[Path] = ParamsOption,
    as_json: bool = typer.Option(False, "--json", help="print the structured report as JSON"),
    docs: bool = typer.Option(True, "--docs/--no-docs", help="write GX data docs under SITE_DIR/reports/"),
) -> None:
    """Run the Great Expectations gate on one site. Exit 1 when any rule fails."""
    from fedkim.data.validate import validate_site

    cfg = _params(params)
    if not site_dir.is_dir():
        err_console.print(f"[red]error:[/red] {site_dir}: not a directory", highlight=False)
        raise typer.Exit(2)
    from fedkim.data.catalogue import catalogue_of

    report = validate_site(site_dir, cfg.data.gate, write_docs=docs, catalogue=catalogue_of(cfg.data))
    if as_json:
        print(json.dumps(report.model_dump(mode="json"), indent=2))
    else:
        console.print(report.summary(), highlight=False, markup=False, soft_wrap=True)  # data may hold "[...]"
    raise typer.Exit(0 if report.success else 1)


@app.command("experiment")
def experiment(
    out: Path = typer.Option(..., "--out", help="folder for comparison.md, comparison.json and per-variant runs"),
    params: Optional[Path] = ParamsOption,
    variants: Optional[str] = typer.Option(None, help="comma-separated subset (default: all)"),
    rounds: Optional[int] = typer.Option(None, help="override federation.rounds"),
    fm: Optional[str] = typer.Option(None, "--fm", help="override inject.foundation_model (smollm2, tiny, a folder)"),
    seeds: int = typer.Option(1, min=1, help="trials per variant with shifted training seeds (same data): "
                                             "mean ± sd and per-seed wins are reported"),
    first_seed: int = typer.Option(0, min=0, help="the first trial's seed shift: --first-seed 1 --seeds 2 "
                                                  "runs trials 1 and 2, the same as a --seeds 3 run's"),
    settings: list[str] = typer.Option([], "--set", metavar="KEY=VALUE",
                                       help="override a setting, e.g. --set eval.max_per_task=160 (repeatable)"),
) -> None:
    """Run FedKIM and every baseline and ablation (multi-round), then compare them on the test split."""
    from fedkim.config import ConfigError, parse_overrides
    from fedkim.data.synth.federation import generate_federation
    from fedkim.central.variants import VARIANTS
    from fedkim.experiment import run_experiment
    from fedkim.rounds import QuorumError, SplitGateError

    try:
        overrides = parse_overrides(settings)
    except ConfigError as exc:
        err_console.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from None
    overrides |= {k: v for k, v in {"federation.rounds": rounds, "inject.foundation_model": fm}.items()
                  if v is not None}
    cfg = _params(params, overrides)
    names = [v.strip() for v in variants.split(",")] if variants else list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        err_console.print(f"[red]error:[/red] unknown variant(s) {unknown}; allowed: {', '.join(VARIANTS)}")
        raise typer.Exit(2)
    generate_federation(cfg)  # cached: a no-op when the generated part already matches params
    try:
            comparison = run_experiment(cfg, out, names, progress=True, seeds=seeds, first_seed=first_seed)
    except (QuorumError, SplitGateError) as exc:  # the data failed a check
        err_console.print("[red]error:[/red] ", end="")
        err_console.print(str(exc), markup=False, highlight=False)
        raise typer.Exit(1) from None
    console.print((out / "comparison.md").read_text(), markup=False)
    console.print(f"written: {out / 'comparison.md'}, {out / 'comparison.json'} ({len(comparison)} variants)")


@app.command("rescore")
def rescore(
    out: Path = typer.Argument(..., help="a finished `fedkim experiment --out` folder"),
    params: Optional[Path] = ParamsOption,
    tasks: Optional[str] = typer.Option(None, help="comma-separated tasks to score again (default: all)"),
    settings: list[str] = typer.Option([], "--set", metavar="KEY=VALUE",
                                       help="override an eval setting, e.g. --set eval.choice_scoring=label"),
) -> None:
    """Re-evaluate an experiment's trained models (their last checkpoints) with the current evaluation settings,
    without retraining; rewrites its metrics.json files and comparison."""
    from fedkim.config import ConfigError, parse_overrides
    from fedkim.data.catalogue import catalogue_of
    from fedkim.experiment import rescore_experiment

    try:
        overrides = parse_overrides(settings)
    except ConfigError as exc:
        err_console.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from None
    cfg = _params(params, overrides)
    names = tuple(t.strip() for t in tasks.split(",")) if tasks else None
    known = catalogue_of(cfg.data).tasks
    unknown = [t for t in names or () if t not in known]
    if unknown:
        err_console.print(f"[red]error:[/red] unknown task(s) {unknown}; allowed: {', '.join(known)}")
        raise typer.Exit(2)
    try:
        comparison = rescore_experiment(cfg, out, names)
    except (FileNotFoundError, ValueError) as exc:
        err_console.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from None
    console.print((out / "comparison.md").read_text(), markup=False)
    console.print(f"rescored: {out / 'comparison.md'}, {out / 'comparison.json'} ({len(comparison)} variants)")


@app.command("evaluate")
def evaluate_registered(
    model: str = typer.Argument(..., help="registered model: champion, challenger, a version number, NAME@ALIAS, "
                                          "NAME/VERSION or models:/..."),
    test_dir: Path = typer.Option(..., "--test-dir", help="a site-format folder with the samples to score"),
    catalogue: Optional[Path] = typer.Option(None, help="task catalogue YAML (default: params' data.catalogue)"),
    tasks: Optional[str] = typer.Option(None, help="comma-separated tasks to score (default: all in the folder)"),
    out: Optional[Path] = typer.Option(None, "--out", help="write the metrics as JSON here"),
    params: Optional[Path] = ParamsOption,
) -> None:
    """Score a registered model on a task catalogue and a test folder, without retraining: a new zero-shot task
    needs only its catalogue entry and its samples. Prints the metrics per task."""
    from fedkim import tracking
    from fedkim.central.evaluate import write_metrics
    from fedkim.config import ConfigError, default_params_path
    from fedkim.tracking.scoring import score_registered

    cfg = _params(params)
    tracking.configure(cfg.tracking, (params or default_params_path()).resolve().parent)
    names = tuple(t.strip() for t in tasks.split(",") if t.strip()) if tasks else None
    try:
        metrics = score_registered(model, test_dir, cfg, catalogue=catalogue, tasks=names, progress=True)
    except (ConfigError, FileNotFoundError, KeyError, LookupError, ValueError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        err_console.print(f"[red]error:[/red] {message}", highlight=False)
        raise typer.Exit(2) from None
    console.print(f"{metrics['model']} on {test_dir} ({metrics['catalogue']['file']})", highlight=False)
    for task, m in metrics["tasks"].items():
        figure = "F1" if m["kind"] == "binary" else "accuracy"
        auroc = f", AUROC {m['auroc']:.3f}" if m.get("auroc") is not None else ""
        console.print(f"  {task:<28} {m['role']:<9} n={m['n']:<4} {figure} {m['primary']:.3f}{auroc}",
                      highlight=False)
    if out is not None:
        write_metrics(metrics, out)
        console.print(f"written: {out}")


@app.command("combine")
def combine(
    sources: list[str] = typer.Argument(..., help="finished `fedkim experiment --out` folders; FOLDER:v1,v2 takes "
                                                   "only those variants from it"),
    out: Path = typer.Option(..., "--out", help="a new folder for the combined comparison"),
) -> None:
    """One comparison from the trials of several experiments (e.g. the variants a change touches, run again, with
    an earlier run's untouched ones), without re-running any."""
    from fedkim.experiment import combine_experiments

    chosen = []
    for source in sources:
        folder, _, names = source.partition(":")
        chosen.append((Path(folder), [n.strip() for n in names.split(",") if n.strip()]) if names else Path(folder))
    try:
        comparison = combine_experiments(out, chosen)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        err_console.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from None
    console.print((out / "comparison.md").read_text(), markup=False)
    console.print(f"combined: {out / 'comparison.md'}, {out / 'comparison.json'} ({len(comparison)} variants)")


@app.command("params")
def show_params(params: Optional[Path] = ParamsOption) -> None:
    """Validate params.yaml and print the resolved values."""
    cfg = _params(params)
    print(json.dumps(cfg.model_dump(mode="json"), indent=2))


@app.command("deploy")
def deploy(params: Optional[Path] = ParamsOption) -> None:
    """Create or update the Prefect deployments: fedkim/round (central pool, inactive daily schedule) and
    fedkim-site/<id> for each member of federation.members on its work pool. PREFECT_API_URL names the server."""
    import subprocess
    import sys

    from fedkim.config import REPO_ROOT, default_params_path

    path = (params or default_params_path()).resolve()
    _params(path)  # bad params: exit 2 naming the key, before Prefect is imported
    # flows/deploy.py builds them (Prefect lives in flows/, never in the library), run from the checkout
    done = subprocess.run([sys.executable, "-m", "flows.deploy", "--params", str(path)], cwd=REPO_ROOT)
    raise typer.Exit(done.returncode)


# ------------------------------------------------------------------------------------------- fedkim registry
registry_app = typer.Typer(help="The MLflow model registry: versions, aliases, promotion decisions.",
                           no_args_is_help=True)
app.add_typer(registry_app, name="registry")


@registry_app.command("show")
def registry_show(params: Optional[Path] = ParamsOption) -> None:
    """List the registered versions of tracking.registered_model with aliases, round, decision and lineage."""
    from rich.table import Table

    from fedkim import tracking
    from fedkim.config import default_params_path

    cfg = _params(params)
    base = (params or default_params_path()).resolve().parent  # relative sqlite paths follow params.yaml
    uri = tracking.configure(cfg.tracking, base)
    rows = tracking.registry_show()
    if not rows:
        console.print(f"no versions of {cfg.tracking.registered_model} in {uri}", highlight=False)
        return
    table = Table(title=f"{cfg.tracking.registered_model} ({uri})")
    for column in ("version", "aliases", "round", "decision", "decided on", "train F1", "AUROC",
                   "lineage (run → round run)"):
        table.add_column(column, overflow="fold")  # run ids are copied from here: wrap them, never cut them
    for row in rows:
        figures = [f"{row[k]:.3f}" if row[k] is not None else "–" for k in ("train_mean_f1", "mean_auroc")]
        table.add_row(str(row["version"]), ", ".join(row["aliases"]) or "–", row["round_id"], row["decision"],
                      row["decided_on"], *figures, f"{row['run_id'] or '?'} → {row['round_run_id'] or '?'}")
    Console().print(table)  # sized now (COLUMNS, terminal), not when the module was imported



# ---------------------------------------------------------------------------------------------- fedkim stack
stack_app = typer.Typer(help="The deployed mode on one host: Prefect, MLflow and S3 servers, work pools, "
                             "workers and deployments, all on 127.0.0.1 (state in .fedkim/stack/).",
                        no_args_is_help=True)
app.add_typer(stack_app, name="stack")


def _stack_error(exc: Exception) -> None:
    err_console.print("[red]error:[/red] ", end="")
    err_console.print(str(exc), markup=False, highlight=False)  # paths and logs may hold "[...]"
    raise typer.Exit(1) from None


@stack_app.command("up")
def stack_up(
    params: Optional[Path] = ParamsOption,
    prefect_port: int = typer.Option(4200, envvar="FEDKIM_PREFECT_PORT", help="Prefect server (API + UI)"),
    mlflow_port: int = typer.Option(5000, envvar="FEDKIM_MLFLOW_PORT", help="MLflow server (tracking + UI)"),
    s3_port: int = typer.Option(9000, envvar="FEDKIM_S3_PORT", help="S3 server (rclone serve s3 or moto)"),
    timeout: float = typer.Option(120.0, help="seconds each service may take to become ready"),
    s3: str = typer.Option("rclone", "--s3", envvar="FEDKIM_STACK_S3",
                           help="rclone: the store on disk, store roles NOT enforced; moto: the roles enforced "
                                "(a key per site and one for the coordinator), the store in memory only"),
) -> None:
    """Start Prefect, MLflow and S3 servers, a worker per pool (central, site-<id>) and the deployments."""
    from fedkim.ops import stack

    _params(params)  # bad params: exit 2 naming the key, before anything starts
    try:
        state = stack.up(params, ports=stack.Ports(prefect_port, mlflow_port, s3_port), timeout_s=timeout,
                         log=lambda line: console.print(line, markup=False, highlight=False), s3_server=s3)
    except stack.StackError as exc:
        _stack_error(exc)
    s3 = state["s3"]
    console.print(f"""
fedkim stack is up ({state['project']}):
  Prefect UI   {state['prefect_url']}
  MLflow UI    {state['mlflow_url']}
  S3 endpoint  {s3['endpoint']}  bucket {s3['bucket']}  ({s3['server']}; keys: `fedkim stack env --pool P`)
  store roles  {"enforced by the server (in memory: `stack down` loses the store)" if s3['roles_enforced'] else
                "NOT enforced (rclone: every key may read and write the whole bucket; --s3 moto enforces them)"}
  workers      {', '.join(state['pools'])}
next:
  export PREFECT_API_URL={state['prefect_api_url']}
  prefect deployment run fedkim/round --watch      # -p mode=federated: each site's part on its own pool
stop: fedkim stack down""", markup=False, highlight=False)


@stack_app.command("down")
def stack_down(
    params: Optional[Path] = ParamsOption,
    grace: float = typer.Option(10.0, help="seconds between SIGTERM and SIGKILL"),
) -> None:
    """Stop everything `fedkim stack up` started (a no-op when nothing runs)."""
    from fedkim.ops import stack

    try:
        stack.down(params, grace_s=grace, log=lambda line: console.print(line, markup=False, highlight=False))
    except stack.StackError as exc:
        _stack_error(exc)


@stack_app.command("status")
def stack_status(params: Optional[Path] = ParamsOption) -> None:
    """What the stack runs. Exit 0 when everything recorded runs, 1 when something is down or nothing runs."""
    from rich.table import Table

    from fedkim.ops import stack

    try:
        state, rows = stack.status(params)
    except stack.StackError as exc:
        _stack_error(exc)
    if state is None:
        console.print(f"no stack running for {stack.project_dir(params)}", markup=False, highlight=False)
        raise typer.Exit(1)
    s3 = state.get("s3", {})
    roles = "store roles enforced" if s3.get("roles_enforced") else "store roles NOT enforced"
    table = Table(title=f"fedkim stack of {state['project']} (since {state['started']}; S3 server "
                        f"{s3.get('server', 'rclone')}, {roles})")
    for column in ("service", "pid", "state", "url / pool", "log"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(row.name, str(row.pid), "running" if row.running else "[red]stopped[/red]", row.where,
                      row.log)
    Console().print(table)
    raise typer.Exit(0 if all(r.running for r in rows) else 1)


@stack_app.command("env")
def stack_env(
    params: Optional[Path] = ParamsOption,
    pool: str = typer.Option("central", help="central, or a site's pool (site-<id>)"),
) -> None:
    """Print the `export` lines a worker of POOL needs to join the running stack (they hold its role's S3 secret:
    the only command that prints one)."""
    import shlex

    from fedkim.ops import stack

    state, _ = stack.status(params)
    if state is None:
        err_console.print(f"no stack running for {stack.project_dir(params)}", markup=False, highlight=False)
        raise typer.Exit(1)
    if pool not in state["pools"]:
        err_console.print(f"no pool {pool!r} in this stack; its pools: {', '.join(state['pools'])}", markup=False)
        raise typer.Exit(2)
    keys = ["PREFECT_API_URL", "FEDKIM_HOME", "FEDKIM_PARAMS", "FEDKIM_STORE_KIND", "FEDKIM_S3_ENDPOINT_URL",
            "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "FEDKIM_STORE_ROLE", "AWS_DEFAULT_REGION",
            "MLFLOW_TRACKING_URI"]
    try:
        env = stack.worker_env(state, pool, base={})
    except stack.StackError as exc:
        _stack_error(exc)
    for key in (k for k in keys if k in env):
        print(f"export {key}={shlex.quote(env[key])}")
    print(f"# then: prefect worker start --pool {pool} --type process")


from fedkim.cli_site import site_app  # noqa: E402  (its commands import from here lazily)

app.add_typer(site_app, name="site")


if __name__ == "__main__":
    app()
