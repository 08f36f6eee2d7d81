"""The data gate's rule vocabulary, what each rule does to a site, and the gate's thresholds (data.gate). Kept apart from the gate itself (which
needs Great Expectations) so that params validation can check data.gate.actions at start-up.

Each rule has an action: `block` fails the site, `quarantine` leaves the samples it names out of training and
evaluation (never deleting or changing them), `warn` only reports. Rules about the site as a whole (schema,
manifest, index structure, counts) always block; rules about one sample can be set per federation.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, Field

from fedkim.params_base import Strict

Action = Literal["block", "quarantine", "warn"]

# rule id -> what it checks: the stable vocabulary of findings (tests and dashboards key on these ids)
RULES: dict[str, str] = {
    "site.directory": "the site path is a directory",
    "manifest.readable": "site.yaml exists and follows SiteManifest",
    "manifest.fingerprint": "site.yaml fingerprint equals the content's",
    "manifest.modalities": "site.yaml modalities equal the index's",
    "manifest.counts": "site.yaml counts equal the index's per (task, split)",
    "index.readable": "index.parquet exists and is a readable Parquet file",
    "index.schema": "every index column exists with its type",
    "index.not_null": "sample_id, task, modality, split and answer are set",
    "index.duplicate_ids": "sample_id is unique",
    "index.split_values": "split is one of SPLITS",
    "index.task_known": "task is in the catalogue",
    "index.modality": "modality is the task's",
    "index.label_set": "label is 0/1 for binary tasks, null for choice tasks",
    "index.answer_set": "answer is one of the task's answers",
    "index.answer_label": "a binary task's answer agrees with its label (1 = Yes)",
    "index.zero_shot_split": "zero-shot tasks appear only in the test split",
    "index.paths": "the path columns the task's modality needs are set",
    "file.path": "a referenced path stays inside the site directory",
    "file.exists": "a referenced file exists (WFDB: .hea and .dat)",
    "file.decodes": "a referenced file decodes with its reader",
    "image.size": "image sides within [image_min_side, image_max_side]",
    "image.bit_depth": "bits per sample within [image_min_bits, image_max_bits]",
    "image.photometric": "a colour form the reader converts to gray (gray, gray+alpha, RGB(A), palette; DICOM "
                         "MONOCHROME1/2, RGB, YBR)",
    "image.colour": "mean spread between colour channels <= image_max_colour_spread (a radiograph, not a photo)",
    "image.modality": "DICOM modality is DX or CR",
    "ecg.leads": "all 12 standard leads present",
    "ecg.sampling_rate": "sampling rate within [ecg_min_hz, ecg_max_hz]",
    "ecg.units": "every standard lead states a voltage unit (mV, uV/µV, V)",
    "ecg.duration": "whole record's duration within [ecg_min_seconds, ecg_max_seconds]",
    "ecg.amplitude": "no sample of the window read beyond ecg_max_abs_mv",
    "ecg.flat_lead": "no lead with std below ecg_flat_std_mv in the window read",
    "clinical.schema": "hour is an integer column and value a numeric one",
    "clinical.variables": "variable is one of clinical.VARIABLES",
    "clinical.hours": "hour is set and not negative",
    "clinical.physiological_range": "values within each variable's physiological limits",
    "clinical.units": "each unit is an accepted unit of its variable (clinical.UNITS)",
    "clinical.empty_sample": "a sample that needs clinical data has at least one measurement",
    "clinical.missingness": "each variable a sample records is measured in >= clinical_min_hours hours of the "
                            "window the model reads",
    "clinical.static_schema": "clinical/static.parquet is readable, with sample_id, variable and a numeric value",
    "clinical.static_variables": "a static covariate is one of clinical.STATIC",
    "clinical.static_range": "static covariates within their limits (after unit conversion)",
    "text.sample_present": "each sample's question is in its JSONL file",
    "text.answer_matches": "the index answer equals the JSONL answer",
    "counts.per_class": "samples per (binary task, split, label) >= min_samples_per_class, test split too",
    "counts.per_site": "samples in the index >= min_samples_per_site",
    "gate.error": "a check could not run (a bug in the gate: the site is not trusted)",
}


# Rules about one sample (a value, a file, a stay): quarantine by default, and the actions each allows. A rule
# whose samples cannot be read at all (a missing file, an unknown unit) cannot be `warn`: training would fail.
SAMPLE_RULES: dict[str, tuple[Action, ...]] = {
    **{rule: ("quarantine", "block") for rule in (
        "file.path", "file.exists", "file.decodes", "ecg.leads", "ecg.units", "image.photometric", "clinical.units",
        "text.sample_present")},
    **{rule: ("quarantine", "block", "warn") for rule in (
        "image.size", "image.bit_depth", "image.modality", "ecg.sampling_rate", "ecg.duration", "ecg.amplitude",
        "ecg.flat_lead", "clinical.hours", "clinical.physiological_range", "clinical.empty_sample",
        "clinical.missingness", "text.answer_matches", "clinical.static_range")},
}
# Rules about data the model ignores (names it does not know): their default first.
# A colourful image is probably a photo, not a radiograph: reported, and trained on unless a federation says so.
IGNORABLE_RULES: dict[str, tuple[Action, ...]] = {"clinical.static_variables": ("warn", "block"),
                                                  "image.colour": ("warn", "quarantine", "block"),
                                                  "clinical.variables": ("block", "warn")}
# Every other rule blocks and allows nothing else.
ACTIONS: dict[str, Action] = {rule: (SAMPLE_RULES.get(rule) or IGNORABLE_RULES.get(rule) or ("block",))[0]
                              for rule in RULES}


def allowed_actions(rule: str) -> tuple[Action, ...]:
    return SAMPLE_RULES.get(rule) or IGNORABLE_RULES.get(rule) or ("block",)


def check_actions(actions: dict[str, str]) -> dict[str, str]:
    """data.gate.actions: every rule id known, every action one the rule allows; else a ValueError naming them."""
    unknown = sorted(set(actions) - set(RULES))
    if unknown:
        raise ValueError(f"unknown rule id(s) {unknown}; rules: {', '.join(RULES)}")
    refused = [f"{rule}: {action} (allowed: {', '.join(allowed_actions(rule))})"
               for rule, action in actions.items() if action not in allowed_actions(rule)]
    if refused:
        raise ValueError("action not allowed for " + "; ".join(refused)
                         + " (schema, manifest, index and count rules always block)")
    return actions


def action_of(rule: str, actions: dict[str, str] | None = None) -> Action:
    return (actions or {}).get(rule, ACTIONS.get(rule, "block"))


class GateParams(Strict):
    """Thresholds of the Great Expectations gate a site's data must pass before it trains (params: data.gate)."""

    min_samples_per_site: int = Field(20, ge=1)
    min_samples_per_class: int = Field(5, ge=1, description="per task, label value and split")
    image_min_side: int = Field(32, ge=8)
    image_max_side: int = Field(4096, ge=8)
    image_min_bits: int = Field(8, ge=1, le=16, description="bits per sample (DICOM BitsStored), at least")
    image_max_bits: int = Field(16, ge=1, le=16, description="at most; the readers decode 8 to 16")
    image_max_colour_spread: float = Field(0.05, ge=0, le=1, description="mean (max - min colour channel) above "
                                                                        "which an image is a photo, not an X-ray")
    ecg_min_hz: float = Field(100.0, gt=0)
    ecg_max_hz: float = Field(2000.0, gt=0)
    ecg_min_seconds: float = Field(5.0, gt=0)
    ecg_max_seconds: float = Field(86400.0, gt=0, description="absurd lengths only: long records are windowed")
    ecg_max_abs_mv: float = Field(10.0, gt=0, description="any sample beyond this is an amplifier/unit error")
    ecg_flat_std_mv: float = Field(0.005, ge=0, description="a lead whose std is below this is flat")
    ecg_window_seconds: float | None = Field(None, gt=0, description="signal checks read (data.ecg_seconds); None: all")
    clinical_min_hours: int = Field(1, ge=1, description="each variable a stay records: measured in at least this "
                                                         "many of the hours the model reads")
    clinical_duplicates: Literal["mean", "last", "first", "max", "min"] = "mean"  # one (stay, hour, variable)
    actions: Annotated[dict[str, Literal["block", "quarantine", "warn"]], AfterValidator(check_actions)] = Field(
        default_factory=dict, description="rule id -> action, over the defaults of fedkim.gate_rules.ACTIONS")
