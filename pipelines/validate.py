"""DVC stage `validate`: run the Great Expectations gate on every directory of the federation.

Writes reports/validation/<site>.json and exits non-zero when any site fails, so `dvc repro` stops there.
"""

import json
import sys
from pathlib import Path

from fedkim.config import REPO_ROOT, load_params
from fedkim.data.validate import validate_site


def main() -> int:
    params = load_params()
    out = REPO_ROOT / "reports" / "validation"
    out.mkdir(parents=True, exist_ok=True)
    failed = []
    for site_dir in sorted(p for p in Path(params.data.root).iterdir() if p.is_dir()):
        report = validate_site(site_dir, params.data.gate)
        (out / f"{site_dir.name}.json").write_text(json.dumps(report.model_dump(mode="json"), indent=2))
        print(report.summary())
        if not report.success:
            failed.append(site_dir.name)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
