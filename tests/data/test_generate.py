"""The generated federation: the site format, reproducibility, caching, heterogeneity, safety of existing data."""

import numpy as np
import pandas as pd
import pydicom
import pytest
import yaml

from fedkim.config import load_params
from fedkim.data.catalogue import load_catalogue
from fedkim.data.formats.ecg import header_facts
from fedkim.data.siteformat import INDEX_COLUMNS, compute_fingerprint, count_samples, read_index, read_manifest
from fedkim.data.synth.federation import GenerationError, generate_federation
from tests.helpers import small_params_dict

CATALOGUE = load_catalogue()  # the shipped catalogue
TASKS, TRAIN_TASKS, ZERO_SHOT_TASKS = CATALOGUE.tasks, CATALOGUE.train, CATALOGUE.zero_shot


def has_mains(path, mains: float) -> bool:
    """Lead I of the WFDB record shows a peak at the mains frequency (powerline noise) over its 20-45 Hz floor."""
    from scipy.signal import welch

    from fedkim.data.formats.ecg import read_ecg

    record = read_ecg(path)
    f, p = welch(record.signal[:, 0], fs=record.fs, nperseg=int(record.fs))
    return p[(f >= mains - 1) & (f <= mains + 1)].max() > 20 * np.median(p[(f >= 20) & (f <= 45)])


def params_at(tmp_path, root, **extra):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(small_params_dict(root, **extra)))
    return load_params(path)


def test_layout_and_manifests(small_federation):
    root = small_federation.root
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert names == ["public", "site-a", "site-b", "site-c", "site-d", "test", "validation"]
    for manifest in small_federation.sites:
        site_dir = root / manifest.site_id
        index = read_index(site_dir)
        assert list(index.columns) == list(INDEX_COLUMNS)
        assert read_manifest(site_dir) == manifest
        assert manifest.fingerprint == compute_fingerprint(site_dir)
        assert manifest.counts == count_samples(index)
        assert index["sample_id"].is_unique
        for column in ("image_path", "ecg_path", "clinical_path", "text_path"):
            for rel in index[column].dropna().unique():
                assert (site_dir / rel).is_file(), rel


def test_zero_shot_tasks_only_in_test_and_sites_hold_only_their_modalities(small_federation):
    root = small_federation.root
    params = {s.id: s for s in load_params(root.parent / "params.yaml").generated_sites()}
    for site_id, spec in params.items():
        index = read_index(root / site_id)
        assert set(index["task"]) <= set(TRAIN_TASKS)
        assert set(index["modality"]) == set(spec.modalities)
        assert set(index["split"]) == {"train", "val"}
    assert set(read_index(root / "public")["task"]) == set(TRAIN_TASKS)
    validation = read_index(root / "validation")  # promotion decides on the training tasks here
    assert set(validation["task"]) == set(TRAIN_TASKS) and set(validation["split"]) == {"validation"}
    test = read_index(root / "test")
    assert set(test["task"]) == set(TASKS) and set(test["split"]) == {"test"}
    assert set(ZERO_SHOT_TASKS) <= set(test["task"])


def test_labels_and_answers_follow_the_catalogue(small_federation):
    test = read_index(small_federation.root / "test")
    for task, rows in test.groupby("task"):
        spec = TASKS[task]
        assert set(rows["answer"]) <= set(spec.answers)
        if spec.kind == "binary":
            assert set(rows["label"]) == {0, 1}
            assert (rows["answer"] == rows["label"].map({0: "No", 1: "Yes"})).all()
        else:
            assert rows["label"].isna().all()


def test_site_heterogeneity_is_real(small_federation):
    root = small_federation.root
    c = read_index(root / "site-c")
    dicom_path = root / "site-c" / c["image_path"].dropna().iloc[0]
    ds = pydicom.dcmread(dicom_path)
    assert dicom_path.suffix == ".dcm" and ds.Modality == "DX" and ds.PhotometricInterpretation == "MONOCHROME1"
    assert read_index(root / "site-a")["image_path"].dropna().str.endswith(".png").all()
    rate = lambda site: {header_facts(root / site / p)["fs"] for p in read_index(root / site)["ecg_path"].dropna()}
    assert rate("site-a") == {500.0} and rate("site-b") == {250.0}
    per_task = {m.site_id: sum(m.counts["lung_opacity"].values()) for m in small_federation.sites
                if "lung_opacity" in m.counts}
    assert per_task["site-d"] <= 0.6 * per_task["site-a"]  # the small site


def test_reproducible_under_a_seed_and_cached(tmp_path, small_federation):
    again = generate_federation(params_at(tmp_path, tmp_path / "again"))
    assert {m.site_id: m.fingerprint for m in again.sites} == {m.site_id: m.fingerprint for m in small_federation.sites}
    # Byte for byte, top-level files included: DVC hashes the whole folder, so a regenerated one must not
    # differ (sites' reports/ folders are the validation gate's, written later by other tests).
    files = lambda root: {p.relative_to(root): p.read_bytes() for p in root.rglob("*")  # noqa: E731
                          if p.is_file() and "reports" not in p.relative_to(root).parts}
    assert files(again.root) == files(small_federation.root)
    cached = generate_federation(params_at(tmp_path, tmp_path / "again"))
    assert cached.cached and cached.params_hash == again.params_hash
    other = generate_federation(params_at(tmp_path, tmp_path / "other", **{"data.seed": 7}))
    assert other.params_hash != again.params_hash
    assert all(a.fingerprint != b.fingerprint for a, b in zip(other.sites, again.sites))


