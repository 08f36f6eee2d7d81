"""The Great Expectations gate: clean sites pass untouched, each defect class fails with its rule id."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import wfdb
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from fedkim.config import GateParams
from fedkim.data.catalogue import load_catalogue
from fedkim.data.formats.clinical import VARIABLES, read_long, to_grid, write_long
from fedkim.data.formats.ecg import LEADS, write_wfdb
from fedkim.data.formats.text import read_jsonl, write_jsonl
from fedkim.data.siteformat import (
    INDEX_FILE, REPORTS_DIR, SITE_FILE, SPLITS, compute_fingerprint, finalize_site, read_manifest,
    write_index,
)
import fedkim.data.validate as validate_module
from fedkim.data.validate import RULES, ValidationReport, gate_reason, gate_summary, validate_site
from tests.helpers.sites import build_site, refinalize, synthetic_ecg, synthetic_image

TASKS = load_catalogue().tasks  # the shipped catalogue
MODALITY_INPUTS = load_catalogue().modalities

N = 6  # per (task, split, label): one above the default minimum, so single-row edits keep counts valid
LOOSE = GateParams(min_samples_per_site=1, min_samples_per_class=1)  # for the tiny fuzzing sites


# ------------------------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def templates(tmp_path_factory) -> dict[str, Path]:
    """Each kind of valid site built once; tests work on copies."""
    root = tmp_path_factory.mktemp("templates")
    return {
        "full": build_site(root / "full", n_per_class=N),
        "image": build_site(root / "image", n_per_class=N, modalities=("image",)),
        "ecg": build_site(root / "ecg", n_per_class=N, modalities=("ecg",)),
        "clinical": build_site(root / "clinical", n_per_class=N, modalities=("clinical",)),
        "dicom_text": build_site(root / "dicom_text", n_per_class=N, modalities=("image", "text"),
                                 image_format="dicom"),
        "tiny_image": build_site(root / "tiny_image", n_per_class=2, modalities=("image",)),
        "tiny_clinical": build_site(root / "tiny_clinical", n_per_class=2, modalities=("clinical",),
                                    splits=("train",)),
    }


@pytest.fixture
def copy_site(templates, tmp_path):
    def make(kind: str) -> Path:
        return Path(shutil.copytree(templates[kind], tmp_path / kind))
    return make


def check(site: Path, rules: GateParams | None = None) -> ValidationReport:
    return validate_site(site, rules, write_docs=False)


def rule_ids(report: ValidationReport) -> set[str]:
    return {f.rule for f in report.findings}


def finding(report: ValidationReport, rule: str):
    found = [f for f in report.findings if f.rule == rule]
    assert found, f"no {rule} finding in:\n{report.summary()}"
    return found[0]


def flags(site: Path, rule: str, *, only: bool = True, rules: GateParams | None = None):
    """Validate, assert the rule fired (and, by default, nothing else), return its finding. A blocking rule
    fails the site; a sample rule quarantines the samples it names and the site passes (the templates keep one
    sample per class above the minimum)."""
    report = check(site, rules)
    if only:
        assert rule_ids(report) == {rule}, report.summary()
    found = finding(report, rule)
    if found.action == "block":
        assert not report.success
    elif found.action == "warn":  # reported, the samples kept
        assert report.success and not set(found.samples or []) & set(report.quarantined), report.summary()
    else:
        assert found.action == "quarantine" and report.success, report.summary()
        assert found.samples and set(found.samples) <= set(report.quarantined)
    assert rule in report.summary()
    return found


def index_of(site: Path) -> pd.DataFrame:
    return pq.read_table(site / INDEX_FILE).to_pandas()


def edit_index(site: Path, change, *, raw: bool = False, finalize: bool = True) -> None:
    """Write `change(index)` back and refinalize; raw=True keeps the frame's own column types."""
    frame = change(index_of(site))
    if raw:
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), site / INDEX_FILE)
    else:
        write_index(site, frame)
    if finalize:
        refinalize(site)


def first(site: Path, column: str) -> str:
    return index_of(site)[column].dropna().iloc[0]


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def file_hashes(site: Path) -> dict[str, str]:
    return {p.relative_to(site).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(site.rglob("*")) if p.is_file() and p.relative_to(site).parts[0] != REPORTS_DIR}


