"""The site data directory: the contract between a hospital's export (or our generator) and everything else.

    <site>/site.yaml          site id, role, modalities, counts, content fingerprint
    <site>/index.parquet      one row per sample (INDEX_COLUMNS), file paths relative to <site>/
    <site>/images/...         8-bit grayscale PNG or DICOM (DX/CR)
    <site>/ecg/...            WFDB records (.hea + .dat), or DICOM 12-lead waveform
    <site>/clinical/*.parquet long format: sample_id, hour, variable, value
    <site>/text/*.jsonl       questions: sample_id, question, options, answer
    <site>/reports/           written by the validation gate; never part of the fingerprint
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedkim.members import SERVER_SPLITS

FORMAT_VERSION = 1
SITE_FILE = "site.yaml"
INDEX_FILE = "index.parquet"
REPORTS_DIR = "reports"

SPLITS = ("train", "val", "public", "test", "validation")
# A hospital's samples are split train / val; a server split's folder holds one split named after its role.
ROLES = ("hospital", *SERVER_SPLITS)
PATH_COLUMNS = ("image_path", "ecg_path", "clinical_path", "text_path")
INDEX_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("task", pa.string()),
        ("modality", pa.string()),
        ("split", pa.string()),
        ("label", pa.int8()),  # 0/1 for binary tasks, null for choice tasks
        ("answer", pa.string()),  # the answer text ("Yes"/"No" or the option)
        *[(c, pa.string()) for c in PATH_COLUMNS],
    ]
)
INDEX_COLUMNS = tuple(INDEX_SCHEMA.names)


class SiteFormatError(ValueError):
    """A site directory that does not follow the format; the message names the file and what is wrong."""


class SiteManifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    site_id: str
    role: Literal["hospital", "public", "test", "validation"] = "hospital"
    description: str = ""
    modalities: list[str]
    counts: dict[str, dict[str, int]] = Field(description="task -> split -> number of samples")
    fingerprint: str = Field(pattern=r"^[0-9a-f]{64}$")
    generator: dict | None = Field(None, description="set by `fedkim data generate`: params hash, seed")


def write_index(site_dir: Path, index: pd.DataFrame) -> None:
    frame = index.reindex(columns=list(INDEX_COLUMNS))
    table = pa.Table.from_pandas(frame, schema=INDEX_SCHEMA, preserve_index=False)
    pq.write_table(table, site_dir / INDEX_FILE)


def read_index(site_dir: Path) -> pd.DataFrame:
    path = Path(site_dir) / INDEX_FILE
    if not path.is_file():
        raise SiteFormatError(f"{path}: index file missing")
    try:
        frame = pq.read_table(path).to_pandas()
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise SiteFormatError(f"{path}: not a readable Parquet file ({exc})") from None
    missing = [c for c in INDEX_COLUMNS if c not in frame.columns]
    if missing:
        raise SiteFormatError(f"{path}: missing column(s) {missing}; required: {list(INDEX_COLUMNS)}")
    return frame


def read_manifest(site_dir: Path) -> SiteManifest:
    path = Path(site_dir) / SITE_FILE
    if not path.is_file():
        raise SiteFormatError(f"{path}: site manifest missing")
    try:
        return SiteManifest.model_validate(yaml.safe_load(path.read_text()))
    except yaml.YAMLError as exc:
        raise SiteFormatError(f"{path}: not valid YAML ({exc})") from None
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise SiteFormatError(f"{path}: {problems}") from None


def write_manifest(site_dir: Path, manifest: SiteManifest) -> None:
    text = yaml.safe_dump(manifest.model_dump(mode="json"), sort_keys=False)
    (Path(site_dir) / SITE_FILE).write_text(text)


def data_files(site_dir: Path) -> list[Path]:
    """Every file that belongs to the site's content: all but site.yaml and the reports folder."""
    site_dir = Path(site_dir)
    files = []
    for path in site_dir.rglob("*"):
        rel = path.relative_to(site_dir)
        if path.is_file() and rel.parts[0] not in (SITE_FILE, REPORTS_DIR):
            files.append(path)
    return sorted(files, key=lambda p: p.relative_to(site_dir).as_posix())


def compute_fingerprint(site_dir: Path) -> str:
    """sha256 over (relative path, sha256 of content) of every data file, the index included."""
    site_dir = Path(site_dir)
    outer = hashlib.sha256()
    for path in data_files(site_dir):
        inner = hashlib.sha256()
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                inner.update(chunk)
        outer.update(path.relative_to(site_dir).as_posix().encode() + b"\0" + inner.digest())
    return outer.hexdigest()


def count_samples(index: pd.DataFrame) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for (task, split), n in index.groupby(["task", "split"]).size().items():
        counts.setdefault(str(task), {})[str(split)] = int(n)
    return counts


def finalize_site(site_dir: Path, *, site_id: str, role: str, description: str = "",
                  generator: dict | None = None) -> SiteManifest:
    """Write site.yaml for a directory whose index and files are complete (used by exporters and tests)."""
    index = read_index(site_dir)
    modalities = sorted({m for mod in index["modality"].unique() for m in str(mod).split("+")})
    manifest = SiteManifest(
        site_id=site_id, role=role, description=description, modalities=modalities,
        counts=count_samples(index), fingerprint=compute_fingerprint(site_dir), generator=generator,
    )
    write_manifest(site_dir, manifest)
    return manifest


SKELETON_FOLDERS = ("images", "ecg", "clinical", "text")
README_TEXT = """This is a fedkim site folder. Put the files under images/, ecg/, clinical/ and text/, one row per sample
in index.parquet (relative paths), then run `fedkim site finalize {name}` to write site.yaml and run the gate.
The format: docs/site-format.md of fedkim.
"""


def init_site(site_dir: Path, *, site_id: str, description: str = "") -> SiteManifest:
    """An empty site skeleton: the folders, an empty index with the schema, README.txt and site.yaml.
    Refuses an existing folder that is not empty."""
    site_dir = Path(site_dir)
    if site_dir.exists() and (not site_dir.is_dir() or any(site_dir.iterdir())):
        raise SiteFormatError(f"{site_dir}: exists and is not an empty folder")
    for sub in SKELETON_FOLDERS:
        (site_dir / sub).mkdir(parents=True, exist_ok=True)
    (site_dir / "README.txt").write_text(README_TEXT.format(name=site_dir.name))
    write_index(site_dir, pd.DataFrame(columns=list(INDEX_COLUMNS)))
    return finalize_site(site_dir, site_id=site_id, role="hospital", description=description)


def resolve(site_dir: Path, relative: str) -> Path:
    """A path from the index, resolved inside the site directory; refuses paths that leave it."""
    site_dir = Path(site_dir)
    path = (site_dir / relative).resolve()
    if not path.is_relative_to(site_dir.resolve()):
        raise SiteFormatError(f"{site_dir / INDEX_FILE}: path {relative!r} points outside the site directory")
    return path
