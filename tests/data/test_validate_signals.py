"""The gate accepts what the image and ECG readers decode (every depth and colour form, JPEG, any voltage unit,
long records) and still refuses what they cannot, with findings that name the file (and the lead)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pydicom
import pytest
from pydicom.data import get_testdata_file

from fedkim.config import ConfigError, GateParams
from fedkim.data.formats.ecg import write_wfdb
from fedkim.data.formats.image import write_dicom
from fedkim.data.siteformat import INDEX_FILE, write_index
from fedkim.data.validate import ValidationReport, validate_site
from tests.helpers import small_params_dict, write_params
from tests.helpers.signals import write_pillow, write_rgb_dicom, write_wfdb_in
from tests.helpers.sites import build_site, refinalize, synthetic_ecg, synthetic_image


@pytest.fixture(scope="module")
def templates(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("signal_templates")
    return {"png": build_site(root / "png", modalities=("image",)),
            "dicom": build_site(root / "dicom", modalities=("image",), image_format="dicom"),
            "ecg": build_site(root / "ecg", modalities=("ecg",))}


@pytest.fixture
def site_of(templates, tmp_path):
    return lambda kind: Path(shutil.copytree(templates[kind], tmp_path / kind))


def check(site: Path, rules: GateParams | None = None) -> ValidationReport:
    # The templates hold exactly the default minimums: one quarantined sample must not fail the counts here.
    rules = (rules or GateParams()).model_copy(update={"min_samples_per_site": 10, "min_samples_per_class": 2})
    return validate_site(site, rules, write_docs=False)


def only_finding(site: Path, rule: str, rules: GateParams | None = None):
    """The rule fired and nothing else; its samples are quarantined (the site passes on the rest), kept with a
    warning, or the site fails, as the rule's action says."""
    report = check(site, rules)
    assert {f.rule for f in report.findings} == {rule}, report.summary()
    found = report.findings[0]
    if found.action == "block":
        assert not report.success
    else:
        assert report.success, report.summary()
        assert bool(set(found.samples) & set(report.quarantined)) == (found.action == "quarantine")
    return found


def replace_first(site: Path, column: str, suffix: str | None = None) -> tuple[str, Path]:
    """The first referenced file of `column`, renamed to `suffix` in the index when given; (index path, file)."""
    index = pq.read_table(site / INDEX_FILE).to_pandas()
    rel = index[column].dropna().iloc[0]
    if suffix is not None:
        new = str(Path(rel).with_suffix(suffix))
        index.loc[index[column] == rel, column] = new
        write_index(site, index)
        rel = new
    return rel, site / rel


# -------------------------------------------------------------------------------------------------- images
@pytest.mark.parametrize("bits", [10, 14])
@pytest.mark.parametrize("monochrome1", [False, True])
def test_dicom_of_10_and_14_bits_passes(site_of, bits, monochrome1):
    site = site_of("dicom")
    rel, path = replace_first(site, "image_path")
    write_dicom(path, synthetic_image(np.random.default_rng(1)), sample_id="s", site_id="site-t",
                bits_stored=bits, monochrome1=monochrome1)
    refinalize(site)
    report = check(site)
    assert report.success, report.summary()


def test_rgb_dicom_passes(site_of):
    site = site_of("dicom")
    rel, path = replace_first(site, "image_path")
    write_rgb_dicom(path, np.stack([synthetic_image(np.random.default_rng(1))] * 3, axis=-1))
    refinalize(site)
    assert check(site).success


@pytest.mark.parametrize("form, suffix", [("I;16", ".png"), ("RGB", ".png"), ("RGBA", ".png"), ("P", ".png"),
                                          ("LA", ".png"), ("L", ".jpg"), ("RGB", ".jpeg")])
def test_png_and_jpeg_forms_pass(site_of, form, suffix):
    site = site_of("png")
    rel, path = replace_first(site, "image_path", suffix)
    write_pillow(path, synthetic_image(np.random.default_rng(1)), form)
    refinalize(site)
    report = check(site)
    assert report.success, report.summary()


def test_truncated_jpeg_is_a_decode_finding_naming_the_file(site_of):
    site = site_of("png")
    rel, path = replace_first(site, "image_path", ".jpg")
    write_pillow(path, synthetic_image(np.random.default_rng(1)), "L")
    path.write_bytes(path.read_bytes()[:400])
    refinalize(site)
    found = only_finding(site, "file.decodes")
    assert found.file == rel and rel in found.examples[0]


def test_colour_photo_is_flagged_and_its_threshold_applies(site_of):
    site = site_of("png")
    rel, path = replace_first(site, "image_path", ".jpg")
    write_pillow(path, synthetic_image(np.random.default_rng(1)), "RGB", tint=0.25, quality=95)
    refinalize(site)
    assert only_finding(site, "image.colour").file == rel
    assert check(site, GateParams(image_max_colour_spread=1.0)).success


