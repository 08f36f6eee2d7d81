"""A zero-shot task that no code names, only a catalogue file: a registered model scores it (`fedkim evaluate`) and
the served model answers it, without retraining; the tasks it was trained on keep their gate."""

import json
import shutil

import mlflow
import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from fedkim import tracking
from fedkim.central.bundle import MANIFEST, load_bundle, save_bundle
from fedkim.cli import app
from fedkim.config import load_params
from fedkim.data.catalogue import SHIPPED, load_catalogue
from fedkim.data.siteformat import finalize_site, read_index, write_index
from fedkim.tracking.query_inputs import DATA_DIR_ENV
from tests.helpers import TINY, small_params_dict
from tests.helpers.models import trained_model

NEW = "basal_fluid_meniscus"  # a task name that appears in no code
NEW_TASK = {"name": NEW, "modality": "image", "role": "zero_shot", "kind": "binary", "answers": ["No", "Yes"],
            "task_description": "Basal fluid meniscus screening: decide whether a curved fluid line sits at the "
                                "base of a lung, dulling the angle between the ribs and the diaphragm.",
            "question": "Is there a fluid meniscus at a lung base?", "original": "none: a test of the catalogue"}
KNOWN = "covid"  # a training task scored beside it


def new_test_folder(source, out, finding: str = "pleural_effusion", known: str = KNOWN):
    """The generated test samples of a known finding, filed under the new task's name (same PNG files), with a
    known training task's samples beside them."""
    index = read_index(source)
    rows = index[index["task"].isin([finding, known])].copy()
    for path in rows["image_path"]:
        (out / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source / path, out / path)
    rows.loc[rows["task"] == finding, "task"] = NEW
    write_index(out, rows.reset_index(drop=True))
    finalize_site(out, site_id="new-tasks", role="test", description="a zero-shot task from a catalogue file")
    return rows


@pytest.fixture(scope="module")
def registered(small_federation, tmp_path_factory):
    """A tiny model registered as champion in a fresh MLflow store, and a catalogue with the new task."""
    folder = tmp_path_factory.mktemp("new-tasks")
    (folder / "params.yaml").write_text(yaml.safe_dump(small_params_dict(small_federation.root, **TINY)))
    params = load_params(folder / "params.yaml")
    catalogue = yaml.safe_load(SHIPPED.read_text())
    catalogue["tasks"].append(NEW_TASK)
    (folder / "with-new-task.yaml").write_text(yaml.safe_dump(catalogue, sort_keys=False))
    test_dir = folder / "test"
    test_dir.mkdir()
    rows = new_test_folder(small_federation.root / "test", test_dir)
    model = trained_model(params)
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        tracking.configure(params.tracking, folder)
        bundle = save_bundle(model, params, folder / "bundle", round_id="1", sites=["site-a"])
        with tracking.round_run(params, "1", sites={"site-a": "fp"}, params_hash="h") as parent:
            with tracking.injection_run(parent) as run:
                figures = {"tasks": {KNOWN: {"role": "train", "kind": "binary", "primary": 0.5, "auroc": 0.5}}}
                version = tracking.register(bundle, run.run_id, "1", figures)
        assert tracking.promote(version, figures).decision == "promoted"  # the champion
        yield {"folder": folder, "params": params, "model": model, "bundle": bundle, "rows": rows,
               "test_dir": test_dir, "catalogue": folder / "with-new-task.yaml"}


def test_the_bundle_keeps_the_catalogue_and_the_gate_reference_it_was_trained_with(registered):
    manifest = json.loads((registered["bundle"] / MANIFEST).read_text())
    trained = registered["model"].m3oe.reference
    assert [tuple(p) for p in manifest["gate_reference"]["reference"]] == trained
    assert (registered["bundle"] / "catalogue.yaml").read_bytes() == SHIPPED.read_bytes()
    loaded, _ = load_bundle(registered["bundle"])
    assert loaded.m3oe.reference == trained and NEW not in loaded.catalogue


