"""Evaluation on the test split: every task of the catalogue in force (`data.catalogue`; by default FedKIM's 12),
zero-shot ones with their own descriptions in the gate.

Binary tasks are scored deterministically from log p("Yes") − log p("No") (accuracy, F1, AUROC, MCC; a binary
task's answers are (negative, positive), No and Yes in the shipped catalogue);
multi-answer questions take the highest-scoring option (accuracy, macro F1). Greedy generation is a secondary
report. The primary figure per task is F1 for binary tasks and accuracy for questions.

The yes/no decision threshold is calibrated without labels (`eval.calibration: public_median`): an LLM's raw
log p(Yes) − log p(No) carries a prompt-specific bias (Zhao et al. 2021, "Calibrate before use"), so a fixed
threshold of 0 answers nearly everything Yes or No and F1 then measures the bias, not the model. The threshold is
the median score of the same task prompt on unlabelled inputs of the task's modality from the server's public
split: no labels are used, and every variant gets the same treatment. The public inputs must have the form the
model reads, not only the task's modality: read whole, sepsis's 48 ICU hours scored elsewhere than the public
split's 24-hour stays (the median put every sepsis patient above the threshold). The central model reads an ICU
series as its most recent `data.icu_hours` hours by default (`inject.icu_window: recent`, see
`CentralModel.recent_hours`), so sepsis then shares the public stays' form. Where the public split has no inputs
of the form read (`icu_window: full`), the threshold is the median score of the task's own unlabelled evaluation
inputs (batch calibration); each task records which source it used (`calibration_source`). AUROC does not depend on
the threshold; the uncalibrated F1 is reported beside it.

Multiple-answer questions get the same treatment (contextual calibration): each option's score is taken relative
to its mean log-probability when the same question is asked about unlabelled public inputs of the task's
non-text modality (for a text-only question, about the content-free question "N/A"), so that an option the prompt
favours regardless of the input does not win by default. The uncalibrated accuracy is reported beside it, and
chance is the mean of 1 / (options offered) over the samples. Each question task also reports its confusion
(answer -> pick -> count) and its figures per option set offered (`by_options`: a VQA's yes/no questions apart
from its left/right/none ones, each with its chance and the share of its commonest answer).

Lettered multiple choice whose records carry the choices' texts (medical_qa: "... A. Diseases of the nervous
system B. ...") is scored, by default (`eval.choice_scoring: text`), on the texts: the question stem without its
listed options, then each choice's text, ranked by mean log-probability per token (lm-evaluation-harness's
continuation form, the usual way to evaluate small LMs). Picking a letter after the listed options asks a 135M
model to do the letter bookkeeping it cannot do, and hides what it knows. The protocol was chosen on 300
generated questions disjoint from the test split, with the un-injected SmolLM2: letter 0.22, whole question +
text 0.26, stem + text summed 0.29, per token 0.38, per token with a content-free prior 0.32 (chance 0.25).
Length normalisation is its calibration, so no content-free prior is subtracted.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Collection
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, matthews_corrcoef, roc_auc_score
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from fedkim.central.model import CentralModel
from fedkim.config import DataParams, EvalParams, SiteTrainingParams
from fedkim.data.catalogue import Catalogue, Task, catalogue_of, load_catalogue
from fedkim.data.loaders import collate
from fedkim.data.batches import icu_windows, task_dataset, to_device
from fedkim.progress import Progress

log = logging.getLogger(__name__)


def select_tasks(catalogue: Catalogue, which: str) -> tuple[str, ...]:
    return {"all": tuple(catalogue.tasks), "train": catalogue.train, "zero_shot": catalogue.zero_shot}[which]


@torch.no_grad()
def evaluate(model: CentralModel, test_dir: str | Path, p: EvalParams, site: SiteTrainingParams, data: DataParams,
             *, public_dir: str | Path, tasks: tuple[str, ...] | None = None, progress: bool = False,
             split: str = "test", calibration: dict | None = None, picks: dict | None = None,
             exclude: Collection[str] = ()) -> dict:
    """Metrics per task of data's catalogue on `test_dir`'s `split`; `public_dir` (the server's public split)
    calibrates them label-free. The model is switched to the catalogue: its gate keeps the reference descriptions
    it was trained against, so a catalogue with more zero-shot tasks leaves the known ones as trained.
    `calibration`: a dict filled with what each task was decided with (`calibration_record`), for serving;
    `picks`: a dict filled with each task's answers ({task: {sample id: answer}}); `exclude`: sample ids the data
    gate quarantined in the test and public folders, left out."""
    started = time.perf_counter()
    catalogue = catalogue_of(data)
    unknown = [t for t in tasks or () if t not in catalogue]
    if unknown:
        raise KeyError(f"task(s) {unknown} are not in the catalogue {catalogue.source}")
    model.use_catalogue(catalogue)
    model.eval()
    device = model.projectors[next(iter(model.projectors))].weight.device if len(model.projectors) else "cpu"
    out: dict = {"tasks": {}}
    public = Path(public_dir)
    chosen = tasks or select_tasks(catalogue, p.tasks)
    with Progress("evaluation", len(chosen), logger=log, bar=progress, every=0) as bar:  # a line per task
        for task in chosen:
            bar.update(task)
            dataset = task_dataset(Path(test_dir), task, split, site, data, limit=p.max_per_task, exclude=exclude)
            if len(dataset) == 0:
                bar.advance()
                continue
            threshold, priors = None, None
            if catalogue[task].kind == "binary" and p.calibration == "public_median":
                threshold = calibrate_threshold(model, public, task, p, site, data, device, exclude=exclude)
                if threshold is None:
                    threshold = OWN_INPUTS  # no public inputs of this task's form: its own unlabelled inputs
            elif p.calibration == "public_median":
                priors = option_priors(model, public, dataset, task, p, site, data, device, exclude=exclude)
            result = out["tasks"][task] = evaluate_task(model, dataset, task, p, device, threshold=threshold,
                                                        priors=priors, picks=None if picks is None else
                                                        picks.setdefault(task, {}))
            if calibration is not None:
                calibration[task] = calibration_record(result, priors, text_only=catalogue[task].inputs == ("text",))
            figure = "F1" if result["kind"] == "binary" else "accuracy"
            bar.advance(description=f"{task} {figure} {result['primary']:.3f}")
    out |= summarise(out["tasks"])
    out["seconds"] = round(time.perf_counter() - started, 1)
    return out


def yes_no_scores(model: CentralModel, dataset, task: str, batch_size: int, device) -> list[float]:
    """log p(positive) − log p(negative) (Yes, No) for every sample, with this task's prompt and gate."""
    answers = list(model.catalogue[task].answers)  # (negative, positive)
    scores = []
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate):
        logp = model.option_logprobs(to_device(batch, device), task, [answers] * len(batch["answer"]))
        scores += (logp[:, 1] - logp[:, 0]).float().cpu().tolist()
    return scores


