"""`fedkim ...`: thin command-line wrappers over the library. Exit codes: 0 ok, 1 the data failed a check,
2 bad usage or bad params (a message names the file, key or rule; never a bare traceback)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from fedkim.config import ConfigError, load_params

app = typer.Typer(help="Federated knowledge injection into medical foundation models.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
data_app = typer.Typer(help="Site data: generate the offline federation, validate a site.", no_args_is_help=True)
app.add_typer(data_app, name="data")

console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)

ParamsOption = typer.Option(None, "--params", "-p", help="params.yaml to read (default: FEDKIM_PARAMS or repo's)")


def _params(path: Optional[Path], overrides: Optional[dict] = None):
    try:
        return load_params(path, overrides)
    except ConfigError as exc:
        err_console.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from None


@data_app.command("generate")
def data_generate(
    params: Optional[Path] = ParamsOption,
    out: Optional[Path] = typer.Option(None, "--out", help="write here instead of data.root"),
    seed: Optional[int] = typer.Option(None, help="override data.seed"),
    force: bool = typer.Option(False, "--force", help="regenerate even if the cache matches"),
) -> None:
    """Generate the default offline federation (4 hospitals + public + test), cached by a hash of its params."""
    from fedkim.data.synth.federation import GenerationError, generate_federation

    overrides = {"data.seed": seed} if seed is not None else {}
    if out is not None:
        overrides["data.root"] = str(out.resolve())
    cfg = _params(params, overrides)
    try:
        result = generate_federation(cfg.data, force=force, progress=True)
    except GenerationError as exc:
        err_console.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from None
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
    report = validate_site(site_dir, cfg.data.gate, write_docs=docs)
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
) -> None:
    """Run FedKIM and every baseline and ablation (multi-round), then compare them on the test split."""
    from fedkim.data.synth.federation import generate_federation
    from fedkim.experiment import VARIANTS, run_experiment

    overrides = {k: v for k, v in {"federation.rounds": rounds, "inject.foundation_model": fm}.items() if v is not None}
    cfg = _params(params, overrides)
    names = [v.strip() for v in variants.split(",")] if variants else list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        err_console.print(f"[red]error:[/red] unknown variant(s) {unknown}; allowed: {', '.join(VARIANTS)}")
        raise typer.Exit(2)
    generate_federation(cfg.data)  # cached: a no-op when the federation already matches params
    comparison = run_experiment(cfg, out, names, progress=True)
    console.print((out / "comparison.md").read_text(), markup=False)
    console.print(f"written: {out / 'comparison.md'}, {out / 'comparison.json'} ({len(comparison)} variants)")


@app.command("params")
def show_params(params: Optional[Path] = ParamsOption) -> None:
    """Validate params.yaml and print the resolved values."""
    cfg = _params(params)
    print(json.dumps(cfg.model_dump(mode="json"), indent=2))


if __name__ == "__main__":
    app()
