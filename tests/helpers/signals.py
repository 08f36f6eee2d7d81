"""Files in the forms real exports take, written with Pillow, pydicom and wfdb (the project's writers produce
only 8-bit gray PNG, 12-bit DICOM and WFDB in mV):

    write_pillow(path, image01, form)          PNG / JPEG in a Pillow mode: L, I;16, LA, RGB, RGBA, P
    write_rgb_dicom(path, rgb01)               DX DICOM with RGB pixels
    write_wfdb_in(record, signal_mv, fs, unit) WFDB whose header states `unit` (mV, uV, µV, V, any text, "")
    digest(array)                              short hash of an array's dtype, shape and bytes
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pydicom
import wfdb
from PIL import Image

from fedkim.data.formats.ecg import LEADS
from fedkim.data.formats.image import write_dicom

TO_UNIT = {"mV": 1.0, "uV": 1e3, "µV": 1e3, "V": 1e-3}  # multiplies millivolts


def digest(array) -> str:
    array = np.ascontiguousarray(np.asarray(array))
    return hashlib.sha256(str(array.dtype).encode() + str(array.shape).encode() + array.tobytes()).hexdigest()[:16]


def tinted(image01: np.ndarray, tint: float = 0.0) -> np.ndarray:
    """(H, W, 3) in [0, 1]: the gray image in each channel, red and blue pushed apart by `tint`."""
    return np.stack([image01 + tint, image01, image01 - tint], axis=-1).clip(0, 1)


def write_pillow(path: Path, image01: np.ndarray, form: str = "L", *, tint: float = 0.0, **save) -> None:
    """Save `image01` in a Pillow mode; the format follows the suffix (PNG, JPEG)."""
    gray8 = np.rint(image01 * 255).astype(np.uint8)
    if form == "I;16":
        img = Image.fromarray(np.rint(image01 * 65535).astype(np.uint16))
    elif form == "LA":
        img = Image.fromarray(np.stack([gray8, np.full_like(gray8, 200)], axis=-1), mode="LA")
    elif form in ("RGB", "RGBA", "P"):
        img = Image.fromarray(np.rint(tinted(image01, tint) * 255).astype(np.uint8), mode="RGB")
        img = img.convert("RGBA") if form == "RGBA" else img
        img = img.quantize(256) if form == "P" else img
    else:
        img = Image.fromarray(gray8, mode="L")
    img.save(path, **save)


def write_rgb_dicom(path: Path, rgb01: np.ndarray) -> None:
    """A DX DICOM holding 8-bit RGB pixels (a secondary capture of a radiograph)."""
    write_dicom(path, rgb01[..., 0], sample_id="rgb", site_id="site-t", bits_stored=8)
    ds = pydicom.dcmread(path)
    for name in ("WindowCenter", "WindowWidth", "RescaleIntercept", "RescaleSlope"):
        delattr(ds, name)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = np.rint(rgb01 * 255).astype(np.uint8).tobytes()
    ds.save_as(path, enforce_file_format=True)


def write_wfdb_in(record: Path, signal_mv: np.ndarray, fs: int, unit: str) -> None:
    """A 12-lead WFDB record in `unit` (1 µV resolution for the voltages), its header edited to state `unit`
    exactly as given: an empty string leaves the unit out."""
    scale = TO_UNIT.get(unit, 1.0)
    gain = 1000.0 / scale
    n = len(LEADS)
    record = Path(record)
    wfdb.wrsamp(record.name, fs=fs, units=["mV"] * n, sig_name=list(LEADS),
                p_signal=np.asarray(signal_mv, dtype=np.float64) * scale, fmt=["16"] * n, adc_gain=[gain] * n,
                baseline=[0] * n, write_dir=str(record.parent))
    header = record.with_suffix(".hea")
    text = header.read_text()
    header.write_text(text.replace("/mV", f"/{unit}" if unit else ""))
