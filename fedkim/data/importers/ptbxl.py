"""PTB-XL-style ECG collections: `ptbxl_database.csv` (ecg_id, patient_id, scp_codes, strat_fold, filename_lr,
filename_hr) with WFDB records at 100 Hz (records100/...) and 500 Hz (records500/...), and optionally
`scp_statements.csv` (code -> diagnostic_class).

Labels come from the SCP codes through a mapping (task -> rule); the default rule for `ecg_abnormal`:
any code of the MI, STTC, CD or HYP diagnostic class, or AFIB / AFLT -> Yes; otherwise NORM -> No; otherwise the
record is not labelled for the task. Diagnostic codes count when their likelihood is at least `min_likelihood`;
form and rhythm codes carry no likelihood (PTB-XL writes 0) and always count.
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import wfdb
import yaml

from fedkim.data.formats import FormatError
from fedkim.data.formats.ecg import header_facts, read_ecg, unknown_units
from fedkim.data.catalogue import Catalogue
from fedkim.data.importers.common import (ImportFailure, ImportReport, Problem, check_tasks, clean_id, csv_line,
                                          inside, patient_split, place, read_csv, staging, write_site)
from fedkim.members import SERVER_SPLITS

DATABASE_CSV = "ptbxl_database.csv"
STATEMENTS_CSV = "scp_statements.csv"
DEFAULT_MAPPING = {"ecg_abnormal": {"yes_classes": ["MI", "STTC", "CD", "HYP"], "yes_codes": ["AFIB", "AFLT"],
                                    "no_codes": ["NORM"]}}
# PTB-XL's 71 SCP statements, used when the collection ships no scp_statements.csv: the 44 diagnostic codes by
# superclass, then the form and rhythm codes (no diagnostic class).
DIAGNOSTIC_CLASSES = {
    "NORM": ["NORM"],
    "MI": ["IMI", "ASMI", "ILMI", "AMI", "ALMI", "INJAS", "LMI", "INJAL", "IPLMI", "IPMI", "INJIN", "INJLA", "PMI",
           "INJIL"],
    "STTC": ["NDT", "NST_", "DIG", "LNGQT", "ISC_", "ISCAL", "ISCIN", "ISCIL", "ISCAS", "ISCLA", "ANEUR", "EL",
             "ISCAN"],
    "CD": ["LAFB", "IRBBB", "1AVB", "IVCD", "CRBBB", "CLBBB", "LPFB", "WPW", "ILBBB", "3AVB", "2AVB"],
    "HYP": ["LVH", "LAO/LAE", "RVH", "RAO/RAE", "SEHYP"],
}
OTHER_CODES = ("ABQRS", "PVC", "STD_", "VCLVH", "QWAVE", "LOWT", "NT_", "PAC", "LPR", "INVT", "LVOLT", "HVOLT",
               "TAB_", "STE_", "PRC(S)", "SR", "AFIB", "STACH", "SARRH", "SBRAD", "PACE", "SVARR", "BIGU", "AFLT",
               "SVTAC", "PSVT", "TRIGU")
PLAUSIBLE_MV = (0.02, 20.0)  # typical lead amplitude (median over leads of the 99th percentile of |x|), in mV
RULE_KEYS = {"yes_classes", "yes_codes", "no_codes"}


def code_classes(source: Path) -> dict[str, str | None]:
    """code -> diagnostic class (None for form and rhythm codes): from scp_statements.csv when present."""
    path = source / STATEMENTS_CSV
    if not path.is_file():
        classes: dict[str, str | None] = {code: None for code in OTHER_CODES}
        classes.update({code: cls for cls, codes in DIAGNOSTIC_CLASSES.items() for code in codes})
        return classes
    table = read_csv(path, ("diagnostic_class",))
    code_column = table.columns[0]  # PTB-XL writes the code as the unnamed index column
    return {row[code_column].strip(): (row["diagnostic_class"].strip() or None) for _, row in table.iterrows()}


def load_mapping(path: Path | None) -> dict[str, dict[str, list[str]]]:
    """task -> {yes_classes, yes_codes, no_codes} from a YAML/JSON file; the default when `path` is None."""
    if path is None:
        return DEFAULT_MAPPING
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ImportFailure(f"{path}: cannot read the mapping ({exc})") from None
    if not isinstance(raw, dict) or not raw:
        raise ImportFailure(f"{path}: expected a mapping task -> {{yes_classes, yes_codes, no_codes}}")
    for task, rule in raw.items():
        if not isinstance(rule, dict) or not set(rule) <= RULE_KEYS or \
                not all(isinstance(v, list) for v in rule.values()):
            raise ImportFailure(f"{path}: task {task!r}: expected lists under {sorted(RULE_KEYS)}")
    return {str(t): {k: [str(c) for c in rule.get(k, [])] for k in RULE_KEYS} for t, rule in raw.items()}


def label(codes: dict[str, float], rule: dict, classes: dict, min_likelihood: float) -> int | None:
    counted = [c for c, likelihood in codes.items() if classes.get(c) is None or likelihood >= min_likelihood]
    if any(c in rule["yes_codes"] or classes.get(c) in rule["yes_classes"] for c in counted):
        return 1
    return 0 if any(c in rule["no_codes"] for c in counted) else None


def parse_codes(text: str) -> dict[str, float] | None:
    """`{'NORM': 100.0, 'SR': 0.0}` -> dict; None when it is not a dict literal of code -> number."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, (int, float))
                                              for k, v in value.items()):
        return None
    return {k.strip(): float(v) for k, v in value.items()}


