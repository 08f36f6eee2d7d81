"""Chest radiographs: PNG (8 or 16 bits; gray, gray+alpha, RGB, RGBA, palette), JPEG (gray or RGB) and DICOM
DX/CR (BitsStored 8 to 16; MONOCHROME1/2 with modality LUT, VOI LUT or window; RGB). Every reader returns one
gray frame in [0, 1], white = most attenuating; colour is converted to luminance, alpha is dropped."""

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
# The colour forms the reader converts to one gray channel (Pillow modes; DICOM photometric interpretations,
# YBR decoded to RGB by pydicom). Anything else is refused by the reader and by rule image.photometric.
PIL_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "P", "PA", "RGB", "RGBA")
DICOM_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
DICOM_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")
SUPPORTED_FORMS = tuple(dict.fromkeys(PIL_MODES + DICOM_MONOCHROME + DICOM_COLOUR))
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601, as Pillow's convert("L")


def write_png(path: Path, image01: np.ndarray) -> None:
    """Write an image in [0, 1] (1 = most attenuating, shown white) as 8-bit grayscale PNG."""
    pixels = np.clip(np.rint(image01 * 255.0), 0, 255).astype(np.uint8)
    Image.fromarray(pixels, mode="L").save(path, optimize=False)


def write_dicom(path: Path, image01: np.ndarray, *, sample_id: str, site_id: str, monochrome1: bool = False,
                bits_stored: int = 12) -> None:
    """Write a DX 'for presentation' DICOM: `bits_stored` (8 to 16) with a window spanning them, MONOCHROME1
    stores inverted values."""
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
    """Read a PNG, JPEG or DICOM radiograph as float32 in [0, 1], white = attenuating, whatever the storage."""
    return decode_image(path)[0]


def decode_image(path: str | Path) -> tuple[np.ndarray, float]:
    """(gray image as read_image returns it, colour spread): the spread is the mean over pixels of the largest
    minus the smallest colour channel, in [0, 1]; 0 for a gray image or a gray picture stored as RGB."""
    path = Path(path)
    if not path.is_file():
        raise FormatError(path, "file not found")
    if path.suffix.lower() in DICOM_SUFFIXES:
        return _read_dicom(path)
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode not in PIL_MODES:
                raise FormatError(path, f"colour form {img.mode!r} not supported (one of {', '.join(PIL_MODES)})")
            bits = _pillow_bits(path, img)
            spread = 0.0
            if img.mode in ("RGB", "RGBA", "P", "PA"):
                spread = _spread(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0)
            if img.mode not in ("L", "I;16", "I;16B", "I"):
                img = img.convert("L")  # luminance; alpha dropped
            pixels = np.asarray(img)
    except FormatError:
        raise
    except Exception as exc:
        raise FormatError(path, f"cannot decode image ({exc.__class__.__name__}: {exc})") from None
    # 8 bits as stored; 16 bits scaled by the depth the file declares (PNG sBIT), else the full 16 bits
    top = 255.0 if pixels.dtype == np.uint8 else float((1 << min(bits, 31)) - 1)
    return (pixels.astype(np.float32) / top).clip(0.0, 1.0), spread


def _spread(rgb: np.ndarray) -> float:
    return float((rgb.max(axis=-1) - rgb.min(axis=-1)).mean()) if rgb.size else 0.0