def test_changed_params_replace_a_generated_federation_atomically(tmp_path):
    root = tmp_path / "fed"
    first = generate_federation(params_at(tmp_path, root, **_two_sites()))
    second = generate_federation(params_at(tmp_path, root, **_two_sites(), **{"data.seed": 9}))
    assert first.params_hash != second.params_hash and not second.cached
    assert yaml.safe_load((root / "federation.yaml").read_text())["params_hash"] == second.params_hash
    assert sorted(p.name for p in root.iterdir()) == ["federation.yaml", "public", "site-x", "site-y", "test",
                                                      "validation"]


def test_refuses_to_overwrite_a_folder_it_did_not_write(tmp_path):
    root = tmp_path / "hospital-export"
    (root / "site-a").mkdir(parents=True)
    precious = root / "site-a" / "patients.csv"
    precious.write_text("do not lose me")
    with pytest.raises(GenerationError, match=r"site-a: exists but was not generated here \(not recorded in "):
        generate_federation(params_at(tmp_path, root))
    assert precious.read_text() == "do not lose me" and sorted(p.name for p in root.iterdir()) == ["site-a"]


def test_clinical_files_are_long_format_with_one_window_per_task(small_federation):
    root = small_federation.root / "test"
    index = read_index(root)
    for task, hours in (("mortality", 24), ("sepsis", 48)):
        path = root / index[index.task == task]["clinical_path"].iloc[0]
        frame = pd.read_parquet(path)
        assert list(frame.columns) == ["sample_id", "hour", "variable", "value"]
        assert frame["hour"].max() < hours and frame["hour"].max() >= hours - 4
        assert np.isfinite(frame["value"]).all()


def _two_sites() -> dict:
    return {"federation.members": [{"id": "site-x", "modalities": ["image", "ecg", "clinical"]},
                                   {"id": "site-y", "modalities": ["ecg", "clinical"]}],
            "data.sites": {"site-x": {"size_factor": 0.4}, "site-y": {"size_factor": 0.4}}}


def test_every_generated_directory_passes_the_gate(small_federation):
    from fedkim.config import GateParams
    from fedkim.data.validate import validate_site

    # The test-sized federation has a handful of samples per class; the default gate minimum is for real sizes.
    rules = GateParams(min_samples_per_class=1, min_samples_per_site=10)
    for manifest in small_federation.sites:
        report = validate_site(small_federation.root / manifest.site_id, rules, write_docs=False)
        assert report.success, report.summary()


def test_labelled_ecgs_carry_routine_artifacts_at_the_configured_share(small_federation):
    """Recorded ECGs are not all clean (PTB-XL annotates drift, static and burst noise): a share of the labelled
    tasks' records carry one artifact, so encoders and the label-free calibration see them before ecg_noise_qa."""
    root = small_federation.root
    params = load_params(root.parent / "params.yaml")
    records = [(root / site.id / rel, site.ecg.powerline_hz) for site in params.generated_sites()
               if "ecg" in site.modalities for rel in read_index(root / site.id)["ecg_path"].dropna()]

    with_mains = sum(has_mains(path, mains) for path, mains in records)
    expected = params.data.difficulty.ecg_artifacts / 3 * len(records)  # powerline is one of three artifacts
    assert 0.3 * expected < with_mains < 2 * expected + 3, (with_mains, expected, len(records))


def test_ecg_noise_questions_verify_or_query_the_noise_the_record_carries(tmp_path):
    """ecg_noise_qa comes in ECG-QA's two forms: "is there noise?" (yes/no, balanced) and "which noise?" (four
    options). The answers must match the signal: powerline noise is visible as power at the site's mains."""
    from fedkim.data.synth.ecg import NOISES, build_bank
    from fedkim.data.synth.federation import NOISE_VERIFY_QUESTION, _make_ecg

    ECG_NOISE_ANSWERS = NOISES

    params = params_at(tmp_path, tmp_path / "unused")
    data, site = params.data, params.generated_sites()[0]
    bank = build_bank(data.seed, 2, data.difficulty.ecg_effect, data.difficulty.ecg_variability)
    rng, questions, paths = np.random.default_rng(0), [], {}
    for i in range(120):
        path, answer = _make_ecg(tmp_path, rng, data, bank, site, TASKS["ecg_noise_qa"], 0, "test", f"q{i}", questions)
        assert answer == questions[-1]["answer"]
        paths[f"q{i}"] = tmp_path / path

    def mains_in(sample_id):
        return has_mains(paths[sample_id], site.ecg.powerline_hz)

    verify = [q for q in questions if q["question"] == NOISE_VERIFY_QUESTION]
    query = [q for q in questions if q["question"] == TASKS["ecg_noise_qa"].question]
    assert len(verify) + len(query) == 120 and 35 <= len(verify) <= 85
    assert all(q["options"] == ["yes", "no"] for q in verify)
    assert all(q["options"] == list(ECG_NOISE_ANSWERS) and q["answer"] in ECG_NOISE_ANSWERS for q in query)
    yes = [q for q in verify if q["answer"] == "yes"]
    assert 0.3 < len(yes) / len(verify) < 0.7  # "yes" is not a majority answer to guess
    assert not any(mains_in(q["sample_id"]) for q in verify if q["answer"] == "no")
    assert any(mains_in(q["sample_id"]) for q in yes)  # some of the noisy ones are powerline
    assert all(mains_in(q["sample_id"]) == (q["answer"] == "powerline") for q in query)
