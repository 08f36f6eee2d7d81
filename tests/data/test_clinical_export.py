"""ICU data as hospitals export it: units, several values in one hour, sparse and single-variable cohorts, stays
without rows, and static covariates, through the gate, the loader and the clinical encoder."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fedkim.config import DataParams, GateParams, SiteTrainingParams
from fedkim.data.formats import FormatError
from fedkim.data.formats.clinical import STATIC, STATIC_FILE, VARIABLES, read_long, write_static
from fedkim.data.loaders import ClinicalDataset, collate
from fedkim.data.synth.icu import BASELINE
from fedkim.data.validate import validate_site
from fedkim.site.model import ClinicalEncoder, global_model
from tests.helpers.sites import CLINICAL_N, refinalize, write_clinical_rows

N = CLINICAL_N
TRAIN = "clinical/train.parquet"
LACTATE = list(VARIABLES).index("lactate")



def rewrite(site: Path, change, rel: str = TRAIN) -> pd.DataFrame:
    frame = change(read_long(site / rel))
    write_clinical_rows(site / rel, frame)
    refinalize(site)
    return frame


def check(site: Path, **gate):
    return validate_site(site, GateParams(**gate), write_docs=False)


def grid_of(site: Path, sample: str, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """The hours the model reads of one sample, in canonical units (standardisation undone)."""
    data = ClinicalDataset(site, hours={"mortality": 24}, **kwargs)
    item = data[list(data.index["sample_id"]).index(sample)]
    scale = np.array([BASELINE[v][1] * 2 for v in VARIABLES])
    mean = np.array([BASELINE[v][0] for v in VARIABLES])
    mask = item["clinical_mask"].numpy().astype(bool)
    return np.where(mask, item["clinical"].numpy() * scale + mean, np.nan), mask


# -------------------------------------------------------------------------------------------- missingness
@pytest.mark.parametrize("cohort", ["admission_only", "single_variable"])
def test_sparse_cohorts_the_model_can_use_pass(site, cohort):
    for rel in (TRAIN, "clinical/val.parquet"):
        if cohort == "admission_only":  # three admission values, nothing afterwards
            rewrite(site, lambda f: f[(f["hour"] == 0) & f["variable"].isin(["heart_rate", "sbp", "lactate"])],
                    rel)
        else:  # a hospital that exports heart rate only
            rewrite(site, lambda f: f[f["variable"] == "heart_rate"], rel)
    report = check(site)
    assert report.success and report.findings == [], report.summary()
    _, mask = grid_of(site, "mortality-train-0-0")
    assert mask.sum() == (3 if cohort == "admission_only" else 24)


def test_a_stay_without_rows_is_quarantined_and_reads_as_missing(site):
    empty = "mortality-train-1-3"
    rewrite(site, lambda f: f[f["sample_id"] != empty])
    report = check(site)
    assert report.success and report.quarantine == {empty: ["clinical.empty_sample"]}
    found = report.findings[0]
    assert found.rule == "clinical.empty_sample" and found.file == TRAIN and empty in found.examples[0]
    grid, mask = grid_of(site, empty)  # the loader does not crash
    assert grid.shape == (24, len(VARIABLES)) and not mask.any()
    assert len(ClinicalDataset(site, exclude=report.quarantined)) == 4 * N - 1


def test_missingness_is_judged_on_the_hours_the_model_reads(site):
    sample = "mortality-train-0-2"

    def after_window(frame):  # its creatinine only after hour 24: the model never sees it
        late = (frame["sample_id"] == sample) & (frame["variable"] == "creatinine")
        frame.loc[late, "hour"] = 30
        return frame.drop_duplicates(["sample_id", "hour", "variable"])

    rewrite(site, after_window)
    assert check(site).quarantine == {sample: ["clinical.missingness"]}
    assert check(site, min_samples_per_class=1).success  # the longer window of icu_hours=48 reads it
    assert validate_site(site, write_docs=False, icu_hours=48).quarantine == {}
    assert check(site, clinical_min_hours=2, actions={"clinical.missingness": "warn"}).success


# --------------------------------------------------------------------------------------------------- units
def test_lactate_in_mg_per_dl_is_converted(site, tmp_path):
    sample = "mortality-train-0-0"
    mmol = grid_of(site, sample)[0][:, LACTATE]

    def in_mg_per_dl(frame):
        lactate = frame["variable"] == "lactate"
        frame["unit"] = np.where(lactate, "mg/dL", None)
        frame.loc[lactate, "value"] = frame.loc[lactate, "value"] * 9.01
        frame.loc[frame["variable"] == "temperature", "unit"] = "degC"
        return frame

    frame = rewrite(site, in_mg_per_dl)
    assert frame.loc[frame["variable"] == "lactate", "value"].max() > 25  # beyond the mmol/L limit unconverted
    assert check(site).findings == []
    converted = grid_of(site, sample)[0][:, LACTATE]
    assert np.allclose(converted, mmol, rtol=1e-5, equal_nan=True) and np.isfinite(converted).sum() == 4


def test_values_are_judged_after_conversion(site):
    def fahrenheit(frame):  # 37 degC written as 98.6 degF passes; 120 degF (48.9 degC) does not
        temperature = frame["variable"] == "temperature"
        frame["unit"] = np.where(temperature, "degF", None)
        frame.loc[temperature, "value"] = 98.6
        frame.loc[frame.index[temperature][0], "value"] = 120.0
        return frame

    rewrite(site, fahrenheit)
    report = check(site)
    assert report.quarantine == {"mortality-train-0-0": ["clinical.physiological_range"]}
    assert "value=48.8889" in report.findings[0].examples[0]


def test_unknown_unit_names_file_variable_and_unit(site):
    sample = "mortality-train-1-1"

    def mg_percent(frame):
        frame["unit"] = None
        frame.loc[(frame["sample_id"] == sample) & (frame["variable"] == "lactate"), "unit"] = "mg%"
        return frame

    rewrite(site, mg_percent)
    report = check(site)
    found = report.findings[0]
    assert [f.rule for f in report.findings] == ["clinical.units"] and found.file == TRAIN
    assert "lactate in unit 'mg%'" in found.examples[0] and found.samples == [sample]
    assert report.success and report.quarantined == [sample]
    with pytest.raises(FormatError, match=r"train\.parquet: unknown unit\(s\): lactate in 'mg%'"):
        grid_of(site, sample)
    assert len(ClinicalDataset(site, exclude=report.quarantined)) == 4 * N - 1


# ------------------------------------------------------------------------------------------------ duplicates
@pytest.mark.parametrize("rule, expected", [("mean", 2.0), ("first", 1.0), ("last", 3.0), ("max", 3.0)])
def test_several_values_in_one_hour_follow_the_rule(site, rule, expected):
    sample = "mortality-train-0-0"

    def three_lactates(frame):
        extra = pd.DataFrame({"sample_id": sample, "hour": 0, "variable": "lactate", "value": [1.0, 3.0]})
        frame = frame[~((frame["sample_id"] == sample) & (frame["variable"] == "lactate") & (frame["hour"] == 0))]
        first = pd.DataFrame({"sample_id": [sample], "hour": [0], "variable": ["lactate"], "value": [1.0]})
        return pd.concat([first.assign(value=1.0), extra.assign(value=[2.0, 3.0]), frame], ignore_index=True)

    rewrite(site, three_lactates)
    assert check(site).findings == []
    grid, _ = grid_of(site, sample, duplicates=rule)
    assert grid[0, LACTATE] == pytest.approx(expected)


# -------------------------------------------------------------------------------------------- static covariates
def covariates(samples: list[str]) -> pd.DataFrame:
    rows = []
    for n, sample in enumerate(samples):
        rows += [{"sample_id": sample, "variable": "age", "value": 40.0 + n, "unit": "years"},
                 {"sample_id": sample, "variable": "sex", "value": float(n % 2), "unit": None},
                 {"sample_id": sample, "variable": "weight", "value": 150.0 + n, "unit": "lb"}]
    return pd.DataFrame(rows)


def test_static_covariates_are_read_and_change_the_encoder(site):
    samples = list(ClinicalDataset(site).index["sample_id"])
    write_static(site / STATIC_FILE, covariates(samples[1:]))  # the first stay has none
    refinalize(site)
    assert check(site).findings == []
    data = ClinicalDataset(site, hours={"mortality": 24})
    items = [data[i] for i in range(3)]
    assert not items[0]["static_mask"].any()
    age, sex, weight, height = (list(STATIC).index(v) for v in ("age", "sex", "weight", "height"))
    assert items[1]["static_mask"].tolist() == [1.0, 1.0, 1.0, 0.0] and items[1]["static_mask"][height] == 0
    kg = (150.0 * 0.45359237 - STATIC["weight"][3]) / STATIC["weight"][4]
    assert items[1]["static"][weight] == pytest.approx(kg) and items[1]["static"][age] == pytest.approx(
        (40.0 - STATIC["age"][3]) / STATIC["age"][4])

    p = SiteTrainingParams(token_dim=16, clinical_heads=2)
    torch.manual_seed(0)
    encoder = ClinicalEncoder(p).eval()
    batch = collate(items)
    without = {k: v for k, v in batch.items() if not k.startswith("static")}
    older = {**batch, "static": batch["static"] + 1.0}
    with torch.no_grad():
        tokens, plain, shifted = encoder(batch), encoder(without), encoder(older)
    assert tokens.shape == (3, 25, 16) and plain.shape == (3, 24, 16)
    assert not torch.allclose(tokens[:, :24], plain) and not torch.allclose(tokens[1:], shifted[1:])


def test_static_covariates_outside_their_limits_quarantine(site):
    frame = covariates(["mortality-train-0-0", "mortality-train-0-1"])
    frame.loc[0, "value"] = 430.0  # age
    frame.loc[len(frame)] = {"sample_id": "mortality-train-0-1", "variable": "bmi", "value": 24.0, "unit": None}
    write_static(site / STATIC_FILE, frame)
    refinalize(site)
    report = check(site)
    assert report.success and report.quarantine == {"mortality-train-0-0": ["clinical.static_range"]}
    assert [(f.rule, f.action) for f in report.findings] == [("clinical.static_variables", "warn"),
                                                            ("clinical.static_range", "quarantine")]
    (site / STATIC_FILE).write_bytes(b"broken")
    refinalize(site)
    assert [f.rule for f in check(site).blocking] == ["clinical.static_schema"]


# The state of global_model(SiteTrainingParams(), seed=0) before static covariates existed (sha256 over its
# keys and tensors) and the next two draws of the global generator after building it.
BEFORE_DIGEST = "208e7375e74cc9c61a907bb6565d6ba8dbdf6ef098b22732bc83f56884d8264e"
BEFORE_DRAWS = [0.19381171464920044, 0.3066861033439636]


def test_without_static_covariates_the_model_is_the_one_built_before():
    data = DataParams()
    model = global_model(SiteTrainingParams(), data, seed=0)
    draws = torch.rand(2).tolist()
    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        if not key.startswith("encoders.clinical.static."):
            digest.update(key.encode())
            digest.update(value.contiguous().numpy().tobytes())
    assert digest.hexdigest() == BEFORE_DIGEST and draws == pytest.approx(BEFORE_DRAWS, abs=0)
    batch = {"clinical": torch.randn(2, 24, len(VARIABLES)), "clinical_mask": torch.ones(2, 24, len(VARIABLES))}
    encoder = model.encoders["clinical"].eval()
    with torch.no_grad():
        out = encoder(batch)
        del encoder.static  # the layer a batch without covariates never reaches
        assert torch.equal(encoder(batch), out)
