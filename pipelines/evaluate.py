"""DVC stage `evaluate`: the injected model on the test split of every catalogue task (the reported figures) and on
the server's validation split (the figures promotion decides on).

Reads <store>/rounds/<round>/{aggregate,central}/ and the test and validation splits; writes
<store>/rounds/<round>/evaluation/ (metrics.json with the gate table and calibration, validation_metrics.json), the
DVC metrics files (--metrics: the test split's per-task f1/auroc/accuracy/primary and the summaries, without the
gate table and calibration; --validation-metrics: the validation split's) and plot data: --tasks (CSV, one row per
task) and --gate (heatmap PNG of the gate weights per task and expert).
"""

import csv
import sys
from pathlib import Path

from fedkim.central.evaluate import plot_gate_heatmap
from fedkim.data.catalogue import catalogue_of
from fedkim.errors import run_stage
from fedkim.members import server_splits
from fedkim.rounds import evaluate_step, load_central, validate_split_step
from pipelines.common import parser, setup, write_json

COLUMNS = ("f1", "auroc", "accuracy", "primary")


def main(argv: list[str] | None = None) -> None:
    cli = parser(__doc__)
    cli.add_argument("--metrics", required=True, type=Path, help="DVC metrics file (JSON)")
    cli.add_argument("--tasks", required=True, type=Path, help="per-task metrics (CSV) for `dvc plots`")
    cli.add_argument("--gate", required=True, type=Path, help="gate heatmap (PNG) for `dvc plots`")
    cli.add_argument("--validation-metrics", type=Path, help="DVC metrics file (JSON) of the validation split")
    args = cli.parse_args(argv)
    params, store, round_id = setup(args)
    validate_split_step(params, "test")  # SplitGateError: the stage fails naming the split and the rules
    model = load_central(params, store, round_id, injected=True)
    metrics = evaluate_step(params, store, round_id, model)
    if "validation" in server_splits(params):
        validate_split_step(params, "validation")
        decided_on = evaluate_step(params, store, round_id, model, split="validation")
        if args.validation_metrics:
            write_json(args.validation_metrics, {"round_id": round_id, **decided_on})

    write_json(args.metrics, {"round_id": round_id, **{k: v for k, v in metrics.items() if k not in ("gate", "calibration")}})
    catalogue = catalogue_of(params.data)
    args.tasks.parent.mkdir(parents=True, exist_ok=True)
    with args.tasks.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["task", "role", "modality", *COLUMNS])
        for task, m in metrics["tasks"].items():
            writer.writerow([task, catalogue[task].role, catalogue[task].modality, *(_number(m.get(c)) for c in COLUMNS)])
    if plot_gate_heatmap(metrics.get("gate") or {}, args.gate, catalogue) is None:
        raise SystemExit(f"round {round_id}: the model has no M3OE gate to plot (inject.num_experts, inject.gate)")
    print(f"round {round_id}: {len(metrics['tasks'])} tasks, train mean F1 {metrics['train_mean_f1']:.3f}, "
          f"zero-shot mean {metrics['zeroshot_mean']:.3f}, mean AUROC {metrics['mean_auroc']:.3f}")


def _number(value) -> str:
    return "" if value is None else f"{float(value):.6g}"


if __name__ == "__main__":
    sys.exit(run_stage(main))
