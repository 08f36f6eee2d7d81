"""The registered model as MLflow serves it: a pyfunc over a fedkim bundle that answers one query per row, exactly
as evaluation answered it.

    served = mlflow.pyfunc.load_model("models:/fedkim-foundation@champion")
    served.predict(pd.DataFrame([{"task": "medical_qa", "question": "Which is a bone? A) femur B) liver",
                                  "options": "A|B"}]))          # -> task, answer, scores

A query may name a task the model never saw: it then brings the task's own `task_description`, `modality`,
`question` and `options` (and `modality_description` when the modality is not one the bundle's catalogue
describes), and the gate routes it from those descriptions: zero-shot, without retraining.

Answers are decided as `fedkim.central.evaluate` decided them, from the bundle's calibration.json: a yes/no task
answers its positive answer when log p(positive) − log p(negative) exceeds the task's calibrated threshold; a
question task subtracts the option priors evaluation measured for that (question, options) (for a text-only
task: for that option set) and, with `eval.choice_scoring: text` and the choices' texts given, ranks the texts by
mean log-probability per token. Rows are scored per task in batches of `eval.batch_size`, as evaluation batches.
A task the calibration does not cover (a query's own zero-shot task, an unseen question) is decided label-free
without a prior: yes/no by log p(positive) > log p(negative), questions by the highest log-probability; the
`calibration` column says which rule decided each row. Inputs: fedkim.tracking.query_inputs.
"""

from __future__ import annotations

from collections import defaultdict

import mlflow
import pandas as pd
import torch

from fedkim.config import Params
from fedkim.data.catalogue import Catalogue, CatalogueError, query_task
from fedkim.tracking.query_inputs import DATA_COLUMNS, PATH_COLUMNS, listed, present, query_item

OPTIONAL_COLUMNS = ("modality", "sample_id", *DATA_COLUMNS, *PATH_COLUMNS, "question", "options",
                    "task_description", "modality_description")
OUTPUT_COLUMNS = ["task", "answer", "scores", "calibration"]


def serving_signature():
    """Input schema of the served model: `task` plus optional string columns (fedkim.tracking.query_inputs)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(inputs=Schema([ColSpec("string", "task")]
                                        + [ColSpec("string", c, required=False) for c in OPTIONAL_COLUMNS]))


class FedKIMPyfunc(mlflow.pyfunc.PythonModel):
    """Serves a bundle: one row per query with `task`, optional `modality` (must be the task's), and the inputs the
    task needs (fedkim.tracking.query_inputs). Returns `task`, `answer`, `scores` ({option: summed
    log-probability}, or mean per token when the choices' texts were ranked) and `calibration` (the rule that
    decided)."""

    def load_context(self, context) -> None:
        from fedkim.central.bundle import load_bundle, read_calibration

        self.model, self.params = load_bundle(context.artifacts["bundle"])
        self.calibration = read_calibration(context.artifacts["bundle"])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        return answer_frame(self.model, self.params, model_input, self.calibration)


@torch.no_grad()
def answer_frame(model, params: Params, frame: pd.DataFrame, calibration: dict | None = None) -> pd.DataFrame:
    """Answer every row of `frame` (grouped by task: the model scores one task per batch), in row order.
    calibration: the bundle's calibration.json ({task: fedkim.central.evaluate.calibration_record}); None or a
    task it lacks: the label-free rule of the module docstring."""
    from fedkim.data.loaders import collate

    if "task" not in frame.columns:
        raise ValueError(f"input needs a 'task' column; got columns {list(frame.columns)}")
    rows = frame.to_dict("records")
    trained = model.catalogue
    catalogue = trained
    groups: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        task, catalogue = _task_of(row, i, catalogue)
        groups[task].append(i)
    answers: list[dict] = [{} for _ in rows]
    model.eval()
    model.use_catalogue(catalogue)  # the bundle's tasks and the queries' own; the gate's reference stays
    size = params.eval.batch_size
    try:
        for task, index in groups.items():
            record = (calibration or {}).get(task) if task in trained else None  # a query's own task: label-free
            for start in range(0, len(index), size):
                chunk = index[start:start + size]
                batch = collate([query_item(rows[i], task, params, i, catalogue) for i in chunk])
                for i, answer in zip(chunk, decide_batch(model, params, batch, task, record)):
                    answers[i] = answer
    finally:
        model.use_catalogue(trained)
    return pd.DataFrame(answers, columns=OUTPUT_COLUMNS)


def decide_batch(model, params: Params, batch: dict, task: str, record: dict | None) -> list[dict]:
    """The answers of one batch of a task, decided as evaluate_task decides (see the module docstring)."""
    from fedkim.central.evaluate import by_text, choice_text_logprobs

    spec = model.catalogue[task]
    n = len(batch["task"])
    options = batch.get("options") or [list(spec.answers)] * n
    questions = batch.get("question") or [spec.question] * n
    if by_text(batch, params.eval):
        logp, rule = choice_text_logprobs(model, batch, task, questions, options), "choice texts per token"
    else:
        logp, rule = model.option_logprobs(batch, task, options), None
    out = []
    for row, opts, question in zip(logp, options, questions):
        values = row[:len(opts)]
        if spec.kind == "binary":
            negative, positive = spec.answers[:2]
            threshold = record["threshold"] if record else 0.0
            score = float(row[opts.index(positive)] - row[opts.index(negative)])
            answer = positive if score > threshold else negative
            how = (f"threshold {threshold:.6g} ({record['source']})" if record
                   else "label-free: log p(positive) > log p(negative)")
        else:
            prior = _prior(record, question, opts)
            answer = opts[int((values - prior if prior is not None else values).argmax())]
            how = rule or ("option priors" if prior is not None else "label-free: highest log-probability")
        out.append({"task": task, "answer": answer, "scores": dict(zip(opts, map(float, values))),
                    "calibration": how})
    return out


def _prior(record: dict | None, question: str, options: list[str]) -> torch.Tensor | None:
    """The option prior evaluation measured for (question, options); a text-only task's for the option set."""
    for entry in (record or {}).get("priors", ()):
        if entry["options"] == list(options) and (entry["question"] == question or record.get("text_only")):
            return torch.tensor(entry["log_prior"], dtype=torch.float32)
    return None


def _task_of(row: dict, i: int, catalogue: Catalogue) -> tuple[str, Catalogue]:
    """The row's task, and the catalogue that knows it: a task the catalogue lacks is added from the row's own
    description (task_description, modality, question, options)."""
    task = row.get("task")
    if not isinstance(task, str) or not task:
        raise ValueError(f"row {i}, column 'task': must name a task, got {task!r}")
    modality = row.get("modality")
    if task in catalogue:
        if present(modality) and modality != catalogue[task].modality:
            raise ValueError(f"row {i}: task {task!r} takes modality {catalogue[task].modality!r}, "
                             f"got {modality!r}")
        return task, catalogue
    missing = [c for c in ("task_description", "modality", "question", "options") if not present(row.get(c))]
    if missing:
        raise ValueError(f"row {i}: task {task!r} is not in the model's catalogue ({', '.join(catalogue.tasks)}); "
                         f"a new task needs the column(s) {missing} (its own description, modality, question and "
                         "answer options)")
    description = row.get("modality_description")
    try:
        spec = query_task(catalogue, task, str(modality), str(row["task_description"]), str(row["question"]),
                          listed(row["options"]), str(description) if present(description) else None)
    except CatalogueError as exc:
        raise ValueError(f"row {i}: {exc}") from None
    return task, catalogue.with_task(spec)
