"""What the round stages share: their command line, the params, and the store a DVC-run round lives in.

A DVC-run round keeps its artifacts in its own LocalStore (dvc.yaml passes `--store artifacts/dvc/store`), not in
params.yaml `store:`, which is the store of the orchestrated (Prefect) rounds and may be S3. Every stage owns one
round folder of that store as its DVC out (`rounds/<round>/global`, `.../sites/<site>`, `.../aggregate`,
`.../central`, `.../evaluation`), so the outs never overlap, DVC removes a stage's folder before it reruns the stage
(the store's resume logic then finds nothing and recomputes), and the files are the same knowledge packages,
aggregates and injected weights a Prefect round writes. A DVC round never writes `rounds/LATEST.json`: it starts
from the initial global model, so its outputs depend on nothing but its declared deps and params.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from fedkim.config import Params, load_params
from fedkim.federation.store import LocalStore
from fedkim.progress import log_to_console


def parser(description: str | None, *, store: bool = True, site: bool = False) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description.strip().splitlines()[0] if description else None)
    if store:
        p.add_argument("--store", required=True, type=Path,
                       help="root folder of the round's LocalStore (relative: to the folder of params.yaml)")
    if site:
        p.add_argument("--site", required=True, help="site id, one of params.yaml federation.members[].id")
    return p


def setup(args: argparse.Namespace) -> tuple[Params, LocalStore | None, str]:
    """The params, the round's store (None without --store) and the round id (federation.round_id).

    The params file is FEDKIM_PARAMS, else ./params.yaml: the file DVC tracks (stages run in the folder of dvc.yaml)."""
    log_to_console()  # DVC shows a stage's output: progress lines of training, injection and evaluation
    params_file = params_path()
    params = load_params(params_file)
    if getattr(args, "site", None) is not None:
        known = params.member_ids()
        if args.site not in known:
            raise SystemExit(f"--site {args.site!r} is not in params.yaml federation.members; known sites: {known}")
    store = None
    if getattr(args, "store", None) is not None:
        root = args.store if args.store.is_absolute() else params_file.resolve().parent / args.store
        store = LocalStore(root)
    return params, store, params.federation.round_id


def params_path() -> Path:
    return Path(os.environ.get("FEDKIM_PARAMS") or "params.yaml")


def write_json(path: str | Path, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=True, default=float) + "\n")
    return path
