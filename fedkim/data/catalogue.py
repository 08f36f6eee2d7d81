"""The task catalogue: FedKIM's 12 tasks as offline analogues, each with its canonical gate descriptions.

Training tasks appear in site, public and test data; zero-shot tasks only in the test split, with their own task
and modality descriptions so that the M3OE gate meets combinations it never trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Role = Literal["train", "zero_shot"]
Kind = Literal["binary", "choice"]

# A sample's modality string: the inputs it carries, joined by '+'.
MODALITY_DESCRIPTIONS: dict[str, str] = {
    "image": "Image only: a frontal chest radiograph.",
    "ecg": "ECG only: a 12-lead electrocardiogram signal.",
    "clinical": "Clinical features only, including hourly vital signs and laboratory results from the ICU.",
    "text": "Text only: a written medical question with answer options.",
    "image+text": "Text and image: a question about a frontal chest radiograph.",
    "ecg+text": "Text and signal: a question about a 12-lead electrocardiogram.",
}

# Which input files a modality string needs (index columns image_path / ecg_path / clinical_path / text_path).
MODALITY_INPUTS: dict[str, tuple[str, ...]] = {
    "image": ("image",),
    "ecg": ("ecg",),
    "clinical": ("clinical",),
    "text": ("text",),
    "image+text": ("image", "text"),
    "ecg+text": ("ecg", "text"),
}

YES_NO = ("No", "Yes")
ECG_NOISE_ANSWERS = ("none", "powerline", "baseline drift", "burst")
# ecg_noise_qa's verify form (the query form is the task's own question): half its records are clean.
NOISE_VERIFY_QUESTION = "Is there noise in this ECG?"


@dataclass(frozen=True)
class Task:
    name: str
    modality: str
    role: Role
    kind: Kind
    answers: tuple[str, ...]
    task_description: str
    question: str
    original: str  # the FedKIM / FedMEKI data set this task stands in for

    @property
    def modality_description(self) -> str:
        return MODALITY_DESCRIPTIONS[self.modality]

    @property
    def inputs(self) -> tuple[str, ...]:
        return MODALITY_INPUTS[self.modality]


def _binary(name, modality, role, description, question, original) -> Task:
    return Task(name, modality, role, "binary", YES_NO, description, question, original)


TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        _binary(
            "lung_opacity", "image", "train",
            "Lung opacity classification: decide whether the chest radiograph shows a focal lung opacity, "
            "such as a consolidation from pneumonia, in any lung zone.",
            "Does this chest radiograph show a lung opacity?", "RSNA Pneumonia",
        ),
        _binary(
            "covid", "image", "train",
            "The COVID-19 prediction task: decide whether the chest radiograph shows bilateral, peripheral "
            "ground-glass opacities typical of COVID-19 pneumonia.",
            "Does this chest radiograph show signs of COVID-19 pneumonia?", "COVID-19 Radiography",
        ),
        _binary(
            "ecg_abnormal", "ecg", "train",
            "The ECG abnormal detection task: decide whether the 12-lead ECG is abnormal, for example atrial "
            "fibrillation, a widened QRS complex or inverted T waves.",
            "Is this ECG abnormal?", "PTB-XL",
        ),
        _binary(
            "mortality", "clinical", "train",
            "In-hospital mortality prediction: from the first day of ICU vital signs and laboratory results, "
            "predict whether the patient dies during the hospital stay.",
            "Will this patient die during the hospital stay?", "MIMIC-III",
        ),
        _binary(
            "enlarged_cardiomediastinum", "image", "zero_shot",
            "The enlarged cardiomediastinum prediction task: decide whether the heart and mediastinal "
            "silhouette is widened, with a cardiothoracic ratio above one half.",
            "Is the cardiomediastinum enlarged in this chest radiograph?", "CheXpert",
        ),
        _binary(
            "atelectasis", "image", "zero_shot",
            "The atelectasis detection task: decide whether part of a lung has collapsed, seen as volume loss "
            "with an elevated hemidiaphragm and a band-like opacity.",
            "Does this chest radiograph show atelectasis?", "CheXpert",
        ),
        _binary(
            "pleural_effusion", "image", "zero_shot",
            "The pleural effusion detection task: decide whether fluid collects at the lung base, seen as a "
            "dense meniscus that blunts the costophrenic angle.",
            "Does this chest radiograph show a pleural effusion?", "CheXpert",
        ),
        _binary(
            "ectopic_beats", "ecg", "zero_shot",
            "Ectopic beats detection: decide whether the 12-lead ECG contains premature, wide ectopic beats "
            "interrupting the regular rhythm.",
            "Does this ECG contain ectopic beats?", "PTB-XL",
        ),
        _binary(
            "sepsis", "clinical", "zero_shot",
            "The task aims at predicting the onset of sepsis from ICU vital signs and laboratory results: "
            "decide whether the patient develops sepsis during the observed window.",
            "Does this patient develop sepsis?", "MIMIC (FedMEKI)",
        ),
        Task(
            "ecg_noise_qa", "ecg+text", "zero_shot", "choice", ("yes", "no", *ECG_NOISE_ANSWERS),
            "Signal noise clarification: answer a question about noise in the given ECG signal, such as whether "
            "any noise corrupts it or which kind.",
            "Which noise affects this ECG: none, powerline, baseline drift or burst?", "ECG-QA",
        ),
        Task(
            "cxr_vqa", "image+text", "zero_shot", "choice", ("yes", "no", "left", "right", "none"),
            "The medical visual question answering task: answer a question about the given chest radiograph, "
            "such as on which side a finding lies or whether it is present.",
            "(per sample)", "VQA-RAD / SLAKE",
        ),
        Task(
            "medical_qa", "text", "zero_shot", "choice", ("A", "B", "C", "D"),
            "The medical knowledge question answering task: answer a multiple-choice question about diseases "
            "and their classification.",
            "(per sample)", "MedQA / SLAKE",
        ),
    ]
}

TRAIN_TASKS = tuple(n for n, t in TASKS.items() if t.role == "train")
ZERO_SHOT_TASKS = tuple(n for n, t in TASKS.items() if t.role == "zero_shot")


def tasks_for_modality(modality: str) -> list[Task]:
    """Training tasks whose (single) modality is `modality`: what a site holding it can train."""
    return [TASKS[n] for n in TRAIN_TASKS if TASKS[n].modality == modality]


def check_sites(sites) -> None:
    """Every training task needs a site that holds its modality: raise ConfigError naming the ones none holds.
    `sites`: the members of the federation (federation.members), each with its modalities."""
    from fedkim.config import ConfigError

    held = {m for s in sites for m in s.modalities}
    missing = sorted({TASKS[t].modality for t in TRAIN_TASKS} - held)
    if missing:
        raise ConfigError(f"federation.members: no member holds modality {missing}; every training task needs one "
                          f"({', '.join(t for t in TRAIN_TASKS if TASKS[t].modality in missing)})")