# -------------------------------------------------------------------------------------------- clean sites
def test_clean_site_passes_and_is_left_untouched(copy_site):
    site = copy_site("full")
    before = file_hashes(site)
    fingerprint = read_manifest(site).fingerprint
    report = validate_site(site)
    assert report.success, report.summary()
    assert report.findings == []
    assert report.summary().startswith("PASS")
    assert report.site_id == "site-t"
    assert report.stats["samples"] == 3 * 2 * 2 * N
    assert report.stats["files_per_kind"] == {"image": 24, "ecg": 24, "clinical": 2}
    assert file_hashes(site) == before  # nothing outside reports/ changed
    assert compute_fingerprint(site) == fingerprint
    docs = Path(report.docs_path)
    assert docs.is_file() and docs.is_relative_to(site / REPORTS_DIR / "gx") and docs.suffix == ".html"
    saved = json.loads((site / REPORTS_DIR / "validation.json").read_text())
    assert saved["success"] is True and saved["site_id"] == "site-t"
    assert validate_site(site).success  # a rerun rebuilds the docs in place
    assert file_hashes(site) == before


def test_dicom_and_text_site_passes(copy_site):
    report = check(copy_site("dicom_text"))
    assert report.success, report.summary()
    assert report.stats["modalities"] == {"image": 2 * N, "image+text": 2 * N, "text": 2 * N}


def test_gx_analytics_off_in_the_context(monkeypatch):
    from fedkim.data.validate.engine import _Gate

    monkeypatch.setenv("GX_ANALYTICS_ENABLED", "true")  # the context's own setting wins over the environment
    assert _Gate(None).context.config.analytics_enabled is False


def test_rule_ids_are_documented():
    source = "".join(p.read_text() for p in sorted(Path(validate_module.__file__).parent.glob("*.py")))
    families = "site|manifest|index|file|image|ecg|clinical|text|counts|gate"
    used = set(re.findall(rf'"((?:{families})\.[a-z_]+)"', source))
    assert len(used) > 30 and used - {"index.html"} == set(RULES)


# -------------------------------------------------------------------------------------------------- images
def test_truncated_png(copy_site):
    site = copy_site("image")
    rel = first(site, "image_path")
    truncate(site / rel)
    refinalize(site)
    found = flags(site, "file.decodes")
    assert found.file == rel and "truncated" in found.examples[0]


def test_truncated_dicom(copy_site):
    site = copy_site("dicom_text")
    rel = first(site, "image_path")
    truncate(site / rel)
    refinalize(site)
    assert flags(site, "file.decodes").file == rel


def test_missing_image(copy_site):
    site = copy_site("image")
    rel = first(site, "image_path")
    (site / rel).unlink()
    refinalize(site)
    found = flags(site, "file.exists")
    assert found.file == rel and found.column == "exists"


@pytest.mark.parametrize("defect, rule, column", [
    ("bilevel", "image.bit_depth", "bits"),
    ("cmyk", "image.photometric", "photometric"),
    ("photo", "image.colour", "colour_spread"),
    ("small", "image.size", "width"),
])
def test_image_facts(copy_site, defect, rule, column):
    site = copy_site("image")
    rel = first(site, "image_path")
    pixels = synthetic_image(np.random.default_rng(1))
    if defect == "bilevel":
        Image.fromarray(pixels > 0.5).save(site / rel)  # 1 bit per sample
    elif defect == "cmyk":  # an Adobe-style CMYK JPEG, whatever its name says
        Image.fromarray((pixels * 255).astype(np.uint8)).convert("CMYK").save(site / rel, format="JPEG")
    elif defect == "photo":  # strongly coloured: red and blue channels apart
        rgb = np.stack([pixels, 0.5 * pixels, 1 - pixels], axis=-1)
        Image.fromarray((rgb * 255).astype(np.uint8)).save(site / rel)
    else:
        Image.fromarray((pixels[:16, :16] * 255).astype(np.uint8)).save(site / rel)
    refinalize(site)
    found = flags(site, rule)
    assert found.file == rel and found.column == column and rel in found.examples[0]


def test_path_outside_the_site(copy_site):
    site = copy_site("image")
    outside = site.parent / "elsewhere.png"
    shutil.copy(site / first(site, "image_path"), outside)
    edit_index(site, lambda f: f.assign(image_path=f["image_path"].where(f.index != 0, "../elsewhere.png")))
    assert flags(site, "file.path").file == "../elsewhere.png"


