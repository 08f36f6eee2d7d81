"""Importers: well-known collection layouts read into a new site directory (docs/importers.md).

    ptbxl     PTB-XL-style ECG: ptbxl_database.csv + WFDB records (fedkim.data.importers.ptbxl)
    chexpert  CheXpert- or MIMIC-CXR-JPG-style chest X-rays: finding CSVs + images (fedkim.data.importers.chexpert)
    ehr       ICU exports: a stays table (wide admission values) and/or long event tables (fedkim.data.importers.ehr)

Each writes DIR through a staging folder, never modifies SOURCE, finalizes the site (site.yaml) and leaves an
import report in DIR/reports/import.json; ImportFailure (nothing written) when the import cannot go on.
"""

from __future__ import annotations

from pathlib import Path

from fedkim.data.importers.chexpert import import_chexpert
from fedkim.data.importers.common import IMPORT_REPORT, ImportFailure, ImportReport, Problem, check_new_dir
from fedkim.data.importers.ehr import import_ehr
from fedkim.data.importers.ptbxl import import_ptbxl

KINDS = {"ptbxl": import_ptbxl, "chexpert": import_chexpert, "ehr": import_ehr}

__all__ = ["IMPORT_REPORT", "KINDS", "ImportFailure", "ImportReport", "Problem", "import_collection"]


def import_collection(kind: str, source: Path, dest: Path, **options) -> ImportReport:
    """Import the collection at `source` of layout `kind` into the new site `dest`."""
    if kind not in KINDS:
        raise ImportFailure(f"unknown collection kind {kind!r}; one of {', '.join(KINDS)}")
    if not Path(source).is_dir():
        raise ImportFailure(f"{source}: not a folder")
    if Path(dest).resolve().is_relative_to(Path(source).resolve()):
        raise ImportFailure(f"{dest}: inside the collection {source}; the collection is never written to")
    check_new_dir(Path(dest))  # before reading a large collection, not only when writing it
    return KINDS[kind](Path(source), Path(dest), **options)
