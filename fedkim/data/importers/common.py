"""What every importer shares: the import report, the errors, CSV reading, the patient-level split, copying files
out of the collection, the one lookup into the task catalogue, and writing a new site through a staging folder.

A collection (SOURCE) is only read. The new site is assembled in a hidden staging folder next to DIR and renamed
to DIR when complete, so a failed import leaves neither a half-written DIR nor a staging folder behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from fedkim.data.catalogue import Catalogue, load_catalogue
from fedkim.data.siteformat import REPORTS_DIR, finalize_site, write_index

IMPORT_REPORT = "import.json"
MAX_PRINTED_PROBLEMS = 20


class ImportFailure(ValueError):
    """The import cannot go on (a required column missing, no usable row, DIR not empty): nothing was written."""


@dataclass
class Problem:
    """One bad row: `row` is the CSV line number (the header is line 1), `column` the column at fault."""
    file: str
    row: int | None
    column: str | None
    message: str

    def line(self) -> str:
        where = self.file + (f", row {self.row}" if self.row is not None else "")
        return f"{where}, column {self.column}: {self.message}" if self.column else f"{where}: {self.message}"


@dataclass
class ImportReport:
    kind: str
    source: str
    options: dict
    rows_read: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> rows (or row x task) left out
    problems: list[Problem] = field(default_factory=list)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # task -> split -> samples
    files_copied: int = 0

    def problem(self, file: str, row: int | None, column: str | None, message: str, reason: str) -> None:
        self.problems.append(Problem(file, row, column, message))
        self.skip(reason)

    def skip(self, reason: str, n: int = 1) -> None:
        if n:
            self.skipped[reason] = self.skipped.get(reason, 0) + n

    def to_json(self) -> dict:
        return {"kind": self.kind, "source": self.source, "options": self.options, "rows_read": self.rows_read,
                "samples": sum(n for splits in self.counts.values() for n in splits.values()),
                "counts": self.counts, "files_copied": self.files_copied, "skipped": self.skipped,
                "problems": [p.__dict__ for p in self.problems]}

    def summary(self) -> str:
        total = sum(n for splits in self.counts.values() for n in splits.values())
        lines = [f"imported {self.kind} from {self.source}: {self.rows_read} rows read, {total} samples, "
                 f"{self.files_copied} files"]
        for task, splits in sorted(self.counts.items()):
            lines.append(f"  {task:<28} " + ", ".join(f"{s} {n}" for s, n in sorted(splits.items())))
        if self.skipped:
            lines.append("  left out: " + ", ".join(f"{reason} {n}" for reason, n in sorted(self.skipped.items())))
        lines += [f"  {p.line()}" for p in self.problems[:MAX_PRINTED_PROBLEMS]]
        if len(self.problems) > MAX_PRINTED_PROBLEMS:
            lines.append(f"  ... {len(self.problems) - MAX_PRINTED_PROBLEMS} more in {REPORTS_DIR}/{IMPORT_REPORT}")
        return "\n".join(lines)


def catalogue_task(name: str, catalogue: Catalogue | None = None) -> tuple[str, str, str]:
    """(modality, role, kind) of a task of `catalogue` (None: the shipped one); the one place importers consult
    the catalogue."""
    tasks = (catalogue or load_catalogue()).tasks
    task = tasks.get(name)
    if task is None:
        raise ImportFailure(f"task {name!r} is not in the catalogue ({', '.join(tasks)})")
    return task.modality, task.role, task.kind


def check_tasks(tasks, modality: str, site_role: str, where: str, catalogue: Catalogue | None = None) -> None:
    """Mapped tasks must be yes/no tasks of `modality`; zero-shot ones only for a test-role site."""
    for name in tasks:
        task_modality, task_role, task_kind = catalogue_task(name, catalogue)
        if task_kind != "binary":
            raise ImportFailure(f"{where}: task {name!r} is a {task_kind} task; a finding maps to a yes/no task")
        if task_modality != modality:
            raise ImportFailure(f"{where}: task {name!r} is a {task_modality} task, not {modality}")
        if task_role == "zero_shot" and site_role != "test":
            raise ImportFailure(f"{where}: {name!r} is a zero-shot task: only a test-role site (--role test) "
                                f"may hold it")


def read_csv(path: Path, required: tuple[str, ...]) -> pd.DataFrame:
    """A CSV read as strings (blank cells stay blank); a missing file or required column stops the import."""
    if not path.is_file():
        raise ImportFailure(f"{path}: file not found")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as exc:  # the parser raises several types for a damaged file
        raise ImportFailure(f"{path}: not a readable CSV ({exc.__class__.__name__}: {exc})") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    for column in required:
        if column not in frame.columns:
            raise ImportFailure(f"{path}: required column {column!r} missing (columns: {list(frame.columns)})")
    return frame


def csv_line(position: int) -> int:
    """The CSV line of the data row at 0-based `position` (line 1 is the header)."""
    return position + 2


def clean_id(value) -> str:
    """An identifier as text: '15709.0' (a float column written by pandas) reads as '15709'."""
    text = str(value).strip()
    return text[:-2] if text.endswith(".0") and text[:-2].isdigit() else text


def patient_split(patient_id: str, val_fraction: float, seed: int = 0) -> str:
    """'val' for a stable `val_fraction` of patients, else 'train': a hash of the id, so every record of a patient
    lands in the same split and re-importing gives the same split."""
    digest = hashlib.sha256(f"{seed}:{patient_id}".encode()).digest()
    return "val" if int.from_bytes(digest[:8], "big") / 2**64 < val_fraction else "train"


def inside(root: Path, relative: str) -> Path | None:
    """`relative` resolved under `root`, or None when it leaves it (an absolute path or '..')."""
    path = (root / relative).resolve()
    return path if path.is_relative_to(root.resolve()) else None


def place(source: Path, target: Path, link: bool) -> None:
    """Copy `source` to `target` (or hard-link it; copy when the link fails, e.g. across filesystems)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if link:
        try:
            os.link(source, target)
            return
        except OSError:
            pass
    shutil.copyfile(source, target)


def check_new_dir(dest: Path) -> None:
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ImportFailure(f"{dest}: exists and is not an empty folder; choose a new site folder")


@contextmanager
def staging(dest: Path):
    """Yield a staging folder next to `dest`; on success rename it to `dest`, on any error remove it."""
    dest = Path(dest)
    check_new_dir(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    stage = dest.parent / f".{dest.name}.importing-{os.getpid()}"
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir()
    try:
        yield stage
        check_new_dir(dest)  # someone may have written DIR meanwhile: never replace their files
        if dest.exists():
            dest.rmdir()
        stage.rename(dest)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def write_site(stage: Path, rows: list[dict], report: ImportReport, *, site_id: str, role: str,
               description: str) -> None:
    """Index, import report and site.yaml of the staged site; stops when no row is usable."""
    if not rows:
        raise ImportFailure(f"{report.source}: no usable row ({report.rows_read} read; left out: "
                            f"{report.skipped or 'none'})" + "".join(f"\n  {p.line()}" for p in report.problems[:5]))
    index = pd.DataFrame(rows)
    write_index(stage, index)
    manifest = finalize_site(stage, site_id=site_id, role=role, description=description)
    report.counts = manifest.counts
    (stage / REPORTS_DIR).mkdir(exist_ok=True)
    (stage / REPORTS_DIR / IMPORT_REPORT).write_text(json.dumps(report.to_json(), indent=2))
