"""Tiny collections in the layouts public data sets ship, for the importer tests:

    write_ptbxl(root)        ptbxl_database.csv + scp_statements.csv + WFDB records100/ and records500/ (10 s)
    write_chexpert(root)     CheXpert-v1.0-small/train.csv + train/patientNNNNN/studyN/viewN_*.jpg (64 px)
    write_mimic(root)        mimic-cxr-2.0.0-chexpert.csv + -metadata.csv + files/p10/p100000NN/sNNNNNNNN/<id>.jpg
    tree_digest(root)        {relative path: sha256} of every file, to show a collection was left unchanged
    gate_rules(**extra)      GateParams for collections of a dozen records

Each returns the expected labels so that tests can count what an import must produce.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd

from fedkim.config import GateParams
from fedkim.data.formats.image import write_dicom
from tests.helpers.signals import write_pillow, write_wfdb_in
from tests.helpers.sites import synthetic_ecg, synthetic_image

# ecg_id, patient_id, scp_codes, strat_fold: with the default mapping and folds (9 -> val, 10 left out)
# train: 3 No (1, 2, 4), 3 Yes (3 MI, 5 HYP, 6 AFIB); val: 2 No (7, 10), 2 Yes (8 CD, 9 STTC); 11, 12 left out
PTBXL_RECORDS = [
    (1, 101, {"NORM": 100.0, "SR": 0.0}, 1), (2, 101, {"NORM": 80.0, "SR": 0.0}, 1),
    (3, 102, {"IMI": 100.0, "SR": 0.0}, 2), (4, 103, {"NORM": 100.0}, 3),
    (5, 104, {"LVH": 50.0, "SR": 0.0}, 4), (6, 105, {"AFIB": 0.0}, 5),
    (7, 106, {"NORM": 100.0, "SR": 0.0}, 9), (8, 106, {"CLBBB": 100.0}, 9),
    (9, 107, {"NDT": 100.0}, 9), (10, 108, {"NORM": 100.0}, 9),
    (11, 109, {"NORM": 100.0}, 10), (12, 110, {"ASMI": 15.0}, 10),
]
PTBXL_YES = {3, 5, 6, 8, 9, 12}
STATEMENTS = {"NORM": "NORM", "IMI": "MI", "ASMI": "MI", "LVH": "HYP", "CLBBB": "CD", "NDT": "STTC",
              "SR": "", "AFIB": "", "PVC": ""}
FINDINGS = ("Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Atelectasis", "Pleural Effusion")


def gate_rules(**extra) -> GateParams:
    return GateParams(**{"min_samples_per_class": 1, "min_samples_per_site": 4, **extra})


def tree_digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


def ptbxl_record_name(ecg_id: int, hz: int) -> str:
    return f"records{hz}/00000/{ecg_id:05d}_{'lr' if hz == 100 else 'hr'}"


def write_ptbxl(root: Path, records=PTBXL_RECORDS, statements: bool = True, seed: int = 0) -> Path:
    root = Path(root)
    rng = np.random.default_rng(seed)
    rows = []
    for ecg_id, patient, codes, fold in records:
        for hz in (100, 500):
            record = root / ptbxl_record_name(ecg_id, hz)
            record.parent.mkdir(parents=True, exist_ok=True)
            write_wfdb_in(record, synthetic_ecg(rng, fs=hz, seconds=10), hz, "mV")
        rows.append({"ecg_id": ecg_id, "patient_id": float(patient), "age": 60, "sex": 0, "scp_codes": str(codes),
                     "strat_fold": fold, "filename_lr": ptbxl_record_name(ecg_id, 100),
                     "filename_hr": ptbxl_record_name(ecg_id, 500)})
    pd.DataFrame(rows).to_csv(root / "ptbxl_database.csv", index=False)
    if statements:
        table = pd.DataFrame({"description": list(STATEMENTS), "diagnostic": [1.0 if c else "" for c in
                                                                               STATEMENTS.values()],
                              "diagnostic_class": list(STATEMENTS.values())}, index=list(STATEMENTS))
        table.to_csv(root / "scp_statements.csv")
    return root


def write_chexpert(root: Path, patients: int = 12, seed: int = 0) -> tuple[Path, pd.DataFrame]:
    """SOURCE = root/CheXpert-v1.0-small; each patient one frontal (JPEG, one PNG, one DICOM) and one lateral
    view. Lung Opacity cycles 1, 0, 1, 0, ... with patient 3 uncertain (-1) and patient 4 blank."""
    source = Path(root) / "CheXpert-v1.0-small"
    rng = np.random.default_rng(seed)
    rows = []
    for n in range(1, patients + 1):
        folder = source / f"train/patient{n:05d}/study1"
        folder.mkdir(parents=True, exist_ok=True)
        suffix = {5: ".png", 6: ".dcm"}.get(n, ".jpg")
        frontal, lateral = folder / f"view1_frontal{suffix}", folder / "view2_lateral.jpg"
        if suffix == ".dcm":
            write_dicom(frontal, synthetic_image(rng, 64), sample_id=f"p{n}", site_id="chexpert")
        else:
            write_pillow(frontal, synthetic_image(rng, 64))
        write_pillow(lateral, synthetic_image(rng, 64))
        opacity = {3: "-1.0", 4: ""}.get(n, "1.0" if n % 2 else "0.0")
        values = {"Enlarged Cardiomediastinum": "0.0" if n % 3 else "1.0", "Cardiomegaly": "",
                  "Lung Opacity": opacity, "Atelectasis": "1.0" if n % 2 == 0 else "0.0",
                  "Pleural Effusion": "-1.0" if n == 7 else ("1.0" if n % 4 == 0 else "0.0")}
        for image, view in ((frontal, "Frontal"), (lateral, "Lateral")):
            rows.append({"Path": f"CheXpert-v1.0-small/{image.relative_to(source).as_posix()}", "Sex": "Female",
                         "Age": 50, "Frontal/Lateral": view, "AP/PA": "PA" if view == "Frontal" else "",
                         "No Finding": "", **values})
    table = pd.DataFrame(rows)
    table.to_csv(source / "train.csv", index=False)
    return source, table


def write_mimic(root: Path, subjects: int = 10, seed: int = 0) -> tuple[Path, pd.DataFrame, pd.DataFrame]:
    """Each subject one study with a PA image and a LATERAL one; Lung Opacity alternates 1.0 / 0.0."""
    source = Path(root)
    rng = np.random.default_rng(seed)
    labels, meta = [], []
    for n in range(subjects):
        subject, study = 10000032 + n, 50000000 + n
        folder = source / f"files/p{str(subject)[:2]}/p{subject}/s{study}"
        folder.mkdir(parents=True, exist_ok=True)
        for view in ("PA", "LATERAL"):
            dicom_id = f"{n:04d}{view.lower()}-{seed}"
            write_pillow(folder / f"{dicom_id}.jpg", synthetic_image(rng, 64))
            meta.append({"dicom_id": dicom_id, "subject_id": subject, "study_id": study, "ViewPosition": view,
                         "Rows": 64, "Columns": 64})
        labels.append({"subject_id": subject, "study_id": study, **{f: "" for f in FINDINGS},
                       "Lung Opacity": "1.0" if n % 2 else "0.0"})
    label_table, meta_table = pd.DataFrame(labels), pd.DataFrame(meta)
    label_table.to_csv(source / "mimic-cxr-2.0.0-chexpert.csv", index=False)
    meta_table.to_csv(source / "mimic-cxr-2.0.0-metadata.csv", index=False)
    return source, label_table, meta_table


# ICU exports: stay i (1..EHR_STAYS) belongs to patient 500 + (i + 1) // 2 (two stays for most patients) and dies
# when i % 3 == 0. Canonical values: heart rate 70 + i % 10 + hour, temperature 37 + hour / 10 degC, lactate
# 1.5 + (i % 5) / 10 mmol/L at hours 1 and 3; exported in degF / mg/dL for even stays.
EHR_STAYS = 40
EHR_START = pd.Timestamp("2180-07-23 08:00:00")


def ehr_outcome(stay: int) -> int:
    return int(stay % 3 == 0)


def ehr_canonical(stay: int) -> dict[tuple[int, str], float]:
    """(hour, variable) -> the canonical value the events of `stay` encode (heart rate at hour 2: the mean of
    two measurements)."""
    values = {(h, "heart_rate"): 70.0 + stay % 10 + h for h in range(6)}
    values |= {(h, "temperature"): 37.0 + h / 10 for h in range(6)}
    values |= {(h, "lactate"): 1.5 + (stay % 5) / 10 for h in (1, 3)}
    return values


def write_ehr_wide(root: Path, stays: int = EHR_STAYS) -> Path:
    """SOURCE/stays.csv with admission values in columns, static covariates and the outcome."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    pd.DataFrame([{"stay_id": 30000 + i, "patient_id": 500 + (i + 1) // 2, "age": 40 + i, "sex": "MF"[i % 2],
                   "weight_kg": 60 + i, "heart_rate": 70 + i % 10, "sbp": 110 + i, "lactate": 1.5 + (i % 5) / 10,
                   "hospital_expire_flag": ehr_outcome(i)} for i in range(1, stays + 1)]
                 ).to_csv(root / "stays.csv", index=False)
    return root


