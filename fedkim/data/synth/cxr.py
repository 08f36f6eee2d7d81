"""Procedural chest-radiograph phantoms: thorax, lung fields, ribs, heart, mediastinum and diaphragm, with
planted findings and a site's acquisition (exposure, gamma, quantum noise, blur, rotation).

Images are attenuation maps in [0, 1] (1 = dense, shown white), PA view: the patient's right is image left.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from scipy.special import expit

FINDINGS = ("lung_opacity", "covid", "enlarged_cardiomediastinum", "pleural_effusion", "atelectasis")
ZONES = {"upper": (-0.45, -0.2), "middle": (-0.2, 0.1), "lower": (0.1, 0.35)}  # y ranges (down is +)


@dataclass
class Findings:
    """What is planted in one image; `side` is the patient's side ('left'/'right') of a lateral finding."""

    lung_opacity: bool = False
    covid: bool = False
    enlarged_cardiomediastinum: bool = False
    pleural_effusion: bool = False
    atelectasis: bool = False
    side: str | None = None
    zones: tuple[str, ...] = ("upper", "middle", "lower")


@dataclass
class Acquisition:
    exposure: float = 1.0
    gamma: float = 1.0
    noise: float = 0.05
    blur: float = 0.0
    rotation_deg: float = 3.0


@dataclass
class _Anatomy:
    yy: np.ndarray
    xx: np.ndarray
    lung_cx: float = 0.36
    lung_cy: float = -0.08
    lung_rx: float = 0.24
    lung_ry: float = 0.42
    heart_w: float = 0.2
    dome: dict = field(default_factory=dict)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    axis = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    return np.meshgrid(axis, axis, indexing="ij")  # yy (rows, down +), xx (cols, right +)


def _ellipse(yy, xx, cy, cx, ry, rx, soft=0.04):
    d = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
    return expit((1.0 - d) / soft)


