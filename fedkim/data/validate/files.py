"""The per-file tables: one row per referenced image, ECG record or question file (clinical: validate.clinical),
with facts read here by fedkim.data.formats, and the table of the text samples."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from great_expectations.expectations.row_conditions import Column

from fedkim.config import GateParams
from fedkim.data.formats import FormatError
from fedkim.data.formats import ecg as ecg_fmt
from fedkim.data.formats import image as image_fmt
from fedkim.data.formats import text as text_fmt
from fedkim.data.siteformat import SiteFormatError, resolve
from fedkim.data.validate.engine import GX, Rule, Table, _gx_frame, _rule
from fedkim.data.catalogue import Catalogue
from fedkim.data.validate.tables import _needing, _paths, _relative

# ---------------------------------------------------------------------------------------- per-file facts
def _locate(site: Path, rel: str) -> tuple[dict, Path | None]:
    """A referenced path's first facts; None when it leaves the site (or cannot be a path at all)."""
    row: dict[str, Any] = {"file": rel, "inside": True, "exists": None, "decodes": None, "detail": ""}
    try:
        return row, resolve(site, rel)
    except SiteFormatError:
        row.update(inside=False, detail="points outside the site directory")
    except (ValueError, OSError) as exc:  # a NUL byte, a name too long
        row.update(inside=False, detail=str(exc))
    return row, None


def _exists(row: dict, parts: list[Path], site: Path) -> bool:
    try:
        missing = [p for p in parts if not p.is_file()]
    except (OSError, ValueError) as exc:
        missing, row["detail"] = parts, str(exc)
    row["exists"] = not missing
    if missing and not row["detail"]:
        row["detail"] = "missing " + ", ".join(_relative(str(p), site.resolve()) for p in missing)
    return not missing


def _failed(row: dict, exc: Exception, site: Path) -> dict:
    reason = exc.reason if isinstance(exc, FormatError) else f"{exc.__class__.__name__}: {exc}"
    row.update(decodes=False, detail=_relative(reason, site.resolve()))
    return row


def _file_rules() -> list[Rule]:
    common = (("file.path", "inside", "path leaves the site directory"),
              ("file.exists", "exists", "referenced file missing"),
              ("file.decodes", "decodes", "file does not decode"))
    return [_rule(rid, GX.ExpectColumnValuesToBeInSet, msg, column=col, value_set=[True], detail="detail")
            for rid, col, msg in common]


def _facts_table(name: str, rows: list[dict], columns: list[str], checks: list[Rule]) -> Table:
    """Facts of None/NaN were not measured: GX's column-map expectations skip them."""
    frame = _gx_frame(pd.DataFrame(rows, columns=["file", "inside", "exists", "decodes", "detail", *columns]))
    return Table(name, frame, _file_rules() + checks, list(frame["file"]), file_column="file")


def _image_row(site: Path, rel: str) -> dict:
    row, path = _locate(site, rel)
    if path is None or not _exists(row, [path], site):
        return row
    try:
        facts = image_fmt.image_facts(path)  # header: format, width, height, bits, photometric, modality
        row.update({k: facts[k] for k in ("format", "width", "height", "bits", "photometric", "modality")})
        if facts["photometric"] not in image_fmt.SUPPORTED_FORMS:
            return row  # image.photometric's finding; not decoded
        _, row["colour_spread"] = image_fmt.decode_image(path)  # decoded once: truncated pixel data fails here
        row["decodes"] = True
    except Exception as exc:  # image_facts does not wrap the libraries' errors
        _failed(row, exc, site)
    return row


def _image_table(site: Path, paths: list[str], rules: GateParams) -> Table:
    side = {"min_value": rules.image_min_side, "max_value": rules.image_max_side}
    size = f"image side outside [{rules.image_min_side}, {rules.image_max_side}] px"
    checks = [
        _rule("image.size", GX.ExpectColumnValuesToBeBetween, size, column="width", **side),
        _rule("image.size", GX.ExpectColumnValuesToBeBetween, size, column="height", **side),
        _rule("image.bit_depth", GX.ExpectColumnValuesToBeBetween,
              f"bits per sample outside [{rules.image_min_bits}, {rules.image_max_bits}]", column="bits",
              min_value=rules.image_min_bits, max_value=rules.image_max_bits),
        _rule("image.photometric", GX.ExpectColumnValuesToBeInSet,
              "colour form the reader cannot convert to gray", column="photometric",
              value_set=list(image_fmt.SUPPORTED_FORMS)),
        _rule("image.colour", GX.ExpectColumnValuesToBeBetween,
              f"colour channels differ by more than {rules.image_max_colour_spread:g} on average (a colour "
              f"picture, not a radiograph)", column="colour_spread", max_value=rules.image_max_colour_spread),
        _rule("image.modality", GX.ExpectColumnValuesToBeInSet, "DICOM modality must be DX or CR",
              column="modality", value_set=["DX", "CR"], row_condition=Column("format") == "dicom",
              uses=("format",)),
    ]
    rows = [_image_row(site, rel) for rel in paths]
    facts = ["format", "width", "height", "bits", "photometric", "colour_spread", "modality"]
    return _facts_table("image", rows, facts, checks)


def _ecg_parts(path: Path) -> list[Path]:
    """The files a record needs, found as read_ecg finds them."""
    if path.suffix.lower() in (".dcm", ".dicom"):
        return [path]
    record = path.with_suffix("") if path.suffix in (".hea", ".dat") else path
    return [record.with_suffix(".hea"), record.with_suffix(".dat")]


