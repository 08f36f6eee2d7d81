"""The radiograph reader: every bit depth and colour form real exports hold, decoded to one gray frame in [0, 1]."""

import struct
import zlib

import numpy as np
import pydicom
import pytest
from PIL import Image

from fedkim.data.formats import FormatError
from fedkim.data.formats.image import decode_image, image_facts, read_image, write_dicom
from fedkim.data.loaders import load_image
from tests.helpers.signals import write_pillow, write_rgb_dicom


@pytest.fixture
def gradient():
    """Dark at the top, bright at the bottom: contrast shows as a rising column mean."""
    return np.repeat(np.linspace(0, 1, 96, dtype=np.float64)[:, None], 80, axis=1)


@pytest.mark.parametrize("bits", [8, 10, 14, 16])
@pytest.mark.parametrize("monochrome1", [False, True])
def test_dicom_of_any_depth_decodes_to_the_unit_range(tmp_path, gradient, bits, monochrome1):
    path = tmp_path / "x.dcm"
    write_dicom(path, gradient, sample_id="s", site_id="site-z", bits_stored=bits, monochrome1=monochrome1)
    stored = pydicom.dcmread(path).pixel_array
    assert stored.max() == (1 << bits) - 1 and stored.min() == 0  # the file uses its whole depth
    image = read_image(path)
    assert image.dtype == np.float32 and image.min() >= 0 and image.max() <= 1
    assert np.abs(image - gradient).max() < 1.5 / (1 << bits) + 1e-3  # within 1.5 stored steps, white stays white
    assert image_facts(path)["bits"] == bits


@pytest.mark.parametrize("bits", [10, 14])
def test_dicom_without_a_window_is_scaled_by_its_bit_depth(tmp_path, gradient, bits):
    path = tmp_path / "x.dcm"
    write_dicom(path, gradient * 0.5, sample_id="s", site_id="site-z", bits_stored=bits)
    ds = pydicom.dcmread(path)
    del ds.WindowCenter, ds.WindowWidth
    ds.save_as(path)
    image = read_image(path)  # half the stored range stays half bright, not stretched to white
    assert image.max() == pytest.approx(0.5, abs=2.0 / (1 << bits))
    assert image.min() == pytest.approx(0.0, abs=1e-6)


def test_a_narrow_window_sets_the_contrast(tmp_path, gradient):
    path = tmp_path / "x.dcm"
    write_dicom(path, gradient, sample_id="s", site_id="site-z", bits_stored=14)
    ds = pydicom.dcmread(path)
    ds.WindowCenter, ds.WindowWidth = 8192, 8192  # the middle half of the 14-bit range
    ds.save_as(path)
    image = read_image(path)
    middle = (gradient > 0.3) & (gradient < 0.7)
    assert np.abs(image[middle] - (gradient[middle] - 0.25) * 2).max() < 1e-3


def test_rgb_dicom_is_converted_to_luminance(tmp_path, gradient):
    path = tmp_path / "rgb.dcm"
    write_rgb_dicom(path, np.stack([gradient] * 3, axis=-1))
    image, spread = decode_image(path)
    assert image.shape == gradient.shape and spread == 0.0
    assert np.abs(image - gradient).max() <= 0.5 / 255 + 1e-6


@pytest.mark.parametrize("form", ["L", "I;16", "LA", "RGB", "RGBA", "P"])
def test_png_forms_decode_to_the_same_gray(tmp_path, gradient, form):
    path = tmp_path / f"{form.replace(';', '')}.png"
    write_pillow(path, gradient, form)
    image, spread = decode_image(path)
    tolerance = 1.0 / 65535 if form == "I;16" else (3.0 if form == "P" else 0.6) / 255
    assert image.shape == gradient.shape and np.abs(image - gradient).max() <= tolerance
    assert spread < 0.02
    assert image_facts(path)["bits"] == (16 if form == "I;16" else 8)


def test_16_bit_png_declaring_12_significant_bits_uses_them(tmp_path, gradient):
    path = tmp_path / "x.png"
    stored = np.rint(gradient * 4095).astype(np.uint16)
    Image.fromarray(stored).save(path)
    data = path.read_bytes()
    chunk = b"sBIT" + bytes([12])
    sbit = struct.pack(">I", 1) + chunk + struct.pack(">I", zlib.crc32(chunk))
    path.write_bytes(data[:33] + sbit + data[33:])  # right after IHDR (8 + 25 bytes)
    assert image_facts(path)["bits"] == 12
    assert np.abs(read_image(path) - gradient).max() <= 0.5 / 4095 + 1e-6


@pytest.mark.parametrize("form", ["L", "RGB"])
def test_jpeg_gray_and_rgb_decode_and_load(tmp_path, gradient, form):
    path = tmp_path / "x.jpg"
    write_pillow(path, gradient, form, quality=95)
    image, spread = decode_image(path)
    assert np.abs(image - gradient).mean() < 0.01 and spread < 0.02
    assert image_facts(path)["format"] == "jpeg"
    tensor = load_image(path, 32)
    assert tensor.shape == (1, 32, 32) and float(tensor[0, -1].mean()) > 0.9 > 0.1 > float(tensor[0, 0].mean())


def test_a_colour_photo_has_a_large_spread(tmp_path, gradient):
    path = tmp_path / "photo.jpeg"
    write_pillow(path, gradient, "RGB", tint=0.3, quality=95)
    assert decode_image(path)[1] > 0.3


def test_truncated_jpeg_is_a_format_error_naming_the_file(tmp_path, gradient):
    path = tmp_path / "cut.jpg"
    write_pillow(path, gradient, "L")
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(FormatError) as raised:
        read_image(path)
    assert raised.value.path == str(path) and "cannot decode" in raised.value.reason


def test_unsupported_colour_form_is_refused(tmp_path, gradient):
    path = tmp_path / "cmyk.jpg"
    write_pillow(path, gradient, "L")
    Image.open(path).convert("CMYK").save(path)
    with pytest.raises(FormatError, match="CMYK"):
        read_image(path)
