"""ICU exports of an electronic health record: a stays table (one row per ICU stay: stay_id, patient_id, the
outcome, admission time, static covariates and, in the wide layout, admission values in columns) and optionally
long event tables (MIMIC-like chartevents / labevents: stay_id, charttime or hour, itemid or label,
valuenum / value, valueuom / unit).

A mapping (YAML/JSON; sections `outcome`, `columns`, `static`, `items`) says which source column or item is which
fedkim variable and, where the export has no unit, in which unit. Values are written as exported with their unit;
the reader and the gate convert them through the one table, fedkim.data.formats.clinical.UNITS. Several values in
one hour are all kept: the reader's duplicates rule (data.gate.clinical_duplicates) combines them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from fedkim.data.catalogue import Catalogue
from fedkim.data.formats.clinical import STATIC, STATIC_FILE, UNITS, VARIABLES, write_long, write_static
from fedkim.data.importers.common import (ImportFailure, ImportReport, check_tasks, clean_id, csv_line,
                                          patient_split, read_csv, staging, write_site)
from fedkim.members import SERVER_SPLITS

STAYS_CSV = "stays.csv"
EVENT_CSVS = ("events.csv", "chartevents.csv", "labevents.csv")  # read when present and no --events is given
MAX_HOUR = 32767  # the long format's int16 hour
SECTIONS = {"outcome", "columns", "static", "items"}
_TEMP_F, _TEMP_C = {"variable": "temperature", "unit": "degF"}, {"variable": "temperature", "unit": "degC"}
DEFAULT_MAPPING = {
    "outcome": {"column": "hospital_expire_flag", "task": "mortality"},
    "columns": {variable: variable for variable in VARIABLES},  # wide layout: columns named after the variables
    "static": {"age": "age", "anchor_age": "age", "sex": "sex", "gender": "sex", "weight": "weight",
               "weight_kg": "weight", "height": "height", "height_cm": "height"},
    # MIMIC-IV itemids (icu.d_items, hosp.d_labitems) and their labels
    "items": {"220045": "heart_rate", "Heart Rate": "heart_rate", "220179": "sbp", "220050": "sbp",
              "Non Invasive Blood Pressure systolic": "sbp", "Arterial Blood Pressure systolic": "sbp",
              "220180": "dbp", "220051": "dbp", "Non Invasive Blood Pressure diastolic": "dbp",
              "Arterial Blood Pressure diastolic": "dbp", "220210": "resp_rate", "Respiratory Rate": "resp_rate",
              "220277": "spo2", "O2 saturation pulseoxymetry": "spo2", "223761": _TEMP_F,
              "Temperature Fahrenheit": _TEMP_F, "223762": _TEMP_C, "Temperature Celsius": _TEMP_C,
              "50813": "lactate", "Lactate": "lactate", "51301": "wbc", "51300": "wbc", "WBC Count": "wbc",
              "White Blood Cells": "wbc", "50912": "creatinine", "Creatinine": "creatinine"},
}
SEX = {"m": 1.0, "male": 1.0, "1": 1.0, "f": 0.0, "female": 0.0, "0": 0.0}


def accepted_unit(variable: str, unit) -> str | None:
    """The UNITS spelling of `unit` for `variable` (exact, else ignoring case), or None when not accepted."""
    text = str(unit).strip()
    if text in UNITS[variable]:
        return text
    matches = [u for u in UNITS[variable] if u.lower() == text.lower()]
    return matches[0] if len(matches) == 1 else None


def load_mapping(path: Path | None) -> dict:
    """The mapping: the default, with the sections a YAML/JSON file names replaced by the file's."""
    raw = {}
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ImportFailure(f"{path}: cannot read the mapping ({exc})") from None
        if not isinstance(raw, dict) or not set(raw) <= SECTIONS:
            raise ImportFailure(f"{path}: expected a mapping with sections {sorted(SECTIONS)}")
    where = str(path or "the default mapping")
    outcome = raw.get("outcome", DEFAULT_MAPPING["outcome"])
    if not isinstance(outcome, dict) or not isinstance(outcome.get("column"), str):
        raise ImportFailure(f"{where}: outcome: expected {{column: COLUMN, task: TASK}}")
    mapping = {"outcome": {"column": outcome["column"], "task": str(outcome.get("task", "mortality"))}}
    for section, known in (("columns", VARIABLES), ("static", STATIC), ("items", VARIABLES)):
        entries = raw.get(section, DEFAULT_MAPPING[section])
        if not isinstance(entries, dict):
            raise ImportFailure(f"{where}: {section}: expected a mapping of source name -> variable")
        mapping[section] = {clean_id(key): _entry(value, known, f"{where}: {section}: {key!r}")
                            for key, value in entries.items()}
    return mapping


