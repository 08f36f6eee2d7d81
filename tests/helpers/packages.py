"""Tiny stand-ins for the site model's state dict (keys `encoders.<modality>.*` / `heads.<task>.*`) and package fields."""

from __future__ import annotations

import torch

from fedkim.federation.package import key_modality

FINGERPRINT = "ab" * 32
SHAPES = {
    "encoders.image.proj.weight": (4, 3),
    "encoders.image.proj.bias": (4,),
    "encoders.ecg.conv.weight": (2, 3, 3),
    "encoders.clinical.lin.weight": (3, 5),
    "heads.lung_opacity.weight": (1, 4),
    "heads.covid.weight": (1, 4),
    "heads.ecg_abnormal.weight": (1, 2),
    "heads.mortality.weight": (1, 3),
}


def global_state(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(shape, generator=gen) for k, shape in SHAPES.items()}
    state["encoders.image.bn.num_batches_tracked"] = torch.tensor(7, dtype=torch.int64)
    return state


def site_state(glob: dict, modalities, seed: int, scale: float = 0.1) -> dict[str, torch.Tensor]:
    """A site's trained state: the global keys of its modalities, moved by a little noise."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in glob.items():
        if key_modality(key) in modalities:
            noise = torch.randn(value.shape, generator=gen) * scale if value.is_floating_point() else 0
            out[key] = value + noise if value.is_floating_point() else value + 3
    return out


def package_fields(site_id: str = "site-a", round_id: str = "r1", **counts) -> dict:
    counts = counts or {"image": 10}
    tasks = {"image": "lung_opacity", "ecg": "ecg_abnormal", "clinical": "mortality"}
    return dict(site_id=site_id, round_id=round_id, sample_counts=counts,
                task_counts={tasks[m]: n for m, n in counts.items()}, data_fingerprint=FINGERPRINT,
                validation_summary={"success": True, "findings": 0})


def gate_summary(site_id: str, samples: int, quarantined: int = 0, modalities: dict | None = None) -> dict:
    """A passing data gate summary in the shape `fedkim.data.validate.gate_summary` gives the server."""
    stats = {"samples": samples, "files_checked": samples, "expectations": 12, "seconds": 0.1}
    return {"site_id": site_id, "success": True, "findings": [],
            "quarantined": {"samples": quarantined, "per_rule": {"image_blank": quarantined} if quarantined else {}},
            "stats": stats | ({"modalities": modalities} if modalities is not None else {})}


def upload_package(store, state: dict, tmp_path, **fields) -> None:
    """Write a real package (the package writer; `fields` as package_fields gives them) and upload it as a site
    does: tensors first, manifest last."""
    from fedkim.federation.package import write_package
    from fedkim.federation.store import package_prefix

    folder = tmp_path / f"package-{fields['round_id']}-{fields['site_id']}"
    write_package(folder, state, **fields)
    for f in sorted(folder.iterdir(), key=lambda f: f.name == "manifest.json"):
        store.put_file(f"{package_prefix(fields['round_id'], fields['site_id'])}/{f.name}", f)
