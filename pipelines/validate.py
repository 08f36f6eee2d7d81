"""DVC stage `validate@<n>`: run the Great Expectations gate on one site's data folder.

Writes the site's report (JSON) to --out and exits non-zero when the site fails, so `dvc repro` stops there. The
report leaves out the gate's timing and names the site folder relative to the repo: the same data gives the same
file, so re-validating (e.g. after a change to the gate's code) does not retrain the site. GX data docs are not
written: they would land inside the site folder, which is the `generate` stage's out.
"""

import os
import sys
from pathlib import Path

from fedkim.errors import run_stage
from fedkim.rounds import validate_site_step
from pipelines.common import params_path, parser, setup, write_json


def main(argv: list[str] | None = None) -> int:
    cli = parser(__doc__, store=False, site=True)
    cli.add_argument("--out", required=True, type=Path, help="where the site's validation report (JSON) goes")
    args = cli.parse_args(argv)
    params, _, _ = setup(args)
    report = validate_site_step(params, args.site, write_docs=False)
    print(report.summary())
    payload = report.model_dump(mode="json")
    payload["stats"].pop("seconds", None)
    payload["site_dir"] = Path(os.path.relpath(payload["site_dir"], params_path().resolve().parent)).as_posix()
    write_json(args.out, payload)
    return 0 if report.success else 1


if __name__ == "__main__":
    sys.exit(run_stage(main))