def test_bit_depth_range_is_configurable(site_of):
    site = site_of("dicom")
    rel, path = replace_first(site, "image_path")
    write_dicom(path, synthetic_image(np.random.default_rng(1)), sample_id="s", site_id="site-t", bits_stored=14)
    refinalize(site)
    found = only_finding(site, "image.bit_depth", GateParams(image_max_bits=12))
    assert found.file == rel and "bits=14" in found.examples[0]


def test_non_radiograph_dicom_modality_still_fails(site_of):
    site = site_of("dicom")
    rel, path = replace_first(site, "image_path")
    ds = pydicom.dcmread(path)
    ds.Modality = "US"
    ds.save_as(path)
    refinalize(site)
    assert only_finding(site, "image.modality").file == rel


# ----------------------------------------------------------------------------------------------------- ECG
@pytest.mark.parametrize("unit", ["uV", "µV", "V"])
def test_ecg_in_any_voltage_unit_passes(site_of, unit):
    site = site_of("ecg")
    rel, path = replace_first(site, "ecg_path")
    write_wfdb_in(path.with_suffix(""), synthetic_ecg(np.random.default_rng(1)), 250, unit)
    refinalize(site)
    report = check(site)
    assert report.success, report.summary()


@pytest.mark.parametrize("unit, shown", [("furlong", "'furlong'"), ("", "no unit")])
def test_unknown_or_missing_unit_is_a_finding_naming_file_and_lead(site_of, unit, shown):
    site = site_of("ecg")
    rel, path = replace_first(site, "ecg_path")
    write_wfdb_in(path.with_suffix(""), synthetic_ecg(np.random.default_rng(1)), 250, unit)
    refinalize(site)
    found = only_finding(site, "ecg.units")
    assert found.file == rel and found.count == 1
    assert f"{rel}: I: {shown}" in found.examples[0] and f"aVR: {shown}" in found.examples[0]


def test_a_300_s_record_passes_and_a_3_s_record_fails(site_of):
    site = site_of("ecg")
    rel, path = replace_first(site, "ecg_path")
    write_wfdb(path.with_suffix(""), synthetic_ecg(np.random.default_rng(1), seconds=300), 250)
    refinalize(site)
    report = check(site)
    assert report.success, report.summary()
    write_wfdb(path.with_suffix(""), synthetic_ecg(np.random.default_rng(1), seconds=3), 250)
    refinalize(site)
    found = only_finding(site, "ecg.duration")
    assert found.file == rel and "seconds=3" in found.examples[0]


def test_signal_checks_read_the_window_the_model_reads(site_of):
    site = site_of("ecg")
    rel, path = replace_first(site, "ecg_path")
    signal = synthetic_ecg(np.random.default_rng(1), seconds=60)
    signal[250 * 40, 3] = 30.0  # an artefact 40 s in, beyond a 10 s window
    write_wfdb(path.with_suffix(""), signal, 250)
    refinalize(site)
    assert check(site, GateParams(ecg_window_seconds=10)).success
    assert only_finding(site, "ecg.amplitude", GateParams(ecg_window_seconds=None)).file == rel


@pytest.mark.parametrize("units", [True, False])
def test_dicom_waveform_units_are_checked(site_of, units):
    site = site_of("ecg")
    rel, path = replace_first(site, "ecg_path", ".dcm")
    ds = pydicom.dcmread(get_testdata_file("waveform_ecg.dcm"))
    if not units:
        del ds.WaveformSequence[0].ChannelDefinitionSequence[1].ChannelSensitivityUnitsSequence
    ds.save_as(path)
    refinalize(site)
    if units:
        assert check(site).success
    else:
        found = only_finding(site, "ecg.units")
        assert found.file == rel and f"{rel}: II: no unit" in found.examples[0]


# ------------------------------------------------------------------------------------------------- config
def test_data_gate_checks_the_models_ecg_window(tmp_path):
    params = write_params(tmp_path / "a", small_params_dict(tmp_path / "fed"))
    assert params.data.gate.ecg_window_seconds == params.data.ecg_seconds == 6
    assert params.data.gate.image_min_bits == 8 and params.data.gate.image_max_bits == 16


def test_the_old_image_bits_key_is_a_clear_error_naming_its_replacements(tmp_path):
    raw = small_params_dict(tmp_path / "fed", **{"data.gate.image_bits": [8, 12, 16]})
    with pytest.raises(ConfigError, match=r"data\.gate\.image_bits: unknown key; allowed here: .*image_max_bits, "
                                          r"image_max_colour_spread, image_max_side, image_min_bits"):
        write_params(tmp_path / "old", raw)