def _entry(value, known, where: str) -> tuple[str, str | None]:
    """(variable, unit or None) of a mapping entry `variable` or {variable: ..., unit: ...}."""
    variable, unit = (value.get("variable"), value.get("unit")) if isinstance(value, dict) else (value, None)
    if variable not in known:
        raise ImportFailure(f"{where}: unknown variable {variable!r}; one of {', '.join(known)}")
    if unit is not None and accepted_unit(variable, unit) is None:
        raise ImportFailure(f"{where}: unit {unit!r} not accepted for {variable} ({', '.join(UNITS[variable])})")
    return variable, (accepted_unit(variable, unit) if unit is not None else None)


def first_column(table: pd.DataFrame, names: tuple[str, ...], path: Path, required: bool = True) -> str | None:
    found = next((n for n in names if n in table.columns), None)
    if found is None and required:
        others = f" (or {', '.join(map(repr, names[1:]))})" if names[1:] else ""
        raise ImportFailure(f"{path}: required column {names[0]!r}{others} missing (columns: {list(table.columns)})")
    return found


def number(text: str) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if np.isfinite(value) else None


def _times(texts: pd.Series) -> pd.Series:
    """Date-times in any common spelling (NaT when unreadable); a time without a zone is read as UTC, so that
    an export mixing both still subtracts."""
    return pd.to_datetime(texts, errors="coerce", format="mixed", utc=True)


def import_ehr(source: Path, dest: Path, *, site_id: str, role: str = "hospital", description: str = "",
               mapping: Path | None = None, val_fraction: float = 0.2, csv: str | None = None,
               events: tuple[str, ...] | None = None, link: bool = False,
               catalogue: Catalogue | None = None) -> ImportReport:
    """Write a new clinical site at `dest` from the export at `source` (read only); return the import report.
    `events`: event CSVs relative to `source` (None: those of EVENT_CSVS that exist; () none)."""
    source, dest = Path(source), Path(dest)
    rules = load_mapping(mapping)
    task = rules["outcome"]["task"]
    check_tasks([task], "clinical", role, str(mapping or "the default mapping"), catalogue)
    names = [n for n in EVENT_CSVS if (source / n).is_file()] if events is None else list(events)
    tables = {n: read_csv(source / n, ("stay_id",)) for n in names}
    timed = {n: first_column(t, ("hour", "charttime"), source / n) for n, t in tables.items()}
    stays_csv = csv or STAYS_CSV
    stays = read_csv(source / stays_csv, ("stay_id", rules["outcome"]["column"])
                     + (("intime",) if "charttime" in timed.values() else ()))
    options = {"mapping": str(mapping) if mapping else "default", "csv": stays_csv, "events": names,
               "val_fraction": val_fraction, "role": role, "task": task}
    report = ImportReport("ehr", source.name, options, rows_read=len(stays) + sum(map(len, tables.values())))
    kept, measured, static = _stays(stays, stays_csv, source, rules, role, val_fraction,
                                    "charttime" in timed.values(), report)
    for name, table in tables.items():
        measured.append(_events(table, name, source, timed[name], kept, set(stays["stay_id"].map(clean_id)),
                                rules["items"], report))
    long = pd.concat(measured, ignore_index=True).sort_values(["stay", "hour"], kind="stable")
    with staging(dest) as stage:
        (stage / "clinical").mkdir()
        rows = []
        for split in sorted({s for s, _, _ in kept.values()}):
            ids = [stay for stay, (s, _, _) in kept.items() if s == split]
            part = long[long["stay"].isin(ids)]
            rel = f"clinical/{task}_{split}.parquet"
            empty = set(ids) - set(part["stay"])
            report.skip("stay without measurement", len(empty))
            if len(part):
                write_long(stage / rel, part.assign(sample_id=task + "-" + part["stay"]))
            rows += [{"sample_id": f"{task}-{stay}", "task": task, "modality": "clinical", "split": split,
                      "label": kept[stay][1], "answer": "Yes" if kept[stay][1] else "No", "clinical_path": rel}
                     for stay in ids if stay not in empty]
        covariates = pd.DataFrame(static, columns=["stay", "variable", "value", "unit"])
        covariates = covariates[covariates["stay"].isin({r["sample_id"][len(task) + 1:] for r in rows})]
        if len(covariates):
            write_static(stage / STATIC_FILE, covariates.assign(sample_id=task + "-" + covariates["stay"]))
        write_site(stage, rows, report, site_id=site_id, role=role, description=description)
    return report


