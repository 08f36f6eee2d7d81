"""`fedkim data generate`: the generated part of the federation, written in the site data format.

    <root>/federation.yaml           params hash, seed, the directories it generated (no timings)
    <root>/site-a ... site-d/        generated members: only their modalities and conditions, their acquisition
    <root>/public/                   the server's public split (training tasks, every condition), when generated
    <root>/test/                     all 12 tasks; zero-shot tasks appear nowhere else (when generated)

Only the generated members (federation.members with `data: generated`) and generated server splits are written;
a provided directory is never written into, moved or deleted, whether it lies beside data.root or inside it.
Seeded and cached by a hash of the data params and the generated members: a second call with the same params
reuses what is there. Each directory is written to a staging folder and swapped in only when all are complete,
so an interrupted run never leaves a half-written directory. federation.yaml records the directories it
generated: only those are ever replaced or removed; anything else in data.root is left alone.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from fedkim.config import DataParams, Params, SiteSpec, params_hash
from fedkim.data.catalogue import Catalogue, catalogue_of
from fedkim.members import provided_dirs, server_splits, split_source
from fedkim.data.formats.clinical import write_long
from fedkim.data.formats.ecg import write_wfdb
from fedkim.data.formats.image import write_dicom, write_png
from fedkim.data.formats.text import write_jsonl
from fedkim.data.siteformat import SiteManifest, finalize_site, write_index
from fedkim.data.synth import cxr, icu, text
from fedkim.data.synth.ecg import BeatBank, EcgSpec, NOISES, build_bank, compose
from fedkim.progress import Progress

log = logging.getLogger(__name__)

FEDERATION_FILE = "federation.yaml"
STAGING = ".generating"  # inside data.root: new directories are written here, then swapped in one by one
BANK_PER_CLASS = 12
IMAGE_TASKS = ("lung_opacity", "covid", "enlarged_cardiomediastinum", "pleural_effusion", "atelectasis")
# The tasks whose data the generator can draw (by name; their texts, answers and roles come from the catalogue).
GENERATED_TASKS = (*IMAGE_TASKS, "ecg_abnormal", "mortality", "ectopic_beats", "sepsis", "ecg_noise_qa", "cxr_vqa",
                   "medical_qa")
# ecg_noise_qa's verify form (the query form is the task's own question): half its records are clean.
NOISE_VERIFY_QUESTION = "Is there noise in this ECG?"


class GenerationError(RuntimeError):
    pass


@dataclass
class GenerationResult:
    root: Path
    params_hash: str
    cached: bool
    seconds: float
    sites: list[SiteManifest] = field(default_factory=list)


@dataclass
class _Job:
    """Everything one worker needs to write one directory."""

    dir_name: str
    role: str  # hospital | public | test
    description: str
    profiles: list[SiteSpec]  # acquisition/condition profiles to draw from (one for a hospital)
    tasks: dict[str, int]  # task -> number of samples
    prevalence: float
    with_val: bool


def generator_sources() -> list[Path]:
    """The files whose source is part of the cache key (dvc.yaml's generate stage must list them as deps)."""
    package = Path(__file__).resolve().parents[1]
    return sorted([*package.glob("synth/*.py"), *package.glob("formats/*.py"), package / "siteformat.py"])


def _code_digest() -> str:
    """The generator's own source: a changed generator must not reuse a federation cached by an older one."""
    digest = hashlib.sha256()
    for path in generator_sources():
        digest.update(path.read_bytes())
    return digest.hexdigest()


def data_hash(params: Params) -> str:
    """Cache key: the data params (paths, worker count and gate thresholds excluded), the generated members with
    their profiles, the generated splits, the task catalogue's content and the generator code."""
    data = params.data.model_copy(update={"workers": 1, "gate": None, "sites": {}, "catalogue": None})
    key = {"data": params_hash(data), "sites": [s.model_dump(mode="json") for s in params.generated_sites()],
           "splits": _generated_splits(params)}
    return hashlib.sha256((yaml.safe_dump(key) + catalogue_of(params.data).digest + _code_digest()).encode()
                          ).hexdigest()[:16]


def _generated_splits(params: Params) -> list[str]:
    return [n for n in server_splits(params) if split_source(params, n).data == "generated"]


def generate_federation(params: Params, *, force: bool = False, progress: bool = False) -> GenerationResult:
    """Write the generated members and splits to data.root (a no-op when everything is provided)."""
    data = params.data
    catalogue = catalogue_of(data)
    root = Path(data.root)
    jobs = _plan(data, catalogue, params.generated_sites(), _generated_splits(params))
    if not jobs:
        return GenerationResult(root, "", True, 0.0, [])
    catalogue.check_sites(params.federation.members)
    check_generable(catalogue, jobs)
    names = [j.dir_name for j in jobs]
    _check_provided(params, root, names)
    digest = data_hash(params)
    existing = _read_federation_file(root) or {}
    recorded = [d for d in existing.get("directories") or [] if isinstance(d, str)]
    if (existing.get("params_hash") == digest and not force and recorded == names
            and all((root / n / "site.yaml").is_file() for n in names)):
        sites = [SiteManifest.model_validate(yaml.safe_load((root / d / "site.yaml").read_text())) for d in names]
        return GenerationResult(root, digest, True, 0.0, sites)
    for name in names:
        if (root / name).exists() and name not in recorded:
            raise GenerationError(f"{root / name}: exists but was not generated here (not recorded in "
                                  f"{root / FEDERATION_FILE}); refusing to overwrite it — move it away, or choose "
                                  "another data.root or --out")

    started = time.perf_counter()
    staging = root / STAGING
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    workers = max(1, data.workers)
    bank = build_bank(data.seed, BANK_PER_CLASS, data.difficulty.ecg_effect, data.difficulty.ecg_variability,
                      workers=workers)
    args = [(job, data, catalogue, bank, staging, digest) for job in jobs]
    manifests: list[SiteManifest] = []
    with Progress("writing site directories", len(jobs), logger=log, bar=progress, every=0) as bar:
        if workers > 1:
            with ProcessPoolExecutor(workers) as pool:
                for manifest in pool.map(_write_directory, args):
                    manifests.append(manifest)
                    bar.advance(description=f"wrote {manifest.site_id}")
        else:
            for a in args:
                manifests.append(_write_directory(a))
                bar.advance(description=f"wrote {manifests[-1].site_id}")
    seconds = time.perf_counter() - started
    federation = {  # no timing: a regenerated federation is byte-identical, so DVC's hash of it is stable
        "params_hash": digest, "seed": data.seed,
        "directories": names,
        "roles": {j.dir_name: j.role for j in jobs},
        "fingerprints": {m.site_id: m.fingerprint for m in manifests},
    }
    _swap_in(params, root, staging, names, recorded)
    _write_federation_file(root, federation)
    shutil.rmtree(staging, ignore_errors=True)
    return GenerationResult(root, digest, False, seconds, manifests)


def _check_provided(params: Params, root: Path, names: list[str]) -> None:
    """A provided directory must neither lie inside a generated one nor hold one: generation would write into it."""
    for key, path in provided_dirs(params).items():
        path = path.resolve()
        for generated in [root.resolve() / n for n in names]:
            if path == generated or generated in path.parents:
                raise GenerationError(f"{key}: {path} lies inside the generated directory {generated}; a provided "
                                      "directory must be outside the directories fedkim generates")
            if path in generated.parents:
                raise GenerationError(f"{key}: {path} holds the generated directory {generated}; a provided "
                                      "directory must be outside the directories fedkim generates (data.root)")


def _read_federation_file(root: Path) -> dict | None:
    path = root / FEDERATION_FILE
    if not path.is_file():
        return None
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _write_federation_file(root: Path, federation: dict) -> None:
    tmp = root / (FEDERATION_FILE + ".tmp")
    tmp.write_text(yaml.safe_dump(federation, sort_keys=False))
    os.replace(tmp, root / FEDERATION_FILE)


def _swap_in(params: Params, root: Path, staging: Path, names: list[str], recorded: list[str]) -> None:
    """Move each new directory into place, replacing only directories this generator recorded. The record is
    widened first (no hash: incomplete), so a run interrupted mid-swap leaves only recorded directories behind."""
    stale = [d for d in recorded if d not in names]
    _write_federation_file(root, {"params_hash": None, "directories": names + stale})
    for name in names:
        old = root / f".{name}.old"
        shutil.rmtree(old, ignore_errors=True)
        if (root / name).exists():
            (root / name).rename(old)
        (staging / name).rename(root / name)
        shutil.rmtree(old, ignore_errors=True)
    provided = [p.resolve() for p in provided_dirs(params).values()]
    for name in stale:  # generated before, no longer part of the federation; a provided one is only forgotten
        folder = (root / name).resolve()
        if not any(p == folder or folder in p.parents or p in folder.parents for p in provided):
            shutil.rmtree(root / name, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------- plan
def check_generable(catalogue: Catalogue, jobs: list[_Job]) -> None:
    """The generator draws the data of the tasks it knows by name; any other task's data must be provided."""
    unknown = sorted({n for job in jobs for n in job.tasks if n not in GENERATED_TASKS})
    if unknown:
        raise GenerationError(f"{catalogue.source}: the synthetic generator cannot make data for task(s) "
                              f"{unknown} (it makes {', '.join(GENERATED_TASKS)}); their data must be provided "
                              "in the site format (docs/site-format.md) by a provided member or split")


def _plan(data: DataParams, catalogue: Catalogue, sites: list[SiteSpec], splits: list[str]) -> list[_Job]:
    jobs = []
    for site in sites:
        n = max(4, round(data.sizes.site_train * site.size_factor))
        tasks = {t.name: n for m in site.modalities for t in catalogue.for_modality(m)}
        jobs.append(_Job(site.id, "hospital", site.description, [site], tasks, site.prevalence, True))
    # The server's splits see every generated site's acquisition but every condition, at full strength.
    everything = [site.model_copy(update={
        "opacity_zones": ["upper", "middle", "lower"], "ecg_abnormalities": ["af", "wide_qrs", "t_inversion"],
        "deterioration": ["shock", "respiratory", "renal"], "signal_scale": 1.0}) for site in sites]
    if "public" in splits:
        public_tasks = {name: data.sizes.public for name in catalogue.train}
        jobs.append(_Job("public", "public", "server public split: training tasks, every condition",
                         everything, public_tasks, 0.5, False))
    if "test" in splits:
        test_tasks = {name: data.sizes.test for name in catalogue.tasks}
        jobs.append(_Job("test", "test", f"held-out test split: all {len(catalogue.tasks)} tasks, zero-shot tasks only here",
                         everything, test_tasks, 0.5, False))
    if "validation" in splits:  # its own directory and RNG streams (keyed by its name): the others do not move
        validation_tasks = {name: data.sizes.validation for name in catalogue.train}
        jobs.append(_Job("validation", "validation", "server validation split: training tasks, every condition; "
                         "promotion decides on it", everything, validation_tasks, 0.5, False))
    return jobs


def _rng(seed: int, *names: str) -> np.random.Generator:
    return np.random.default_rng([seed, *(zlib.crc32(n.encode()) for n in names)])


# --------------------------------------------------------------------------------------------- one directory
def _write_directory(args) -> SiteManifest:
    job, data, catalogue, bank, staging, digest = args
    out = staging / job.dir_name
    out.mkdir(parents=True)
    rows: list[dict] = []
    for task_name, n in job.tasks.items():
        rng = _rng(data.seed, job.dir_name, task_name)
        rows += _write_task(out, job, data, bank, catalogue[task_name], n, rng)
    write_index(out, pd.DataFrame(rows))
    return finalize_site(out, site_id=job.dir_name, role=job.role, description=job.description,
                         generator={"params_hash": digest, "seed": data.seed, "tool": "fedkim data generate"})


def _labels(rng, n: int, prevalence: float) -> np.ndarray:
    labels = np.zeros(n, dtype=np.int8)
    labels[: max(1, round(n * prevalence))] = 1
    rng.shuffle(labels)
    return labels


def _splits(rng, labels: np.ndarray, job: _Job, data: DataParams) -> list[str]:
    if not job.with_val:
        return [job.role] * len(labels)
    split = np.array(["train"] * len(labels), dtype=object)
    for value in (0, 1):  # stratified validation split
        idx = np.flatnonzero(labels == value)
        rng.shuffle(idx)
        split[idx[: max(1, round(len(idx) * data.sizes.val_fraction))]] = "val"
    return list(split)


def _write_task(out: Path, job: _Job, data: DataParams, bank: BeatBank, task, n: int, rng) -> list[dict]:
    labels = _labels(rng, n, job.prevalence if task.kind == "binary" else 0.5)
    splits = _splits(rng, labels, job, data)
    noisy = job.role not in ("test", "validation") and data.difficulty.label_noise > 0  # held-out labels are clean
    rows, long_frames, questions = [], [], []
    for i, (label, split) in enumerate(zip(labels, splits)):
        sample_id = f"{job.dir_name}-{task.name}-{i:05d}"
        profile = job.profiles[rng.integers(len(job.profiles))]
        row = {"sample_id": sample_id, "task": task.name, "modality": task.modality, "split": split}
        answer = None
        if task.modality.startswith("image"):
            row["image_path"], answer = _make_image(out, rng, data, profile, task.name, int(label), split,
                                                    sample_id, questions, job.role == "hospital")
        elif task.modality.startswith("ecg"):
            row["ecg_path"], answer = _make_ecg(out, rng, data, bank, profile, task, int(label), split,
                                                sample_id, questions)
        elif task.modality == "clinical":
            long_frames.append(_make_clinical(rng, data, profile, task.name, int(label), sample_id))
            row["clinical_path"] = f"clinical/{task.name}_{split}.parquet"
        else:
            questions.append(text.make_question(rng, sample_id))
            answer = questions[-1]["answer"]
        if task.kind == "binary":
            observed = int(label) ^ int(noisy and rng.random() < data.difficulty.label_noise)
            row["label"], row["answer"] = observed, task.answers[observed]
        else:
            row["label"], row["answer"] = None, answer
        if "text" in task.inputs:
            row["text_path"] = f"text/{task.name}.jsonl"
        rows.append(row)
    if long_frames:
        (out / "clinical").mkdir(exist_ok=True)
        frame = pd.concat(long_frames, ignore_index=True)
        split_of = {r["sample_id"]: r["split"] for r in rows}
        for split, part in frame.groupby(frame["sample_id"].map(split_of)):
            write_long(out / f"clinical/{task.name}_{split}.parquet", part)
    if questions:
        (out / "text").mkdir(exist_ok=True)
        write_jsonl(out / f"text/{task.name}.jsonl", questions)
    return rows


def _make_image(out, rng, data: DataParams, site: SiteSpec, task: str, label: int, split: str, sample_id: str,
                questions: list, own_format: bool):
    side = ("left", "right")[rng.integers(2)]
    findings = cxr.Findings(side=side, zones=tuple(site.opacity_zones))
    answer = None
    if task in IMAGE_TASKS:
        setattr(findings, task, bool(label))
    else:  # cxr_vqa: an opacity on one side, or none, and a question about it
        present = rng.random() < 0.6
        findings.lung_opacity = present
        if rng.random() < 0.5:
            asked = ("left", "right")[rng.integers(2)]
            question, options = f"Is there an opacity in the {asked} lung?", ["yes", "no"]
            answer = "yes" if present and asked == side else "no"
        else:
            question, options = "On which side is the lung opacity?", ["left", "right", "none"]
            answer = side if present else "none"
        questions.append({"sample_id": sample_id, "question": question, "options": options, "answer": answer})
    acq = site.image
    acquisition = cxr.Acquisition(exposure=acq.exposure, gamma=acq.gamma, blur=acq.blur,
                                  noise=data.difficulty.image_noise + acq.noise, rotation_deg=acq.rotation_deg)
    contrast = data.difficulty.image_contrast * (site.signal_scale if own_format else 1.0)
    image = cxr.render(rng, data.image_size, findings, acquisition, contrast, data.difficulty.covid_contrast)
    folder = out / "images" / split
    folder.mkdir(parents=True, exist_ok=True)
    if own_format and site.image_format == "dicom":
        path = folder / f"{sample_id}.dcm"
        write_dicom(path, image, sample_id=sample_id, site_id=site.id, monochrome1=acq.monochrome1)
    else:
        path = folder / f"{sample_id}.png"
        write_png(path, image)
    return path.relative_to(out).as_posix(), answer


def _make_ecg(out, rng, data: DataParams, bank: BeatBank, site: SiteSpec, spec_task, label: int, split: str,
              sample_id: str, questions: list):
    task = spec_task.name
    spec = EcgSpec(fs=site.ecg.sampling_rate, seconds=data.ecg_seconds, powerline_hz=site.ecg.powerline_hz,
                   lead_gain=site.ecg.lead_gain, broadband_mv=data.difficulty.ecg_noise,
                   signal_scale=site.signal_scale)
    answer = None
    if task != "ecg_noise_qa" and rng.random() < data.difficulty.ecg_artifacts:
        spec.noise = NOISES[1 + rng.integers(len(NOISES) - 1)]  # routine recordings carry artifacts too
    if task == "ecg_abnormal":
        if label:
            spec.rhythm = site.ecg_abnormalities[rng.integers(len(site.ecg_abnormalities))]
    elif task == "ectopic_beats":
        spec.ectopics = int(rng.integers(1, 4)) if label else 0
        if not label and rng.random() < 0.3:  # abnormal but not ectopic: no "abnormal = yes" shortcut
            spec.rhythm = ("af", "wide_qrs", "t_inversion")[rng.integers(3)]
    else:  # ecg_noise_qa, in ECG-QA's two forms: verify (is any noise there?) and query (which noise?)
        if rng.random() < 0.5:
            noisy = rng.random() < 0.5  # balanced, so that "yes" is not the majority answer
            spec.noise = NOISES[1 + rng.integers(len(NOISES) - 1)] if noisy else "none"
            question, options, answer = NOISE_VERIFY_QUESTION, ["yes", "no"], "yes" if noisy else "no"
        else:
            spec.noise = NOISES[rng.integers(len(NOISES))]
            question, options, answer = spec_task.question, list(NOISES), spec.noise
        questions.append({"sample_id": sample_id, "question": question, "options": options, "answer": answer})
    signal = compose(rng, bank, spec)
    folder = out / "ecg" / split
    folder.mkdir(parents=True, exist_ok=True)
    write_wfdb(folder / sample_id, signal, spec.fs, comments=[f"site: {site.id}", "synthetic: neurokit2 ECGSYN"])
    return (folder / f"{sample_id}.hea").relative_to(out).as_posix(), answer


def _make_clinical(rng, data: DataParams, site: SiteSpec, task: str, label: int, sample_id: str) -> pd.DataFrame:
    drift = data.difficulty.icu_drift * site.signal_scale
    if task == "mortality":
        hours = data.icu_hours
        kind = site.deterioration[rng.integers(len(site.deterioration))] if label else None
    else:  # sepsis: a different signature over a window twice as long
        hours = 2 * data.icu_hours
        kind = "sepsis" if label else None
    if kind is None and rng.random() < 0.3:  # survivors and non-septic patients can be unwell too
        kind, drift = ("shock", "respiratory", "renal")[rng.integers(3)], drift * 0.35
    return icu.simulate_patient(rng, hours, kind, drift, site.lab_interval_h, sample_id)

