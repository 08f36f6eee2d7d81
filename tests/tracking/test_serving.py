"""The registered model answers as evaluation answered: same calibration, same readers, inputs sent as data."""

import base64
import json
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml

from fedkim import tracking
from fedkim.central.bundle import read_calibration, save_bundle, verify_bundle
from fedkim.central.evaluate import evaluate
from fedkim.data.formats.image import read_image, write_dicom
from fedkim.data.siteformat import read_index, resolve
from fedkim.members import split_dir
from fedkim.tracking.query_inputs import DATA_DIR_ENV
from fedkim.tracking.registry import requirements
from tests.helpers import REPO, TINY, small_params_dict, write_params
from tests.helpers.models import trained_model
from tests.helpers.queries import b64, data_query, ecg_json, ecg_wfdb

CHOSEN = ["lung_opacity", "ecg_abnormal", "mortality", "cxr_vqa", "ecg_noise_qa", "medical_qa"]
N = TINY["eval.max_per_task"]  # evaluation reads the first N samples of each task: the query sends the same


@pytest.fixture(scope="module")
def served(small_federation, tmp_path_factory):
    """A TINY model evaluated on the test split, bundled with its calibration, registered and loaded as a pyfunc."""
    folder = tmp_path_factory.mktemp("serving")
    params = write_params(folder, small_params_dict(small_federation.root, **TINY))
    model = trained_model(params)
    calibration, picks = {}, {}
    metrics = evaluate(model, split_dir(params, "test"), params.eval, params.site, params.data,
                       public_dir=split_dir(params, "public"), tasks=tuple(CHOSEN), calibration=calibration,
                       picks=picks)
    metrics["calibration"] = calibration
    bundle = save_bundle(model, params, folder / "bundle", round_id="s1", metrics=metrics)
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        tracking.configure(params.tracking, folder)
        with tracking.round_run(params, "s1", sites={}, params_hash="h") as parent:
            with tracking.injection_run(parent) as run:
                run.log_evaluation(metrics)
        version = tracking.register(bundle, run.run_id, "s1", metrics)
        pyfunc = mlflow.pyfunc.load_model(f"models:/{version.name}/{version.version}")
        yield {"params": params, "model": model, "metrics": metrics, "picks": picks, "bundle": bundle,
               "pyfunc": pyfunc, "folder": folder, "version": version}


def test_the_bundle_carries_the_calibration_evaluation_used(served):
    verify_bundle(served["bundle"])  # calibration.json is listed with its sha256 like the other files
    stored = read_calibration(served["bundle"])
    for task in CHOSEN:
        figures = served["metrics"]["tasks"][task]
        if figures["kind"] == "binary":
            assert stored[task]["threshold"] == figures["threshold"]
            assert stored[task]["source"] == figures["calibration_source"]
        else:
            assert bool(stored[task]["priors"]) == figures["calibrated"]
    assert any(stored[t]["priors"] for t in ("cxr_vqa", "ecg_noise_qa"))  # choice tasks with option priors


def test_served_answers_equal_the_evaluated_answers(served):
    query = data_query(split_dir(served["params"], "test"), CHOSEN, N)
    order = query.groupby("task").cumcount().sort_values(kind="stable").index  # tasks interleaved row by row
    query = query.loc[order].reset_index(drop=True)
    answers = served["pyfunc"].predict(query.drop(columns=["answer"]))
    assert list(answers["task"]) == list(query["task"])
    expected = [served["picks"][t][s] for t, s in zip(query["task"], query["sample_id"])]
    assert list(answers["answer"]) == expected
    binary = answers[answers["task"] == "lung_opacity"]
    assert binary["calibration"].str.startswith("threshold").all()
    # the calibrated threshold decides: at threshold 0 at least one yes/no answer would differ here
    raw = [max(s, key=s.get) for s in answers["scores"]]
    assert raw != expected