# ----------------------------------------------------------------------------------------------------- ECG
def rewrite_ecg(site: Path, signal: np.ndarray, fs: int = 250, *, gain: float | None = None) -> str:
    """Replace the first ECG; `gain` writes with wfdb directly (any lead count, a coarser ADC)."""
    rel = first(site, "ecg_path")
    record = (site / rel).with_suffix("")
    if gain is None:
        write_wfdb(record, signal, fs)
    else:
        n = signal.shape[1]
        wfdb.wrsamp(record.name, fs=fs, units=["mV"] * n, sig_name=list(LEADS[:n]), p_signal=signal,
                    fmt=["16"] * n, adc_gain=[gain] * n, baseline=[0] * n, write_dir=str(record.parent))
    refinalize(site)
    return rel


def test_truncated_wfdb_dat(copy_site):
    site = copy_site("ecg")
    rel = first(site, "ecg_path")
    truncate((site / rel).with_suffix(".dat"))
    refinalize(site)
    assert flags(site, "file.decodes").file == rel


def test_missing_wfdb_dat(copy_site):
    site = copy_site("ecg")
    rel = first(site, "ecg_path")
    (site / rel).with_suffix(".dat").unlink()
    refinalize(site)
    found = flags(site, "file.exists")
    assert found.file == rel and ".dat" in found.examples[0]


def test_ecg_with_11_leads(copy_site):
    site = copy_site("ecg")
    rel = rewrite_ecg(site, synthetic_ecg(np.random.default_rng(1), leads=11), gain=1000.0)
    found = flags(site, "ecg.leads")
    assert found.file == rel and "leads=11" in found.examples[0]


def test_ecg_wrong_sampling_rate(copy_site):
    site = copy_site("ecg")
    rel = rewrite_ecg(site, synthetic_ecg(np.random.default_rng(1), fs=50), 50)
    found = flags(site, "ecg.sampling_rate")
    assert found.file == rel and found.column == "fs" and "fs=50" in found.examples[0]


def test_ecg_too_short(copy_site):
    site = copy_site("ecg")
    rel = rewrite_ecg(site, synthetic_ecg(np.random.default_rng(1), seconds=2))
    assert flags(site, "ecg.duration").file == rel


def test_ecg_amplitude_in_microvolts(copy_site):
    site = copy_site("ecg")
    signal = synthetic_ecg(np.random.default_rng(1)) * 1000  # µV values labelled mV
    rel = rewrite_ecg(site, signal, gain=10.0)  # a coarse ADC so that int16 holds ±560
    assert flags(site, "ecg.amplitude").file == rel


def test_ecg_flat_lead(copy_site):
    site = copy_site("ecg")
    signal = synthetic_ecg(np.random.default_rng(1))
    signal[:, 4] = 0.0
    rel = rewrite_ecg(site, signal)
    found = flags(site, "ecg.flat_lead")
    assert found.file == rel and "flat_leads=1" in found.examples[0]


# ------------------------------------------------------------------------------------------------ clinical
def edit_clinical(site: Path, change) -> str:
    rel = "clinical/train.parquet"
    write_long(site / rel, change(read_long(site / rel)))
    refinalize(site)
    return rel


def test_vitals_outside_physiological_limits(copy_site):
    site = copy_site("clinical")

    def heart_rate_400(frame):
        frame.loc[frame.index[frame["variable"] == "heart_rate"][0], "value"] = 400.0
        return frame

    rel = edit_clinical(site, heart_rate_400)
    found = flags(site, "clinical.physiological_range")
    assert found.file == rel and found.column == "heart_rate" and "value=400" in found.examples[0]


def test_variable_outside_the_hours_the_model_reads(copy_site):
    site = copy_site("clinical")
    sample = first(site, "sample_id")  # a train sample whose heart rate was recorded only after hour 24

    def late_heart_rate(frame):
        late = (frame["sample_id"] == sample) & (frame["variable"] == "heart_rate")
        frame.loc[late, "hour"] = frame.loc[late, "hour"] + 24
        return frame

    rel = edit_clinical(site, late_heart_rate)
    found = flags(site, "clinical.missingness")
    assert found.file == rel and found.samples == [sample]
    assert sample in found.examples[0] and "heart_rate in 0 h" in found.examples[0]


def test_unknown_variable_and_negative_hour(copy_site):
    site = copy_site("clinical")

    def damage(frame):
        frame.loc[0, "variable"] = "heart_rat"
        frame.loc[1, "hour"] = -1
        return frame

    edit_clinical(site, damage)
    report = check(site)
    assert {"clinical.variables", "clinical.hours"} <= rule_ids(report)


