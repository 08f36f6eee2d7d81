"""The PTB-XL-style ECG importer on tiny collections in PTB-XL's exact layout (CSV + WFDB records)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from fedkim.data.importers import ImportFailure, import_collection
from fedkim.data.siteformat import read_index, read_manifest
from fedkim.data.validate import validate_site
from tests.helpers.collections import (PTBXL_RECORDS, PTBXL_YES, gate_rules, ptbxl_record_name, tree_digest,
                                       write_ptbxl)
from tests.helpers.signals import write_wfdb_in
from tests.helpers.sites import synthetic_ecg


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    return write_ptbxl(tmp_path_factory.mktemp("ptbxl") / "ptb-xl")


def _import(source, dest, **options):
    return import_collection("ptbxl", source, dest, site_id="ecg-site", **options)


def test_a_ptbxl_collection_becomes_a_site_that_passes_the_gate(collection, tmp_path):
    before = tree_digest(collection)
    report = _import(collection, tmp_path / "site")
    site = tmp_path / "site"
    assert tree_digest(collection) == before
    assert report.counts == {"ecg_abnormal": {"train": 6, "val": 4}}
    assert report.skipped == {"excluded fold": 2} and report.problems == []
    index = read_index(site)
    labels = {int(s.split("-")[-1]): int(v) for s, v in zip(index["sample_id"], index["label"])}
    assert labels == {i: int(i in PTBXL_YES) for i in range(1, 11)}
    assert set(index.loc[index["split"] == "val", "sample_id"]) == {f"ecg_abnormal-{i}" for i in (7, 8, 9, 10)}
    assert all(p.startswith("ecg/records100/") and str(collection) not in p for p in index["ecg_path"])
    assert (site / "ecg/records100/00000/00003_lr.dat").is_file()
    assert read_manifest(site).modalities == ["ecg"]
    saved = json.loads((site / "reports/import.json").read_text())
    assert saved["samples"] == 10 and saved["skipped"] == {"excluded fold": 2}
    gate = validate_site(site, gate_rules(), write_docs=False)
    assert gate.success, gate.summary()


def test_500_hz_records_and_a_patient_level_hash_split(collection, tmp_path):
    report = _import(collection, tmp_path / "site", hz=500, split="patients", val_fraction=0.5,
                     exclude_folds=())
    index = read_index(tmp_path / "site")
    assert sum(report.counts["ecg_abnormal"].values()) == 12
    assert all(p.startswith("ecg/records500/") for p in index["ecg_path"])
    patient = {ecg_id: p for ecg_id, p, _, _ in PTBXL_RECORDS}
    splits = {}
    for sample_id, split in zip(index["sample_id"], index["split"]):
        splits.setdefault(patient[int(sample_id.split("-")[-1])], set()).add(split)
    assert all(len(s) == 1 for s in splits.values()) and {"train", "val"} == set().union(*splits.values())
    assert validate_site(tmp_path / "site", gate_rules(), write_docs=False).success


def test_min_likelihood_and_a_mapping_file_for_a_test_site(collection, tmp_path):
    mapping = tmp_path / "mapping.yaml"
    mapping.write_text("ecg_abnormal:\n  yes_classes: [MI]\n  no_codes: [NORM]\n"
                       "ectopic_beats:\n  yes_codes: [PVC, AFIB]\n  no_codes: [SR]\n")
    report = _import(collection, tmp_path / "site", role="test", mapping=mapping, min_likelihood=50)
    # ecg_abnormal: MI at >= 50 only (3); ASMI at 15 does not count, NORM rows -> No; others unlabelled
    assert report.counts["ecg_abnormal"] == {"test": 7}
    assert report.counts["ectopic_beats"] == {"test": 6}  # SR rows -> No, AFIB -> Yes
    index = read_index(tmp_path / "site")
    assert index.loc[index["sample_id"] == "ectopic_beats-6", "label"].item() == 1
    with pytest.raises(ImportFailure, match="zero-shot"):
        _import(collection, tmp_path / "hospital", mapping=mapping)
    assert not (tmp_path / "hospital").exists()


def test_bad_rows_are_reported_by_file_row_and_column_and_the_rest_imported(tmp_path):
    source = write_ptbxl(tmp_path / "ptb-xl", statements=False)
    table = pd.read_csv(source / "ptbxl_database.csv", dtype=str, keep_default_na=False)
    table.loc[1, "scp_codes"] = "{'XYZ': 100.0}"             # line 3: unknown code
    table.loc[3, "scp_codes"] = "{'NORM': 100.0"             # line 5: unparseable
    table.loc[4, "ecg_id"] = "4"                             # line 6: duplicate of line 5's id
    (source / f"{ptbxl_record_name(6, 100)}.dat").unlink()   # line 7: missing file
    signal = synthetic_ecg(np.random.default_rng(1), fs=100, seconds=10)
    write_wfdb_in(source / ptbxl_record_name(7, 100), signal, 100, "mV")
    header = source / f"{ptbxl_record_name(7, 100)}.hea"     # line 8: mV values declared as uV
    header.write_text(header.read_text().replace("/mV", "/uV"))
    write_wfdb_in(source / ptbxl_record_name(8, 100), signal, 100, "mmHg")  # line 9: not a voltage
    table.to_csv(source / "ptbxl_database.csv", index=False)
    before = tree_digest(source)

    report = _import(source, tmp_path / "site", exclude_folds=())
    problems = {(p.file, p.row, p.column): p.message for p in report.problems}
    assert set(problems) == {("ptbxl_database.csv", 3, "scp_codes"), ("ptbxl_database.csv", 5, "scp_codes"),
                             ("ptbxl_database.csv", 6, "ecg_id"), ("ptbxl_database.csv", 7, "filename_lr"),
                             ("ptbxl_database.csv", 8, "filename_lr"), ("ptbxl_database.csv", 9, "filename_lr")}
    assert "XYZ" in problems[("ptbxl_database.csv", 3, "scp_codes")]
    assert "00006_lr.dat" in problems[("ptbxl_database.csv", 7, "filename_lr")]
    assert "['uV']" in problems[("ptbxl_database.csv", 8, "filename_lr")]
    assert "mmHg" in problems[("ptbxl_database.csv", 9, "filename_lr")]
    assert sum(report.counts["ecg_abnormal"].values()) == 12 - 6
    saved = json.loads((tmp_path / "site/reports/import.json").read_text())
    assert {(p["row"], p["column"]) for p in saved["problems"]} == {(r, c) for _, r, c in problems}
    assert tree_digest(source) == before


def test_a_missing_column_stops_before_anything_is_written(tmp_path):
    source = write_ptbxl(tmp_path / "ptb-xl", records=PTBXL_RECORDS[:2])
    table = pd.read_csv(source / "ptbxl_database.csv").drop(columns=["scp_codes"])
    table.to_csv(source / "ptbxl_database.csv", index=False)
    with pytest.raises(ImportFailure, match=r"ptbxl_database.csv: required column 'scp_codes' missing"):
        _import(source, tmp_path / "site")
    assert not (tmp_path / "site").exists() and [p.name for p in tmp_path.iterdir()] == ["ptb-xl"]


def test_an_existing_site_folder_is_refused_and_left_untouched(collection, tmp_path):
    dest = tmp_path / "site"
    dest.mkdir()
    (dest / "keep.txt").write_text("hospital notes")
    with pytest.raises(ImportFailure, match="not an empty folder"):
        _import(collection, dest)
    assert [p.name for p in dest.iterdir()] == ["keep.txt"] and (dest / "keep.txt").read_text() == "hospital notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site"]
    before = tree_digest(collection)
    with pytest.raises(ImportFailure, match="inside the collection"):
        _import(collection, collection / "site")
    assert tree_digest(collection) == before
