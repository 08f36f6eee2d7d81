"""DVC stage `train_site@<n>`: local training at one site from the round's global model.

Reads the site's data folder, its validation report and <store>/rounds/<round>/global/; writes the site's knowledge
package (manifest.json + encoders.safetensors) to <store>/rounds/<round>/sites/<site>/, the stage's out.
"""

import json
import sys
from pathlib import Path

from fedkim.errors import run_stage
from fedkim.rounds import package_validation, train_site_step
from pipelines.common import parser, setup


def main(argv: list[str] | None = None) -> int:
    cli = parser(__doc__, site=True)
    cli.add_argument("--validation", required=True, type=Path, help="the site's report from the validate stage")
    args = cli.parse_args(argv)
    params, store, round_id = setup(args)
    report = json.loads(args.validation.read_text())
    if report.get("site_id") not in (None, args.site):
        print(f"{args.validation} is the report of site {report['site_id']!r}, not of {args.site!r}", file=sys.stderr)
        return 1
    if not report["success"]:
        print(f"{args.validation}: site {args.site} did not pass the data gate; not training", file=sys.stderr)
        return 1
    outcome = train_site_step(params, store, round_id, args.site, validation=package_validation(report),
                              quarantined=sorted(report.get("quarantine", {})))
    if outcome.status == "refused":  # its privacy budget is spent: the round stops here, as for a failed gate
        print(f"round {round_id}, {outcome.reason}", file=sys.stderr)
        return 1
    spent = f", ε {outcome.privacy['epsilon_round']:.2f} ({outcome.privacy['epsilon_total']:.2f} in all)" \
        if outcome.privacy else ""
    print(f"round {round_id}, {args.site}: {outcome.status} in {outcome.seconds} s, samples {outcome.sample_counts}"
          f"{spent}")
    return 0


if __name__ == "__main__":
    sys.exit(run_stage(main))