def check_record(record: Path) -> str | None:
    """Why a WFDB record cannot be imported (missing file, unit unknown or mixed up), or None."""
    for needed in (record.with_suffix(".hea"), record.with_suffix(".dat")):
        if not needed.is_file():
            return f"file missing: {needed.name}"
    try:
        facts = header_facts(record.with_suffix(".hea"))
        bad_units = unknown_units(facts["names"], facts["units"])
        if bad_units:
            return f"unit missing or not a voltage in the header: {'; '.join(bad_units)}"
        signal = read_ecg(record).signal
    except FormatError as exc:
        return exc.reason
    except Exception as exc:  # wfdb raises several types for a damaged header
        return f"cannot read the WFDB record ({exc.__class__.__name__}: {exc})"
    typical = float(np.median(np.percentile(np.abs(signal), 99, axis=0)))
    if not PLAUSIBLE_MV[0] <= typical <= PLAUSIBLE_MV[1]:
        units = sorted({u for u in facts["units"] if u})
        return (f"amplitudes of {typical:.3g} mV after converting from the header's unit {units}: outside "
                f"{PLAUSIBLE_MV[0]}-{PLAUSIBLE_MV[1]} mV, the declared unit does not match the values")
    return None


def import_ptbxl(source: Path, dest: Path, *, site_id: str, role: str = "hospital", description: str = "",
                 hz: int = 100, mapping: Path | None = None, min_likelihood: float = 0.0, split: str = "folds",
                 val_folds: tuple[int, ...] = (9,), exclude_folds: tuple[int, ...] = (10,),
                 val_fraction: float = 0.2, link: bool = False, csv: str = DATABASE_CSV,
                 catalogue: Catalogue | None = None) -> ImportReport:
    """Write a new site at `dest` from the collection at `source` (read only); return the import report.
    `catalogue`: the tasks the mapping may name (None: the shipped catalogue)."""
    source, dest = Path(source), Path(dest)
    if hz not in (100, 500):
        raise ImportFailure(f"--hz {hz}: PTB-XL records are at 100 or 500 Hz")
    if split not in ("folds", "patients"):
        raise ImportFailure(f"--split {split!r}: one of folds, patients")
    file_column = "filename_lr" if hz == 100 else "filename_hr"
    by_fold = split == "folds" and role == "hospital"
    table = read_csv(source / csv, ("ecg_id", "patient_id", "scp_codes", file_column)
                     + (("strat_fold",) if by_fold else ()))
    rules = load_mapping(mapping)
    check_tasks(rules, "ecg", role, str(mapping or "the default mapping"), catalogue)
    classes = code_classes(source)
    known = set(classes) | {c for rule in rules.values() for c in rule["yes_codes"] + rule["no_codes"]}
    options = {"hz": hz, "mapping": str(mapping) if mapping else "default", "min_likelihood": min_likelihood,
               "split": split, "val_folds": list(val_folds), "exclude_folds": list(exclude_folds),
               "val_fraction": val_fraction, "link": link, "role": role}
    report = ImportReport("ptbxl", source.name, options, rows_read=len(table))
    records = _usable_records(source, table, report, csv, file_column, known, role, split, val_folds,
                              exclude_folds, val_fraction)
    with staging(dest) as stage:
        rows = []
        for ecg_id, (codes, split_name, relative) in records.items():
            labelled = {task: label(codes, rule, classes, min_likelihood) for task, rule in rules.items()}
            for task, value in labelled.items():
                if value is None:
                    report.skip(f"not labelled for {task}")
                    continue
                rows.append({"sample_id": f"{task}-{ecg_id}", "task": task, "modality": "ecg",
                             "split": split_name, "label": value, "answer": "Yes" if value else "No",
                             "ecg_path": f"ecg/{relative}.hea"})
            if any(v is not None for v in labelled.values()):
                report.files_copied += _copy_record(source / relative, stage / "ecg" / relative, link)
        write_site(stage, rows, report, site_id=site_id, role=role, description=description)
    return report


