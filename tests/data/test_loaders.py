"""Round trips through every file format, and the torch Datasets over generated and real files."""

import json

import numpy as np
import pandas as pd
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file
from torch.utils.data import DataLoader

from fedkim.data.formats import FormatError
from fedkim.data.formats.clinical import read_long, to_grid, write_long
from fedkim.data.formats.ecg import LEADS, read_ecg, write_wfdb
from fedkim.data.formats.image import read_image, write_dicom, write_png
from fedkim.data.formats.text import read_jsonl, write_jsonl
from fedkim.data.loaders import (ClinicalDataset, DecodedCache, EcgDataset, ImageDataset, SiteDataset, TextDataset,
                                 collate, load_ecg, load_image)


@pytest.fixture
def gradient():
    return np.linspace(0, 1, 96 * 80, dtype=np.float32).reshape(96, 80)


def test_png_round_trip(tmp_path, gradient):
    write_png(tmp_path / "x.png", gradient)
    assert np.abs(read_image(tmp_path / "x.png") - gradient).max() <= 0.5 / 255 + 1e-6


@pytest.mark.parametrize("monochrome1", [False, True])
def test_dicom_round_trip_undoes_monochrome1(tmp_path, gradient, monochrome1):
    path = tmp_path / "x.dcm"
    write_dicom(path, gradient, sample_id="s1", site_id="site-z", monochrome1=monochrome1)
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == ("MONOCHROME1" if monochrome1 else "MONOCHROME2")
    assert ds.BitsStored == 12 and ds.Modality == "DX"
    assert np.abs(read_image(path) - gradient).max() < 2e-3


def test_dicom_voi_window_is_applied(tmp_path, gradient):
    path = tmp_path / "w.dcm"
    write_dicom(path, gradient, sample_id="s1", site_id="site-z")
    ds = pydicom.dcmread(path)
    ds.WindowCenter, ds.WindowWidth = 1024, 1024  # narrow window on the dark half
    ds.save_as(path)
    image = read_image(path)
    assert image[gradient > 0.5].min() == pytest.approx(1.0)  # saturated above the window
    assert image[gradient < 0.1].max() == pytest.approx(0.0, abs=1e-3)


def test_real_dicom_images_from_pydicom_load():
    for name, side in (("CT_small.dcm", 128), ("MR_small.dcm", 64)):
        image = load_image(get_testdata_file(name), 32)
        assert image.shape == (1, 32, 32) and 0 <= image.min() < image.max() <= 1


def test_wfdb_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    signal = rng.normal(0, 0.5, size=(2500, 12)).astype(np.float32)
    write_wfdb(tmp_path / "rec", signal, 250)
    record = read_ecg(tmp_path / "rec.hea")
    assert record.fs == 250 and record.leads == LEADS
    assert np.abs(record.signal - signal).max() < 1e-3


def test_real_dicom_12_lead_ecg_loads_in_millivolts():
    record = read_ecg(get_testdata_file("waveform_ecg.dcm"))
    assert record.signal.shape == (10000, 12) and record.fs == 1000
    assert 0.5 < np.abs(record.signal).max() < 5  # a resting ECG, in mV
    tensor = load_ecg(get_testdata_file("waveform_ecg.dcm"), hz=250, seconds=10)
    assert tensor.shape == (12, 2500)
    peak = float(np.abs(record.signal).max())
    assert 0.6 * peak < float(tensor.abs().max()) < 1.4 * peak


def test_ecg_resampling_keeps_the_waveform(tmp_path):
    t = np.arange(5000) / 500
    signal = np.stack([np.sin(2 * np.pi * 1.2 * t)] * 12, axis=1)
    write_wfdb(tmp_path / "s", signal, 500)
    down = load_ecg(tmp_path / "s.hea", hz=250, seconds=12).numpy()
    assert down.shape == (12, 3000)
    assert np.abs(down[0, 100:2400] - signal[200:4800:2, 0]).max() < 0.02
    assert np.all(down[:, 2500:] == 0)  # padded beyond the 10 s recorded


