"""The registered model as MLflow serves it: a pyfunc over a fedkim bundle that answers one query per row.

    served = mlflow.pyfunc.load_model("models:/fedkim-foundation@champion")
    served.predict(pd.DataFrame([{"task": "medical_qa", "question": "Which is a bone? A) femur B) liver",
                                  "options": "A|B"}]))          # -> task, answer, scores
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import mlflow
import pandas as pd

from fedkim.config import Params
from fedkim.data.catalogue import TASKS

OPTIONAL_COLUMNS = ("modality", "sample_id", "image_path", "ecg_path", "clinical_path", "text_path", "question",
                    "options")


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
    groups: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        groups[_task_of(row, i)].append(i)
    answers: list[dict] = [{} for _ in rows]
    model.eval()
    for task, index in groups.items():
        items = [query_item(rows[i], task, params, i) for i in index]
        batch = collate(items)
        options = batch.get("options") or [list(TASKS[task].answers)] * len(items)
        scores = model.option_logprobs(batch, task, options)
        for row_scores, opts, i in zip(scores, options, index):
            values = [float(s) for s in row_scores[: len(opts)]]
            answers[i] = {"task": task, "answer": opts[max(range(len(opts)), key=values.__getitem__)],
                          "scores": dict(zip(opts, values))}
    return pd.DataFrame(answers, columns=["task", "answer", "scores"])


def _task_of(row: dict, i: int) -> str:
    task = row.get("task")
    if task not in TASKS:
        raise ValueError(f"row {i}: unknown task {task!r}; known: {', '.join(TASKS)}")
    modality = row.get("modality")
    if _present(modality) and modality != TASKS[task].modality:
        raise ValueError(f"row {i}: task {task!r} takes modality {TASKS[task].modality!r}, got {modality!r}")
    return task


def _present(value) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value)) and value != ""


def query_item(row: dict, task: str, params: Params, i: int) -> dict:
    """One sample shaped like the test loaders' items (same readers, same sizes as the bundle's params)."""
    from fedkim.data.formats.clinical import read_long, to_grid
    from fedkim.data.formats.text import read_jsonl
    from fedkim.data.loaders import load_ecg, load_image, standardise_clinical
    from fedkim.data.batches import icu_windows

    def need(column: str) -> str:
        if not _present(row.get(column)):
            raise ValueError(f"row {i} (task {task}): needs column {column!r}")
        return str(row[column])

    item: dict = {"task": task, "modality": TASKS[task].modality}
    inputs = TASKS[task].inputs
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
        hours = icu_windows(params.data)[task]  # as task_dataset windows them; the model reads the recent part
        item["clinical"], item["clinical_mask"] = standardise_clinical(to_grid(frame, hours))
    if "text" in inputs:
        item |= _question(row, task, i, need, read_jsonl)
    return item


def _question(row: dict, task: str, i: int, need, read_jsonl) -> dict:
    if _present(row.get("question")):
        options = row.get("options")
        if isinstance(options, str):
            options = json.loads(options) if options.startswith("[") else [o.strip() for o in options.split("|")]
        if options is None or (isinstance(options, float) and math.isnan(options)):
            options = list(TASKS[task].answers)
        return {"question": str(row["question"]), "options": list(options)}
    questions = read_jsonl(need("text_path"))
    sample = need("sample_id")
    if sample not in questions:
        raise ValueError(f"row {i} (task {task}): {row['text_path']} has no question for sample {sample!r}")
    return {"question": questions[sample]["question"], "options": list(questions[sample]["options"])}