def test_each_modality_as_bytes_reads_as_its_file(served, tmp_path, monkeypatch):
    test_dir = split_dir(served["params"], "test")
    index = read_index(test_dir)
    image_row = index[index["task"] == "lung_opacity"].iloc[0]
    dicom = tmp_path / "xray.dcm"
    write_dicom(dicom, read_image(resolve(test_dir, image_row["image_path"])), sample_id="q1", site_id="client")
    ecg_path = resolve(test_dir, index[index["task"] == "ecg_abnormal"].iloc[0]["ecg_path"])
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path.parent))
    (tmp_path / "ecg").mkdir()
    for suffix in (".hea", ".dat"):
        (tmp_path / "ecg" / ecg_path.with_suffix(suffix).name).write_bytes(ecg_path.with_suffix(suffix).read_bytes())
    query = pd.DataFrame([
        {"task": "lung_opacity", "image": b64(dicom)}, {"task": "lung_opacity", "image_path": str(dicom)},
        {"task": "ecg_abnormal", "ecg": ecg_json(ecg_path)}, {"task": "ecg_abnormal", "ecg": ecg_wfdb(ecg_path)},
        {"task": "ecg_abnormal", "ecg_path": str(tmp_path / "ecg" / ecg_path.with_suffix(".hea").name)},
    ])
    answers = served["pyfunc"].predict(query)
    assert answers["scores"][0] == answers["scores"][1]  # DICOM bytes read exactly as the DICOM file
    assert answers["scores"][2] == answers["scores"][3] == answers["scores"][4]  # JSON, WFDB bytes, WFDB file


def test_a_zero_shot_task_of_the_query_is_decided_label_free(served):
    image = data_query(split_dir(served["params"], "test"), ["lung_opacity"], 1)["image"][0]
    query = pd.DataFrame([{"task": "rib_fracture", "modality": "image", "image": image, "options": "No|Yes",
                           "task_description": "Detect a fractured rib on a chest radiograph.",
                           "question": "Is there a rib fracture?"}])
    answer = served["pyfunc"].predict(query).iloc[0]
    assert answer["calibration"].startswith("label-free")
    assert answer["answer"] == ("Yes" if answer["scores"]["Yes"] > answer["scores"]["No"] else "No")