def test_clinical_round_trip_to_grid(tmp_path):
    frame = pd.DataFrame({"sample_id": ["a", "a", "b"], "hour": [0, 3, 1],
                          "variable": ["heart_rate", "lactate", "spo2"], "value": [80.0, 2.5, 97.0]})
    write_long(tmp_path / "c.parquet", frame)
    back = read_long(tmp_path / "c.parquet")
    grid = to_grid(back[back.sample_id == "a"], hours=4)
    assert grid.shape == (4, 9) and grid[0, 0] == 80 and grid[3, 6] == pytest.approx(2.5)
    assert np.isnan(grid).sum() == 4 * 9 - 2


def test_jsonl_round_trip_and_bad_lines(tmp_path):
    rows = [{"sample_id": "q1", "question": "?", "options": ["A", "B"], "answer": "B"}]
    write_jsonl(tmp_path / "q.jsonl", rows)
    assert read_jsonl(tmp_path / "q.jsonl")["q1"] == rows[0]
    (tmp_path / "bad.jsonl").write_text(json.dumps(rows[0]) + "\n{not json\n")
    with pytest.raises(FormatError, match=r"bad.jsonl: line 2: not valid JSON"):
        read_jsonl(tmp_path / "bad.jsonl")
    (tmp_path / "wrong.jsonl").write_text(json.dumps({**rows[0], "answer": "C"}) + "\n")
    with pytest.raises(FormatError, match="not among the options"):
        read_jsonl(tmp_path / "wrong.jsonl")
    # Lettered multiple choice may carry each label's text; one missing or empty text names the line and rule.
    lettered = {**rows[0], "choices": {o: f"text {o}" for o in rows[0]["options"]}}
    write_jsonl(tmp_path / "lettered.jsonl", [lettered])
    assert read_jsonl(tmp_path / "lettered.jsonl")["q1"]["choices"] == lettered["choices"]
    for broken in ({rows[0]["options"][0]: "only one"}, {o: "" for o in rows[0]["options"]}, ["a", "b"]):
        write_jsonl(tmp_path / "choices.jsonl", [{**rows[0], "choices": broken}])
        with pytest.raises(FormatError, match=r"choices.jsonl: line 1: choices must map each of the options"):
            read_jsonl(tmp_path / "choices.jsonl")


def test_damaged_files_raise_format_errors_naming_the_file(tmp_path, gradient):
    write_png(tmp_path / "x.png", gradient)
    (tmp_path / "cut.png").write_bytes((tmp_path / "x.png").read_bytes()[:100])
    with pytest.raises(FormatError, match="cut.png: cannot decode image"):
        read_image(tmp_path / "cut.png")
    write_dicom(tmp_path / "x.dcm", gradient, sample_id="s", site_id="z")
    (tmp_path / "cut.dcm").write_bytes((tmp_path / "x.dcm").read_bytes()[:600])
    with pytest.raises(FormatError, match="cut.dcm"):
        read_image(tmp_path / "cut.dcm")
    with pytest.raises(FormatError, match="WFDB file missing"):
        read_ecg(tmp_path / "absent.hea")


def test_datasets_over_a_generated_site(small_federation):
    root = small_federation.root
    images = ImageDataset(root / "site-c", split="train", image_size=32)
    assert len(images) > 0 and all(images.index["split"] == "train")
    item = images[0]
    assert item["image"].shape == (1, 32, 32) and item["label"] in (0, 1) and item["answer"] in ("Yes", "No")
    ecgs = EcgDataset(root / "site-b", ecg_hz=100, ecg_seconds=6)
    batch = collate([ecgs[i] for i in range(4)])
    assert batch["ecg"].shape == (4, 12, 600) and batch["label"].dtype == torch.long
    clinical = ClinicalDataset(root / "test", tasks=["sepsis"])
    x = clinical[0]
    assert x["clinical"].shape == (48, 9) and x["clinical_mask"].shape == (48, 9)
    assert torch.all(x["clinical"][x["clinical_mask"] == 0] == 0)
    texts = TextDataset(root / "test")
    q = texts[0]
    assert q["label"] == -1 and q["answer"] in q["options"] and "?" in q["question"]


