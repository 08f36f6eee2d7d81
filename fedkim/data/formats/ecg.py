"""12-lead ECG: WFDB records (.hea + .dat) written and read, DICOM 12-lead waveform read.

Every lead's physical unit must be stated (WFDB: `gain/unit` in the header; DICOM: the channel sensitivity
units) and be a voltage: mV, uV/µV or V, converted to mV. A record longer than the model's window is read as its
first `seconds` (see read_ecg).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import wfdb

from fedkim.data.formats import FormatError

LEADS = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
_UNIT_TO_MV = {"mv": 1.0, "uv": 1e-3, "\u00b5v": 1e-3, "\u03bcv": 1e-3, "v": 1e3}  # µ: micro sign or Greek mu
KNOWN_UNITS = "mV, uV (µV), V"


@dataclass
class EcgRecord:
    signal: np.ndarray  # (n_samples, 12) float32, millivolts, columns in LEADS order
    fs: float
    leads: tuple[str, ...] = LEADS

    @property
    def seconds(self) -> float:
        return self.signal.shape[0] / self.fs


def write_wfdb(record_path: Path, signal_mv: np.ndarray, fs: int, comments: list[str] | None = None) -> None:
    """Write `record_path`.hea/.dat (format 16, 1 µV resolution)."""
    record_path = Path(record_path)
    wfdb.wrsamp(
        record_path.name, fs=fs, units=["mV"] * len(LEADS), sig_name=list(LEADS),
        p_signal=np.asarray(signal_mv, dtype=np.float64), fmt=["16"] * len(LEADS),
        adc_gain=[1000.0] * len(LEADS), baseline=[0] * len(LEADS), comments=comments or [],
        write_dir=str(record_path.parent),
    )


def read_ecg(path: str | Path, seconds: float | None = None) -> EcgRecord:
    """Read a WFDB record (path to .hea, .dat or the bare record name) or a DICOM 12-lead waveform, in mV.

    With `seconds`, only the first `seconds` of a longer record are read: the one window the model sees (the
    start, as an acquisition's stored 10 s are; a shorter record is read whole)."""
    path = Path(path)
    if path.suffix.lower() in (".dcm", ".dicom"):
        return _read_dicom_waveform(path, seconds)
    record = path.with_suffix("") if path.suffix in (".hea", ".dat") else path
    header_path = record.with_suffix(".hea")
    for needed in (header_path, record.with_suffix(".dat")):
        if not needed.is_file():
            raise FormatError(needed, "WFDB file missing")
    try:
        header = wfdb.rdheader(str(record))
        units = declared_units(header_path, header.n_sig)
        window = _window(int(header.sig_len), float(header.fs), seconds)
        rec = wfdb.rdrecord(str(record), sampto=window)
    except Exception as exc:
        raise FormatError(header_path, f"cannot read WFDB record ({exc.__class__.__name__}: {exc})") from None
    if rec.p_signal is None:
        raise FormatError(header_path, "record has no physical signal")
    scale = _scales(header_path, rec.sig_name, units)
    return _ordered(header_path, rec.p_signal * scale, rec.fs, rec.sig_name)


def _window(samples: int, fs: float, seconds: float | None) -> int | None:
    """The sample count to read: None (all) unless the record is longer than `seconds`."""
    if seconds is None or fs <= 0:
        return None
    wanted = int(round(fs * seconds))
    return wanted if 0 < wanted < samples else None


def declared_units(header_path: Path, n_signals: int) -> list[str | None]:
    """Each signal's unit as the header states it (`gain(baseline)/unit`); None where none is given.
    wfdb reads an absent unit as mV, which would hide an export that dropped it."""
    lines = [line.split() for line in Path(header_path).read_text(errors="replace").splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    units: list[str | None] = []
    for fields in lines[1:1 + n_signals]:
        gain = fields[2] if len(fields) > 2 else ""
        units.append(gain.split("/", 1)[1].strip() if "/" in gain else None)
    return units + [None] * (n_signals - len(units))


def unknown_units(names: list[str], units: list[str | None]) -> list[str]:
    """'lead: unit' for each standard lead whose unit is missing or not a voltage (other channels are unused)."""
    return [f"{_lead_name(name)}: {'no unit' if not unit else repr(unit)}" for name, unit in zip(names, units)
            if _lead_name(name) in LEADS and _unit_scale(unit) is None]


def _unit_scale(unit: str | None) -> float | None:
    return _UNIT_TO_MV.get(str(unit).strip().lower()) if unit else None


def _scales(path: Path, names: list[str], units: list[str | None]) -> np.ndarray:
    unknown = unknown_units(names, units)
    if unknown:
        raise FormatError(path, f"unit missing or not a voltage ({KNOWN_UNITS}): {'; '.join(unknown)}")
    return np.array([_unit_scale(u) or 1.0 for u in units], dtype=np.float64)  # unused channels: any scale


def _read_dicom_waveform(path: Path, seconds: float | None = None) -> EcgRecord:
    try:
        ds = pydicom.dcmread(path)
        group = ds.WaveformSequence[0]
        signal = ds.waveform_array(0)
        names, units = _dicom_channels(group)
    except Exception as exc:
        raise FormatError(path, f"cannot read DICOM waveform ({exc.__class__.__name__}: {exc})") from None
    fs = float(group.SamplingFrequency)
    signal = signal[: _window(signal.shape[0], fs, seconds)]
    return _ordered(path, signal * _scales(path, names, units), fs, names)


def _dicom_channels(group) -> tuple[list[str], list[str | None]]:
    """Channel labels and sensitivity units (UCUM code value; None when the channel states none)."""
    names, units = [], []
    for channel in group.ChannelDefinitionSequence:
        names.append(str(channel.ChannelSourceSequence[0].CodeMeaning))
        sequence = channel.get("ChannelSensitivityUnitsSequence")
        units.append(str(sequence[0].get("CodeValue", "")) or None if sequence else None)
    return names, units


def _lead_name(raw: str) -> str:
    """'Lead I (Einthoven)' -> 'I', 'Lead aVR' -> 'aVR', 'v1' -> 'V1'."""
    name = re.sub(r"\(.*?\)", "", str(raw)).replace("Lead", "").strip()
    for lead in LEADS:
        if name.lower() == lead.lower():
            return lead
    return name


def _ordered(path: Path, signal: np.ndarray, fs: float, names: list[str]) -> EcgRecord:
    mapped = [_lead_name(n) for n in names]
    missing = [lead for lead in LEADS if lead not in mapped]
    if missing:
        raise FormatError(path, f"missing lead(s) {missing}; found {mapped}")
    columns = [mapped.index(lead) for lead in LEADS]
    return EcgRecord(np.asarray(signal[:, columns], dtype=np.float32), float(fs))


def header_facts(path: str | Path) -> dict:
    """Header-only facts for the gate: leads, sampling rate, samples, each channel's name and declared unit."""
    path = Path(path)
    if path.suffix.lower() in (".dcm", ".dicom"):
        group = pydicom.dcmread(path).WaveformSequence[0]
        names, units = _dicom_channels(group)
        fs, samples = float(group.SamplingFrequency), int(group.NumberOfWaveformSamples)
    else:
        record = path.with_suffix("") if path.suffix in (".hea", ".dat") else path
        header = wfdb.rdheader(str(record))
        names, units = list(header.sig_name), declared_units(record.with_suffix(".hea"), header.n_sig)
        fs, samples = float(header.fs), int(header.sig_len)
    return {"leads": [_lead_name(n) for n in names], "fs": fs, "samples": samples, "names": names, "units": units}
