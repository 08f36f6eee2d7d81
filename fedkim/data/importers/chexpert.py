"""CheXpert- and MIMIC-CXR-JPG-style chest X-ray collections: finding columns holding 1 / 0 / -1 / blank.

    chexpert  one CSV (default train.csv) with `Path` (e.g. CheXpert-v1.0-small/train/patient00001/study1/
              view1_frontal.jpg, relative to SOURCE or to its parent), `Frontal/Lateral`, `AP/PA` and findings
    mimic     mimic-cxr-2.0.0-chexpert.csv (subject_id, study_id, findings) joined on (subject_id, study_id)
              with mimic-cxr-2.0.0-metadata.csv (dicom_id, subject_id, study_id, ViewPosition); images under
              files/p10/p10000032/s50414267/<dicom_id>.jpg (or .png, .dcm)

A finding column maps to a catalogue task (default `Lung Opacity` -> lung_opacity; for a test-role site also the
zero-shot findings). 1 -> Yes, 0 -> No, -1 (uncertain) by the policy ignore (left out), zeros or ones; a blank
cell leaves the image unlabelled for that task.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from fedkim.data.formats import FormatError
from fedkim.data.formats.image import decode_image
from fedkim.data.catalogue import Catalogue
from fedkim.data.importers.common import (ImportFailure, ImportReport, check_tasks, clean_id, csv_line, inside,
                                          patient_split, place, read_csv, staging, write_site)
from fedkim.members import SERVER_SPLITS

MIMIC_LABELS = "mimic-cxr-2.0.0-chexpert.csv"
MIMIC_METADATA = "mimic-cxr-2.0.0-metadata.csv"
CHEXPERT_CSV = "train.csv"
TRAIN_FINDINGS = {"Lung Opacity": "lung_opacity"}
ZERO_SHOT_FINDINGS = {"Enlarged Cardiomediastinum": "enlarged_cardiomediastinum", "Atelectasis": "atelectasis",
                      "Pleural Effusion": "pleural_effusion"}
UNCERTAIN_POLICIES = {"ignore": None, "zeros": 0, "ones": 1}  # CheXpert's U-Ignore, U-Zeros, U-Ones
VALUES = {"1": 1, "1.0": 1, "0": 0, "0.0": 0, "-1": -1, "-1.0": -1}
FRONTAL_VIEWS = ("PA", "AP")
MIMIC_SUFFIXES = (".jpg", ".png", ".dcm")


@dataclass
class Radiograph:
    key: str  # unique within the collection: part of the sample ids
    patient: str
    file: Path  # resolved, inside SOURCE
    labels_file: str
    labels_line: int
    values: dict[str, str]  # finding column -> cell


def finding_tasks(mapping: Path | None, pairs: dict[str, str] | None, role: str) -> dict[str, str]:
    """finding column -> task: a YAML/JSON file, else COLUMN=TASK pairs, else the default for the role."""
    if mapping is not None:
        try:
            raw = yaml.safe_load(Path(mapping).read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ImportFailure(f"{mapping}: cannot read the mapping ({exc})") from None
        if not isinstance(raw, dict) or not raw or not all(isinstance(v, str) for v in raw.values()):
            raise ImportFailure(f"{mapping}: expected a mapping finding column -> task name")
        return {str(k): v for k, v in raw.items()}
    if pairs:
        return dict(pairs)
    return TRAIN_FINDINGS | (ZERO_SHOT_FINDINGS if role == "test" else {})


def cell_label(cell: str, uncertain: str) -> tuple[int | None, str | None]:
    """(label or None, problem or None) for one finding cell."""
    text = cell.strip()
    if not text:
        return None, None
    if text not in VALUES:
        return None, f"unknown value {text!r} (expected 1, 0, -1 or blank)"
    value = VALUES[text]
    return (UNCERTAIN_POLICIES[uncertain], None) if value == -1 else (value, None)


def import_chexpert(source: Path, dest: Path, *, site_id: str, role: str = "hospital", description: str = "",
                    csv: str | None = None, metadata: str | None = None, mapping: Path | None = None,
                    findings: dict[str, str] | None = None, uncertain: str = "ignore", views: str = "frontal",
                    val_fraction: float = 0.2, link: bool = False, catalogue: Catalogue | None = None) -> ImportReport:
    """Write a new site at `dest` from the collection at `source` (read only); return the import report.
    `catalogue`: the tasks the mapping may name (None: the shipped catalogue)."""
    source, dest = Path(source), Path(dest)
    if uncertain not in UNCERTAIN_POLICIES:
        raise ImportFailure(f"--uncertain {uncertain!r}: one of {', '.join(UNCERTAIN_POLICIES)}")
    if views not in ("frontal", "all"):
        raise ImportFailure(f"--views {views!r}: one of frontal, all")
    tasks = finding_tasks(mapping, findings, role)
    check_tasks(tasks.values(), "image", role, str(mapping or "the finding mapping"), catalogue)
    mimic = metadata is not None or (csv is None and _shipped(source, MIMIC_LABELS) is not None)
    layout = "mimic" if mimic else "chexpert"
    options = {"layout": layout, "findings": tasks, "uncertain": uncertain, "views": views,
               "val_fraction": val_fraction, "link": link, "role": role}
    report = ImportReport("chexpert", source.name, options)
    images = (_mimic_images(source, csv or _shipped(source, MIMIC_LABELS) or MIMIC_LABELS,
                            metadata or _shipped(source, MIMIC_METADATA) or MIMIC_METADATA, tasks, views, report)
              if mimic else _chexpert_images(source, csv or CHEXPERT_CSV, tasks, views, report))
    with staging(dest) as stage:
        rows, reported = [], set()
        for image in images:
            labels = {}
            for column, task in tasks.items():
                value, problem = cell_label(image.values[column], uncertain)
                if problem:  # a MIMIC study's cell is shared by its images: reported once
                    if (image.labels_file, image.labels_line, column) not in reported:
                        reported.add((image.labels_file, image.labels_line, column))
                        report.problem(image.labels_file, image.labels_line, column, problem, "unknown value")
                elif value is None:
                    report.skip("blank finding" if not image.values[column].strip() else "uncertain (ignored)")
                else:
                    labels[task] = value
            if not labels:
                continue
            relative = image.file.relative_to(source.resolve()).as_posix()
            place(image.file, stage / "images" / relative, link)
            report.files_copied += 1
            split = role if role in SERVER_SPLITS else patient_split(image.patient, val_fraction)
            rows += [{"sample_id": f"{task}-{image.key}", "task": task, "modality": "image", "split": split,
                      "label": value, "answer": "Yes" if value else "No", "image_path": f"images/{relative}"}
                     for task, value in labels.items()]
        write_site(stage, rows, report, site_id=site_id, role=role, description=description)
    return report


def _shipped(source: Path, name: str) -> str | None:
    """`name` or `name`.gz (as MIMIC-CXR-JPG ships its tables) when SOURCE holds it."""
    return next((n for n in (name, f"{name}.gz") if (source / n).is_file()), None)


def _chexpert_images(source: Path, csv: str, tasks: dict, views: str, report: ImportReport) -> list[Radiograph]:
    view_column = ("Frontal/Lateral",) if views == "frontal" else ()
    table = read_csv(source / csv, ("Path", *view_column, *tasks))
    report.rows_read = len(table)
    images, seen = [], set()
    for position, row in enumerate(table.to_dict("records")):
        line, path = csv_line(position), row["Path"].strip()
        if views == "frontal" and row["Frontal/Lateral"].strip().lower() != "frontal":
            report.skip("not frontal")
            continue
        file = _chexpert_file(source, path)
        if file in seen:
            report.problem(csv, line, "Path", f"duplicate path {path}", "duplicate id")
            continue
        seen.add(file)
        problem = _image_problem(file, path)
        if problem:
            report.problem(csv, line, "Path", problem, "missing file" if "not found" in problem else "bad image")
            continue
        relative = file.relative_to(source.resolve())
        match = re.search(r"patient\w+", path)
        patient = match.group(0) if match else relative.parts[-3] if len(relative.parts) >= 3 else path
        key = relative.with_suffix("").as_posix().replace("/", "_")
        images.append(Radiograph(key, patient, file, csv, line, {c: row[c] for c in tasks}))
    return images


def _chexpert_file(source: Path, path: str) -> Path | None:
    """`Path` resolved under SOURCE, or under it without the first part (SOURCE is CheXpert-v1.0-small)."""
    candidates = [path] + (["/".join(Path(path).parts[1:])] if len(Path(path).parts) > 1 else [])
    resolved = [inside(source, c) for c in candidates if c]
    return next((p for p in resolved if p is not None and p.is_file()), resolved[0] if resolved else None)


def _image_problem(file: Path | None, shown: str) -> str | None:
    if file is None:
        return f"{shown}: outside the collection"
    if not file.is_file():
        return f"{shown}: file not found"
    try:
        decode_image(file)
    except FormatError as exc:
        return f"{shown}: {exc.reason}"
    return None


def _mimic_images(source: Path, csv: str, metadata: str, tasks: dict, views: str,
                  report: ImportReport) -> list[Radiograph]:
    labels = read_csv(source / csv, ("subject_id", "study_id", *tasks))
    meta = read_csv(source / metadata, ("dicom_id", "subject_id", "study_id",
                                        *(("ViewPosition",) if views == "frontal" else ())))
    report.rows_read = len(meta)
    studies: dict[tuple[str, str], tuple[int, dict]] = {}
    for position, row in enumerate(labels.to_dict("records")):
        study = (clean_id(row["subject_id"]), clean_id(row["study_id"]))
        if study in studies:
            report.problem(csv, csv_line(position), "study_id", f"duplicate study {study[1]} of subject "
                           f"{study[0]}", "duplicate id")
            continue
        studies[study] = (csv_line(position), {c: row[c] for c in tasks})
    images, seen = [], set()
    for position, row in enumerate(meta.to_dict("records")):
        line, dicom_id = csv_line(position), row["dicom_id"].strip()
        subject, study_id = clean_id(row["subject_id"]), clean_id(row["study_id"])
        if views == "frontal" and row["ViewPosition"].strip().upper() not in FRONTAL_VIEWS:
            report.skip("not frontal")
            continue
        if dicom_id in seen:
            report.problem(metadata, line, "dicom_id", f"duplicate dicom_id {dicom_id}", "duplicate id")
            continue
        seen.add(dicom_id)
        if (subject, study_id) not in studies:
            report.skip("study without labels")
            continue
        stem = f"files/p{subject[:2]}/p{subject}/s{study_id}/{dicom_id}"
        found = [inside(source, stem + suffix) for suffix in MIMIC_SUFFIXES]
        file = next((p for p in found if p is not None and p.is_file()), found[0])
        problem = _image_problem(file, stem + "(.jpg|.png|.dcm)" if file is None or not file.is_file() else
                                 file.relative_to(source.resolve()).as_posix())
        if problem:
            report.problem(metadata, line, "dicom_id", problem, "missing file" if "not found" in problem
                           else "bad image")
            continue
        labels_line, values = studies[(subject, study_id)]
        images.append(Radiograph(dicom_id, subject, file, csv, labels_line, values))
    return images
