"""Calibration probe for the generated federation: does federation matter?

For each training task, a simple model (logistic regression on hand-made features, read through the library's
loaders) is trained on one site's data alone, on all sites pooled, and on the server's public split, then scored
on the test split. Federation matters when the best single site is clearly above chance and clearly below pooled.

    python -m benchmarks.data_probe [--root data/federation]   -> one JSON object on stdout
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from scipy.signal import welch
from scipy.stats import kurtosis, skew
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from fedkim.config import load_params
from fedkim.data.catalogue import Catalogue, catalogue_of
from fedkim.data.loaders import SiteDataset
from fedkim.members import site_dir, split_dir

ECG_HZ = 250


def features(item: dict) -> np.ndarray:
    if "image" in item:  # per-image standardisation: a probe should not just learn each site's exposure
        x = item["image"].numpy().ravel()
        return (x - x.mean()) / (x.std() + 1e-6)
    if "ecg" in item:
        x = item["ecg"].numpy()
        _, psd = welch(x, fs=ECG_HZ, nperseg=256, axis=1)
        band = np.log(psd[:, 1:42] + 1e-8).ravel()
        return np.concatenate([band, x.std(1), skew(x, axis=1), kurtosis(x, axis=1)])
    values, mask = item["clinical"].numpy(), item["clinical_mask"].numpy().astype(bool)
    stats = []
    for j in range(values.shape[1]):
        seen = values[mask[:, j], j]
        if len(seen) == 0:
            seen = np.zeros(1)
        stats += [seen.mean(), seen.min(), seen.max(), seen[-1], seen[-1] - seen[0], mask[:, j].mean()]
    return np.array(stats)


def matrix(site_dir: Path, task: str, splits) -> tuple[np.ndarray, np.ndarray]:
    ds = SiteDataset(site_dir, split=splits, tasks=[task], image_size=32, ecg_hz=ECG_HZ)
    if len(ds) == 0:
        return np.zeros((0, 1)), np.zeros(0)
    items = [ds[i] for i in range(len(ds))]
    return np.stack([features(it) for it in items]), np.array([it["label"] for it in items])


def score(train, test) -> dict:
    (xtr, ytr), (xte, yte) = train, test
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.05, max_iter=2000))
    model.fit(xtr, ytr)
    p = model.predict_proba(xte)[:, 1]
    return {"auroc": round(float(roc_auc_score(yte, p)), 3), "accuracy": round(float(accuracy_score(yte, p > 0.5)), 3),
            "n_train": int(len(ytr))}


def probe(dirs: dict[str, Path], catalogue: Catalogue) -> dict:
    """dirs: each member's directory and the server's `public` and `test` splits, by name."""
    result = {}
    site_ids = [s for s in dirs if s not in ("public", "test")]
    for task in catalogue.train:
        test = matrix(dirs["test"], task, ["test"])
        per_site, pooled_x, pooled_y = {}, [], []
        for site in site_ids:
            x, y = matrix(dirs[site], task, ["train", "val"])
            if len(y) == 0:
                continue
            per_site[site] = score((x, y), test)
            pooled_x.append(x)
            pooled_y.append(y)
        pooled = score((np.concatenate(pooled_x), np.concatenate(pooled_y)), test)
        public = score(matrix(dirs["public"], task, ["public"]), test)
        best = max(per_site.values(), key=lambda s: s["auroc"])
        result[task] = {"modality": catalogue[task].modality, "per_site": per_site, "best_single_site": best,
                        "pooled": pooled, "public_only": public,
                        "federation_gain_auroc": round(pooled["auroc"] - best["auroc"], 3)}
    return result


def zero_shot_learnability(test_dir: Path, catalogue: Catalogue) -> dict:
    """5-fold cross-validated AUROC of the same probe inside the test split: the zero-shot labels are learnable."""
    from sklearn.model_selection import cross_val_score

    out = {}
    for task in catalogue.zero_shot:
        if catalogue[task].kind != "binary":
            continue
        x, y = matrix(test_dir, task, ["test"])
        model = make_pipeline(StandardScaler(), LogisticRegression(C=0.05, max_iter=2000))
        out[task] = round(float(cross_val_score(model, x, y, cv=5, scoring="roc_auc").mean()), 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", type=Path, default=None, help="data.root of the generated members and splits")
    args = parser.parse_args()
    params = load_params(overrides={"data.root": str(args.root.resolve())} if args.root else None)
    dirs = {s: site_dir(params, s) for s in params.member_ids()}
    dirs |= {s: split_dir(params, s) for s in ("public", "test")}
    started = time.perf_counter()
    catalogue = catalogue_of(params.data)
    out = probe(dirs, catalogue)
    out["zero_shot_cv_auroc"] = zero_shot_learnability(dirs["test"], catalogue)
    out["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
