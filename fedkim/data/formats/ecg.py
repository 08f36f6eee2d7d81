"""12-lead ECG: WFDB records (.hea + .dat) written and read, DICOM 12-lead waveform read."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import wfdb

from fedkim.data.formats import FormatError

LEADS = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
_UNIT_TO_MV = {"mv": 1.0, "uv": 1e-3, "µv": 1e-3, "v": 1e3}


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


def read_ecg(path: str | Path) -> EcgRecord:
    """Read a WFDB record (path to .hea, .dat or the bare record name) or a DICOM 12-lead waveform."""
    path = Path(path)
    if path.suffix.lower() in (".dcm", ".dicom"):
        return _read_dicom_waveform(path)
    record = path.with_suffix("") if path.suffix in (".hea", ".dat") else path
    for needed in (record.with_suffix(".hea"), record.with_suffix(".dat")):
        if not needed.is_file():
            raise FormatError(needed, "WFDB file missing")
    try:
        rec = wfdb.rdrecord(str(record))
    except Exception as exc:
        raise FormatError(record.with_suffix(".hea"), f"cannot read WFDB record ({exc.__class__.__name__}: {exc})") from None
    if rec.p_signal is None:
        raise FormatError(record.with_suffix(".hea"), "record has no physical signal")
    scale = np.array([_UNIT_TO_MV.get(str(u).lower(), 1.0) for u in rec.units], dtype=np.float64)
    return _ordered(record.with_suffix(".hea"), rec.p_signal * scale, rec.fs, rec.sig_name)


def _read_dicom_waveform(path: Path) -> EcgRecord:
    try:
        ds = pydicom.dcmread(path)
        group = ds.WaveformSequence[0]
        signal = ds.waveform_array(0)
    except Exception as exc:
        raise FormatError(path, f"cannot read DICOM waveform ({exc.__class__.__name__}: {exc})") from None
    names, scale = [], []
    for channel in group.ChannelDefinitionSequence:
        names.append(channel.ChannelSourceSequence[0].CodeMeaning)
        units = channel.get("ChannelSensitivityUnitsSequence")
        code = units[0].CodeValue if units else "uV"
        scale.append(_UNIT_TO_MV.get(str(code).lower(), 1e-3))
    return _ordered(path, signal * np.array(scale), float(group.SamplingFrequency), names)


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
    """Header-only facts for the gate: leads, sampling rate, samples."""
    path = Path(path)
    if path.suffix.lower() in (".dcm", ".dicom"):
        ds = pydicom.dcmread(path)
        group = ds.WaveformSequence[0]
        leads = [_lead_name(c.ChannelSourceSequence[0].CodeMeaning) for c in group.ChannelDefinitionSequence]
        return {"leads": leads, "fs": float(group.SamplingFrequency), "samples": int(group.NumberOfWaveformSamples)}
    header = wfdb.rdheader(str(path.with_suffix("") if path.suffix in (".hea", ".dat") else path))
    return {"leads": [_lead_name(n) for n in header.sig_name], "fs": float(header.fs), "samples": int(header.sig_len)}
