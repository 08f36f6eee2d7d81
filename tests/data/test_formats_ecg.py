"""The ECG reader: stated units converted to mV, missing or foreign units refused, long records windowed."""

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from fedkim.data.formats import FormatError
from fedkim.data.formats.ecg import header_facts, read_ecg, write_wfdb
from fedkim.data.loaders import load_ecg
from tests.helpers.signals import write_wfdb_in


@pytest.fixture
def signal():
    rng = np.random.default_rng(3)
    t = np.arange(2500) / 250
    return 0.8 * np.sin(2 * np.pi * 1.1 * t[:, None] + np.arange(12)) + rng.normal(0, 0.05, (2500, 12))


@pytest.mark.parametrize("unit", ["uV", "µV", "V"])
def test_voltages_in_any_unit_read_as_millivolts(tmp_path, signal, unit):
    write_wfdb(tmp_path / "mv", signal, 250)
    write_wfdb_in(tmp_path / "other", signal, 250, unit)
    assert header_facts(tmp_path / "other.hea")["units"] == [unit] * 12
    reference, other = read_ecg(tmp_path / "mv.hea").signal, read_ecg(tmp_path / "other.hea").signal
    assert np.allclose(other, reference, atol=2e-3) and np.abs(other).max() > 0.5


@pytest.mark.parametrize("unit", ["furlong", ""])
def test_a_missing_or_foreign_unit_is_refused_naming_file_and_lead(tmp_path, signal, unit):
    write_wfdb_in(tmp_path / "odd", signal, 250, unit)
    with pytest.raises(FormatError) as raised:
        read_ecg(tmp_path / "odd.hea")
    assert raised.value.path == str(tmp_path / "odd.hea")
    assert ("I: 'furlong'" if unit else "I: no unit") in raised.value.reason and "V6" in raised.value.reason


def test_a_long_record_is_read_as_its_first_window(tmp_path):
    rng = np.random.default_rng(4)
    long = rng.normal(0, 0.4, (300 * 250, 12))
    write_wfdb(tmp_path / "long", long, 250)
    whole = read_ecg(tmp_path / "long.hea")
    window = read_ecg(tmp_path / "long.hea", seconds=10)
    assert whole.seconds == 300 and window.seconds == 10
    assert np.array_equal(window.signal, whole.signal[:2500])
    tensor = load_ecg(tmp_path / "long.hea", hz=250, seconds=10).numpy()
    assert tensor.shape == (12, 2500) and np.array_equal(tensor, whole.signal[:2500].T)
    short = read_ecg(tmp_path / "long.hea", seconds=400)  # longer than the record: all of it
    assert short.seconds == 300


def test_dicom_waveform_units_and_window():
    path = get_testdata_file("waveform_ecg.dcm")
    assert header_facts(path)["units"] == ["uV"] * 12
    whole, window = read_ecg(path), read_ecg(path, seconds=4)
    assert window.signal.shape == (4000, 12) and np.array_equal(window.signal, whole.signal[:4000])


def test_dicom_waveform_without_units_is_refused(tmp_path):
    ds = pydicom.dcmread(get_testdata_file("waveform_ecg.dcm"))
    del ds.WaveformSequence[0].ChannelDefinitionSequence[6].ChannelSensitivityUnitsSequence
    ds.save_as(tmp_path / "nounits.dcm")
    with pytest.raises(FormatError, match="V1: no unit"):
        read_ecg(tmp_path / "nounits.dcm")
