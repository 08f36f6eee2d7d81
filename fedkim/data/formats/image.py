"""Chest radiographs: 8-bit grayscale PNG, or DICOM DX/CR with modality LUT, VOI LUT and MONOCHROME1 handled."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid

from fedkim.data.formats import FormatError

DICOM_SUFFIXES = (".dcm", ".dicom")


def write_png(path: Path, image01: np.ndarray) -> None:
    """Write an image in [0, 1] (1 = most attenuating, shown white) as 8-bit grayscale PNG."""
    pixels = np.clip(np.rint(image01 * 255.0), 0, 255).astype(np.uint8)
    Image.fromarray(pixels, mode="L").save(path, optimize=False)


def write_dicom(path: Path, image01: np.ndarray, *, sample_id: str, site_id: str, monochrome1: bool = False,
                bits_stored: int = 12) -> None:
    """Write a DX 'for presentation' DICOM: 12 bits stored with a window, MONOCHROME1 stores inverted values."""
    top = (1 << bits_stored) - 1
    stored = np.clip(np.rint(image01 * top), 0, top).astype(np.uint16)
    if monochrome1:  # MONOCHROME1: low values are shown white, so store the complement
        stored = (top - stored).astype(np.uint16)
    # UIDs derived from the sample so that a regenerated federation is byte-identical.
    uid = lambda kind: generate_uid(entropy_srcs=[site_id, sample_id, kind])  # noqa: E731
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = uid("instance")
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = uid("study")
    ds.SeriesInstanceUID = uid("series")
    ds.Modality = "DX"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.PatientID = sample_id  # synthetic identifier, never a real patient
    ds.PatientName = "SYNTHETIC^PHANTOM"
    ds.InstitutionName = site_id
    ds.ContentDate = dt.date(2026, 1, 1).strftime("%Y%m%d")
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.WindowCenter = top / 2
    ds.WindowWidth = top + 1
    ds.PixelData = stored.tobytes()
    ds.save_as(path, enforce_file_format=True)


def read_image(path: str | Path) -> np.ndarray:
    """Read a PNG or DICOM radiograph as float32 in [0, 1], white = attenuating, whatever the storage."""
    path = Path(path)
    if not path.is_file():
        raise FormatError(path, "file not found")
    if path.suffix.lower() in DICOM_SUFFIXES:
        return _read_dicom(path)
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode not in ("L", "I;16", "I"):
                img = img.convert("L")
            pixels = np.asarray(img)
    except Exception as exc:
        raise FormatError(path, f"cannot decode image ({exc.__class__.__name__}: {exc})") from None
    top = 255.0 if pixels.dtype == np.uint8 else float(max(pixels.max(), 1))
    return (pixels.astype(np.float32) / top).clip(0.0, 1.0)


def _read_dicom(path: Path) -> np.ndarray:
    try:
        ds = pydicom.dcmread(path)
        raw = ds.pixel_array
    except Exception as exc:
        raise FormatError(path, f"cannot decode DICOM pixel data ({exc.__class__.__name__}: {exc})") from None
    if raw.ndim != 2:
        raise FormatError(path, f"expected one grayscale frame, got pixel array of shape {raw.shape}")
    values = apply_modality_lut(raw, ds).astype(np.float32)
    if "WindowCenter" in ds or "VOILUTSequence" in ds:
        values = apply_voi_lut(values, ds, prefer_lut=True).astype(np.float32)
    low, high = float(values.min()), float(values.max())
    if "WindowCenter" in ds and "VOILUTSequence" not in ds:
        center = float(np.atleast_1d(ds.WindowCenter)[0])
        width = float(np.atleast_1d(ds.WindowWidth)[0])
        low, high = center - width / 2, center + width / 2
    scaled = (values - low) / max(high - low, 1e-6)
    if ds.get("PhotometricInterpretation", "MONOCHROME2") == "MONOCHROME1":
        scaled = 1.0 - scaled
    return scaled.clip(0.0, 1.0).astype(np.float32)


def image_facts(path: str | Path) -> dict:
    """Header facts the validation gate checks without decoding: width, height, bit depth, photometric."""
    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        return {"width": int(ds.Columns), "height": int(ds.Rows), "bits": int(ds.BitsStored),
                "photometric": str(ds.PhotometricInterpretation), "modality": str(ds.get("Modality", ""))}
    with Image.open(path) as img:
        bits = {"L": 8, "1": 1, "P": 8, "I;16": 16, "I": 32}.get(img.mode, 8)
        return {"width": img.width, "height": img.height, "bits": bits, "photometric": img.mode, "modality": "PNG"}
