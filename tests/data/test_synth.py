"""The generators plant what their labels say: each finding moves the signal where it should."""

import numpy as np
import pytest
from scipy.signal import welch

from fedkim.data.formats.clinical import VARIABLES
from fedkim.data.synth import cxr, icu, text
from fedkim.data.synth.ecg import EcgSpec, build_bank, compose

SIZE = 64
NO_NOISE = cxr.Acquisition(noise=0.0, rotation_deg=0.0)


def pair(finding: str, **extra):
    """The same patient rendered without and with one finding (same random stream)."""
    base = cxr.render(np.random.default_rng(5), SIZE, cxr.Findings(side="right", **extra), NO_NOISE, 0.2)
    flags = cxr.Findings(side="right", **extra)
    setattr(flags, finding, True)
    return base, cxr.render(np.random.default_rng(5), SIZE, flags, NO_NOISE, 0.2)


def test_phantom_is_deterministic_and_in_range():
    a = cxr.render(np.random.default_rng(1), SIZE, cxr.Findings(), cxr.Acquisition(), 0.2)
    b = cxr.render(np.random.default_rng(1), SIZE, cxr.Findings(), cxr.Acquisition(), 0.2)
    assert a.dtype == np.float32 and a.shape == (SIZE, SIZE)
    assert np.array_equal(a, b) and 0.0 <= a.min() and a.max() <= 1.0