def _read_dicom(path: Path) -> tuple[np.ndarray, float]:
    try:
        ds = pydicom.dcmread(path)
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
        if photometric not in DICOM_MONOCHROME + DICOM_COLOUR:
            raise FormatError(path, f"photometric interpretation {photometric!r} not supported")
        raw = ds.pixel_array  # YBR is converted to RGB
    except FormatError:
        raise
    except Exception as exc:
        raise FormatError(path, f"cannot decode DICOM pixel data ({exc.__class__.__name__}: {exc})") from None
    if photometric in DICOM_COLOUR:
        if raw.ndim != 3 or raw.shape[-1] != 3:
            raise FormatError(path, f"expected one RGB frame, got pixel array of shape {raw.shape}")
        rgb = raw.astype(np.float32) / float((1 << int(ds.BitsStored)) - 1)
        return (rgb @ LUMA).clip(0.0, 1.0).astype(np.float32), _spread(rgb.clip(0.0, 1.0))
    if raw.ndim != 2:
        raise FormatError(path, f"expected one grayscale frame, got pixel array of shape {raw.shape}")
    values = apply_modality_lut(raw, ds).astype(np.float32)
    if "VOILUTSequence" in ds:  # a VOI LUT: scaled by its output range as used
        values = apply_voi_lut(values, ds, prefer_lut=True).astype(np.float32)
        low, high = float(values.min()), float(values.max())
    elif "WindowCenter" in ds:  # the window maps [center - width/2, center + width/2] to [0, 1]
        center = float(np.atleast_1d(ds.WindowCenter)[0])
        width = float(np.atleast_1d(ds.WindowWidth)[0])
        low, high = center - width / 2, center + width / 2
        stored_low, stored_high = _stored_range(ds)
        if low <= stored_low and high >= stored_high:
            # spanning the stored range, pydicom's VOI transform is the identity up to rounding: kept, so
            # that such files (the generated ones) decode exactly as they always have
            values = apply_voi_lut(values, ds, prefer_lut=True).astype(np.float32)
    else:  # neither: the range its bit depth can store, through the modality LUT
        low, high = _stored_range(ds)
    scaled = (values - low) / max(high - low, 1e-6)
    if photometric == "MONOCHROME1":
        scaled = 1.0 - scaled
    return scaled.clip(0.0, 1.0).astype(np.float32), 0.0


def _stored_range(ds) -> tuple[float, float]:
    bits = int(ds.BitsStored)
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    ends = np.array([-(1 << (bits - 1)), (1 << (bits - 1)) - 1] if signed else [0, (1 << bits) - 1])
    ends = np.asarray(apply_modality_lut(ends, ds), dtype=np.float64)
    return float(ends.min()), float(ends.max())


def _png_header(path: Path) -> tuple[int, int, int | None]:
    """(bit depth, colour type, significant bits of the gray channel from sBIT or None) of a PNG file."""
    with path.open("rb") as handle:
        data = handle.read(8)
        depth, colour, significant = 8, 0, None
        while True:
            head = handle.read(8)
            if len(head) < 8:
                break
            size, kind = int.from_bytes(head[:4], "big"), head[4:]
            if kind in (b"IDAT", b"IEND") or size > 1 << 20:
                break
            data = handle.read(size)
            handle.seek(4, 1)  # CRC
            if kind == b"IHDR" and size >= 10:
                depth, colour = data[8], data[9]
            elif kind == b"sBIT" and data and colour in (0, 4):
                significant = data[0]
    return depth, colour, significant


def _pillow_bits(path: Path, img: Image.Image) -> int:
    """Bits per sample as stored: PNG from its header (palette entries are 8-bit), JPEG its precision."""
    if img.format == "PNG":
        depth, colour, significant = _png_header(path)
        return 8 if colour == 3 else (significant or depth)
    if img.format == "JPEG":
        return int(getattr(img, "bits", 8))
    return {"1": 1, "I;16": 16, "I;16B": 16, "I": 32}.get(img.mode, 8)


def image_facts(path: str | Path) -> dict:
    """Header facts the validation gate checks without decoding: format, width, height, bits per sample,
    photometric (DICOM) or Pillow mode, modality (DICOM)."""
    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        return {"format": "dicom", "width": int(ds.Columns), "height": int(ds.Rows), "bits": int(ds.BitsStored),
                "photometric": str(ds.PhotometricInterpretation), "modality": str(ds.get("Modality", ""))}
    with Image.open(path) as img:
        kind = str(img.format or path.suffix.lstrip(".")).lower()
        return {"format": kind, "width": img.width, "height": img.height, "bits": _pillow_bits(path, img),
                "photometric": img.mode, "modality": kind.upper()}
