"""Hourly ICU vitals and labs with a latent deterioration onset and informative missingness.

Each patient has their own baseline (between-patient spread) and AR(1) hour-to-hour fluctuation. A patient who
deteriorates drifts after an onset hour in the direction of their deterioration kind; sicker patients are
measured more often. Mortality: deterioration that ends in death. Sepsis (zero-shot): a different signature
(fever or hypothermia, tachycardia, tachypnoea, leukocytosis, rising lactate) that overlaps the mortality
variables, over a window twice as long.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from fedkim.data.formats.clinical import VARIABLES

NAMES = tuple(VARIABLES)
# population mean, between-patient SD, hour-to-hour innovation SD
BASELINE = {
    "heart_rate": (82, 11, 3.5), "sbp": (122, 14, 4.5), "dbp": (68, 9, 3.0), "resp_rate": (17, 2.8, 1.2),
    "spo2": (96.5, 1.3, 0.6), "temperature": (36.9, 0.35, 0.12), "lactate": (1.3, 0.4, 0.12),
    "wbc": (8.5, 2.4, 0.4), "creatinine": (1.0, 0.28, 0.04),
}
LABS = ("lactate", "wbc", "creatinine")
# direction of drift, in between-patient SDs, per deterioration kind
SIGNATURES = {
    "shock": {"heart_rate": 1.2, "sbp": -1.6, "dbp": -1.2, "lactate": 1.6},
    "respiratory": {"resp_rate": 1.8, "spo2": -1.8, "temperature": 0.4},
    "renal": {"creatinine": 2.4, "wbc": 0.6},
    "sepsis": {"temperature": 1.8, "heart_rate": 1.3, "resp_rate": 1.2, "wbc": 1.8, "lactate": 1.2, "sbp": -0.8},
}


def simulate_patient(rng: np.random.Generator, hours: int, kind: str | None, drift: float,
                     lab_interval_h: float, sample_id: str) -> pd.DataFrame:
    """Long-format rows for one patient; `kind` None means no deterioration."""
    mean = np.array([BASELINE[v][0] for v in NAMES])
    between = np.array([BASELINE[v][1] for v in NAMES])
    innovation = np.array([BASELINE[v][2] for v in NAMES])
    base = mean + rng.normal(0, 1, len(NAMES)) * between
    series = np.empty((hours, len(NAMES)))
    state = np.zeros(len(NAMES))
    for h in range(hours):
        state = 0.75 * state + rng.normal(0, 1, len(NAMES)) * innovation
        series[h] = base + state
    sickness = np.zeros(hours)
    if kind is not None:
        onset = rng.integers(0, max(1, int(hours * 0.6)))
        ramp = np.clip((np.arange(hours) - onset) / max(1.0, hours - onset), 0, None)
        severity = drift * rng.uniform(0.6, 1.4)
        signature = dict(SIGNATURES[kind])
        if kind == "sepsis" and rng.random() < 0.25:
            signature["temperature"] = -1.5  # hypothermic sepsis
        for name, direction in signature.items():
            j = NAMES.index(name)
            series[:, j] += direction * severity * between[j] * ramp
        sickness = ramp
    series = _clip_to_limits(series)
    measured = _measured_mask(rng, hours, sickness, lab_interval_h)
    hour_idx, var_idx = np.nonzero(measured)
    return pd.DataFrame({
        "sample_id": sample_id,
        "hour": hour_idx.astype(np.int16),
        "variable": np.array(NAMES)[var_idx],
        "value": series[hour_idx, var_idx].astype(np.float32),
    })


def _clip_to_limits(series: np.ndarray) -> np.ndarray:
    low = np.array([VARIABLES[v][1] for v in NAMES])
    high = np.array([VARIABLES[v][2] for v in NAMES])
    return np.clip(series, low, high)


def _measured_mask(rng, hours: int, sickness: np.ndarray, lab_interval_h: float) -> np.ndarray:
    """Informative missingness: vitals nearly hourly, labs every few hours, both more often when sicker."""
    mask = np.zeros((hours, len(NAMES)), dtype=bool)
    for j, name in enumerate(NAMES):
        if name in LABS:
            p = np.clip(1.0 / lab_interval_h * (1.0 + 0.8 * sickness), 0, 1)
        else:
            p = np.clip(0.85 + 0.08 * sickness, 0, 1)
        mask[:, j] = rng.random(hours) < p
    mask[0, :] = True  # admission panel
    return mask
