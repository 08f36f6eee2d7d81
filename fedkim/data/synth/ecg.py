"""Synthetic 12-lead ECGs from neurokit2's ECGSYN model (`ecg_simulate(method="multileads")`).

ECGSYN integrates an ODE per lead, about 1 s of CPU per 10-s record: too slow for a federation of a thousand
records. So we simulate a *bank* of beat morphologies per class once (a 2-s run per patient draw, varying the
P/Q/R/S/T angles, amplitudes and widths as the class requires) and compose each record from those beats:
an RR sequence (regular, or irregular for AF), premature ectopic beats, fibrillatory waves, the site's lead
gain, and the noise types of the ECG question task (powerline at the site's mains frequency, baseline drift,
burst artefacts).
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
from scipy.signal import resample_poly

BANK_HZ = 500
CLASSES = ("normal", "af", "wide_qrs", "t_inversion", "pvc")
NOISES = ("none", "powerline", "baseline drift", "burst")
# ECGSYN defaults (McSharry et al.): P, Q, R, S, T.
TI = np.array([-70.0, -15.0, 0.0, 15.0, 100.0])
AI = np.array([1.2, -5.0, 30.0, -7.5, 0.75])
BI = np.array([0.25, 0.1, 0.1, 0.1, 0.4])
# Where fibrillatory waves are strongest (V1, II, III, aVF).
F_WAVE_LEADS = np.array([0.4, 1.0, 0.8, -0.5, 0.2, 0.9, 1.2, 0.8, 0.5, 0.4, 0.3, 0.3], dtype=np.float32)


@dataclass(frozen=True)
class BeatBank:
    """templates[cls] has shape (K, 12, BANK_HZ): one beat per patient draw, R peak at the centre."""

    templates: dict[str, np.ndarray]
    effect: float


def _morphology(cls: str, effect: float, rng: np.random.Generator, variability: float):
    ti, ai, bi = TI.copy(), AI.copy(), BI.copy()
    jitter = np.exp(rng.normal(0.0, 0.25 * variability, size=5))
    ai *= jitter
    bi *= np.exp(rng.normal(0.0, 0.15 * variability, size=5))
    ti += rng.normal(0.0, 4.0 * variability, size=5)
    severity = effect * rng.uniform(0.6, 1.4)
    if cls == "af":
        ai[0] *= max(0.0, 1.0 - 2.5 * severity)  # no organised atrial activity
    elif cls == "wide_qrs":
        bi[1:4] *= 1.0 + 2.5 * severity
    elif cls == "t_inversion":
        ai[4] *= 1.0 - 4.0 * severity
    elif cls == "pvc":  # ventricular ectopic: no P, wide bizarre QRS, discordant T
        ai[0] = 0.0
        bi[1:4] *= 2.6
        ai[4] *= -1.6
    return ti, ai, bi


def _simulate_beat(args) -> np.ndarray:
    cls, effect, variability, seed = args
    import neurokit2 as nk  # imported in the worker: 3 s, only when a bank is built

    rng = np.random.default_rng(seed)
    ti, ai, bi = _morphology(cls, effect, rng, variability)
    frame = nk.ecg_simulate(duration=2, sampling_rate=BANK_HZ, method="multileads", heart_rate=60,
                            heart_rate_std=0.001, noise=0, random_state=int(seed % 2**31), ti=ti, ai=ai, bi=bi)
    signal = frame.to_numpy(dtype=np.float32).T  # (12, 1000); R peaks at t = 0, 1, 2 s
    beat = signal[:, BANK_HZ // 2: BANK_HZ + BANK_HZ // 2]  # one cycle, R at the centre
    edge = 25
    baseline = np.linspace(beat[:, :edge].mean(1), beat[:, -edge:].mean(1), beat.shape[1]).T
    beat = beat - baseline
    taper = np.ones(beat.shape[1], dtype=np.float32)
    ramp = np.hanning(2 * edge)[:edge].astype(np.float32)
    taper[:edge], taper[-edge:] = ramp, ramp[::-1]
    return (beat * taper).astype(np.float32)


def build_bank(seed: int, per_class: int, effect: float, variability: float, workers: int = 1) -> BeatBank:
    jobs = [(cls, effect, variability, seed * 1_000_003 + c * 10_007 + k)
            for c, cls in enumerate(CLASSES) for k in range(per_class)]
    workers = max(1, min(workers, os.cpu_count() or 1))
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            beats = list(pool.map(_simulate_beat, jobs, chunksize=8))
    else:
        beats = [_simulate_beat(j) for j in jobs]
    stacked = np.stack(beats).reshape(len(CLASSES), per_class, 12, BANK_HZ)
    return BeatBank({cls: stacked[i] for i, cls in enumerate(CLASSES)}, effect)


@dataclass
class EcgSpec:
    """One record to compose."""

    rhythm: str = "normal"  # normal | af | wide_qrs | t_inversion (the beat morphology class)
    ectopics: int = 0  # premature ventricular beats to insert
    noise: str = "none"  # one of NOISES
    fs: int = 500
    seconds: int = 10
    powerline_hz: int = 50
    lead_gain: float = 1.0
    broadband_mv: float = 0.03
    signal_scale: float = 1.0  # < 1 blends the abnormal morphology towards normal (a weak site)


def compose(rng: np.random.Generator, bank: BeatBank, spec: EcgSpec) -> np.ndarray:
    """A (n_samples, 12) record in mV at spec.fs."""
    n = spec.seconds * BANK_HZ
    half = BANK_HZ // 2
    out = np.zeros((12, n + BANK_HZ), dtype=np.float32)
    patient = rng.integers(bank.templates["normal"].shape[0])
    beat = bank.templates[spec.rhythm][rng.integers(bank.templates[spec.rhythm].shape[0])]
    if spec.rhythm != "normal" and spec.signal_scale < 1.0:
        beat = spec.signal_scale * beat + (1 - spec.signal_scale) * bank.templates["normal"][patient]
    pvc = bank.templates["pvc"][rng.integers(bank.templates["pvc"].shape[0])]
    lead_scale = np.exp(rng.normal(0.0, 0.12, size=(12, 1))).astype(np.float32)

    rr_mean = 60.0 / rng.uniform(55, 95)
    irregular = spec.rhythm == "af"
    times, t = [], rng.uniform(0.05, rr_mean)
    while t < spec.seconds + 0.5:
        times.append(t)
        if irregular:
            t += rr_mean * np.clip(rng.normal(1.0, 0.2 + 0.2 * spec.signal_scale), 0.55, 1.6)
        else:
            t += rr_mean * (1.0 + 0.03 * rng.standard_normal())
    kinds = ["sinus"] * len(times)
    if spec.ectopics:  # a premature beat, then a compensatory pause
        slots = rng.choice(np.arange(1, max(2, len(times) - 1)), size=min(spec.ectopics, len(times) - 2),
                           replace=False)
        for i in sorted(slots):
            times[i] = times[i - 1] + rr_mean * rng.uniform(0.55, 0.7)
            kinds[i] = "pvc"
    for t, kind in zip(times, kinds):
        centre = int(round(t * BANK_HZ)) + half
        lo = centre - half
        if lo < 0 or lo + BANK_HZ > out.shape[1]:
            continue
        template = pvc if kind == "pvc" else beat
        out[:, lo:lo + BANK_HZ] += template * rng.uniform(0.95, 1.05)
    signal = out[:, half:half + n] * lead_scale
    tt = np.arange(n, dtype=np.float32) / BANK_HZ
    if irregular:  # fibrillatory waves, 4-9 Hz
        f = rng.uniform(4, 9)
        amp = rng.uniform(0.03, 0.07) * spec.signal_scale
        signal += amp * F_WAVE_LEADS[:, None] * np.sin(2 * np.pi * f * tt + rng.uniform(0, 2 * np.pi))
    signal += 0.02 * np.sin(2 * np.pi * 0.25 * tt + rng.uniform(0, 2 * np.pi))  # respiration, always there
    signal = _add_noise(rng, signal, spec, tt)
    signal *= spec.lead_gain
    if spec.fs != BANK_HZ:
        signal = resample_poly(signal, spec.fs, BANK_HZ, axis=1).astype(np.float32)
    return np.clip(signal.T, -9.0, 9.0)


def _add_noise(rng, signal, spec: EcgSpec, tt):
    n = signal.shape[1]
    signal = signal + rng.normal(0.0, spec.broadband_mv, size=signal.shape).astype(np.float32)
    if spec.noise == "powerline":
        amp = rng.uniform(0.08, 0.2)
        phase = rng.uniform(0, 2 * np.pi, size=(12, 1))
        signal += amp * np.sin(2 * np.pi * spec.powerline_hz * tt + phase)
    elif spec.noise == "baseline drift":
        f = rng.uniform(0.1, 0.4)
        amp = rng.uniform(0.4, 0.9)
        drift = amp * np.sin(2 * np.pi * f * tt + rng.uniform(0, 2 * np.pi)) + rng.uniform(-0.4, 0.4) * tt / tt[-1]
        signal += drift * np.exp(rng.normal(0, 0.2, size=(12, 1)))
    elif spec.noise == "burst":
        for _ in range(rng.integers(1, 4)):
            width = int(rng.uniform(0.15, 0.5) * BANK_HZ)
            start = rng.integers(0, n - width)
            leads = rng.random(12) < 0.6
            burst = rng.normal(0, rng.uniform(0.3, 0.8), size=(int(leads.sum()), width))
            signal[leads, start:start + width] += burst.astype(np.float32)
    return signal