def test_lung_opacity_brightens_the_chosen_lung_zone():
    normal, opaque = pair("lung_opacity", zones=("upper",))
    diff = opaque - normal
    right_lung_upper = diff[: SIZE // 2, : SIZE // 2]  # patient's right = image left, upper half
    assert diff.min() >= -1e-6 and right_lung_upper.sum() > 0.8 * diff.sum() > 0


def test_covid_is_bilateral():
    normal, covid = pair("covid")
    diff = covid - normal
    assert diff[:, : SIZE // 2].sum() > 0.5 and diff[:, SIZE // 2:].sum() > 0.5


def test_enlarged_cardiomediastinum_widens_the_heart():
    normal, big = pair("enlarged_cardiomediastinum")
    row = int(SIZE * 0.58)  # through the heart
    width = lambda img: int((img[row] > img[row].max() - 0.05).sum())
    assert width(big) > width(normal) + 2


def test_effusion_fills_the_base_of_one_side():
    normal, effusion = pair("pleural_effusion")
    diff = effusion - normal
    assert diff[SIZE // 2:, : SIZE // 2].sum() > 5 * max(diff[SIZE // 2:, SIZE // 2:].sum(), 0.1)


def test_atelectasis_changes_the_affected_lung():
    normal, collapsed = pair("atelectasis")
    diff = np.abs(collapsed - normal)
    assert diff[:, : SIZE // 2].sum() > 3 * diff[:, SIZE // 2:].sum()


def test_acquisition_shift_changes_pixels_not_anatomy():
    findings = cxr.Findings()
    bright = cxr.render(np.random.default_rng(2), SIZE, findings, cxr.Acquisition(exposure=1.3, noise=0), 0.2)
    plain = cxr.render(np.random.default_rng(2), SIZE, findings, cxr.Acquisition(exposure=1.0, noise=0), 0.2)
    assert bright.mean() > plain.mean() + 0.02
    assert np.corrcoef(bright.ravel(), plain.ravel())[0, 1] > 0.95


@pytest.fixture(scope="module")
def bank():
    return build_bank(seed=3, per_class=3, effect=0.35, variability=0.3, workers=1)


def record(bank, seed=0, **spec):
    return compose(np.random.default_rng(seed), bank, EcgSpec(seconds=8, broadband_mv=0.01, **spec))


def band_power(signal, fs, lo, hi):
    f, p = welch(signal, fs=fs, nperseg=len(signal), axis=0)
    return p[(f >= lo) & (f <= hi)].mean()


def test_bank_shapes_and_classes(bank):
    assert set(bank.templates) == {"normal", "af", "wide_qrs", "t_inversion", "pvc"}
    assert bank.templates["normal"].shape == (3, 12, 500)
    # T inversion flips the T wave of lead II (the late part of the beat) relative to normal.
    late = slice(300, 420)
    assert bank.templates["t_inversion"][:, 1, late].mean() < bank.templates["normal"][:, 1, late].mean() - 0.1


def test_record_shape_units_and_sampling_rate(bank):
    x500, x250 = record(bank), record(bank, fs=250)
    assert x500.shape == (8 * 500, 12) and x250.shape == (8 * 250, 12)
    assert np.abs(x500).max() < 5.0 and x500.std() > 0.05


def test_af_makes_the_rhythm_irregular(bank):
    def rr_irregularity(x):
        from scipy.signal import find_peaks
        lead = x[:, 6]  # V1 has sharp QRS complexes in this model
        peaks, _ = find_peaks(np.abs(lead - np.median(lead)), distance=150, prominence=0.3)
        return np.std(np.diff(peaks)) / np.mean(np.diff(peaks))
    normal = np.mean([rr_irregularity(record(bank, s)) for s in range(6)])
    af = np.mean([rr_irregularity(record(bank, s, rhythm="af")) for s in range(6)])
    assert af > 2 * normal


def test_noise_types_are_where_their_name_says(bank):
    clean, power = record(bank, 1), record(bank, 1, noise="powerline", powerline_hz=60)
    assert band_power(power[:, 0], 500, 59, 61) > 20 * band_power(clean[:, 0], 500, 59, 61)
    drift = record(bank, 1, noise="baseline drift")
    assert band_power(drift[:, 0], 500, 0.05, 0.6) > 5 * band_power(clean[:, 0], 500, 0.05, 0.6)
    burst = record(bank, 1, noise="burst")
    assert band_power(burst, 500, 60, 200) > 5 * band_power(clean, 500, 60, 200)


def test_ectopic_beats_add_wide_premature_complexes(bank):
    clean, ectopic = record(bank, 4), record(bank, 4, ectopics=2)
    assert np.abs(ectopic - clean).max() > 0.3


def test_icu_deterioration_moves_its_signature_variables():
    def last_hours(kind, variable, seed):
        frame = icu.simulate_patient(np.random.default_rng(seed), 24, kind, 1.0, 6.0, "p")
        rows = frame[(frame.variable == variable) & (frame.hour >= 18)]
        return rows.value.mean()
    stable = np.nanmean([last_hours(None, "lactate", s) for s in range(30)])
    shock = np.nanmean([last_hours("shock", "lactate", s) for s in range(30)])
    assert shock > stable + 0.2
    stable_spo2 = np.nanmean([last_hours(None, "spo2", s) for s in range(30)])
    resp_spo2 = np.nanmean([last_hours("respiratory", "spo2", s) for s in range(30)])
    assert resp_spo2 < stable_spo2 - 0.5


def test_icu_values_stay_physiological_and_sick_patients_are_measured_more():
    frames = [icu.simulate_patient(np.random.default_rng(s), 48, k, 3.0, 6.0, "p")
              for s in range(10) for k in (None, "sepsis")]
    for frame in frames:
        for variable, (_, low, high) in VARIABLES.items():
            values = frame[frame.variable == variable].value
            assert values.between(low, high).all()
    stable = np.mean([len(f) for f in frames[0::2]])
    sick = np.mean([len(f) for f in frames[1::2]])
    assert sick > stable


def test_ontology_questions_are_well_formed_and_varied():
    rng = np.random.default_rng(0)
    questions = [text.make_question(rng, f"q{i}") for i in range(40)]
    for q in questions:
        assert q["answer"] in q["options"] == ["A", "B", "C", "D"]
        assert len(set(q["choices"].values())) == 4
    assert len({q["answer"] for q in questions}) == 4
    assert any("chapter" in q["question"] for q in questions) and any("code" in q["question"] for q in questions)


def test_covid_ground_glass_scales_with_covid_contrast():
    base, faint = pair("covid")  # the default amplitude, 0.15 of the image contrast
    flags = cxr.Findings(side="right", covid=True)
    strong = cxr.render(np.random.default_rng(5), SIZE, flags, NO_NOISE, 0.2, ggo=0.45)
    added_faint, added_strong = (faint - base).sum(), (strong - base).sum()
    assert added_faint > 0 and 2.7 < added_strong / added_faint < 3.3
