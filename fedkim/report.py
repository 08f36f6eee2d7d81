"""The round report: one folder per round with report.md, summary.json and PNGs (per-task metrics against the
previous champion and the `fedkim experiment` baselines, the gate heatmap, the injection loss curve).

The round flow calls `write_round_report` last; `write_report` works on any stored summary.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from fedkim.central.evaluate import plot_gate_heatmap
from fedkim.config import Params
from fedkim.data.catalogue import Catalogue, catalogue_of, load_catalogue


def find_comparison(configured: Path | None, search_root: Path) -> Path | None:
    """The configured comparison.json (even if missing: the report then says so, naming it), else the newest one
    under search_root by modification time (None when there is none)."""
    if configured is not None:
        return configured
    if not search_root.is_dir():
        return None
    found = [p for p in search_root.rglob("comparison.json") if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def load_baselines(path: Path | None) -> tuple[dict[str, dict[str, float]], dict]:
    """{variant: {task: primary}} and the file's meta (foundation model, rounds, path) from comparison.json."""
    if path is None:
        return {}, {}
    try:
        raw = json.loads(path.read_text())
        rows = {name: {t: float(m["primary"]) for t, m in row["tasks"].items() if "primary" in m}
                for name, row in raw["variants"].items()}
    except (OSError, ValueError, KeyError, TypeError) as exc:  # a stale or foreign file must not fail the round
        return {}, {"path": str(path), "error": f"unreadable: {exc.__class__.__name__}: {exc}"}
    return rows, {"path": str(path), "foundation_model": raw.get("foundation_model"), "rounds": raw.get("rounds")}


def write_round_report(params: Params, summary: dict, metrics: dict, injection: dict, *,
                       champion: dict | None, mlflow_ui: str) -> Path:
    """The report of a round in report.root/<round id>/, with the baselines of report.comparison (else the newest
    comparison.json beside the reports). Sets summary["report"] (the report.md path) before summary.json is
    written, so that the file names its report too. Returns the folder."""
    baselines, meta = load_baselines(find_comparison(params.report.comparison, params.report.root.parent))
    folder = params.report.root / summary["round_id"]
    summary["report"] = str(folder / "report.md")
    write_report(folder, summary, metrics, injection, champion=champion, baselines=baselines, baseline_meta=meta,
                 mlflow_ui=mlflow_ui, catalogue=catalogue_of(params.data))
    return folder


def _fmt(value) -> str:
    return "–" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.3f}"


def _tasks_in(columns: dict[str, dict], catalogue: Catalogue) -> list[str]:
    """The tasks any column has, in catalogue order, then those the catalogue lacks (an older baseline's)."""
    present = [t for col in columns.values() for t in col]
    return [t for t in catalogue.tasks if t in present] + [t for t in dict.fromkeys(present) if t not in catalogue]


def _role(task: str, catalogue: Catalogue) -> str:
    return catalogue[task].role if task in catalogue else "?"


