"""The EHR importer on small ICU exports in the layouts hospitals ship: a wide stays table with admission values,
and MIMIC-like chartevents / labevents with a stays table, mixed units included."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from fedkim.cli import app
from fedkim.data.formats.clinical import STATIC_FILE, VARIABLES, read_long, read_static
from fedkim.data.importers import ImportFailure, import_collection
from fedkim.data.loaders import SiteDataset, standardise_clinical
from fedkim.data.siteformat import read_index
from fedkim.data.validate import validate_site
from tests.helpers import small_params_dict
from tests.helpers.collections import (EHR_STAYS, ehr_canonical, ehr_outcome, gate_rules, tree_digest,
                                       write_ehr_long, write_ehr_wide)

runner = CliRunner()


def _import(source, dest, **options):
    return import_collection("ehr", source, dest, site_id="icu-site", **options)


def _expected_counts(index: pd.DataFrame) -> dict:
    return {"mortality": {split: int(n) for split, n in index.groupby("split").size().items()}}


def test_a_wide_admission_values_cohort_becomes_a_site_that_passes_the_gate(tmp_path):
    source = write_ehr_wide(tmp_path / "export")
    before = tree_digest(source)
    report = _import(source, tmp_path / "site")
    site = tmp_path / "site"
    assert tree_digest(source) == before
    index = read_index(site)
    assert len(index) == EHR_STAYS and set(index["clinical_path"]) == {f"clinical/mortality_{s}.parquet"
                                                                     for s in set(index["split"])}
    assert set(index["split"]) == {"train", "val"} and report.counts == _expected_counts(index)
    labels = {int(s.split("-")[1]): int(v) for s, v in zip(index["sample_id"], index["label"])}
    assert labels == {30000 + i: ehr_outcome(i) for i in range(1, EHR_STAYS + 1)}
    per_split = index.groupby("split")["label"].agg(["sum", "count"])
    assert (per_split["sum"] > 0).all() and (per_split["sum"] < per_split["count"]).all()
    patients = {30000 + i: 500 + (i + 1) // 2 for i in range(1, EHR_STAYS + 1)}
    splits = index.groupby(index["sample_id"].map(lambda s: patients[int(s.split("-")[1])]))["split"].nunique()
    assert (splits == 1).all()  # both stays of a patient in one split
    values = read_long(site / "clinical/mortality_train.parquet")
    assert set(values["hour"]) == {0} and set(values["variable"]) == {"heart_rate", "sbp", "lactate"}
    static = read_static(site / STATIC_FILE)
    first = static[static["sample_id"] == "mortality-30001"].set_index("variable")["value"].to_dict()
    assert first == {"age": 41.0, "sex": 0.0, "weight": 61.0}  # stay 1: 'F'
    assert report.problems == [] and report.skipped == {}
    assert json.loads((site / "reports/import.json").read_text())["counts"] == report.counts
    gate = validate_site(site, gate_rules(), write_docs=False)
    assert gate.success and gate.quarantined == [], gate.summary()


def test_long_events_in_mixed_units_read_back_as_the_canonical_values(tmp_path):
    source = write_ehr_long(tmp_path / "export")
    report = _import(source, tmp_path / "site")
    site = tmp_path / "site"
    assert report.problems == [] and sum(report.counts["mortality"].values()) == EHR_STAYS
    stored = pd.concat([read_long(p) for p in sorted((site / "clinical").glob("mortality_*.parquet"))])
    assert set(stored["unit"]) == {"°F", "°C", "mg/dL", "mmol/L", "bpm"}  # as exported, spelled as in UNITS
    assert validate_site(site, gate_rules(), write_docs=False).success
    dataset = SiteDataset(site, hours=6)
    column = {v: i for i, v in enumerate(VARIABLES)}
    assert len(dataset) == EHR_STAYS
    for item in dataset:
        grid = np.full((6, len(VARIABLES)), np.nan, dtype=np.float32)
        for (hour, variable), value in ehr_canonical(int(item["sample_id"].split("-")[1]) - 30000).items():
            grid[hour, column[variable]] = value
        values, mask = standardise_clinical(grid)
        np.testing.assert_array_equal(item["clinical_mask"].numpy(), mask.numpy())
        np.testing.assert_allclose(item["clinical"].numpy(), values.numpy(), atol=1e-5)
        assert item["static_mask"].numpy().tolist() == [1.0, 1.0, 0.0, 0.0]  # age and sex


def test_implausible_values_are_quarantined_by_the_gate_and_the_site_passes(tmp_path):
    source = write_ehr_long(tmp_path / "export")
    chart = pd.read_csv(source / "chartevents.csv")
    chart.loc[chart.index[chart["stay_id"] == 30003][0], "valuenum"] = 900  # heart rate 900 bpm
    chart.to_csv(source / "chartevents.csv", index=False)
    lab = pd.read_csv(source / "labevents.csv")
    lab.loc[lab.index[lab["stay_id"] == 30004][0], "value"] = 3000  # mg/dL: 333 mmol/L
    lab.to_csv(source / "labevents.csv", index=False)
    report = _import(source, tmp_path / "site")
    assert report.problems == []  # plausibility is the gate's judgement, not the importer's
    gate = validate_site(tmp_path / "site", gate_rules(), write_docs=False)
    assert gate.success, gate.summary()
    assert gate.quarantine == {"mortality-30003": ["clinical.physiological_range"],
                               "mortality-30004": ["clinical.physiological_range"]}


def test_bad_rows_are_reported_by_file_row_and_column_and_the_rest_imported(tmp_path):
    source = write_ehr_long(tmp_path / "export")
    stays = pd.read_csv(source / "stays.csv", dtype=str, keep_default_na=False)
    stays.loc[1, "hospital_expire_flag"] = ""             # line 3: stay 30002 without outcome
    stays.loc[2, "hospital_expire_flag"] = "yes"          # line 4: not 0/1
    stays.loc[4, "gender"] = "unknown"                    # line 6: covariate left out, stay kept
    stays.to_csv(source / "stays.csv", index=False)
    chart = pd.read_csv(source / "chartevents.csv", dtype=str, keep_default_na=False)
    first = chart.index[chart["stay_id"] == "30010"][0]
    chart.loc[first, "itemid"] = "999999"                 # unmapped item
    chart.loc[first + 1, "valuenum"] = "see note"         # text value
    chart.loc[first + 2, "valueuom"] = "bananas"          # unit the table does not know
    chart.loc[first + 3, "charttime"] = "2180-08-02 07:00:00"  # before 30010's admission (08:00)
    chart.loc[first + 4, "stay_id"] = "99999"             # no such stay
    chart.to_csv(source / "chartevents.csv", index=False)
    lab = pd.read_csv(source / "labevents.csv", dtype=str, keep_default_na=False)
    lab.loc[0, "unit"] = "mg%"                            # line 2
    lab.to_csv(source / "labevents.csv", index=False)
    before = tree_digest(source)

    report = _import(source, tmp_path / "site")
    row = first + 2
    problems = {(p.file, p.row, p.column): p.message for p in report.problems}
    assert set(problems) == {("stays.csv", 3, "hospital_expire_flag"), ("stays.csv", 4, "hospital_expire_flag"),
                             ("stays.csv", 6, "gender"), ("chartevents.csv", row, "itemid"),
                             ("chartevents.csv", row + 1, "valuenum"), ("chartevents.csv", row + 2, "valueuom"),
                             ("chartevents.csv", row + 3, "charttime"), ("chartevents.csv", row + 4, "stay_id"),
                             ("labevents.csv", 2, "unit")}
    assert "no outcome" in problems[("stays.csv", 3, "hospital_expire_flag")]
    assert "'yes'" in problems[("stays.csv", 4, "hospital_expire_flag")]
    assert "999999" in problems[("chartevents.csv", row, "itemid")]
    assert "see note" in problems[("chartevents.csv", row + 1, "valuenum")]
    assert "bananas" in problems[("chartevents.csv", row + 2, "valueuom")]
    assert "before the ICU admission" in problems[("chartevents.csv", row + 3, "charttime")]
    assert "'mg%' not accepted for lactate" in problems[("labevents.csv", 2, "unit")]
    assert report.skipped["missing outcome"] == 1 and report.skipped["stay left out"] > 0
    index = read_index(tmp_path / "site")
    assert len(index) == EHR_STAYS - 2 and not {"mortality-30002", "mortality-30003"} & set(index["sample_id"])
    saved = json.loads((tmp_path / "site/reports/import.json").read_text())
    assert {(p["file"], p["row"], p["column"]) for p in saved["problems"]} == set(problems)
    assert tree_digest(source) == before


def test_a_mapping_file_names_columns_items_units_and_the_outcome(tmp_path):
    source = write_ehr_wide(tmp_path / "export")
    stays = pd.read_csv(source / "stays.csv").rename(columns={"heart_rate": "HR", "hospital_expire_flag": "died"})
    stays["temp_f"] = 98.6
    stays["hour"] = 2
    stays.to_csv(source / "stays.csv", index=False)
    mapping = tmp_path / "mapping.yaml"
    mapping.write_text(yaml.safe_dump({"outcome": {"column": "died", "task": "mortality"},
                                       "columns": {"HR": "heart_rate", "temp_f": {"variable": "temperature",
                                                                                  "unit": "degF"}}}))
    _import(source, tmp_path / "site", mapping=mapping, role="test")
    values = read_long(tmp_path / "site/clinical/mortality_test.parquet")
    assert set(values["variable"]) == {"heart_rate", "temperature"} and set(values["hour"]) == {2}
    assert set(values.loc[values["variable"] == "temperature", "unit"]) == {"degF"}
    mapping.write_text(yaml.safe_dump({"columns": {"HR": {"variable": "heart_rate", "unit": "furlongs"}}}))
    with pytest.raises(ImportFailure, match="'HR': unit 'furlongs' not accepted for heart_rate"):
        _import(source, tmp_path / "other", mapping=mapping)
    mapping.write_text(yaml.safe_dump({"outcome": {"column": "died", "task": "sepsis"}}))
    with pytest.raises(ImportFailure, match="zero-shot"):
        _import(source, tmp_path / "other", mapping=mapping)
    assert not (tmp_path / "other").exists()


def _params(tmp_path) -> str:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(small_params_dict(tmp_path / "fed", **{"data.gate.min_samples_per_class": 1,
                                                                          "data.gate.min_samples_per_site": 4})))
    return str(path)


def test_the_command_imports_gates_and_refuses_missing_columns_and_an_existing_folder(tmp_path):
    source = write_ehr_long(tmp_path / "export")
    source_before = tree_digest(source)
    site = tmp_path / "icu"
    result = runner.invoke(app, ["site", "import", "ehr", str(source), str(site), "--no-docs",
                                 "--params", _params(tmp_path)])
    assert result.exit_code == 0, result.output
    assert f"{EHR_STAYS} samples" in result.output and "PASS icu" in result.output
    again = runner.invoke(app, ["site", "import", "ehr", str(source), str(site), "--no-docs"])
    assert again.exit_code == 2 and "not an empty folder" in again.output
    broken = tmp_path / "broken"
    broken.mkdir()
    pd.read_csv(source / "stays.csv").to_csv(broken / "stays.csv", index=False)
    pd.read_csv(source / "chartevents.csv").drop(columns=["itemid"]).to_csv(broken / "chartevents.csv",
                                                                            index=False)
    before = tree_digest(broken)
    no_item = runner.invoke(app, ["site", "import", "ehr", str(broken), str(tmp_path / "a"), "--no-docs"])
    assert no_item.exit_code == 2
    assert "chartevents.csv: required column 'itemid' (or 'label', 'item') missing" in no_item.output
    pd.read_csv(source / "chartevents.csv").to_csv(broken / "chartevents.csv", index=False)
    pd.read_csv(source / "stays.csv").drop(columns=["intime"]).to_csv(broken / "stays.csv", index=False)
    no_intime = runner.invoke(app, ["site", "import", "ehr", str(broken), str(tmp_path / "b"), "--no-docs"])
    assert no_intime.exit_code == 2 and "stays.csv: required column 'intime' missing" in no_intime.output
    no_file = runner.invoke(app, ["site", "import", "ehr", str(broken), str(tmp_path / "c"), "--no-docs",
                                  "--events", "labevents.csv"])
    assert no_file.exit_code == 2 and "labevents.csv: file not found" in no_file.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "export", "icu", "params.yaml"]
    assert tree_digest(source) == source_before and set(tree_digest(broken)) == set(before)


def test_events_with_hour_offsets_and_item_labels_need_no_admission_time(tmp_path):
    source = write_ehr_wide(tmp_path / "export", stays=8)
    pd.DataFrame([{"stay_id": 30000 + i, "hour": offset, "label": "Respiratory Rate", "value": 18,
                   "unit": "insp/min"} for i in range(1, 9) for offset in ("1.5", "30", "-0.5")]
                 ).to_csv(source / "events.csv", index=False)
    report = _import(source, tmp_path / "site", role="public")
    values = read_long(tmp_path / "site/clinical/mortality_public.parquet")
    rates = values[values["variable"] == "resp_rate"]
    assert sorted(set(rates["hour"])) == [1, 30] and set(rates["unit"]) == {"insp/min"}
    assert {(p.row, p.column) for p in report.problems} == {(4 + 3 * k, "hour") for k in range(8)}
    assert all("before the ICU admission" in p.message for p in report.problems)
