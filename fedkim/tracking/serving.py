"""The registered model as MLflow serves it: a pyfunc over a fedkim bundle that answers one query per row.

    served = mlflow.pyfunc.load_model("models:/fedkim-foundation@champion")
    served.predict(pd.DataFrame([{"task": "medical_qa", "question": "Which is a bone? A) femur B) liver",
                                  "options": "A|B"}]))          # -> task, answer, scores

A query may name a task the model never saw: it then brings the task's own `task_description`, `modality`,
`question` and `options` (and `modality_description` when the modality is not one the bundle's catalogue
describes), and the gate routes it from those descriptions: zero-shot, without retraining.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import mlflow
import pandas as pd

from fedkim.config import Params
from fedkim.data.catalogue import Catalogue, CatalogueError, query_task

OPTIONAL_COLUMNS = ("modality", "sample_id", "image_path", "ecg_path", "clinical_path", "text_path", "question",
                    "options", "task_description", "modality_description")


def serving_signature():
    """Input schema of the served model: `task` plus optional string columns (options: "A|B" or a JSON list)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(inputs=Schema([ColSpec("string", "task")]
                                        + [ColSpec("string", c, required=False) for c in OPTIONAL_COLUMNS]))


class FedKIMPyfunc(mlflow.pyfunc.PythonModel):
    """Serves a bundle: one row per query with `task`, optional `modality` (must be the task's), and the inputs the
    task needs: image_path / ecg_path / clinical_path (+ sample_id when the Parquet file holds several samples) and,
    for questions, `question` (+ `options`, "A|B" or a JSON list) or text_path + sample_id. Returns `task`,
    `answer` (the best-scoring option) and `scores` ({option: summed log-probability})."""

    def load_context(self, context) -> None:
        from fedkim.central.bundle import load_bundle

        self.model, self.params = load_bundle(context.artifacts["bundle"])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        return answer_frame(self.model, self.params, model_input)


def answer_frame(model, params: Params, frame: pd.DataFrame) -> pd.DataFrame:
    """Answer every row of `frame` (grouped by task: the model scores one task per batch), in row order."""
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
    try:
        for task, index in groups.items():
            items = [query_item(rows[i], task, params, i, catalogue) for i in index]
            batch = collate(items)
            options = batch.get("options") or [list(catalogue[task].answers)] * len(items)
            scores = model.option_logprobs(batch, task, options)
            for row_scores, opts, i in zip(scores, options, index):
                values = [float(s) for s in row_scores[: len(opts)]]
                answers[i] = {"task": task, "answer": opts[max(range(len(opts)), key=values.__getitem__)],
                              "scores": dict(zip(opts, values))}
    finally:
        model.use_catalogue(trained)
    return pd.DataFrame(answers, columns=["task", "answer", "scores"])


def _task_of(row: dict, i: int, catalogue: Catalogue) -> tuple[str, Catalogue]:
    """The row's task, and the catalogue that knows it: a task the catalogue lacks is added from the row's own
    description (task_description, modality, question, options)."""
    task = row.get("task")
    if not isinstance(task, str) or not task:
        raise ValueError(f"row {i}: 'task' must name a task, got {task!r}")
    modality = row.get("modality")
    if task in catalogue:
        if _present(modality) and modality != catalogue[task].modality:
            raise ValueError(f"row {i}: task {task!r} takes modality {catalogue[task].modality!r}, "
                             f"got {modality!r}")
        return task, catalogue
    missing = [c for c in ("task_description", "modality", "question", "options") if not _present(row.get(c))]
    if missing:
        raise ValueError(f"row {i}: task {task!r} is not in the model's catalogue ({', '.join(catalogue.tasks)}); "
                         f"a new task needs the column(s) {missing} (its own description, modality, question and "
                         "answer options)")
    description = row.get("modality_description")
    try:
        spec = query_task(catalogue, task, str(modality), str(row["task_description"]), str(row["question"]),
                          _options(row["options"]), str(description) if _present(description) else None)
    except CatalogueError as exc:
        raise ValueError(f"row {i}: {exc}") from None
    return task, catalogue.with_task(spec)


def _options(value) -> list[str]:
    """options as "A|B" or a JSON list."""
    if isinstance(value, str):
        return json.loads(value) if value.startswith("[") else [o.strip() for o in value.split("|")]
    return list(value)


def _present(value) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value)) and value != ""


def query_item(row: dict, task: str, params: Params, i: int, catalogue: Catalogue) -> dict:
    """One sample shaped like the test loaders' items (same readers, same sizes as the bundle's params)."""
    from fedkim.data.formats.clinical import read_long, to_grid
    from fedkim.data.formats.text import read_jsonl
    from fedkim.data.loaders import load_ecg, load_image, standardise_clinical
    from fedkim.data.batches import icu_windows

    def need(column: str) -> str:
        if not _present(row.get(column)):
            raise ValueError(f"row {i} (task {task}): needs column {column!r}")
        return str(row[column])

    spec = catalogue[task]
    item: dict = {"task": task, "modality": spec.modality}
    inputs = spec.inputs
    if "image" in inputs:
        item["image"] = load_image(Path(need("image_path")), params.site.image_input)
    if "ecg" in inputs:
        item["ecg"] = load_ecg(Path(need("ecg_path")), params.site.ecg_hz, params.data.ecg_seconds)
    if "clinical" in inputs:
        frame = read_long(need("clinical_path"))
        if _present(row.get("sample_id")):
            frame = frame[frame["sample_id"] == row["sample_id"]]
        if frame.empty or frame["sample_id"].nunique() != 1:
            raise ValueError(f"row {i} (task {task}): {row['clinical_path']} must hold exactly one sample "
                             f"(give sample_id to pick one)")
        # as task_dataset windows them (a new task: the series' own length); the model reads the recent part
        hours = icu_windows(params.data).get(task, int(frame["hour"].max()) + 1)
        item["clinical"], item["clinical_mask"] = standardise_clinical(to_grid(frame, hours))
    if "text" in inputs:
        item |= _question(row, spec, i, need, read_jsonl)
    return item


def _question(row: dict, spec, i: int, need, read_jsonl) -> dict:
    task = spec.name
    if _present(row.get("question")):
        options = _options(row["options"]) if _present(row.get("options")) else list(spec.answers)
        return {"question": str(row["question"]), "options": options}
    questions = read_jsonl(need("text_path"))
    sample = need("sample_id")
    if sample not in questions:
        raise ValueError(f"row {i} (task {task}): {row['text_path']} has no question for sample {sample!r}")
    return {"question": questions[sample]["question"], "options": list(questions[sample]["options"])}
