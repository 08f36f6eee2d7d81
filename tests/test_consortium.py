"""A consortium's own federation, end to end. Its catalogue holds a training task and a zero-shot task that fedkim
does not ship; two hospitals are imported from public-collection layouts (PTB-XL ECGs, CheXpert radiographs), a
third holds sparse ICU data (admission values only, two implausible ones); the server's public, validation and test
splits are the consortium's own too. A round runs from the command line (`fedkim experiment`) and as the Prefect
flow (`python -m flows.round`), registers a version, and `mlflow models serve` answers the new zero-shot task over
REST. No provided directory changes."""

from __future__ import annotations

import json
import shutil
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from fedkim.cli import app
from fedkim.data.catalogue import SHIPPED
from fedkim.data.siteformat import INDEX_FILE, REPORTS_DIR, SITE_FILE, finalize_site, read_index, write_index
from tests.helpers import REPO, TINY, small_params_dict
from tests.helpers.collections import write_chexpert, write_ehr_wide, write_ptbxl
from tests.helpers.queries import data_query
from tests.helpers.servers import mlflow_model_server

pytestmark = [pytest.mark.slow, pytest.mark.integration]

CONDUCTION = "conduction_disturbance"  # a training task no code names
BLUNTING = "costophrenic_blunting"  # a zero-shot task no code names
TASKS = [
    {"name": "lung_opacity", "modality": "image", "role": "train", "kind": "binary", "answers": ["No", "Yes"],
     "task_description": "Lung opacity classification: decide whether the chest radiograph shows a focal lung "
                         "opacity in any lung zone.", "question": "Does this chest radiograph show a lung opacity?"},
    {"name": CONDUCTION, "modality": "ecg", "role": "train", "kind": "binary", "answers": ["No", "Yes"],
     "task_description": "Conduction disturbance detection: decide whether the 12-lead ECG shows a bundle branch "
                         "block or another delay of ventricular conduction.",
     "question": "Does this ECG show a conduction disturbance?"},
    {"name": "mortality", "modality": "clinical", "role": "train", "kind": "binary", "answers": ["No", "Yes"],
     "task_description": "In-hospital mortality prediction from the values measured at ICU admission.",
     "question": "Will this patient die in hospital?"},
    {"name": BLUNTING, "modality": "image", "role": "zero_shot", "kind": "binary", "answers": ["No", "Yes"],
     "task_description": "Costophrenic angle blunting: decide whether fluid at a lung base dulls the sharp angle "
                         "between the ribs and the diaphragm on a chest radiograph.",
     "question": "Is a costophrenic angle blunted?"},
]
# PTB-XL mapping of the consortium: complete or incomplete bundle branch blocks (superclass CD) against normal ECGs.
CONDUCTION_MAPPING = {CONDUCTION: {"yes_classes": ["CD"], "no_codes": ["NORM"]}}
SITES = {"ecg-hospital": "ecg", "cxr-hospital": "image", "icu-hospital": "clinical"}
IMPLAUSIBLE = {3: ("heart_rate", 900), 8: ("lactate", 250)}  # stay -> (column, value): a typo and a unit slip


def ptbxl_records(n: int, first: int, folds: bool) -> list[tuple]:
    """Alternating normal ECGs and left bundle branch blocks; hospital records 1..n-6 in fold 1-8, the last 6 in
    fold 9 (val)."""
    return [(i, 1000 + i, {"NORM": 100.0, "SR": 0.0} if i % 2 else {"CLBBB": 100.0},
             (9 if i > first + n - 7 else 1 + i % 8) if folds else 1) for i in range(first, first + n)]


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}


def cli(*args: str) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result.output


def merge_split(parts: list[Path], out: Path, role: str) -> None:
    """One server split from imported folders (one per modality): their files side by side, one index."""
    out.mkdir(parents=True)
    for part in parts:
        for path in part.rglob("*"):
            relative = path.relative_to(part)
            if path.is_file() and relative.parts[0] not in (REPORTS_DIR, SITE_FILE, INDEX_FILE):
                (out / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, out / relative)
    write_index(out, pd.concat([read_index(p) for p in parts], ignore_index=True))
    finalize_site(out, site_id=role, role=role, description=f"the consortium's {role} split")


