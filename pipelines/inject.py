"""DVC stage `inject`: M3OE knowledge injection of the aggregated encoders into the frozen foundation model.

Reads <store>/rounds/<round>/aggregate/ and the server's public split; writes <store>/rounds/<round>/central/
(trainable.safetensors, encoders.safetensors, inject.json) and the loss curve (--loss-curve, CSV: step, task, loss,
lr) for `dvc plots`. Checkpoints go to a temporary folder: a DVC rerun never resumes a stale injection.
"""

import csv
import sys
import tempfile
from pathlib import Path

from fedkim.errors import run_stage
from fedkim.rounds import inject_step, validate_split_step
from pipelines.common import parser, setup


def main(argv: list[str] | None = None) -> None:
    cli = parser(__doc__)
    cli.add_argument("--loss-curve", required=True, type=Path, help="CSV of the injection loss per step")
    args = cli.parse_args(argv)
    params, store, round_id = setup(args)
    validate_split_step(params, "public")  # SplitGateError: the stage fails naming the split and the rules
    with tempfile.TemporaryDirectory(prefix="fedkim-inject-") as work:
        _, summary = inject_step(params, store, round_id, Path(work))
    args.loss_curve.parent.mkdir(parents=True, exist_ok=True)
    with args.loss_curve.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "task", "loss", "lr"])
        for step, (task, loss, lr) in enumerate(zip(summary["tasks"], summary["losses"], summary["lrs"])):
            writer.writerow([step, task, f"{loss:.6g}", f"{lr:.6g}"])
    last = f", last loss {summary['losses'][-1]:.4f}" if summary["losses"] else ""
    print(f"round {round_id}: injection {summary['steps']} steps in {summary['seconds']} s{last}")


if __name__ == "__main__":
    sys.exit(run_stage(main))