def test_clinical_value_column_of_text(copy_site):
    site = copy_site("clinical")
    rel = "clinical/train.parquet"
    frame = read_long(site / rel).astype({"value": str})
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), site / rel)
    refinalize(site)
    found = finding(check(site), "clinical.schema")
    assert found.file == rel and found.column == "value_type"


# ---------------------------------------------------------------------------------------------------- text
def test_question_missing_from_jsonl(copy_site):
    site = copy_site("dicom_text")
    questions = read_jsonl(site / "text" / "questions.jsonl")
    gone = sorted(questions)[0]
    write_jsonl(site / "text" / "questions.jsonl", [q for k, q in questions.items() if k != gone])
    refinalize(site)
    found = flags(site, "text.sample_present")
    assert found.file == "text/questions.jsonl" and gone in found.examples[0]


# --------------------------------------------------------------------------------------------------- index
def set_cell(column: str, value, row: int = 0):
    def change(frame):
        frame[column] = frame[column].astype(object)
        frame.loc[row, column] = value
        return frame
    return change


def test_duplicate_sample_ids(copy_site):
    site = copy_site("image")
    edit_index(site, set_cell("sample_id", first(site, "sample_id"), row=1))
    found = flags(site, "index.duplicate_ids")
    assert found.file == INDEX_FILE and found.column == "sample_id" and found.count == 2


def test_label_outside_0_1(copy_site):
    site = copy_site("image")
    edit_index(site, set_cell("label", 2))
    found = flags(site, "index.label_set")
    assert found.column == "label" and "label=2" in found.examples[0]


def test_unknown_split(copy_site):
    site = copy_site("image")
    edit_index(site, set_cell("split", "trian"))
    assert "'trian'" in flags(site, "index.split_values").examples[0]


def test_unknown_task(copy_site):
    site = copy_site("image")
    edit_index(site, set_cell("task", "lung_opacityy"))
    assert flags(site, "index.task_known").column == "task"


def test_wrong_column_type(copy_site):
    site = copy_site("image")
    edit_index(site, lambda f: f.assign(label=f["label"].map(lambda v: str(int(v)))), raw=True)
    found = flags(site, "index.schema", only=False)
    assert found.column == "label" and found.file == INDEX_FILE


def test_missing_index_column(copy_site):
    site = copy_site("image")
    edit_index(site, lambda f: f.drop(columns=["answer"]), raw=True, finalize=False)
    report = check(site)
    assert not report.success
    assert finding(report, "index.schema").column == "answer"


def test_zero_shot_task_outside_test_split(copy_site):
    site = copy_site("image")
    edit_index(site, set_cell("task", "atelectasis"))  # also a class of one: counts.per_class
    assert flags(site, "index.zero_shot_split", only=False).column == "split"


def test_too_few_samples_per_class(copy_site):
    site = copy_site("image")
    edit_index(site, lambda f: f.drop(f[(f["split"] == "val") & (f["label"] == 1)].index[2:]))
    found = flags(site, "counts.per_class")
    assert found.count == 1 and found.examples == ["lung_opacity/val/label 1: n=2"]


def test_too_few_samples_per_site(copy_site):
    site = copy_site("image")
    found = flags(site, "counts.per_site", rules=GateParams(min_samples_per_site=1000))
    assert found.file == INDEX_FILE


# ------------------------------------------------------------------------------------------------ manifest
def test_fingerprint_mismatch(copy_site):
    site = copy_site("image")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(site / first(site, "image_path"))  # after finalize
    found = flags(site, "manifest.fingerprint")
    assert found.file == SITE_FILE


def test_manifest_counts_mismatch(copy_site):
    site = copy_site("image")
    raw = yaml.safe_load((site / SITE_FILE).read_text())
    raw["counts"]["lung_opacity"]["train"] += 1
    (site / SITE_FILE).write_text(yaml.safe_dump(raw))
    assert "lung_opacity/train" in flags(site, "manifest.counts").examples[0]


@pytest.mark.parametrize("damage", ["garbage", "missing", "invalid"])
def test_damaged_site_yaml(copy_site, damage):
    site = copy_site("image")
    if damage == "missing":
        (site / SITE_FILE).unlink()
    elif damage == "garbage":
        (site / SITE_FILE).write_text("site_id: [unclosed\n  : :")
    else:
        (site / SITE_FILE).write_text(yaml.safe_dump({"site_id": "x", "modalities": []}))
    report = check(site)
    assert rule_ids(report) == {"manifest.readable"}, report.summary()
    assert report.site_id is None and finding(report, "manifest.readable").file == SITE_FILE


