"""Re-running a round id leaves one record of it in MLflow: one parent run, one run per site and one injection run
(an unfinished one from a crashed try is reopened and finished, never left beside a new one), one logged model and
one registry version. MLflow on SQLite in a temporary folder, the tiny FM's central model."""

import mlflow
import pytest
import yaml
from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus

from fedkim import tracking
from fedkim.config import load_params
from fedkim.data.catalogue import load_catalogue
from fedkim.tracking import KIND, PARENT, ROUND, SITE
from tests.helpers import TINY, small_params_dict
from tests.helpers.models import trained_model

SITES = {"site-a": "fp-a", "site-b": "fp-b"}
INJECTION = {"losses": [2.0, 1.5, 1.2], "lrs": [1e-4, 2e-4, 1e-4], "tasks": ["covid", "covid", "mortality"],
             "seconds": 1.0, "steps": 3}


def figures(primary: float) -> dict:
    tasks = {t: {"role": spec.role, "kind": spec.kind, "n": 6, "primary": primary, "f1": primary}
             for t, spec in load_catalogue().tasks.items()}
    return {"tasks": tasks, "train_mean_f1": primary, "zeroshot_mean": primary}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """params.yaml in a fresh folder; its default sqlite:///mlruns/mlflow.db resolves there."""
    folder = tmp_path_factory.mktemp("rerun")
    (folder / "params.yaml").write_text(yaml.safe_dump(small_params_dict(folder / "federation", **TINY)))
    return folder


@pytest.fixture(scope="module")
def params(folder):
    return load_params(folder / "params.yaml")


@pytest.fixture(autouse=True)
def configured(params, folder, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracking.configure(params.tracking, folder)


@pytest.fixture(scope="module")
def model(params):
    return trained_model(params)


def runs(round_id: str, kind: str):
    experiment = mlflow.get_experiment_by_name("fedkim")
    return MlflowClient().search_runs([experiment.experiment_id],
                                      f"tags.`{ROUND}` = '{round_id}' and tags.`{KIND}` = '{kind}'")


def live_models(round_id: str):
    experiment = mlflow.get_experiment_by_name("fedkim")
    return MlflowClient().search_logged_models([experiment.experiment_id],
                                               filter_string=f"tags.`{ROUND}` = '{round_id}'")


def versions(round_id: str):
    return MlflowClient().search_model_versions(f"name = 'fedkim-foundation' and tags.`{ROUND}` = '{round_id}'")


def a_try(params, model, round_id, evaluate):
    with tracking.round_run(params, round_id, sites=SITES, params_hash="h") as parent:
        return tracking.log_round(parent, params, round_id, sites=SITES, inject=lambda: (model, INJECTION),
                                  evaluate=evaluate)


def test_a_round_that_crashed_in_evaluation_is_finished_in_its_own_runs(params, model):
    def crash(_model):
        raise RuntimeError("evaluation crashed")

    with pytest.raises(RuntimeError, match="evaluation crashed"):
        a_try(params, model, "crash-1", crash)
    (parent,), (injection,) = runs("crash-1", "round"), runs("crash-1", "injection")
    assert parent.info.status == "FAILED" and injection.info.status == "FAILED"

    logged = a_try(params, model, "crash-1", lambda _model: figures(0.6))

    (parent_again,), (injection_again,) = runs("crash-1", "round"), runs("crash-1", "injection")
    assert parent_again.info.run_id == parent.info.run_id and parent_again.info.status == "FINISHED"
    assert injection_again.info.run_id == injection.info.run_id == logged.injection_run_id
    assert injection_again.info.status == "FINISHED"
    history = MlflowClient().get_metric_history(injection.info.run_id, "inject.loss")
    assert sorted(m.step for m in history) == [0, 1, 2]  # the loss curve logged once, not twice
    assert len(versions("crash-1")) == 1 and len(live_models("crash-1")) == 1

    again = a_try(params, model, "crash-1", lambda _model: figures(0.6))  # a completed round, once more
    assert again.version.version == logged.version.version
    assert len(runs("crash-1", "round")) == 1 and len(runs("crash-1", "injection")) == 1
    assert len(versions("crash-1")) == 1 and len(live_models("crash-1")) == 1


class Echo(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input):
        return model_input


def test_a_model_logged_by_a_crashed_try_is_registered_not_logged_again(params, model, tmp_path):
    """A crash between logging the model and registering it left a READY logged model (and, from a try that
    crashed while logging, a FAILED one): the round registers the READY one and deletes the other."""
    from fedkim.central.bundle import save_bundle

    bundle = save_bundle(model, params, tmp_path / "bundle", round_id="logged-1", sites=SITES)
    with tracking.round_run(params, "logged-1", sites=SITES, params_hash="h") as parent:
        with tracking.injection_run(parent) as run:
            run.log_evaluation(figures(0.6))
        left = mlflow.models.Model.log(artifact_path=None, name="model", flavor=mlflow.pyfunc, run_id=run.run_id,
                                       python_model=Echo(), tags={ROUND: "logged-1"})
        client = MlflowClient()
        broken = client.create_logged_model(parent.info.experiment_id, name="model", source_run_id=run.run_id,
                                            tags={ROUND: "logged-1"})
        client.finalize_logged_model(broken.model_id, LoggedModelStatus.FAILED)
        assert len(live_models("logged-1")) == 2

        version = tracking.register(bundle, run.run_id, "logged-1", figures(0.6))

    assert version.source == f"models:/{left.model_id}"  # the model the crashed try logged
    assert [m.model_id for m in live_models("logged-1")] == [left.model_id]
    assert tracking.register(bundle, run.run_id, "logged-1", figures(0.6)).version == version.version
    assert len(versions("logged-1")) == 1 and len(live_models("logged-1")) == 1


def test_a_site_run_a_crash_left_running_is_completed_not_duplicated(params):
    with tracking.round_run(params, "site-1", sites=SITES, params_hash="h") as parent:
        client = MlflowClient()
        left = client.create_run(parent.info.experiment_id, tags={  # what a killed process left: RUNNING, partial
            PARENT: parent.info.run_id, KIND: "site", ROUND: "site-1", SITE: "site-a"})
        client.log_metric(left.info.run_id, "samples.image", 18.0)

        run_id = tracking.log_site(parent, "site-a", metrics={"covid": {"f1": 0.7}}, validation={"success": True},
                                   sample_counts={"image": 18}, fingerprint="fp-a")

        assert run_id == left.info.run_id
        assert tracking.log_site(parent, "site-a", metrics={}, validation={}, sample_counts={}) == run_id
    (site,) = runs("site-1", "site")
    assert site.info.status == "FINISHED" and site.data.metrics["local.covid.f1"] == 0.7
    assert site.data.tags["fedkim.validation.success"] == "true"
    assert len(client.get_metric_history(run_id, "samples.image")) == 1  # not logged twice