def _ecg_row(site: Path, rel: str, rules: GateParams) -> dict:
    """Header facts (leads, rate, whole duration, units), then the signal facts of the window the model reads."""
    row, path = _locate(site, rel)
    if path is None or not _exists(row, _ecg_parts(path), site):
        return row
    try:
        header = ecg_fmt.header_facts(path)
    except Exception as exc:
        return _failed(row, exc, site)
    fs = float(header["fs"])
    unknown = ecg_fmt.unknown_units(header["names"], header["units"])
    row.update(leads=len(set(ecg_fmt.LEADS) & set(header["leads"])), fs=fs,
               seconds=header["samples"] / fs if fs > 0 else np.nan,
               units_known=not unknown, units_detail="; ".join(unknown) or "all leads in mV, uV or V")
    if unknown or row["leads"] < len(ecg_fmt.LEADS):
        return row  # ecg.units' or ecg.leads' finding; not decoded
    try:
        record = ecg_fmt.read_ecg(path, rules.ecg_window_seconds)
    except Exception as exc:
        return _failed(row, exc, site)
    signal = np.asarray(record.signal, dtype=np.float64)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN leads give NaN facts, which GX skips
        row.update(
            decodes=True,
            max_abs_mv=float(np.nanmax(np.abs(signal))) if signal.size else np.nan,
            flat_leads=int((np.nanstd(signal, axis=0) < rules.ecg_flat_std_mv).sum()) if signal.size else 0,
        )
    return row


def _ecg_table(site: Path, paths: list[str], rules: GateParams) -> Table:
    n = len(ecg_fmt.LEADS)
    checks = [
        _rule("ecg.leads", GX.ExpectColumnValuesToBeBetween, f"fewer than the {n} standard leads",
              column="leads", min_value=n, max_value=n),
        _rule("ecg.sampling_rate", GX.ExpectColumnValuesToBeBetween,
              f"sampling rate outside [{rules.ecg_min_hz:g}, {rules.ecg_max_hz:g}] Hz",
              column="fs", min_value=rules.ecg_min_hz, max_value=rules.ecg_max_hz),
        _rule("ecg.units", GX.ExpectColumnValuesToBeInSet,
              f"lead unit missing or not a voltage ({ecg_fmt.KNOWN_UNITS})", column="units_known",
              value_set=[True], detail="units_detail"),
        _rule("ecg.duration", GX.ExpectColumnValuesToBeBetween,
              f"duration outside [{rules.ecg_min_seconds:g}, {rules.ecg_max_seconds:g}] s",
              column="seconds", min_value=rules.ecg_min_seconds, max_value=rules.ecg_max_seconds),
        _rule("ecg.amplitude", GX.ExpectColumnValuesToBeBetween,
              f"|signal| beyond {rules.ecg_max_abs_mv:g} mV (unit or amplifier error)",
              column="max_abs_mv", max_value=rules.ecg_max_abs_mv),
        _rule("ecg.flat_lead", GX.ExpectColumnValuesToBeBetween,
              f"lead(s) with std below {rules.ecg_flat_std_mv:g} mV", column="flat_leads", max_value=0),
    ]
    rows = [_ecg_row(site, rel, rules) for rel in paths]
    facts = ["leads", "fs", "seconds", "units_known", "units_detail", "max_abs_mv", "flat_leads"]
    return _facts_table("ecg", rows, facts, checks)


# ----------------------------------------------------------------------------------------------------- text
def _text_tables(site: Path, index: pd.DataFrame, catalogue: Catalogue | None = None) -> list[Table]:
    rows, questions = [], {}
    for rel in _paths(index, "text_path"):
        row, path = _locate(site, rel)
        if path is not None and _exists(row, [path], site):
            try:
                questions[rel] = text_fmt.read_jsonl(path)
                row["decodes"] = True
            except Exception as exc:
                _failed(row, exc, site)
        rows.append(row)
    tables = [_facts_table("text_files", rows, [], [])]
    needing = _needing(index, "text", catalogue)
    needing = needing[needing["text_path"].isin(list(questions))]
    if len(needing):
        tables.append(_text_samples_table(needing, questions))
    return tables


def _text_samples_table(needing: pd.DataFrame, questions: dict[str, dict]) -> Table:
    answers = needing["answer"] if "answer" in needing.columns else [None] * len(needing)
    records = []
    for rel, sample, answer in zip(needing["text_path"], needing["sample_id"], answers):
        question = questions[rel].get(sample)
        known = question is not None and isinstance(answer, str)  # a null answer is index.not_null's
        records.append({"file": rel, "sample_id": sample, "present": question is not None,
                        "answer_matches": str(question["answer"]) == answer if known else None})
    frame = _gx_frame(pd.DataFrame(records))
    checks = [
        _rule("text.sample_present", GX.ExpectColumnValuesToBeInSet, "sample's question not in the file",
              column="present", value_set=[True]),
        _rule("text.answer_matches", GX.ExpectColumnValuesToBeInSet, "index answer differs from the file's",
              column="answer_matches", value_set=[True]),
    ]
    labels = [f"{f}: {s}" for f, s in zip(frame["file"], frame["sample_id"])]
    return Table("text_samples", frame, checks, labels, file_column="file")
