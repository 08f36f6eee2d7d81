"""`fedkim site ...`: create a site skeleton, finalize a site, import a collection (docs/importers.md).
Exit codes as every fedkim command: 0 ok, 1 the site failed the gate, 2 bad usage or an import that cannot go on."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import typer

site_app = typer.Typer(help="A site folder: create its skeleton, finalize it, import a collection into it.",
                       no_args_is_help=True)
ParamsOption = typer.Option(None, "--params", "-p", help="params.yaml whose data.gate thresholds apply")
RoleOption = typer.Option("hospital", "--role", help="hospital, public, test or validation")


def _fail(message: str) -> None:
    from fedkim.cli import err_console

    err_console.print("[red]error:[/red] ", end="")
    err_console.print(message, markup=False, highlight=False)  # paths may hold "[...]"
    raise typer.Exit(2)


def _gate(site_dir: Path, params: Optional[Path], docs: bool) -> None:
    """Run the data gate on the site, print its summary and exit 0 (pass) or 1 (fail)."""
    from fedkim.cli import _params, console
    from fedkim.data.validate import validate_site

    from fedkim.data.catalogue import catalogue_of

    cfg = _params(params)
    report = validate_site(site_dir, cfg.data.gate, write_docs=docs, icu_hours=cfg.data.icu_hours,
                           catalogue=catalogue_of(cfg.data))
    console.print(report.summary(), highlight=False, markup=False, soft_wrap=True)
    raise typer.Exit(0 if report.success else 1)


@site_app.command("init")
def site_init(
    site_dir: Path = typer.Argument(..., help="a new (or empty) folder"),
    site_id: Optional[str] = typer.Option(None, "--id", help="site id (default: the folder name)"),
    description: str = typer.Option("", "--description"),
) -> None:
    """Create an empty site skeleton: folders, an empty index with the schema, README.txt, site.yaml."""
    from fedkim.cli import console
    from fedkim.data.siteformat import SiteFormatError, init_site

    try:
        init_site(site_dir, site_id=site_id or site_dir.name, description=description)
    except SiteFormatError as exc:
        _fail(str(exc))
    console.print(f"site skeleton written: {site_dir} (fill index.parquet and the folders, then "
                  f"`fedkim site finalize {site_dir}`)", markup=False, highlight=False)


@site_app.command("finalize")
def site_finalize(
    site_dir: Path = typer.Argument(..., help="a site folder whose index.parquet and files are complete"),
    site_id: Optional[str] = typer.Option(None, "--id", help="site id (default: site.yaml's, if any)"),
    role: Optional[str] = typer.Option(None, "--role", help="hospital, public, test or validation (default: "
                                                            "site.yaml's, else hospital)"),
    description: Optional[str] = typer.Option(None, "--description"),
    params: Optional[Path] = ParamsOption,
    docs: bool = typer.Option(True, "--docs/--no-docs", help="write GX data docs under SITE_DIR/reports/"),
) -> None:
    """Write site.yaml (counts, modalities, fingerprint), then run the data gate. Exit 1 when it fails."""
    from fedkim.cli import console
    from fedkim.data.siteformat import ROLES, SITE_FILE, SiteFormatError, finalize_site, read_manifest

    if not site_dir.is_dir():
        _fail(f"{site_dir}: not a directory")
    previous = None
    if (site_dir / SITE_FILE).is_file():
        try:
            previous = read_manifest(site_dir)
        except SiteFormatError:
            previous = None  # a damaged manifest is replaced
    site_id = site_id or (previous.site_id if previous else None)
    if not site_id:
        _fail(f"{site_dir}: no site.yaml to take the id from; give --id")
    role = role or (previous.role if previous else "hospital")
    if role not in ROLES:
        _fail(f"--role {role!r}: one of {', '.join(ROLES)}")
    description = description if description is not None else (previous.description if previous else "")
    try:
        manifest = finalize_site(site_dir, site_id=site_id, role=role, description=description)
    except SiteFormatError as exc:
        _fail(str(exc))
    total = sum(n for splits in manifest.counts.values() for n in splits.values())
    console.print(f"site.yaml written: {manifest.site_id} ({manifest.role}), {total} samples, "
                  f"{', '.join(manifest.modalities) or 'no modality'}", markup=False, highlight=False)
    _gate(site_dir, params, docs)


@site_app.command("import")
def site_import(
    kind: str = typer.Argument(..., help="collection layout: ptbxl, chexpert (CheXpert and MIMIC-CXR-JPG) "
                                           "or ehr (ICU stays and events)"),
    source: Path = typer.Argument(..., help="the collection's folder (only read)"),
    site_dir: Path = typer.Argument(..., help="the new site folder (must not exist or be empty)"),
    site_id: Optional[str] = typer.Option(None, "--id", help="site id (default: the folder name)"),
    role: str = RoleOption,
    description: str = typer.Option("", "--description"),
    link: bool = typer.Option(False, "--link/--copy", help="hard-link files into the site instead of copying "
                                                          "(falls back to a copy across filesystems)"),
    mapping: Optional[Path] = typer.Option(None, "--mapping", help="YAML/JSON label mapping (docs/importers.md)"),
    val_fraction: float = typer.Option(0.2, "--val-fraction", min=0.0, max=1.0,
                                       help="share of patients in val (patient-level hash split)"),
    csv: Optional[str] = typer.Option(None, "--csv", help="the labels CSV, relative to SOURCE"),
    hz: int = typer.Option(100, "--hz", help="ptbxl: 100 (filename_lr) or 500 (filename_hr)"),
    min_likelihood: float = typer.Option(0.0, "--min-likelihood",
                                         help="ptbxl: least likelihood of a diagnostic SCP code that counts"),
    split: str = typer.Option("folds", "--split", help="ptbxl: folds (strat_fold) or patients (hash)"),
    val_folds: str = typer.Option("9", "--val-folds", help="ptbxl: comma-separated strat_fold values -> val"),
    exclude_folds: str = typer.Option("10", "--exclude-folds", help="ptbxl: strat_fold values left out ('' none)"),
    metadata: Optional[str] = typer.Option(None, "--metadata", help="chexpert: MIMIC-CXR metadata CSV"),
    findings: list[str] = typer.Option([], "--map", metavar="COLUMN=TASK",
                                       help="chexpert: finding column -> task (repeatable)"),
    uncertain: str = typer.Option("ignore", "--uncertain", help="chexpert: -1 -> ignore, zeros or ones"),
    views: str = typer.Option("frontal", "--views", help="chexpert: frontal or all"),
    events: Optional[list[str]] = typer.Option(None, "--events", help="ehr: an event CSV relative to SOURCE "
                                               "(repeatable; default: events.csv, chartevents.csv, labevents.csv)"),
    params: Optional[Path] = ParamsOption,
    docs: bool = typer.Option(True, "--docs/--no-docs", help="write GX data docs under SITE_DIR/reports/"),
) -> None:
    """Import a collection into a new site folder, finalize it and run the data gate (exit 1 when it fails)."""
    from fedkim.cli import _params, console
    from fedkim.data.catalogue import catalogue_of
    from fedkim.data.importers import ImportFailure, import_collection
    from fedkim.data.siteformat import ROLES

    cfg = _params(params)  # bad params: exit 2 before anything is written
    options = {"site_id": site_id or site_dir.name, "role": role, "description": description, "link": link,
               "mapping": mapping, "val_fraction": val_fraction, "catalogue": catalogue_of(cfg.data)}
    try:
        if kind == "ptbxl":
            options |= {"hz": hz, "min_likelihood": min_likelihood, "split": split,
                        "val_folds": _folds(val_folds), "exclude_folds": _folds(exclude_folds)}
            options |= {"csv": csv} if csv else {}
        elif kind == "chexpert":
            options |= {"csv": csv, "metadata": metadata, "findings": _pairs(findings), "uncertain": uncertain,
                        "views": views}
        elif kind == "ehr":
            options |= {"csv": csv, "events": tuple(events) if events else None}
        if role not in ROLES:
            raise ImportFailure(f"--role {role!r}: one of {', '.join(ROLES)}")
        report = import_collection(kind, source, site_dir, **options)
    except ImportFailure as exc:
        _fail(str(exc))
    console.print(report.summary(), markup=False, highlight=False)
    _gate(site_dir, params, docs)


@site_app.command("keygen")
def site_keygen(
    party_id: str = typer.Option(..., "--id", help="the member id of federation.members, or `coordinator`"),
    out: Path = typer.Option(..., "--out", help="folder for <id>.key (private, mode 0600) and <id>.pub"),
) -> None:
    """Generate the Ed25519 identity of a site (or of the coordinator) and print the params.yaml line that
    trusts it. Never overwrites an existing key."""
    from fedkim.cli import console
    from fedkim.identity import COORDINATOR, KeyFileError, write_key_pair
    from fedkim.members import MemberSpec

    if party_id != COORDINATOR and not re.fullmatch(MemberSpec.model_fields["id"].metadata[0].pattern, party_id):
        _fail(f"--id {party_id!r}: not a member id (lower-case letters, digits and '-') nor {COORDINATOR!r}")
    try:
        key_path, pub_path, public = write_key_pair(out, party_id)
    except (KeyFileError, OSError) as exc:
        _fail(str(exc))
    setting = ("federation.coordinator_public_key: " if party_id == COORDINATOR
               else f"federation.members[id={party_id}].public_key: ")
    console.print(f"private key: {key_path} (keep it at the {'coordinator' if party_id == COORDINATOR else 'site'}; "
                  f"FEDKIM_SIGNING_KEY points to it)\npublic key:  {pub_path}\nparams.yaml: {setting}{public}",
                  markup=False, highlight=False, soft_wrap=True)


def _folds(text: str) -> tuple[int, ...]:
    from fedkim.data.importers import ImportFailure

    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ImportFailure(f"fold list {text!r}: expected comma-separated integers") from None


def _pairs(items: list[str]) -> dict[str, str]:
    from fedkim.data.importers import ImportFailure

    pairs = {}
    for item in items:
        column, sep, task = item.partition("=")
        if not sep or not column.strip() or not task.strip():
            raise ImportFailure(f"--map {item!r}: expected COLUMN=TASK")
        pairs[column.strip()] = task.strip()
    return pairs
