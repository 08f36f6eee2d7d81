"""MLflow tracking on SQLite in a temporary folder: round and nested runs, the registry, promotion, serving, CLI."""

import json
import math

import mlflow
import pandas as pd
import pytest
import torch
import yaml
from mlflow import MlflowClient
from typer.testing import CliRunner

from fedkim import tracking
from fedkim.central.bundle import save_bundle
from fedkim.central.evaluate import by_text, choice_text_logprobs, gate_table
from fedkim.cli import app
from fedkim.config import load_params
from fedkim.data.catalogue import load_catalogue
from fedkim.data.siteformat import read_index
from fedkim.tracking.query_inputs import DATA_DIR_ENV
from tests.helpers import TINY, small_params_dict
from tests.helpers.models import batch_of, trained_model

TASKS = load_catalogue().tasks  # the shipped catalogue

SITES = {"site-a": "fp-a", "site-b": "fp-b"}


def fake_metrics(primary: float, auroc: float, model=None) -> dict:
    """evaluate()'s layout with chosen figures, so that promotion outcomes are known in advance."""
    tasks = {t: {"role": spec.role, "kind": spec.kind, "n": 6, "primary": primary, "f1": primary,
                 "accuracy": primary, **({"auroc": auroc} if spec.kind == "binary" else {})}
             for t, spec in TASKS.items()}
    metrics = {"tasks": tasks, "train_mean_f1": primary, "zeroshot_mean": primary, "mean_auroc": auroc}
    if model is not None:
        metrics["gate"] = gate_table(model)
    return metrics


@pytest.fixture(scope="module")
def store(small_federation, tmp_path_factory):
    """params.yaml in a fresh folder, its default relative sqlite:///mlruns/mlflow.db resolved there."""
    folder = tmp_path_factory.mktemp("tracking")
    (folder / "params.yaml").write_text(yaml.safe_dump(small_params_dict(small_federation.root, **TINY)))
    params = load_params(folder / "params.yaml")
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        uri = tracking.configure(params.tracking, folder)
        yield {"folder": folder, "params": params, "uri": uri}


@pytest.fixture(autouse=True)
def configured(store):
    tracking.configure(store["params"].tracking, store["folder"])  # a test may have pointed it elsewhere


@pytest.fixture(scope="module")
def model(store):
    return trained_model(store["params"])


@pytest.fixture(scope="module")
def bundle(store, model):
    return save_bundle(model, store["params"], store["folder"] / "bundle", round_id="1", sites=SITES)


@pytest.fixture(scope="module")
def rounds(store, model, bundle):
    """Three rounds: the first sets the champion, a worse second is kept, a better third is promoted."""
    figures = {"1": (0.6, 0.7), "2": (0.5, 0.9), "3": (0.7, 0.69)}  # 3: AUROC within the allowed drop
    out = {}
    for round_id, (primary, auroc) in figures.items():
        metrics = fake_metrics(primary, auroc, model)
        with tracking.round_run(store["params"], round_id, sites=SITES, params_hash="h1") as parent:
            with tracking.injection_run(parent) as run:
                run.log_evaluation(metrics)
                comparison = run.compare_with_champion(metrics)
            version = tracking.register(bundle, run.run_id, round_id, metrics)
            aliases = list(version.aliases)
            result = tracking.promote(version, metrics)
        out[round_id] = {"version": version, "aliases": aliases, "result": result, "comparison": comparison,
                         "run_id": run.run_id, "parent_id": parent.info.run_id, "metrics": metrics}
    return out


# --------------------------------------------------------------------------------------------------- configure
def test_relative_sqlite_resolves_under_the_params_folder_and_env_overrides(store, monkeypatch, tmp_path):
    folder = store["folder"]
    assert store["uri"] == f"sqlite:///{(folder / 'mlruns' / 'mlflow.db').as_posix()}"
    assert (folder / "mlruns" / "mlflow.db").is_file()
    experiment = mlflow.get_experiment_by_name("fedkim")
    assert experiment.artifact_location == (folder / "mlruns" / "artifacts").as_uri()
    assert tracking.resolve_uri("http://127.0.0.1:5000", tmp_path) == ("http://127.0.0.1:5000", None)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])  # the env wins over tracking.uri
    other = store["params"].tracking.model_copy(update={"uri": "sqlite:///elsewhere/x.db"})
    assert tracking.configure(other, tmp_path) == store["uri"] and not (tmp_path / "elsewhere").exists()