@pytest.fixture(scope="module")
def consortium(tmp_path_factory):
    """The consortium's folder: catalogue, params, three hospitals and three server splits, all provided."""
    home = tmp_path_factory.mktemp("consortium")
    shipped = yaml.safe_load(SHIPPED.read_text())
    (home / "catalogue.yaml").write_text(yaml.safe_dump({"modalities": shipped["modalities"], "tasks": TASKS},
                                                        sort_keys=False))
    (home / "ptbxl-mapping.yaml").write_text(yaml.safe_dump(CONDUCTION_MAPPING))
    raw = small_params_dict(home / "unused", **TINY, **{
        "data.catalogue": "catalogue.yaml", "data.gate.min_samples_per_site": 4, "report.comparison": None,
        "tracking.uri": f"sqlite:///{home / 'mlflow.db'}", "store.root": str(home / "store"),
        "report.root": str(home / "reports"), "federation.work_dir": str(home / "work"),
        "federation.retries": 0, "federation.site_timeout_s": 600})
    raw["data"]["sites"] = {}  # nothing is generated
    raw["federation"]["members"] = [{"id": site, "description": f"a {modality} export", "modalities": [modality],
                                     "data": "provided", "path": f"hospitals/{site}"}
                                    for site, modality in SITES.items()]
    raw["federation"]["splits"] = {name: {"data": "provided", "path": f"server/{name}"}
                                   for name in ("public", "validation", "test")}
    (home / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    params = ["--params", home / "params.yaml", "--no-docs"]

    exports = home / "exports"
    write_ptbxl(exports / "ptb-xl", records=ptbxl_records(24, 1, folds=True))
    write_chexpert(exports / "chexpert", patients=24)
    wide = write_ehr_wide(exports / "icu")
    stays = pd.read_csv(wide / "stays.csv")
    for stay, (column, value) in IMPLAUSIBLE.items():
        stays.loc[stays["stay_id"] == 30000 + stay, column] = value
    stays.to_csv(wide / "stays.csv", index=False)

    hospitals = home / "hospitals"
    cli("site", "import", "ptbxl", exports / "ptb-xl", hospitals / "ecg-hospital", "--mapping",
        home / "ptbxl-mapping.yaml", *params)
    cli("site", "import", "chexpert", exports / "chexpert/CheXpert-v1.0-small", hospitals / "cxr-hospital",
        "--val-fraction", "0.3", *params)
    quarantined = cli("site", "import", "ehr", exports / "icu", hospitals / "icu-hospital", *params)

    parts = home / "server-parts"
    for n, role in enumerate(("public", "validation", "test")):
        write_ptbxl(exports / f"ptb-xl-{role}", records=ptbxl_records(12, 100 * (n + 1), folds=False), seed=n + 1)
        write_chexpert(exports / f"chexpert-{role}", patients=12, seed=n + 1)
        write_ehr_wide(exports / f"icu-{role}", stays=16)
        cli("site", "import", "ptbxl", exports / f"ptb-xl-{role}", parts / role / "ecg", "--role", role,
            "--mapping", home / "ptbxl-mapping.yaml", *params)
        findings = ["--map", "Lung Opacity=lung_opacity"] + (["--map", f"Pleural Effusion={BLUNTING}"]
                                                             if role == "test" else [])
        cli("site", "import", "chexpert", exports / f"chexpert-{role}/CheXpert-v1.0-small", parts / role / "image",
            "--role", role, *findings, *params)
        cli("site", "import", "ehr", exports / f"icu-{role}", parts / role / "clinical", "--role", role, *params)
        merge_split([parts / role / m for m in ("ecg", "image", "clinical")], home / "server" / role, role)
    provided = {folder: snapshot(home / folder) for folder in ("hospitals", "server")}
    return {"home": home, "provided": provided, "import_output": quarantined}


def test_the_imported_sites_hold_the_consortium_tasks(consortium):
    hospitals = consortium["home"] / "hospitals"
    assert set(read_index(hospitals / "ecg-hospital")["task"]) == {CONDUCTION}
    assert set(read_index(hospitals / "cxr-hospital")["task"]) == {"lung_opacity"}
    test = read_index(consortium["home"] / "server" / "test")
    assert set(test["task"]) == {t["name"] for t in TASKS}
    imported = consortium["import_output"]  # the ICU site passes, its two implausible samples quarantined
    assert "PASS icu-hospital" in imported and "clinical.physiological_range" in imported
    assert all(f"mortality-{30000 + stay}" in imported for stay in IMPLAUSIBLE)


def test_a_round_from_the_command_line(consortium):
    home = consortium["home"]
    out = cli("experiment", "--params", home / "params.yaml", "--out", home / "experiment", "--variants", "fedkim",
              "--rounds", "1")
    assert BLUNTING in out and CONDUCTION in out
    metrics = json.loads(next((home / "experiment").rglob("metrics.json")).read_text())
    assert set(metrics["tasks"]) == {t["name"] for t in TASKS}
    assert metrics["tasks"][BLUNTING]["role"] == "zero_shot" and metrics["tasks"][CONDUCTION]["role"] == "train"
    assert all(0.0 <= figures["auroc"] <= 1.0 for figures in metrics["tasks"].values())
    assert {k: snapshot(home / k) for k in consortium["provided"]} == consortium["provided"]


def test_a_round_as_the_prefect_flow_registers_a_version_that_answers_the_new_task_over_rest(consortium, prefect_api,
                                                                                            monkeypatch):
    from fedkim.federation.store import LocalStore
    from fedkim.rounds import LATEST_KEY, get_json, round_key
    from flows.round import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    home = consortium["home"]
    assert main(["--params", str(home / "params.yaml"), "--round-id", "1", "--no-progress"]) == 0
    store = LocalStore(home / "store")
    assert get_json(store, LATEST_KEY)["round_id"] == "1"
    summary = get_json(store, round_key("1", "round.json"))
    sites = summary["sites"]
    assert {s: sites[s]["status"] for s in SITES} == dict.fromkeys(SITES, "trained")
    assert all(summary["splits"][split]["success"] for split in ("public", "validation", "test"))
    model = summary["model"]
    assert str(model["version"]) == "1" and "champion" in model["aliases"]
    assert set(summary["metrics"]) and summary["included"] == list(SITES)

    uri = f"sqlite:///{home / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    model_dir = mlflow.artifacts.download_artifacts("models:/fedkim-foundation@champion",
                                                    dst_path=str(home / "served-model"))
    card = json.loads(next(Path(model_dir).rglob("data_card.json")).read_text())  # beside the model card
    assert card["data"]["provided"] == list(SITES) and card["data"]["generated"] == []
    assert card["tasks"]["train"] == ["lung_opacity", CONDUCTION, "mortality"]
    assert card["tasks"]["zero_shot"] == [BLUNTING]
    model_card = next(Path(model_dir).rglob("MODEL_CARD.md")).read_text()
    assert "## Evaluation (provided test split)" in model_card and "provided by ecg-hospital" in model_card
    icu = card["sites"]["icu-hospital"]["gate"]
    assert icu["success"] and icu["quarantined"] == len(IMPLAUSIBLE)  # the rest of the site trained
    assert icu["quarantined_per_rule"] == {"clinical.physiological_range": len(IMPLAUSIBLE)}
    query = data_query(home / "server" / "test", [BLUNTING, CONDUCTION], 2).drop(columns=["answer"])
    expected = mlflow.pyfunc.load_model(model_dir).predict(query)
    with mlflow_model_server(model_dir, {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}) as url:
        body = json.dumps({"dataframe_records": json.loads(query.to_json(orient="records"))}).encode()
        request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as answer:
            predictions = json.loads(answer.read())["predictions"]
    assert [p["task"] for p in predictions] == [BLUNTING] * 2 + [CONDUCTION] * 2
    assert {p["answer"] for p in predictions} <= {"No", "Yes"}
    assert [p["answer"] for p in predictions] == list(expected["answer"])
    assert {k: snapshot(home / k) for k in consortium["provided"]} == consortium["provided"]