def write_ehr_long(root: Path, stays: int = EHR_STAYS) -> Path:
    """SOURCE/stays.csv (intime, outcome, static covariates) + chartevents.csv (itemid, valuenum, valueuom) +
    labevents.csv (label, value, unit), MIMIC-IV's itemids and labels, mixed units."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    stay_rows, chart, lab = [], [], []
    for i in range(1, stays + 1):
        stay, intime = 30000 + i, EHR_START + pd.Timedelta(days=i)
        stay_rows.append({"subject_id": 500 + (i + 1) // 2, "stay_id": stay, "intime": str(intime),
                          "anchor_age": 40 + i, "gender": "MF"[i % 2], "hospital_expire_flag": ehr_outcome(i)})
        values = ehr_canonical(i)
        for (hour, variable), value in values.items():
            at = intime + pd.Timedelta(hours=hour, minutes=10)
            if variable == "heart_rate":
                repeat = [value - 2, value + 2] if hour == 2 else [value]
                chart += [{"stay_id": stay, "charttime": str(at + pd.Timedelta(minutes=30 * k)), "itemid": 220045,
                           "valuenum": v, "valueuom": "bpm"} for k, v in enumerate(repeat)]
            elif variable == "temperature" and i % 2 == 0:
                chart.append({"stay_id": stay, "charttime": str(at), "itemid": 223761,
                              "valuenum": round(value * 9 / 5 + 32, 3), "valueuom": "°F"})
            elif variable == "temperature":
                chart.append({"stay_id": stay, "charttime": str(at), "itemid": 223762, "valuenum": value,
                              "valueuom": "°C"})
            else:
                lab.append({"stay_id": stay, "charttime": str(at), "label": "Lactate",
                            "value": round(value * 9.01, 4) if i % 2 == 0 else value,
                            "unit": "mg/dL" if i % 2 == 0 else "mmol/l"})
    pd.DataFrame(stay_rows).to_csv(root / "stays.csv", index=False)
    pd.DataFrame(chart).to_csv(root / "chartevents.csv", index=False)
    pd.DataFrame(lab).to_csv(root / "labevents.csv", index=False)
    return root