def _stays(stays, name, source, rules, role, val_fraction, needs_intime, report):
    """stay -> (split, label, admission time) of the usable stays; their admission values (long rows) and
    static rows (stay, variable, value, unit)."""
    patient_column = first_column(stays, ("patient_id", "subject_id"), source / name)
    outcome = rules["outcome"]["column"]
    values = [(c, v, u) for c, (v, u) in rules["columns"].items() if c in stays.columns]
    covariates = [(c, v, u) for c, (v, u) in rules["static"].items() if c in stays.columns]
    kept, measured, static, seen = {}, [], [], set()
    for position, row in enumerate(stays.to_dict("records")):
        line, stay, patient = csv_line(position), clean_id(row["stay_id"]), clean_id(row[patient_column])
        label = {"0": 0, "1": 1, "0.0": 0, "1.0": 1}.get(row[outcome].strip())
        hour = number(row["hour"]) if row.get("hour", "").strip() else 0.0
        intime = _times(pd.Series([row["intime"]]))[0] if needs_intime else None
        checks = [(not stay, "stay_id", "blank stay_id", "bad stay_id"),
                  (stay in seen, "stay_id", f"duplicate stay_id {stay}", "duplicate id"),
                  (not patient, patient_column, f"blank {patient_column}", "bad patient"),
                  (not row[outcome].strip(), outcome, "no outcome", "missing outcome"),
                  (label is None, outcome, f"outcome {row[outcome]!r} is not 0 or 1", "bad outcome"),
                  (hour is None or not 0 <= hour <= MAX_HOUR, "hour", f"not an hour offset: {row.get('hour')!r}",
                   "bad hour"),
                  (needs_intime and pd.isna(intime), "intime", f"not a time: {row.get('intime')!r}", "bad time")]
        seen.add(stay)
        failed = next((check[1:] for check in checks if check[0]), None)
        if failed:
            report.problem(name, line, *failed)
            continue
        split = role if role in SERVER_SPLITS else patient_split(patient, val_fraction)
        kept[stay] = (split, label, intime)
        for column, variable, unit in values + covariates:
            text = row[column].strip()
            value = SEX.get(text.lower()) if variable == "sex" else number(text)
            if text and value is None:
                report.problem(name, line, column, f"not a number: {text[:40]!r}", "non-numeric value")
            elif text and variable in VARIABLES:
                measured.append({"stay": stay, "hour": int(hour), "variable": variable, "value": value,
                                 "unit": unit})
            elif text:
                static.append((stay, variable, value, unit))
    return kept, [pd.DataFrame(measured, columns=["stay", "hour", "variable", "value", "unit"])], static


