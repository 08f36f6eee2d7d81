"""The generated federation's files (8-bit PNG, 12-bit DICOM, WFDB in mV at 250/500 Hz) decode to exactly the
arrays they always did: the digests below were taken from the readers before they learnt other forms."""

import numpy as np
import pytest

from fedkim.data.formats.ecg import read_ecg, write_wfdb
from fedkim.data.formats.image import read_image, write_dicom, write_png
from fedkim.data.loaders import load_ecg, load_image
from tests.helpers.signals import digest

# file -> (digest of the reader's array, digest of the loader's tensor: images at 64 px, ECGs at 200 Hz x 10 s)
EXPECTED = {
    "x.png": ("68ba65e23da210e5", "fede1047f2074a9b"),
    "m2.dcm": ("79c30aa96af20879", "2dda2dd6493f86b1"),
    "m1.dcm": ("06bf00921fef1cdf", "69b4eb09e985f4a7"),
    "e250": ("5e6c91c33d7a530b", "99ebddf466f8f0b7"),
    "e500": ("de44617e678bb332", "0f1b14104380e013"),
}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    folder = tmp_path_factory.mktemp("identity")
    rng = np.random.default_rng(2026)
    image = np.clip(rng.normal(0.5, 0.2, (128, 112)), 0, 1)
    t = np.arange(5000) / 500
    ecg = 0.8 * np.sin(2 * np.pi * 1.1 * t[:, None] + np.arange(12)) + rng.normal(0, 0.05, (5000, 12))
    write_png(folder / "x.png", image)
    write_dicom(folder / "m2.dcm", image, sample_id="s", site_id="site-z")
    write_dicom(folder / "m1.dcm", image, sample_id="s", site_id="site-z", monochrome1=True)
    for fs in (250, 500):
        write_wfdb(folder / f"e{fs}", ecg[:: 500 // fs], fs)
    return folder


@pytest.mark.parametrize("name", ["x.png", "m2.dcm", "m1.dcm"])
def test_generated_images_decode_bit_identically(written, name):
    path = written / name
    assert (digest(read_image(path)), digest(load_image(path, 64).numpy())) == EXPECTED[name]


@pytest.mark.parametrize("name", ["e250", "e500"])
def test_generated_ecgs_decode_bit_identically(written, name):
    path = written / f"{name}.hea"
    assert (digest(read_ecg(path).signal), digest(load_ecg(path, 200, 10).numpy())) == EXPECTED[name]