@pytest.mark.parametrize("damage", ["garbage", "missing"])
def test_damaged_index(copy_site, damage):
    site = copy_site("image")
    if damage == "missing":
        (site / INDEX_FILE).unlink()
    else:
        (site / INDEX_FILE).write_bytes(b"PAR1 not really parquet")
    report = check(site)
    assert "index.readable" in rule_ids(report)
    assert rule_ids(report) <= {"index.readable", "manifest.fingerprint"}  # the index is part of the content
    assert finding(report, "index.readable").file == INDEX_FILE


def test_not_a_directory(tmp_path):
    report = validate_site(tmp_path / "nope")
    assert rule_ids(report) == {"site.directory"}
    assert not (tmp_path / "nope").exists()  # nothing created


# ---------------------------------------------------------------------------------------------------- fuzz
# Each example builds and runs a GX validation (about half a second): few examples, no deadline.
FUZZ = settings(max_examples=12, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# mutation kind -> the rule it must trigger (the template holds the binary lung_opacity task only)
MUTATIONS = {
    "duplicate_id": "index.duplicate_ids", "bad_split": "index.split_values",
    "unknown_task": "index.task_known", "bad_label": "index.label_set", "null": "index.not_null",
    "wrong_modality": "index.modality", "no_path": "index.paths", "bad_answer": "index.answer_set",
    "flip_label": "index.answer_label",
}
junk = st.text(min_size=0, max_size=6)


@st.composite
def mutated_index(draw):
    kinds = draw(st.lists(st.sampled_from(sorted(MUTATIONS)), max_size=3, unique=True))
    rows = draw(st.permutations(range(6)))  # distinct rows per mutation; rows 6 and 7 stay untouched
    values = {
        "bad_split": draw(junk.filter(lambda s: s not in SPLITS)),
        "unknown_task": draw(junk.filter(lambda s: s not in TASKS)),
        "bad_label": draw(st.sampled_from([2, -1, 7])),
        "null": draw(st.sampled_from(["sample_id", "task", "modality", "split", "answer"])),
        "wrong_modality": draw(st.sampled_from(sorted(set(MODALITY_INPUTS) - {"image"}))),
        "bad_answer": draw(junk.filter(lambda s: s not in ("Yes", "No"))),
    }
    return [(kind, rows[i], values.get(kind)) for i, kind in enumerate(kinds)]


def apply_mutation(frame: pd.DataFrame, kind: str, row: int, value) -> None:
    column, new = {
        "duplicate_id": ("sample_id", frame.at[7, "sample_id"]),
        "bad_split": ("split", value), "unknown_task": ("task", value), "bad_label": ("label", value),
        "null": (value, None), "wrong_modality": ("modality", value), "no_path": ("image_path", None),
        "bad_answer": ("answer", value), "flip_label": ("label", 1 - int(frame.at[row, "label"])),
    }[kind]
    frame.at[row, column] = new


def fresh_copy(template: Path, base: Path) -> Path:
    return Path(shutil.copytree(template, Path(tempfile.mkdtemp(dir=base)) / "site"))


@FUZZ
@given(mutations=mutated_index())
def test_fuzz_index_mutations(templates, tmp_path, mutations):
    site = fresh_copy(templates["tiny_image"], tmp_path)
    frame = index_of(site).astype(object)
    for kind, row, value in mutations:
        apply_mutation(frame, kind, row, value)
    write_index(site, frame)
    refinalize(site)
    report = check(site, LOOSE)
    assert "gate.error" not in rule_ids(report), report.summary()
    assert report.success == (not mutations), report.summary()
    assert {MUTATIONS[kind] for kind, _, _ in mutations} <= rule_ids(report)


cell = st.one_of(st.none(), junk, st.sampled_from([*TASKS, *SPLITS, *MODALITY_INPUTS, "Yes", "No"]))
random_column = st.one_of(
    st.lists(cell, min_size=4, max_size=4),
    st.lists(st.one_of(st.none(), st.integers(-3, 3)), min_size=4, max_size=4),
)


@settings(FUZZ, max_examples=8)
@given(columns=st.fixed_dictionaries({c: random_column for c in
                                      ["sample_id", "task", "modality", "split", "label", "answer",
                                       "image_path", "ecg_path", "clinical_path", "text_path"]}),
       drop=st.sampled_from([None, "label", "task", "image_path"]))
def test_fuzz_random_index_frames(templates, tmp_path, columns, drop):
    site = fresh_copy(templates["tiny_image"], tmp_path)
    frame = pd.DataFrame(columns).drop(columns=[drop] if drop else [])
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), site / INDEX_FILE)
    try:
        finalize_site(site, site_id="fuzz", role="hospital")
    except Exception:
        pass  # an index finalize cannot read: site.yaml stays stale, which must fail too
    report = check(site, LOOSE)  # must not raise
    assert "gate.error" not in rule_ids(report), report.summary()
    obviously_broken = (
        drop is not None
        or frame["sample_id"].isna().any() or frame["sample_id"].duplicated().any()
        or not frame["task"].isin(list(TASKS)).all() or not frame["split"].isin(list(SPLITS)).all()
    )
    if obviously_broken:
        assert not report.success