def _events(table, name, source, time_column, kept, listed, items, report) -> pd.DataFrame:
    """The usable long rows of one event table; every other row reported (file, line, column) or counted."""
    item_column = first_column(table, ("itemid", "label", "item"), source / name)
    value_column = first_column(table, ("valuenum", "value"), source / name)
    unit_column = first_column(table, ("valueuom", "unit"), source / name, required=False)
    frame = pd.DataFrame({"line": np.arange(len(table)) + 2, "stay": table["stay_id"].map(clean_id),
                          "item": table[item_column].map(clean_id)})
    text = table[value_column].str.strip()
    if value_column == "valuenum" and "value" in table.columns:  # MIMIC: valuenum blank, value the text
        text = text.where(text != "", table["value"].str.strip())
    frame["text"], frame["unit_text"] = text, table[unit_column].str.strip() if unit_column else ""

    def drop(mask, column, message, reason):
        nonlocal frame
        for row in frame[mask].itertuples():
            report.problem(name, row.line, column, message(row), reason)
        frame = frame[~mask]

    stay_left = ~frame["stay"].isin(kept) & frame["stay"].isin(listed)
    report.skip("stay left out", int(stay_left.sum()))
    frame = frame[~stay_left]
    drop(~frame["stay"].isin(kept), "stay_id", lambda r: f"stay_id {r.stay!r} not in the stays table",
         "unknown stay")
    drop(~frame["item"].isin(items), item_column, lambda r: f"unmapped item {r.item!r}", "unmapped item")
    blank = frame["text"] == ""
    report.skip("blank value", int(blank.sum()))
    frame = frame[~blank]
    frame["value"] = pd.to_numeric(frame["text"], errors="coerce")
    drop(~np.isfinite(frame["value"]), value_column, lambda r: f"not a number: {r.text[:40]!r}",
         "non-numeric value")
    frame["variable"] = frame["item"].map({item: variable for item, (variable, _) in items.items()})
    mapped_unit = frame["item"].map({item: unit for item, (_, unit) in items.items()})
    given = frame["unit_text"].where(frame["unit_text"] != "")
    spelled = {(v, u): accepted_unit(v, u) for v, u in set(zip(frame["variable"], given)) if isinstance(u, str)}
    frame["unit"] = [spelled[(v, u)] if isinstance(u, str) else m
                     for v, u, m in zip(frame["variable"], given, mapped_unit)]
    drop(given.notna() & frame["unit"].isna(), unit_column,
         lambda r: f"unit {r.unit_text!r} not accepted for {r.variable} ({', '.join(UNITS[r.variable])})",
         "unknown unit")
    raw = table.loc[frame.index, time_column].str.strip()
    if time_column == "hour":
        hours = pd.to_numeric(raw, errors="coerce")
    else:
        intime = pd.to_datetime(frame["stay"].map({s: k[2] for s, k in kept.items()}), utc=True)
        hours = (_times(raw) - intime) / pd.Timedelta(hours=1)
    frame["hour"] = np.floor(hours.to_numpy(dtype=float, na_value=np.nan))
    frame["raw_time"] = raw
    drop(frame["hour"].isna(), time_column, lambda r: f"not a time: {r.raw_time!r}", "bad time")
    drop(frame["hour"] < 0, time_column, lambda r: f"{r.raw_time} is before the ICU admission", "before admission")
    drop(frame["hour"] > MAX_HOUR, time_column, lambda r: f"{r.raw_time} is over {MAX_HOUR} h after admission",
         "too late")
    return frame.assign(hour=frame["hour"].astype(int))[["stay", "hour", "variable", "value", "unit"]]