CALIBRATION = "calibration"  # the metrics key a round stores calibration_record()s under (not a figure)
OWN_INPUTS = "own_inputs"  # threshold sentinel: the median score of the evaluated inputs themselves


def input_form(task: str, data: DataParams, read_hours: int | None = None) -> tuple:
    """What the model reads of a task's non-text input: its modalities and, for ICU series, the hours read (the
    task's window, or its most recent `read_hours` when that is shorter: `CentralModel.clinical_hours`)."""
    inputs = tuple(i for i in catalogue_of(data)[task].inputs if i != "text")  # a question about an image: images
    if "clinical" not in inputs:
        return inputs, None
    hours = icu_windows(data).get(task, data.icu_hours)  # a catalogue's new clinical task: the mortality window
    return inputs, min(hours, read_hours) if read_hours else hours


def calibration_inputs(public_dir: Path, task: str, site: SiteTrainingParams, data: DataParams, limit: int,
                       read_hours: int | None = None, exclude: Collection[str] = ()):
    """Unlabelled public inputs of the form the model reads for the task, taken evenly from the training tasks
    that have it (a zero-shot task has no public samples of its own, but its modality does); None when there are
    none."""
    form = input_form(task, data, read_hours)
    donors = [t for t in catalogue_of(data).train if input_form(t, data, read_hours) == form] if form[0] else []
    if not donors or not public_dir.is_dir():
        return None
    parts = [task_dataset(public_dir, t, None, site, data, limit=max(1, limit // len(donors)), exclude=exclude)
             for t in donors]
    parts = [d for d in parts if len(d)]
    return ConcatDataset(parts) if parts else None


def calibrate_threshold(model: CentralModel, public_dir: Path, task: str, p: EvalParams, site: SiteTrainingParams,
                        data: DataParams, device, exclude: Collection[str] = ()) -> float | None:
    inputs = calibration_inputs(public_dir, task, site, data, p.calibration_samples, model.clinical_hours, exclude)
    if inputs is None or len(inputs) < 2:
        return None  # nothing to calibrate on: fall back to log p(Yes) > log p(No)
    return float(np.median(yes_no_scores(model, inputs, task, p.batch_size, device)))


class _Asked(Dataset):
    """Calibration items: unlabelled inputs (or none: one content-free item) asked one question with its options."""

    def __init__(self, inputs, question: str, options: tuple[str, ...]):
        self.inputs, self.question, self.options = inputs, question, list(options)

    def __len__(self) -> int:
        return len(self.inputs) if self.inputs is not None else 1

    def __getitem__(self, i: int) -> dict:
        item = {k: v for k, v in self.inputs[i].items() if k not in ("question", "options")} if self.inputs else {}
        return item | {"question": self.question, "options": list(self.options), "answer": self.options[0]}


def option_priors(model: CentralModel, public_dir: Path, dataset, task: str, p: EvalParams,
                  site: SiteTrainingParams, data: DataParams, device,
                  exclude: Collection[str] = ()) -> dict[tuple, torch.Tensor]:
    """(question, options) -> mean log-probability of each option over calibration inputs (see the module
    docstring). Only the questions' text is read from the test samples, never their answers."""
    inputs = calibration_inputs(public_dir, task, site, data, p.calibration_samples, model.clinical_hours, exclude)
    if inputs is None and any(i != "text" for i in model.catalogue[task].inputs):
        return {}  # no public inputs of this modality: score uncalibrated
    priors, computed = {}, {}
    for question, options, has_texts in dict.fromkeys(_questions(dataset, model.catalogue[task])):
        if has_texts and p.choice_scoring == "text":
            continue  # scored on the choices' texts, normalised by length instead (see the module docstring)
        asked = (question if inputs is not None else "N/A", options)  # text-only: one prior per option set
        if asked not in computed:
            rows = []
            for batch in DataLoader(_Asked(inputs, *asked), batch_size=p.batch_size, shuffle=False, collate_fn=collate):
                rows.append(model.option_logprobs(to_device(batch, device), task, batch["options"]))
            computed[asked] = torch.cat(rows).float().mean(0)
        priors[(question, options)] = computed[asked]
    return priors


def _questions(dataset, task: Task):
    """Each sample's (question, options, whether its choices' texts are known), read without loading its inputs."""
    parts = dataset.datasets if isinstance(dataset, ConcatDataset) else [dataset]
    for part in parts:
        for i in range(len(part)):
            q = part.question_at(i)
            yield ((q["question"], tuple(q["options"]), bool(q.get("choices"))) if q
                   else (task.question, task.answers, False))


def evaluate_task(model: CentralModel, dataset, task: str, p: EvalParams, device, *,
                  threshold: float | str | None = None, priors: dict[tuple, torch.Tensor] | None = None,
                  picks: dict | None = None) -> dict:
    """One task's metrics. threshold: a yes/no decision threshold, OWN_INPUTS (the median of these inputs'
    scores) or None (log p(Yes) > log p(No)). picks: filled with {sample id: the answer decided}."""
    spec = model.catalogue[task]
    negative, positive = spec.answers[:2]  # of a binary task
    scores, predicted, raw_predicted, truth, generated, forms, ids = [], [], [], [], [], [], []
    text_scored = False
    for batch in DataLoader(dataset, batch_size=p.batch_size, shuffle=False, collate_fn=collate):
        batch = to_device(batch, device)
        options = batch.get("options") or [list(spec.answers)] * len(batch["answer"])
        questions = batch.get("question") or [spec.question] * len(options)
        if by_text(batch, p):
            text_scored = True
            logp = choice_text_logprobs(model, batch, task, questions, options)
        else:
            logp = model.option_logprobs(batch, task, options)
        for row, opts, question in zip(logp, options, questions):
            raw_predicted.append(opts[int(row.argmax())])
            prior = (priors or {}).get((question, tuple(opts)))
            calibrated = row[:len(opts)] - prior if prior is not None else row[:len(opts)]
            predicted.append(opts[int(calibrated.argmax())])
            forms.append(tuple(opts))
            if spec.kind == "binary":
                scores.append(float(row[opts.index(positive)] - row[opts.index(negative)]))
        truth += list(batch["answer"])
        ids += list(batch["sample_id"])
        if p.generate:
            generated += model.generate(batch, task)
    result = {"n": len(truth), "kind": spec.kind, "role": spec.role}
    if spec.kind == "binary":
        y = np.array([a == positive for a in truth], dtype=int)
        raw = np.array([a == positive for a in predicted], dtype=int)
        source = "none" if threshold is None else OWN_INPUTS if threshold == OWN_INPUTS else "public"
        if threshold == OWN_INPUTS:
            threshold = float(np.median(scores))
        yhat = raw if threshold is None else (np.array(scores) > threshold).astype(int)
        predicted = [positive if v else negative for v in yhat.tolist()]
        result |= {"accuracy": accuracy_score(y, yhat), "f1": f1_score(y, yhat, zero_division=0),
                   "mcc": matthews_corrcoef(y, yhat),
                   "auroc": roc_auc_score(y, scores) if len(set(y.tolist())) == 2 else math.nan,
                   "f1_uncalibrated": f1_score(y, raw, zero_division=0),
                   "threshold": 0.0 if threshold is None else threshold, "calibration_source": source,
                   "positive_rate": float(yhat.mean()) if len(yhat) else math.nan}
        result["primary"] = result["f1"]
    else:
        result |= {"accuracy": accuracy_score(truth, predicted),
                   "macro_f1": f1_score(truth, predicted, average="macro", zero_division=0),
                   "accuracy_uncalibrated": accuracy_score(truth, raw_predicted),
                   "calibrated": bool(priors), "choice_scoring": "text" if text_scored else "label",
                   "chance": float(np.mean([1 / len(f) for f in forms])),
                   "confusion": confusion(truth, predicted), "by_options": by_option_set(forms, truth, predicted)}
        result["primary"] = result["accuracy"]
    if picks is not None:
        picks.update(zip(ids, predicted))
    if generated:
        result["generation_exact_match"] = float(np.mean([g.strip().lower().startswith(t.lower())
                                                          for g, t in zip(generated, truth)]))
    return {k: (float(v) if isinstance(v, (np.floating, float)) else v) for k, v in result.items()}


def calibration_record(result: dict, priors: dict[tuple, torch.Tensor] | None, *, text_only: bool) -> dict:
    """How a task's answers were decided, in JSON: a binary task's threshold on log p(positive) − log p(negative)
    (the resolved number, whatever its source); a question task's option priors per (question, options) asked,
    subtracted from the options' log-probabilities before the pick. `text_only`: the priors were asked of the
    content-free input, so they depend on the option set only."""
    if result["kind"] == "binary":
        return {"kind": "binary", "threshold": float(result["threshold"]), "source": result["calibration_source"]}
    return {"kind": result["kind"], "text_only": text_only,
            "priors": [{"question": q, "options": list(o), "log_prior": [float(v) for v in prior.tolist()]}
                       for (q, o), prior in (priors or {}).items()]}


def confusion(truth: list[str], predicted: list[str]) -> dict[str, dict[str, int]]:
    """Answer -> pick -> count (the calibrated picks): shows an answer the model never gives, or two swapped."""
    labels = sorted(set(truth) | set(predicted))
    matrix = confusion_matrix(truth, predicted, labels=labels)
    return {a: {b: int(n) for b, n in zip(labels, row) if n} for a, row in zip(labels, matrix) if row.any()}


def by_option_set(forms: list[tuple[str, ...]], truth: list[str], predicted: list[str]) -> dict[str, dict]:
    """Per option set offered ("yes/no", "left/right/none"): count, accuracy, chance (1 / options) and the share
    of the commonest answer, a reference only: a model that always gave it would score that much."""
    out = {}
    for form in dict.fromkeys(forms):
        rows = [i for i, f in enumerate(forms) if f == form]
        answers, picks = [truth[i] for i in rows], [predicted[i] for i in rows]
        out["/".join(form)] = {"n": len(rows), "accuracy": float(accuracy_score(answers, picks)),
                               "chance": 1 / len(form), "majority": max(map(answers.count, answers)) / len(rows)}
    return out


def by_text(batch: dict, p: EvalParams) -> bool:
    """Whether this batch's questions are scored on their choices' texts (eval.choice_scoring)."""
    choices = batch.get("choices")
    return p.choice_scoring == "text" and bool(choices) and all(choices)


def question_stem(question: str, options: list[str], texts: list[str]) -> str:
    """The question without its listed options ("Q? A. x B. y" -> "Q?"); unchanged when they are not listed at
    its end exactly so."""
    listed = " ".join(f"{o}. {t}" for o, t in zip(options, texts))
    return question[:-len(listed)].rstrip() if question.endswith(listed) and len(question) > len(listed) else question


def choice_text_logprobs(model: CentralModel, batch: dict, task: str, questions: list[str],
                         options: list[list[str]]) -> torch.Tensor:
    """(batch, options) mean log-probability per token of each choice's text after the question stem."""
    texts = [list(c) for c in batch["choices"]]
    stems = [question_stem(q, o, t) for q, o, t in zip(questions, options, texts)]
    summed = model.option_logprobs({**batch, "question": stems}, task, texts)
    lengths = torch.ones_like(summed)
    for i, row in enumerate(texts):
        for j, text in enumerate(row):
            lengths[i, j] = len(model.token_ids(" " + text))
    return summed / lengths


def summarise(per_task: dict) -> dict:
    train = [m["f1"] for t, m in per_task.items() if m["role"] == "train"]
    zero = [m["primary"] for t, m in per_task.items() if m["role"] == "zero_shot"]
    aurocs = [m["auroc"] for m in per_task.values() if m.get("auroc") is not None and not math.isnan(m["auroc"])]
    return {"train_mean_f1": float(np.mean(train)) if train else math.nan,
            "zeroshot_mean": float(np.mean(zero)) if zero else math.nan,
            "mean_auroc": float(np.mean(aurocs)) if aurocs else math.nan}


def write_metrics(metrics: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=2, sort_keys=True, default=float))
    return path


@torch.no_grad()
def gate_table(model: CentralModel) -> dict[str, list[float]]:
    """Gate weights per task (each with its canonical task and modality descriptions), as the gate sees them."""
    if model.m3oe is None:
        return {}
    tasks = list(model.catalogue.tasks)
    pairs = [model.gate_mode.pair(model.catalogue[t]) for t in tasks]
    weights = model.m3oe.gate_weights([p[0] for p in pairs], [p[1] for p in pairs]).float().cpu()
    return {t: [round(float(w), 5) for w in row] for t, row in zip(tasks, weights)}


def gate_distance(table: dict[str, list[float]]) -> float:
    """Mean total-variation distance between the tasks' gate weights: 0 when every task routes alike (the mixture
    then acts as one wide LoRA), up to 1 when tasks use disjoint experts. NaN without a multi-expert gate."""
    rows = [np.asarray(r, dtype=float) for r in table.values()]
    if len(rows) < 2 or len(rows[0]) < 2:
        return float("nan")
    pairs = [(a, b) for i, a in enumerate(rows) for b in rows[i + 1:]]
    return float(np.mean([0.5 * np.abs(a - b).sum() for a, b in pairs]))


def plot_gate_heatmap(table: dict[str, list[float]], path: str | Path,
                      catalogue: Catalogue | None = None) -> Path | None:
    """A (task × expert) heatmap PNG of the gate weights; rows named by task and its modality in `catalogue`
    (None: the shipped one)."""
    catalogue = catalogue or load_catalogue()
    if not table:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(table)
    data = np.array([table[t] for t in tasks])
    fig, ax = plt.subplots(figsize=(1.0 + 0.45 * data.shape[1], 0.9 + 0.35 * len(tasks)))
    image = ax.imshow(data, aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(tasks)), [f"{t} ({catalogue[t].modality})" if t in catalogue else t for t in tasks], fontsize=8)
    ax.set_xticks(range(data.shape[1]), [str(i) for i in range(data.shape[1])], fontsize=8)
    ax.set_xlabel("expert")
    fig.colorbar(image, ax=ax, fraction=0.04)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