class CountingEcgs(EcgDataset):
    """The real ECG dataset, counting how often each sample is decoded from its WFDB files."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reads = [0] * len(self)

    def __getitem__(self, i):
        self.reads[i] += 1
        return super().__getitem__(i)


def test_the_decoded_cache_reads_each_sample_once_and_returns_the_same_items(small_federation):
    ecgs = CountingEcgs(small_federation.root / "site-b", split="train", ecg_hz=100, ecg_seconds=6)
    cached = DecodedCache(ecgs, budget_mb=64)
    first = [cached[i] for i in range(len(cached))]
    first[0]["ecg"] = None  # a caller rebinding a key does not reach the kept item
    again = [cached[i] for i in range(len(cached))]
    assert ecgs.reads == [1] * len(ecgs) and cached.cached == len(ecgs)
    fresh = EcgDataset(small_federation.root / "site-b", split="train", ecg_hz=100, ecg_seconds=6)
    for i in range(len(fresh)):
        assert torch.equal(again[i]["ecg"], fresh[i]["ecg"]) and again[i]["label"] == fresh[i]["label"]


def test_past_its_budget_the_cache_reads_samples_again(small_federation):
    ecgs = CountingEcgs(small_federation.root / "site-b", split="train", ecg_hz=100, ecg_seconds=6)
    per_item = ecgs[0]["ecg"].nbytes
    ecgs.reads[0] = 0
    cached = DecodedCache(ecgs, budget_mb=3.5 * per_item / 2**20)  # room for three items
    for _ in range(2):
        for i in range(len(cached)):
            cached[i]
    assert cached.cached == 3 and cached.used == 3 * per_item <= cached.budget
    assert ecgs.reads[:3] == [1, 1, 1] and all(n == 2 for n in ecgs.reads[3:]) and len(ecgs) > 3
    assert DecodedCache(ecgs, budget_mb=0)[0]["ecg"].shape == (12, 600)  # 0: nothing kept, items still served


def test_multimodal_questions_carry_both_inputs(small_federation):
    test = SiteDataset(small_federation.root / "test", tasks=["cxr_vqa", "ecg_noise_qa"], image_size=32)
    kinds = {tuple(sorted(k for k in ("image", "ecg", "question") if k in test[i])) for i in range(len(test))}
    assert kinds == {("image", "question"), ("ecg", "question")}


def test_batches_of_one_modality_work_and_mixed_batches_fail_clearly(small_federation):
    loader = DataLoader(ImageDataset(small_federation.root / "public", image_size=32), batch_size=8,
                        collate_fn=collate)
    assert next(iter(loader))["image"].shape == (8, 1, 32, 32)
    mixed = SiteDataset(small_federation.root / "site-a", image_size=32)
    by_modality = {m: int(np.flatnonzero(mixed.index["modality"] == m)[0]) for m in ("image", "ecg")}
    with pytest.raises(ValueError, match="different modalities"):
        collate([mixed[by_modality["image"]], mixed[by_modality["ecg"]]])


@pytest.mark.parametrize("fs, mains", [(500, 50), (250, 60)])
def test_default_ecg_rate_keeps_each_sites_powerline_noise_visible(tmp_path, fs, mains):
    """ecg_noise_qa asks about powerline noise: the loader's resampling must not filter the mains out (at 100 Hz
    the anti-alias filter removed 50 and 60 Hz alike, and "powerline" looked like "none")."""
    from scipy.signal import welch

    from fedkim.config import SiteTrainingParams

    hz = SiteTrainingParams().ecg_hz
    t = np.arange(10 * fs) / fs
    clean = np.stack([np.sin(2 * np.pi * 1.2 * t)] * 12, axis=1)
    write_wfdb(tmp_path / "clean", clean, fs)
    write_wfdb(tmp_path / "mains", clean + 0.1 * np.sin(2 * np.pi * mains * t)[:, None], fs)

    def mains_power(name):
        f, p = welch(load_ecg(tmp_path / f"{name}.hea", hz=hz, seconds=10).numpy()[0], fs=hz, nperseg=hz)
        return p[(f >= mains - 2) & (f <= mains + 2)].max()

    assert mains_power("mains") > 100 * mains_power("clean")