def plot_task_metrics(columns: dict[str, dict[str, float]], path: Path, catalogue: Catalogue) -> Path | None:
    """Grouped horizontal bars: the primary figure per task for each column (this round, champion, baselines)."""
    if not columns:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = _tasks_in(columns, catalogue)
    width = 0.8 / len(columns)
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.32 * len(tasks) * max(1.0, len(columns) / 3)))
    for i, (name, col) in enumerate(columns.items()):
        ys = [k + i * width for k in range(len(tasks))]
        ax.barh(ys, [col.get(t, math.nan) for t in tasks], height=width, label=name)
    ax.set_yticks([k + 0.4 - width / 2 for k in range(len(tasks))],
                  [f"{t} ({_role(t, catalogue).replace('_', '-')})" for t in tasks], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("primary figure (F1 for yes/no tasks, accuracy for questions)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(folder: Path, summary: dict, metrics: dict, injection: dict, *,
                 champion: dict | None = None, baselines: dict[str, dict[str, float]] | None = None,
                 baseline_meta: dict | None = None, mlflow_ui: str = "", catalogue: Catalogue | None = None) -> Path:
    """Write report.md, summary.json and the PNGs into folder; return the report.md path.

    champion: {"version", "round_id", "tasks": {task: {"primary", "auroc"}}} of the champion this round was
    compared with (None when there was none). catalogue: the tasks' order and roles (None: the shipped one)."""
    from fedkim.tracking.runs import plot_loss_curve

    catalogue = catalogue or load_catalogue()
    folder.mkdir(parents=True, exist_ok=True)
    baselines, baseline_meta = baselines or {}, baseline_meta or {}
    this = {t: m["primary"] for t, m in metrics.get("tasks", {}).items()}
    columns = {f"round {summary['round_id']}": this}
    if champion:
        columns[f"champion v{champion['version']}"] = {t: m.get("primary", math.nan)
                                                       for t, m in champion["tasks"].items()}
    columns |= {f"baseline {name}": row for name, row in baselines.items()}
    images = {
        "metrics": plot_task_metrics(columns, folder / "task_metrics.png", catalogue),
        "gate": plot_gate_heatmap(metrics.get("gate") or {}, folder / "gate_heatmap.png", catalogue),
        "loss": (plot_loss_curve(injection["losses"], injection["lrs"], injection["tasks"], folder / "loss_curve.png")
                 if injection.get("losses") else None),
    }
    (folder / "summary.json").write_text(json.dumps(summary, indent=2, default=str))

    model = summary.get("model") or {}
    lines = [f"# FedKIM round {summary['round_id']}", "",
             f"- Status: **{summary['status']}** in {summary['seconds']} s ({summary['mode']} mode, "
             f"Prefect flow run `{summary.get('prefect_flow_run_id') or '-'}`)",
             f"- Registered: `{model.get('name')}` v{model.get('version')} with alias(es) "
             f"{', '.join(model.get('aliases') or []) or 'none'}; promotion: {model.get('decision')} "
             f"on the {model.get('decided_on') or 'test'} split ({model.get('reason')})",
             f"- MLflow round run: `{summary.get('mlflow_run_id')}`" + (f"; UI: `{mlflow_ui}`" if mlflow_ui else ""),
             f"- Store: `{summary.get('store')}`", "",
             "## Sites", "", "| site | status | samples | detail |", "|---|---|---|---|"]
    for site, info in summary["sites"].items():
        samples = sum((info.get("sample_counts") or {}).values())
        lines.append(f"| {site} | {info['status']} | {samples or '–'} | {info.get('reason') or ''} |")
    agg = summary.get("aggregate") or {}
    rejected = "; ".join(f"{s}: {', '.join(r)}" for s, r in (agg.get("rejected") or {}).items()) or "none"
    lines += ["", f"Aggregation ({agg.get('strategy')}): accepted {', '.join(agg.get('accepted', [])) or 'none'}; "
                  f"rejected at screening: {rejected}.", ""]

    steps = injection.get("losses") or []
    lines += ["## Injection", ""]
    if steps:
        lines += [f"{len(steps)} steps in {injection.get('seconds')} s; loss {steps[0]:.3f} → {steps[-1]:.3f} "
                  f"(answer tokens).", "", "![injection loss and learning rate](loss_curve.png)", ""]
    else:
        lines += ["No injection steps recorded.", ""]

    names = list(columns)
    lines += ["## Evaluation (test split)", "",
              "Primary figure per task: F1 for yes/no tasks, accuracy for multiple-answer questions.", "",
              "| task | role | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for task in _tasks_in(columns, catalogue):
        lines.append(f"| {task} | {_role(task, catalogue)} | " + " | ".join(_fmt(columns[n].get(task)) for n in names) + " |")
    lines += ["", "Summary of this round: " + ", ".join(f"{k} {_fmt(metrics.get(k))}"
                                                       for k in ("train_mean_f1", "zeroshot_mean", "mean_auroc")), ""]
    if champion:
        lines.append(f"Champion compared with: v{champion['version']} (round {champion.get('round_id') or '?'}).")
    else:
        lines.append("No previous champion: this is the first registered model.")
    if baseline_meta.get("error"):
        lines.append(f"Baselines: {baseline_meta['path']} is {baseline_meta['error']}.")
    elif baselines:
        lines.append(f"Baselines: `{baseline_meta['path']}` ({baseline_meta.get('foundation_model')}, "
                     f"{baseline_meta.get('rounds')} round(s)).")
        if baseline_meta.get("foundation_model") != summary.get("foundation_model"):
            lines.append(f"**Caution:** the baselines used the foundation model "
                         f"`{baseline_meta.get('foundation_model')}`, this round `{summary.get('foundation_model')}`;"
                         f" the columns are not comparable.")
    else:
        lines.append("Baselines: none (run `fedkim experiment --out reports/experiment` or set report.comparison).")
    if images["metrics"]:
        lines += ["", "![per-task metrics](task_metrics.png)"]
    if images["gate"]:
        lines += ["", "## Gate", "", "Gate weight of each expert for each task's (task, modality) descriptions.", "",
                  "![gate heatmap](gate_heatmap.png)"]
    lines.append("")
    path = folder / "report.md"
    path.write_text("\n".join(lines))
    return path