def test_fedkim_evaluate_scores_a_new_task_of_a_registered_model(registered):
    out = registered["folder"] / "scored.json"
    args = ["evaluate", "champion", "--test-dir", str(registered["test_dir"]), "--catalogue",
            str(registered["catalogue"]), "--out", str(out), "--params", str(registered["folder"] / "params.yaml")]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert NEW in result.output and KNOWN in result.output
    metrics = json.loads(out.read_text())
    per_task = metrics["tasks"]
    assert set(per_task) == {NEW, KNOWN}
    assert per_task[NEW]["role"] == "zero_shot" and per_task[KNOWN]["role"] == "train"
    limit = registered["params"].eval.max_per_task
    assert per_task[NEW]["n"] == min(limit, int((registered["rows"]["task"] == NEW).sum()))
    assert 0.0 <= per_task[NEW]["auroc"] <= 1.0 and 0.0 <= per_task[NEW]["f1"] <= 1.0
    assert metrics["model"] == "models:/fedkim-foundation@champion"

    # the training task scores the same with and without the new task in the catalogue: its gate did not move
    shipped_out = registered["folder"] / "shipped.json"
    args = ["evaluate", "1", "--test-dir", str(registered["test_dir"]), "--tasks", KNOWN, "--out", str(shipped_out),
            "--params", str(registered["folder"] / "params.yaml")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads(shipped_out.read_text())["tasks"][KNOWN] == per_task[KNOWN]


def test_fedkim_evaluate_names_what_is_wrong(registered):
    params = ["--params", str(registered["folder"] / "params.yaml")]
    missing = CliRunner().invoke(app, ["evaluate", "champion", "--test-dir", str(registered["test_dir"]),
                                       "--tasks", NEW, *params])  # the shipped catalogue has no such task
    assert missing.exit_code == 2 and f"['{NEW}']" in missing.output and "tasks.yaml" in missing.output
    nothing = CliRunner().invoke(app, ["evaluate", "no-such-alias", "--test-dir", str(registered["test_dir"]),
                                       *params])
    assert nothing.exit_code == 2 and "models:/fedkim-foundation@no-such-alias" in nothing.output


def test_the_served_model_answers_a_task_it_has_never_seen(registered, monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(registered["test_dir"]))  # path inputs: only inside the folder allowed
    tracking.configure(registered["params"].tracking, registered["folder"])
    served = mlflow.pyfunc.load_model("models:/fedkim-foundation@champion")
    rows = registered["rows"]
    samples = rows[rows["task"] == NEW].head(3)
    query = pd.DataFrame([{"task": NEW, "modality": "image", "task_description": NEW_TASK["task_description"],
                           "question": NEW_TASK["question"], "options": "No|Yes",
                           "image_path": str(registered["test_dir"] / p)} for p in samples["image_path"]])
    answers = served.predict(query)
    assert list(answers["task"]) == [NEW] * 3 and set(answers["answer"]) <= {"No", "Yes"}

    # the same scores as the model itself gives with the task in its catalogue
    from fedkim.data.loaders import collate
    from fedkim.tracking.serving import query_item

    model, params = registered["model"], registered["params"]
    extended = load_catalogue(registered["catalogue"])
    model.use_catalogue(extended)
    try:
        batch = collate([query_item(r, NEW, params, i, extended) for i, r in enumerate(query.to_dict("records"))])
        expected = model.option_logprobs(batch, NEW, [["No", "Yes"]] * 3)
    finally:
        model.use_catalogue(load_catalogue())
    got = torch.tensor([list(s.values()) for s in answers["scores"]])
    assert torch.allclose(got, expected, atol=1e-5)

    with pytest.raises(ValueError, match=r"not in the model's catalogue.*\['task_description', 'question'"):
        served.predict(pd.DataFrame([{"task": NEW, "modality": "image", "options": "No|Yes",
                                      "image_path": query["image_path"][0]}]))


def test_the_gate_checks_the_new_task_against_the_catalogue_in_force(registered):
    from fedkim.config import GateParams
    from fedkim.data.validate import validate_site

    rules = GateParams(min_samples_per_site=1, min_samples_per_class=1)
    with_task = validate_site(registered["test_dir"], rules, write_docs=False,
                              catalogue=load_catalogue(registered["catalogue"]))
    assert with_task.success, with_task.summary()
    shipped = validate_site(registered["test_dir"], rules, write_docs=False)
    assert not shipped.success and {f.rule for f in shipped.findings} == {"index.task_known"}