@pytest.mark.parametrize("row, message", [
    ({"task": "lung_opacity"}, "row 0, column 'image': task 'lung_opacity' needs its image input"),
    ({"task": "lung_opacity", "image": "not base64!"}, "row 0, column 'image': not valid base64"),
    ({"task": "lung_opacity", "image": base64.b64encode(b"GIF89a....").decode()},
     "row 0, column 'image': the bytes are not PNG or JPEG or DICOM"),
    ({"task": "lung_opacity", "image_path": "/etc/passwd"}, "row 0, column 'image_path': path inputs are disabled"),
    ({"task": "ecg_abnormal", "ecg": json.dumps({"fs": 500, "leads": ["I"]})},
     "row 0, column 'ecg': an ECG in JSON needs \\['signal'\\]"),
    ({"task": "ecg_abnormal", "ecg": json.dumps({"fs": 500, "leads": ["I", "II"], "signal": [[0, 0]] * 100})},
     "row 0, column 'ecg': missing lead"),
    ({"task": "mortality", "clinical": "{"}, "row 0, column 'clinical': not valid JSON"),
    ({"task": "mortality", "clinical": json.dumps([{"hour": 0, "value": 80}])},
     "row 0, column 'clinical': rows lacks \\['variable'\\]"),
    ({"task": "mortality", "clinical": json.dumps([{"hour": 0, "variable": "heart_rate", "value": 80,
                                                    "unit": "furlongs"}])},
     "row 0, column 'clinical': unknown unit"),
])
def test_bad_inputs_name_row_and_column(served, row, message, monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    with pytest.raises(Exception, match=message):
        served["pyfunc"].predict(pd.DataFrame([row]))


def test_a_path_outside_the_allowed_folder_is_refused(served, tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    with pytest.raises(Exception, match=f"row 0, column 'image_path': .* outside the folder .*{DATA_DIR_ENV}"):
        served["pyfunc"].predict(pd.DataFrame([{"task": "lung_opacity", "image_path": str(tmp_path / ".." / "x.png")}]))


def test_logged_requirements_cover_what_the_pyfunc_imports(served):
    """Every distribution that the fedkim modules loaded by serving import is pinned, at the lock file's version."""
    script = """
import ast, json, sys
from importlib.metadata import packages_distributions
import fedkim.tracking.serving, fedkim.central.bundle, fedkim.tracking.query_inputs
names = set()
for name, module in list(sys.modules.items()):
    if name.startswith("fedkim") and getattr(module, "__file__", None):
        for node in ast.walk(ast.parse(open(module.__file__).read())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
found = packages_distributions()
print(json.dumps({n: found[n] for n in names if n in found and n != "fedkim"}))
"""
    imported = json.loads(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                                         cwd=REPO).stdout)
    pins = dict(line.split("==") for line in requirements())
    normal = {k.lower().replace("_", "-"): v for k, v in pins.items()}
    missing = {n: d for n, d in imported.items() if not any(x.lower() in normal for x in d)}
    assert not missing, f"imported but not in the model's requirements: {missing}"
    lock = dict(line.split("#")[0].strip().lower().split("==") for line in (REPO / "requirements.lock.txt")
                .read_text().splitlines() if "==" in line.split("#")[0])
    assert {k: v for k, v in normal.items() if lock.get(k) != v} == {}
    logged = mlflow.artifacts.download_artifacts(f"models:/{served['version'].name}/{served['version'].version}")
    listed = (served["folder"] / "logged-requirements.txt")
    listed.write_text(open(f"{logged}/requirements.txt").read())
    assert {line.split("==")[0] for line in listed.read_text().split()} >= set(pins)
    assert yaml.safe_load(open(f"{logged}/MLmodel"))["signature"]["inputs"]
    assert np.isfinite(served["metrics"]["tasks"]["lung_opacity"]["threshold"])


@pytest.mark.slow
def test_the_logged_model_answers_where_fedkim_is_not_installed(served, tmp_path):
    """The model carries fedkim's code (code/): a Python with only the pinned dependencies (this venv's
    site-packages without site processing, so without the editable fedkim) loads it and answers as here."""
    import os
    import sysconfig

    model_dir = mlflow.artifacts.download_artifacts(f"models:/{served['version'].name}/{served['version'].version}",
                                                    dst_path=str(tmp_path / "model"))
    assert (Path(model_dir) / "code" / "fedkim" / "tracking" / "serving.py").is_file()
    query = data_query(split_dir(served["params"], "test"), ["lung_opacity", "ecg_abnormal"], 2).drop(
        columns=["answer", "sample_id"])
    query.to_json(tmp_path / "query.json", orient="records")
    script = f"""
import json, sys
sys.path.append({sysconfig.get_paths()["purelib"]!r})
try:
    import fedkim
except ImportError:
    pass
else:
    raise SystemExit("fedkim is importable without the model: " + fedkim.__file__)
import mlflow.pyfunc, pandas as pd
model = mlflow.pyfunc.load_model({model_dir!r})
answers = model.predict(pd.read_json({str(tmp_path / "query.json")!r}, orient="records", dtype=False))
import fedkim
print(json.dumps({{"answers": list(answers["answer"]), "fedkim": fedkim.__file__}}))
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-S", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["fedkim"].startswith(str(Path(model_dir).resolve()))
    assert result["answers"] == list(served["pyfunc"].predict(query)["answer"])


@pytest.mark.slow
@pytest.mark.integration
def test_rest_answers_equal_the_in_process_pyfunc(served):
    """`mlflow models serve` on 127.0.0.1: a dataframe_records request with image bytes and a query's own zero-shot
    task gets the in-process pyfunc's answers."""
    import urllib.request

    from tests.helpers.servers import mlflow_model_server

    query = data_query(split_dir(served["params"], "test"), ["lung_opacity", "cxr_vqa"], 2).drop(columns=["answer"])
    query = pd.concat([query, pd.DataFrame([{
        "task": "rib_fracture", "modality": "image", "image": query["image"][0], "options": "No|Yes",
        "task_description": "Detect a fractured rib on a chest radiograph.", "question": "Is there a rib fracture?"}])],
        ignore_index=True)
    records = json.loads(query.to_json(orient="records"))
    expected = served["pyfunc"].predict(query)
    model_dir = mlflow.artifacts.download_artifacts(f"models:/{served['version'].name}/{served['version'].version}",
                                                    dst_path=str(served["folder"] / "model"))
    env = {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    with mlflow_model_server(model_dir, env) as url:
        request = urllib.request.Request(f"{url}/invocations", data=json.dumps({"dataframe_records": records}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as answer:
            predictions = json.loads(answer.read())["predictions"]
    assert [p["answer"] for p in predictions] == list(expected["answer"])
    assert [p["task"] for p in predictions] == list(expected["task"])
    assert predictions[-1]["calibration"].startswith("label-free")
    for got, want in zip(predictions, expected["scores"]):
        assert got["scores"] == pytest.approx(want, abs=0)