def _usable_records(source, table, report, csv, file_column, known, role, split, val_folds, exclude_folds,
                    val_fraction) -> dict[str, tuple[dict, str, str]]:
    """ecg_id -> (codes, split, record path relative to source) for every row that passes the checks."""
    records: dict[str, tuple[dict, str, str]] = {}
    patient_split_of: dict[str, str] = {}
    seen: set[str] = set()
    for position, row in enumerate(table.to_dict("records")):
        line, ecg_id = csv_line(position), clean_id(row["ecg_id"])
        if not ecg_id:
            report.problem(csv, line, "ecg_id", "blank ecg_id", "bad ecg_id")
            continue
        if ecg_id in seen:
            report.problem(csv, line, "ecg_id", f"duplicate ecg_id {ecg_id}", "duplicate id")
            continue
        seen.add(ecg_id)
        codes = parse_codes(row["scp_codes"])
        if codes is None:
            report.problem(csv, line, "scp_codes", f"not a dict literal of code -> likelihood: "
                           f"{row['scp_codes'][:60]!r}", "unparseable scp_codes")
            continue
        unknown = sorted(set(codes) - known)
        if unknown:
            report.problem(csv, line, "scp_codes", f"unknown SCP code(s) {unknown}", "unknown code")
            continue
        patient = clean_id(row["patient_id"])
        if role in SERVER_SPLITS:
            split_name = role
        elif split == "patients":
            split_name = patient_split(patient, val_fraction)
        else:
            try:
                fold = int(float(row["strat_fold"]))
            except ValueError:
                report.problem(csv, line, "strat_fold", f"not a fold number: {row['strat_fold']!r}", "bad fold")
                continue
            if fold in exclude_folds:
                report.skip("excluded fold")
                continue
            split_name = "val" if fold in val_folds else "train"
            first = patient_split_of.setdefault(patient, split_name)
            if first != split_name:  # a patient never spans train and val: follow its first record
                report.problems.append(Problem(csv, line, "strat_fold", f"patient {patient} also has records in "
                                               f"{first}: put in {first}"))
                split_name = first
        relative = str(row[file_column]).strip()
        record = inside(source, relative) if relative else None
        if record is None:
            report.problem(csv, line, file_column, f"blank or outside the collection: {relative!r}", "bad path")
            continue
        reason = check_record(record)
        if reason:
            report.problem(csv, line, file_column, f"{relative}: {reason}",
                           "missing file" if reason.startswith("file missing") else "bad record")
            continue
        records[ecg_id] = (codes, split_name, record.relative_to(source.resolve()).as_posix())
    return records


def _copy_record(record: Path, target: Path, link: bool) -> int:
    """Copy a WFDB record's header and the signal files it names; the number of files."""
    names = {record.with_suffix(".hea").name, *wfdb.rdheader(str(record)).file_name}
    for name in sorted(names):
        place(record.parent / name, target.parent / name, link)
    return len(names)