def clinical_oracle(long: pd.DataFrame, index: pd.DataFrame, min_per_class: int, window: int = 24) -> bool:
    """Independent statement of the clinical rules, via clinical.to_grid: an unknown variable blocks; a row of
    an indexed sample with a missing or negative hour or a value outside the limits quarantines the sample, and
    so does a sample without measurements or with a recorded variable absent from the hours the model reads;
    the site passes when every (split, label) keeps min_per_class samples."""
    if not long["variable"].isin(list(VARIABLES)).all():
        return False
    ids, bad = set(index["sample_id"]), set()
    for sample, hour, variable, value in long[["sample_id", "hour", "variable", "value"]].itertuples(index=False):
        _, low, high = VARIABLES[variable]
        if sample in ids and (np.isnan(hour) or hour < 0 or (not np.isnan(value) and not low <= value <= high)):
            bad.add(sample)
    for sample in ids:
        rows = long[(long["sample_id"] == sample) & long["value"].notna() & (long["hour"] >= 0)]
        grid = to_grid(rows, window)
        if rows.empty or any(np.isnan(grid[:, list(VARIABLES).index(v)]).all() for v in set(rows["variable"])):
            bad.add(sample)
    kept = index[~index["sample_id"].isin(bad)]
    return all((kept["label"] == label).sum() >= min_per_class for label in (0, 1))


@st.composite
def clinical_edits(draw):
    edits = []
    for _ in range(draw(st.integers(0, 3))):
        edits.append((
            draw(st.integers(0, 10_000)),
            draw(st.sampled_from(["value", "variable", "hour", "sample_id", "drop_sample", "value_ok"])),
            draw(st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32), st.integers(-5, 60),
                           st.sampled_from([*VARIABLES, "heart_rat", ""]))),
        ))
    return edits


@FUZZ
@given(edits=clinical_edits())
def test_fuzz_clinical_frames(templates, tmp_path, edits):
    site = fresh_copy(templates["tiny_clinical"], tmp_path)
    rel = "clinical/train.parquet"
    long = read_long(site / rel).astype({"hour": "float64", "value": "float64"})
    long = long.astype({"variable": object, "sample_id": object})
    for position, kind, value in edits:
        row = long.index[position % len(long)]
        if kind == "drop_sample":
            long = long[long["sample_id"] != long.at[row, "sample_id"]]
        elif kind in ("variable", "sample_id"):  # an unknown name, or a row moved to an unknown sample
            long.at[row, kind] = value if isinstance(value, str) else str(value)
        elif kind == "hour" and not isinstance(value, str):
            long.at[row, "hour"] = float(np.floor(np.clip(value, -5, 300)))  # NaN stays: a missing hour
        elif kind == "value" and not isinstance(value, str):
            long.at[row, "value"] = float(value)
        elif kind == "value_ok" and long.at[row, "variable"] in VARIABLES:  # a valid edit
            _, low, high = VARIABLES[long.at[row, "variable"]]
            long.at[row, "value"] = (low + high) / 2
    write_long(site / rel, long.astype({"hour": "Int16"}))
    refinalize(site)
    expected = clinical_oracle(read_long(site / rel).astype({"hour": "float64", "value": "float64"}),
                               index_of(site), LOOSE.min_samples_per_class)
    report = check(site, LOOSE)
    assert "gate.error" not in rule_ids(report), report.summary()
    assert report.success == expected, report.summary()


