"""The `fedkim` command line: exit codes and messages."""

import json

import yaml
from typer.testing import CliRunner

from fedkim.cli import app
from tests.helpers import small_params_dict

runner = CliRunner()


def test_generate_then_cached(tmp_path):
    params = tmp_path / "params.yaml"
    raw = small_params_dict(tmp_path / "fed", **{
        "federation.members": [{"id": "site-x", "modalities": ["image", "ecg", "clinical"]}],
        "data.sites": {"site-x": {"size_factor": 0.4}}})
    params.write_text(yaml.safe_dump(raw))
    first = runner.invoke(app, ["data", "generate", "--params", str(params)])
    assert first.exit_code == 0, first.output
    assert "generated in" in first.output and "site-x" in first.output and "test" in first.output
    second = runner.invoke(app, ["data", "generate", "--params", str(params)])
    assert second.exit_code == 0 and "reused cached" in second.output
    out = runner.invoke(app, ["data", "generate", "--params", str(params), "--out", str(tmp_path / "other"),
                              "--seed", "3"])
    assert out.exit_code == 0 and (tmp_path / "other" / "federation.yaml").is_file()


def test_bad_params_exit_2_naming_the_key(tmp_path):
    params = tmp_path / "params.yaml"
    raw = small_params_dict(tmp_path / "fed")
    raw["data"]["sizes"]["site_trian"] = 5
    params.write_text(yaml.safe_dump(raw))
    result = runner.invoke(app, ["data", "generate", "--params", str(params)])
    assert result.exit_code == 2
    assert "data.sizes.site_trian: unknown key" in result.output and "site_train" in result.output


def test_generate_refuses_foreign_folder_with_exit_2(tmp_path):
    (tmp_path / "export" / "site-b").mkdir(parents=True)
    (tmp_path / "export" / "site-b" / "keep.txt").write_text("x")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(small_params_dict(tmp_path / "export")))
    result = runner.invoke(app, ["data", "generate", "--params", str(params)])
    assert result.exit_code == 2 and "refusing to overwrite" in result.output
    assert (tmp_path / "export" / "site-b" / "keep.txt").read_text() == "x"


def test_experiment_on_a_foreign_site_folder_or_bad_members_exits_2_with_one_line(tmp_path):
    """What used to end in a GenerationError traceback: the message names the directory or the key."""
    (tmp_path / "fed" / "site-a").mkdir(parents=True)  # a hospital's folder where a generated member would go
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(small_params_dict(tmp_path / "fed")))
    foreign = runner.invoke(app, ["experiment", "--params", str(params), "--out", str(tmp_path / "x")])
    assert foreign.exit_code == 2, foreign.output
    assert f"{tmp_path / 'fed' / 'site-a'}: exists but was not generated" in foreign.output.replace("\n", "")
    assert "Traceback" not in foreign.output and not (tmp_path / "x").exists()

    raw = small_params_dict(tmp_path / "fed")
    raw["data"]["sites"]["site-z"] = {"prevalence": 0.3}
    params.write_text(yaml.safe_dump(raw))
    for command in (["experiment", "--out", str(tmp_path / "x")], ["data", "generate"], ["deploy"]):
        result = runner.invoke(app, [*command, "--params", str(params)])
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        assert "data.sites.site-z: a generator profile, but 'site-z' is not a member" in result.output


def test_a_pipeline_stage_exits_2_with_one_line_naming_the_key(tmp_path):
    import os
    import subprocess
    import sys

    from tests.helpers import REPO

    raw = small_params_dict(tmp_path / "fed")
    raw["federation"]["members"][0]["data"] = "provided"  # without a path
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    done = subprocess.run([sys.executable, "-m", "pipelines.generate"], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "FEDKIM_PARAMS": str(params)}, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith("error: ") and len(done.stderr.strip().splitlines()) == 1
    assert "federation.members.0" in done.stderr and "needs `path`" in done.stderr


def test_params_command_prints_resolved_json(small_params_file):
    result = runner.invoke(app, ["params", "--params", str(small_params_file)])
    assert result.exit_code == 0
    assert json.loads(result.output)["data"]["sizes"]["site_train"] == 24


def test_experiment_rejects_a_malformed_setting_with_exit_2(small_params_file, tmp_path):
    result = runner.invoke(app, ["experiment", "--params", str(small_params_file), "--out", str(tmp_path / "x"),
                                 "--set", "inject.rank"])
    assert result.exit_code == 2 and "--set expects key=value" in result.output and "inject.rank" in result.output
    unknown = runner.invoke(app, ["experiment", "--params", str(small_params_file), "--out", str(tmp_path / "x"),
                                  "--set", "inject.rnak=4"])
    assert unknown.exit_code == 2 and "inject.rnak" in unknown.output
    assert not (tmp_path / "x").exists()  # nothing ran, nothing written


def test_rescore_names_the_missing_run_unknown_task_or_setting_with_exit_2(small_params_file, tmp_path):
    missing = runner.invoke(app, ["rescore", str(tmp_path / "run"), "--params", str(small_params_file)])
    assert missing.exit_code == 2 and "comparison.json: no comparison to rescore" in missing.output
    task = runner.invoke(app, ["rescore", str(tmp_path), "--params", str(small_params_file), "--tasks", "sepsis,nope"])
    assert task.exit_code == 2 and "unknown task(s) ['nope']" in task.output
    setting = runner.invoke(app, ["rescore", str(tmp_path), "--params", str(small_params_file),
                                  "--set", "eval.choice_scoring=letters"])
    assert setting.exit_code == 2 and "eval.choice_scoring" in setting.output


def test_combine_names_the_source_that_is_not_an_experiment_with_exit_2(tmp_path):
    result = runner.invoke(app, ["combine", str(tmp_path / "run"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "no comparison.json" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_combine_takes_the_variants_named_after_a_folder(tmp_path):
    """FOLDER:v1,v2 picks variants; the error names the folder and what it holds."""
    run = tmp_path / "run"
    (run / "fedplug").mkdir(parents=True)
    (run / "comparison.json").write_text(json.dumps({"variants": {"fedplug": {}}, "foundation_model": "tiny",
                                                     "rounds": 1, "max_per_task": 6, "seeds": 1}))
    result = runner.invoke(app, ["combine", f"{run}:fedkim", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "has no variant(s) ['fedkim']" in result.output.replace("\n", "")