def _blob(yy, xx, cy, cx, sigma):
    return np.exp(-(((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2)))


def _lung_x(side: str, anatomy: _Anatomy) -> float:
    # Patient's right lung is on the image's left.
    return -anatomy.lung_cx if side == "right" else anatomy.lung_cx


def render(rng: np.random.Generator, size: int, findings: Findings, acquisition: Acquisition,
           contrast: float, ggo: float = 0.15) -> np.ndarray:
    """One phantom radiograph in [0, 1]. ggo: COVID ground-glass amplitude as a fraction of `contrast`."""
    yy, xx = _grid(size)
    a = _Anatomy(yy, xx)
    # Patient variation: body habitus, lung size, heart size (cardiothoracic ratio 0.38-0.47 when normal).
    scale = rng.uniform(0.92, 1.06)
    a.lung_rx *= scale * rng.uniform(0.95, 1.05)
    a.lung_ry *= scale * rng.uniform(0.95, 1.05)
    thorax_half = a.lung_cx + a.lung_rx
    ctr = rng.uniform(0.38, 0.47)
    if findings.enlarged_cardiomediastinum:
        ctr = rng.uniform(0.53, 0.62)
    a.heart_w = ctr * thorax_half  # heart half-width so that 2*heart_w / (2*thorax_half) = ctr

    body = 0.42 * _ellipse(yy, xx, 0.05, 0.0, 0.92, thorax_half + 0.16, soft=0.03)
    image = 0.04 + body
    dome_right = rng.uniform(0.28, 0.34)  # right hemidiaphragm sits a little higher
    dome_left = dome_right + rng.uniform(0.02, 0.06)
    lungs = np.zeros_like(yy)
    for side, dome in (("right", dome_right), ("left", dome_left)):
        cx = _lung_x(side, a)
        ry = a.lung_ry
        if findings.atelectasis and findings.side == side:
            ry *= rng.uniform(0.74, 0.84)  # volume loss lifts the hemidiaphragm
            dome -= 0.14
        lung = _ellipse(yy, xx, a.lung_cy, cx, ry, a.lung_rx)
        below = expit((yy - (dome + 0.08 * ((xx - cx) / a.lung_rx) ** 2)) / 0.02)
        lung = lung * (1.0 - below)
        lungs = np.maximum(lungs, lung)
        a.dome[side] = dome
    image = image - 0.3 * lungs
    # Ribs: bright arcs across the lung fields.
    for k in range(7):
        y0 = -0.5 + 0.12 * k + rng.normal(0, 0.01)
        arc = y0 + 0.25 * (np.abs(xx) - 0.35) ** 2
        image = image + 0.06 * lungs * np.exp(-((yy - arc) ** 2) / (2 * 0.012**2))
    # Mediastinum and heart (the heart bulges to the patient's left = image right).
    image = image + 0.16 * _ellipse(yy, xx, -0.3, 0.0, 0.38, 0.13, soft=0.06)
    heart = _ellipse(yy, xx, 0.16, 0.05 * scale, 0.2, a.heart_w, soft=0.04)
    image = np.maximum(image, heart * (body.max() + 0.12))
    image = _plant(rng, image, lungs, a, findings, contrast, ggo)
    return _acquire(rng, image, acquisition)


def _plant(rng, image, lungs, a: _Anatomy, f: Findings, contrast: float, ggo_strength: float) -> np.ndarray:
    yy, xx = a.yy, a.xx
    if f.lung_opacity:
        zone = f.zones[rng.integers(len(f.zones))]
        cy = rng.uniform(*ZONES[zone])
        cx = _lung_x(f.side or "right", a) + rng.uniform(-0.08, 0.08)
        sigma = rng.uniform(0.06, 0.11)
        image = image + contrast * rng.uniform(0.8, 1.2) * lungs * _blob(yy, xx, cy, cx, sigma)
    if f.covid:
        ggo = np.zeros_like(image)
        for side in ("left", "right"):  # bilateral, peripheral, lower-zone predominant
            for _ in range(rng.integers(3, 6)):
                lateral = np.sign(_lung_x(side, a)) * (a.lung_cx + a.lung_rx * rng.uniform(0.45, 0.8))
                ggo += _blob(yy, xx, rng.uniform(-0.2, 0.3), lateral, rng.uniform(0.05, 0.09))
        image = image + ggo_strength * contrast * rng.uniform(0.8, 1.2) * lungs * np.clip(ggo, 0, 1.5)
    if f.pleural_effusion:
        side = f.side or "right"
        cx = _lung_x(side, a)
        level = a.dome[side] - rng.uniform(0.12, 0.22)
        meniscus = level - 0.18 * ((xx - cx) * np.sign(cx) / a.lung_rx).clip(0, None) ** 2  # rises laterally
        fluid = expit((yy - meniscus) / 0.02)
        side_mask = (xx * np.sign(cx) > 0.04).astype(np.float32)
        image = image + 1.4 * contrast * fluid * side_mask * lungs
    if f.atelectasis:
        side = f.side or "right"
        cx = _lung_x(side, a)
        angle = rng.uniform(-0.35, 0.35)
        cy = rng.uniform(0.0, 0.15)
        dist = (yy - cy) * np.cos(angle) - (xx - cx) * np.sin(angle)
        band = np.exp(-(dist**2) / (2 * 0.03**2)) * (np.abs(xx - cx) < a.lung_rx * 0.8)
        image = image + 0.9 * contrast * band * lungs
    return image


def _acquire(rng, image, acq: Acquisition) -> np.ndarray:
    if acq.rotation_deg > 0:
        image = ndimage.rotate(image, rng.uniform(-acq.rotation_deg, acq.rotation_deg), reshape=False,
                               order=1, mode="nearest")
    image = np.clip(image * acq.exposure, 0.0, 1.0) ** acq.gamma
    if acq.blur > 0:
        image = ndimage.gaussian_filter(image, acq.blur)
    if acq.noise > 0:  # quantum noise grows with the square root of the detected signal
        image = image + rng.normal(0.0, 1.0, image.shape) * acq.noise * np.sqrt(np.clip(image, 0.02, 1.0))
    return np.clip(image, 0.0, 1.0).astype(np.float32)