# ---------------------------------------------------------------------------------- what leaves the site
def test_gate_summary_of_a_passing_site(copy_site):
    report = check(copy_site("image"))
    assert gate_summary(report) == {
        "site_id": "site-t", "success": True, "findings": [], "quarantined": {"samples": 0, "per_rule": {}},
        "stats": {k: report.stats[k] for k in ("samples", "modalities", "files_checked", "expectations", "seconds")},
    }


PATIENT = "DOE_JOHN_19700101_MRN4711"  # what a hospital export can put in a file name or a sample id


def test_gate_summary_and_reason_carry_rule_ids_and_counts_only(copy_site):
    """An identifier planted in a file name and a sample id: the site's own report names them, what leaves the
    site (the summary uploaded to the store and logged centrally, the reason in logs) never does."""
    site = copy_site("image")
    image = first(site, "image_path")
    planted = f"{Path(image).parent.as_posix()}/{PATIENT}.png"
    (site / image).rename(site / planted)
    truncate(site / planted)
    edit_index(site, lambda frame: frame.replace({"image_path": {image: planted}}))
    edit_index(site, set_cell("split", "trian"))
    edit_index(site, set_cell("task", "lung_opacityy", row=1))
    edit_index(site, set_cell("sample_id", f"{PATIENT}-scan", row=3))
    edit_index(site, set_cell("sample_id", first(site, "sample_id"), row=2), finalize=False)
    report = check(site)
    assert PATIENT in report.summary() and PATIENT in report.model_dump_json()  # the site's own report
    summary = gate_summary(report)
    assert json.loads(json.dumps(summary)) == summary  # what goes to the store is plain JSON
    assert summary["site_id"] == "site-t" and summary["success"] is False
    assert [f["rule"] for f in summary["findings"]] == [
        "index.duplicate_ids", "index.split_values", "index.task_known", "file.decodes", "counts.per_class",
        "manifest.fingerprint"] == [f.rule for f in report.findings]
    assert summary["findings"][3] == {"rule": "file.decodes", "action": "quarantine", "count": 1}
    assert summary["quarantined"] == {"samples": 1, "per_rule": {"file.decodes": 1}}
    assert summary["stats"] == {k: report.stats[k] for k in ("samples", "modalities", "files_checked", "expectations",
                                                               "seconds")}
    text = json.dumps(summary) + gate_reason(summary)
    assert PATIENT not in text and "png" not in text and "index.parquet" not in text
    assert not any(sample in text for sample in report.quarantined) and "examples" not in text
    assert gate_reason(summary) == (  # the blocking findings only, each with what its rule checks
        "data gate failed, 5 blocking finding(s): "
        f"index.duplicate_ids (2 found; checks that {RULES['index.duplicate_ids']}); "
        f"index.split_values (1 found; checks that {RULES['index.split_values']}); "
        f"index.task_known (1 found; checks that {RULES['index.task_known']}); "
        f"counts.per_class (1 found; checks that {RULES['counts.per_class']}); and 1 more")


# ----------------------------------------------------------------------------------------------------- CLI
@pytest.fixture
def cli():
    from fedkim.cli import app
    runner = CliRunner()
    return lambda *args: runner.invoke(app, ["data", "validate", *map(str, args)])


def test_cli_clean_site(cli, copy_site):
    result = cli(copy_site("full"), "--no-docs")
    assert result.exit_code == 0, result.output
    assert "PASS" in result.output


def test_cli_corrupted_site(cli, copy_site):
    site = copy_site("ecg")
    rel = first(site, "ecg_path")
    truncate((site / rel).with_suffix(".dat"))  # quarantines its sample; the stale fingerprint blocks
    result = cli(site)
    assert result.exit_code == 1, result.output
    assert "manifest.fingerprint" in result.output
    assert "FAIL" in result.output and "file.decodes" in result.output and rel in result.output
    assert (site / REPORTS_DIR / "validation.json").is_file()


def test_cli_missing_directory(cli, tmp_path):
    assert cli(tmp_path / "nope").exit_code == 2


def test_cli_json(cli, copy_site):
    site = copy_site("image")
    (site / first(site, "image_path")).unlink()
    result = cli(site, "--json", "--no-docs")
    assert result.exit_code == 1
    payload = json.loads(result.stdout)
    assert payload["success"] is False and payload["findings"][0]["rule"] == "file.exists"