# ------------------------------------------------------------------------------------------------------- runs
def test_round_run_with_site_and_injection_runs(store, model):
    client, params = MlflowClient(), store["params"]
    losses, lrs = [2.0, 1.5, 1.2, 1.0], [1e-4, 5e-4, 4e-4, 2e-4]
    steps = ["lung_opacity", "lung_opacity", "ecg_abnormal", "mortality"]
    with tracking.round_run(params, "logging-1", sites=SITES, params_hash="h1") as parent:
        site = tracking.log_site(parent, "site-a", metrics={"lung_opacity": {"f1": 0.7, "auroc": math.nan}},
                                 validation={"success": True, "findings": 0}, sample_counts={"image": 18, "ecg": 9},
                                 fingerprint="fp-a")
        with tracking.injection_run(parent) as run:
            run.log_injection(losses, lrs, steps)
            run.log_evaluation(fake_metrics(0.6, 0.7, model))
    run_data = client.get_run(parent.info.run_id).data
    assert run_data.params["inject.num_experts"] == "4" and run_data.params["inject.foundation_model"] == "tiny"
    assert run_data.params["federation.strategy"] == "fedavg" and run_data.params["data.sites.site-a.prevalence"]
    tags = run_data.tags
    assert tags["fedkim.round_id"] == "logging-1" and tags["fedkim.sites"] == "site-a,site-b"
    assert tags["fedkim.site.site-b.fingerprint"] == "fp-b" and tags["fedkim.params_hash"] == "h1"
    assert tags["fedkim.git_sha"] == "unknown" or len(tags["fedkim.git_sha"]) == 40

    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(r.data.tags["fedkim.kind"] for r in children) == ["injection", "site"]
    site_run = client.get_run(site)
    assert site_run.data.metrics == {"local.lung_opacity.f1": 0.7, "samples.image": 18, "samples.ecg": 9,
                                     "samples.total": 27, "validation.findings": 0}
    assert site_run.data.tags["fedkim.validation.success"] == "true" and site_run.info.status == "FINISHED"

    history = client.get_metric_history(run.run_id, "inject.loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == list(enumerate(losses))
    assert [m.step for m in client.get_metric_history(run.run_id, "inject.loss.lung_opacity")] == [0, 1]
    metrics = client.get_run(run.run_id).data.metrics
    assert metrics["eval.lung_opacity.f1"] == 0.6 and metrics["eval.mortality.auroc"] == 0.7
    artifacts = {a.path for folder in ("", "gate", "injection") for a in client.list_artifacts(run.run_id, folder)}
    assert {"metrics.json", "gate/gate_heatmap.png", "gate/gate_table.json", "injection/loss_curve.png",
            "injection/steps.json"} <= artifacts
    heatmap = mlflow.artifacts.download_artifacts(run_id=run.run_id, artifact_path="gate/gate_heatmap.png")
    assert open(heatmap, "rb").read(8) == b"\x89PNG\r\n\x1a\n"

    # the same round again resumes its run and does not log the site twice; other params are refused
    with tracking.round_run(params, "logging-1", sites=SITES, params_hash="h1") as again:
        assert again.info.run_id == parent.info.run_id
        assert tracking.log_site(again, "site-a", metrics={}, validation={}, sample_counts={}) == site
    assert tracking.find_round_run("logging-1").info.run_id == parent.info.run_id
    with pytest.raises(tracking.TrackingError, match="round 'logging-1' is already tracked .* use a new round id"):
        with tracking.round_run(params, "logging-1", sites=SITES, params_hash="other"):
            pass


def test_injection_run_failure_marks_the_run_failed(store):
    with tracking.round_run(store["params"], "failing-1", sites=SITES, params_hash="h1") as parent:
        with pytest.raises(RuntimeError, match="boom"):
            with tracking.injection_run(parent) as run:
                raise RuntimeError("boom")
        with pytest.raises(ValueError, match="2 losses, 1 lrs, 2 tasks"):
            tracking.InjectionRun(run.run_id, "failing-1").log_injection([1.0, 2.0], [0.1], ["covid", "covid"])
    assert MlflowClient().get_run(run.run_id).info.status == "FAILED"


# --------------------------------------------------------------------------------------------------- registry
def test_register_aliases_challenger_and_is_idempotent(rounds, bundle):
    first = rounds["1"]
    assert first["aliases"] == ["challenger"] and first["version"].tags["fedkim.round_id"] == "1"
    assert first["version"].tags["fedkim.round_run_id"] == first["parent_id"]
    before = len(MlflowClient().search_model_versions("name = 'fedkim-foundation'"))
    again = tracking.register(bundle, first["run_id"], "1", first["metrics"])
    assert again.version == first["version"].version
    assert len(MlflowClient().search_model_versions("name = 'fedkim-foundation'")) == before == 3


def test_promotion_first_champion_then_kept_then_promoted(rounds):
    r1, r2, r3 = (rounds[r]["result"] for r in ("1", "2", "3"))
    assert (r1.decision, r1.champion, r1.previous_champion) == ("promoted", 1, None)
    assert (r2.decision, r2.champion) == ("kept", 1)
    assert "0.5000" in r2.reason and "0.6000" in r2.reason and "champion stays v1" in r2.reason
    assert (r3.decision, r3.champion, r3.previous_champion) == ("promoted", 3, 1)
    client = MlflowClient()
    v2 = client.get_model_version("fedkim-foundation", "2")
    assert v2.tags["fedkim.promotion.decision"] == "kept" and v2.tags["fedkim.promotion.reason"] == r2.reason
    assert int(client.get_model_version_by_alias("fedkim-foundation", "champion").version) == 3
    assert int(client.get_model_version_by_alias("fedkim-foundation", "challenger").version) == 3
    assert rounds["2"]["aliases"] == ["challenger"]  # v2 was the challenger until round 3 registered
    # asking again returns the recorded decision instead of judging a second time
    assert tracking.promote(v2, fake_metrics(0.99, 0.99)).decision == "kept"
    assert client.get_run(rounds["2"]["parent_id"]).data.tags["fedkim.promotion.decision"] == "kept"


def test_comparison_with_the_previous_champion(rounds):
    assert rounds["1"]["comparison"]["champion"] is None
    second = rounds["2"]["comparison"]
    assert second["champion_version"] == 1 and second["delta"]["score"]["primary"] == pytest.approx(-0.1)
    logged = MlflowClient().get_run(rounds["2"]["run_id"]).data.metrics
    assert logged["vs_champion.score.primary"] == pytest.approx(-0.1)
    assert logged["vs_champion.lung_opacity.auroc"] == pytest.approx(0.2)
    path = mlflow.artifacts.download_artifacts(run_id=rounds["2"]["run_id"], artifact_path="champion_comparison.json")
    assert json.loads(open(path).read())["champion_round_id"] == "1"


@pytest.mark.slow
def test_champion_pyfunc_answers_real_samples(rounds, store, model, monkeypatch):
    params = store["params"]
    monkeypatch.setenv(DATA_DIR_ENV, str(params.data.root))  # path inputs: only inside the folder allowed
    test_dir = params.data.root / "test"
    index = read_index(test_dir)
    chosen = ["lung_opacity", "ecg_abnormal", "mortality", "ecg_noise_qa", "medical_qa"]
    rows = index[index["task"].isin(chosen)].groupby("task", sort=False).head(2).copy()
    for column in ("image_path", "ecg_path", "clinical_path", "text_path"):
        rows[column] = [str(test_dir / p) if isinstance(p, str) else None for p in rows[column]]
    query = rows[["task", "sample_id", "image_path", "ecg_path", "clinical_path", "text_path"]]
    query = query.sample(frac=1.0, random_state=0).reset_index(drop=True)  # answers come back in row order

    served = mlflow.pyfunc.load_model("models:/fedkim-foundation@champion")
    answers = served.predict(query)
    assert list(answers.columns) == ["task", "answer", "scores", "calibration"]
    assert list(answers["task"]) == list(query["task"])
    for task in chosen:
        batch = batch_of(params, task, "test", "test", n=2)
        options = batch.get("options") or [list(TASKS[task].answers)] * 2
        questions = batch.get("question") or [TASKS[task].question] * 2
        expected = (choice_text_logprobs(model, batch, task, questions, options) if by_text(batch, params.eval)
                    else model.option_logprobs(batch, task, options))
        for i, sample in enumerate(batch["sample_id"]):
            row = answers[query["sample_id"] == sample].iloc[0]
            assert list(row["scores"]) == options[i]
            assert torch.allclose(torch.tensor(list(row["scores"].values())), expected[i, : len(options[i])],
                                  atol=1e-5)
            assert row["answer"] == options[i][int(expected[i, : len(options[i])].argmax())]
    with pytest.raises(ValueError, match="task 'covid' takes modality 'image', got 'ecg'"):
        served.predict(pd.DataFrame([{"task": "covid", "modality": "ecg", "image_path": "x.png"}]))
    direct = served.predict(pd.DataFrame([{"task": "medical_qa", "question": "Which is a bone? A) femur B) liver",
                                           "options": "A|B"}]))
    assert set(direct["scores"][0]) == {"A", "B"}


def test_registry_show_and_cli(rounds, store):
    rows = tracking.registry_show()
    assert [(r["version"], r["aliases"], r["decision"]) for r in rows] == [
        (1, [], "promoted"), (2, [], "kept"), (3, ["challenger", "champion"], "promoted")]
    assert rows[1]["round_run_id"] == rounds["2"]["parent_id"] and rows[1]["run_id"] == rounds["2"]["run_id"]
    assert rows[0]["train_mean_f1"] == pytest.approx(0.6)
    result = CliRunner().invoke(app, ["registry", "show", "--params", str(store["folder"] / "params.yaml")],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "challenger, champion" in result.output and "kept" in result.output
    assert "decided on" in result.output and rows[2]["decided_on"] in {"test", "validation"}
    assert rounds["2"]["run_id"] in result.output and rounds["2"]["parent_id"] in result.output


def test_registry_show_cli_without_versions(store):
    raw = yaml.safe_load((store["folder"] / "params.yaml").read_text())
    raw["tracking"] = {"uri": store["uri"], "registered_model": "nothing-here"}  # same database, no versions
    other = store["folder"] / "empty" / "params.yaml"
    other.parent.mkdir(exist_ok=True)
    other.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["registry", "show", "--params", str(other)], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "no versions of nothing-here" in result.output


def test_metric_names_mlflow_refuses_are_made_safe():
    from fedkim.tracking.runs import numeric_items

    values = numeric_items({"stats": {"modalities": {"image+text": 4, "ecg": 2}, "note": "x", "nan": math.nan}},
                           "validation")
    assert values == {"validation.stats.modalities.image_text": 4.0, "validation.stats.modalities.ecg": 2.0}
