"""The CheXpert / MIMIC-CXR-JPG importer on tiny collections in both layouts (CSV + JPEG / PNG / DICOM)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from fedkim.data.importers import ImportFailure, import_collection
from fedkim.data.siteformat import read_index
from fedkim.data.validate import validate_site
from tests.helpers.collections import gate_rules, tree_digest, write_chexpert, write_mimic

# write_chexpert's 12 patients at val_fraction 0.3: patients 2, 4, 8 and 9 in val
VAL_PATIENTS = {2, 4, 8, 9}


@pytest.fixture(scope="module")
def chexpert(tmp_path_factory):
    return write_chexpert(tmp_path_factory.mktemp("chexpert"))[0]


def _import(source, dest, **options):
    return import_collection("chexpert", source, dest, site_id="cxr-site", val_fraction=0.3, **options)


def _patients(index: pd.DataFrame) -> dict[int, set[str]]:
    splits = {}
    for sample_id, split in zip(index["sample_id"], index["split"]):
        patient = int(sample_id.split("patient")[1][:5])
        splits.setdefault(patient, set()).add(split)
    return splits


def test_a_chexpert_collection_becomes_a_site_that_passes_the_gate(chexpert, tmp_path):
    before = tree_digest(chexpert)
    report = _import(chexpert, tmp_path / "site")
    assert tree_digest(chexpert) == before
    # frontal only; patient 3 uncertain (ignored), patient 4 blank
    assert report.counts == {"lung_opacity": {"train": 7, "val": 3}}
    assert report.skipped == {"not frontal": 12, "uncertain (ignored)": 1, "blank finding": 1}
    index = read_index(tmp_path / "site")
    assert {p for p, s in _patients(index).items() if s == {"val"}} == VAL_PATIENTS - {4}
    assert all(len(s) == 1 for s in _patients(index).values())
    assert all(p.startswith("images/train/patient") and "lateral" not in p for p in index["image_path"])
    assert {p.rsplit(".", 1)[1] for p in index["image_path"]} == {"jpg", "png", "dcm"}
    yes = set(index.loc[index["label"] == 1, "sample_id"])
    assert yes == {f"lung_opacity-train_patient{n:05d}_study1_view1_frontal" for n in (1, 5, 7, 9, 11)}
    gate = validate_site(tmp_path / "site", gate_rules(), write_docs=False)
    assert gate.success, gate.summary()


@pytest.mark.parametrize("policy, train_yes, train_no", [("ones", 5, 3), ("zeros", 4, 4)])
def test_the_uncertain_label_policy(chexpert, tmp_path, policy, train_yes, train_no):
    _import(chexpert, tmp_path / "site", uncertain=policy)
    index = read_index(tmp_path / "site")
    train = index[index["split"] == "train"]
    assert (int((train["label"] == 1).sum()), int((train["label"] == 0).sum())) == (train_yes, train_no)


def test_a_test_site_holds_the_zero_shot_findings(chexpert, tmp_path):
    report = _import(chexpert, tmp_path / "site", role="test", views="all")
    assert report.counts == {"lung_opacity": {"test": 20}, "enlarged_cardiomediastinum": {"test": 24},
                             "atelectasis": {"test": 24}, "pleural_effusion": {"test": 22}}
    assert validate_site(tmp_path / "site", gate_rules(), write_docs=False).success
    with pytest.raises(ImportFailure, match="zero-shot"):
        _import(chexpert, tmp_path / "hospital", findings={"Atelectasis": "atelectasis"})


def test_a_mimic_cxr_jpg_collection(tmp_path):
    source, labels, meta = write_mimic(tmp_path / "mimic")
    before = tree_digest(source)
    report = _import(source, tmp_path / "site")
    assert tree_digest(source) == before
    assert report.counts == {"lung_opacity": {"train": 7, "val": 3}} and report.skipped == {"not frontal": 10}
    index = read_index(tmp_path / "site")
    assert all(p.startswith("images/files/p10/p100000") and p.endswith("pa-0.jpg") for p in index["image_path"])
    assert validate_site(tmp_path / "site", gate_rules(), write_docs=False).success


def test_bad_rows_are_reported_by_file_row_and_column_and_the_rest_imported(tmp_path):
    source, table = write_chexpert(tmp_path / "collection")
    table.loc[0, "Lung Opacity"] = "2"             # line 2: patient 1 frontal
    table.loc[10, "Lung Opacity"] = "yes"          # line 12: patient 6 frontal
    table.loc[10, "Atelectasis"] = "1.0"
    (source / table.loc[14, "Path"].split("/", 1)[1]).unlink()  # line 16: patient 8's frontal image
    table.loc[18, "Path"] = table.loc[16, "Path"].split("/", 1)[1]  # line 20: line 18's file, SOURCE-relative
    table.loc[18, "Frontal/Lateral"] = "Frontal"
    table.to_csv(source / "train.csv", index=False)
    report = _import(source, tmp_path / "site", findings={"Lung Opacity": "lung_opacity"})
    problems = {(p.file, p.row, p.column): p.message for p in report.problems}
    assert set(problems) == {("train.csv", 2, "Lung Opacity"), ("train.csv", 12, "Lung Opacity"),
                             ("train.csv", 16, "Path"), ("train.csv", 20, "Path")}
    assert "'yes'" in problems[("train.csv", 12, "Lung Opacity")] and "file not found" in problems[
        ("train.csv", 16, "Path")]
    assert sum(report.counts["lung_opacity"].values()) == 10 - 4  # patients 1, 6, 8 and 10 (its row replaced)
    saved = json.loads((tmp_path / "site/reports/import.json").read_text())
    assert len(saved["problems"]) == 4 and saved["skipped"]["unknown value"] == 2


def test_a_missing_finding_column_stops_before_anything_is_written(tmp_path):
    source, table = write_mimic(tmp_path / "mimic", subjects=2)[:2]
    table.drop(columns=["Lung Opacity"]).to_csv(source / "mimic-cxr-2.0.0-chexpert.csv", index=False)
    with pytest.raises(ImportFailure, match=r"mimic-cxr-2.0.0-chexpert.csv: required column 'Lung Opacity'"):
        _import(source, tmp_path / "site")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mimic"]


def test_gzipped_mimic_tables_a_mapping_file_and_hard_links(tmp_path):
    source, labels, meta = write_mimic(tmp_path / "mimic", subjects=10)
    for name in ("mimic-cxr-2.0.0-chexpert.csv", "mimic-cxr-2.0.0-metadata.csv"):
        table = pd.read_csv(source / name)
        (source / name).unlink()
        table.to_csv(source / f"{name}.gz", index=False)
    mapping = tmp_path / "findings.json"
    mapping.write_text(json.dumps({"Lung Opacity": "lung_opacity"}))
    _import(source, tmp_path / "site", mapping=mapping, link=True)
    index = read_index(tmp_path / "site")
    first = index["image_path"].iloc[0]
    assert (tmp_path / "site" / first).stat().st_ino == (source / first.removeprefix("images/")).stat().st_ino
    mapping.write_text(json.dumps({"Lung Opacity": "pneumothorax"}))
    with pytest.raises(ImportFailure, match="'pneumothorax' is not in the catalogue"):
        _import(source, tmp_path / "other", mapping=mapping)


def test_no_usable_row_stops_the_import(chexpert, tmp_path):
    with pytest.raises(ImportFailure, match="no usable row"):
        _import(chexpert, tmp_path / "site", findings={"Cardiomegaly": "lung_opacity"})  # a blank column
    assert not (tmp_path / "site").exists() and not list(tmp_path.iterdir())
