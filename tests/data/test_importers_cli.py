"""`fedkim site init / finalize / import` through the command line: files written, messages and exit codes."""

from __future__ import annotations

import json

import pandas as pd
import yaml
from typer.testing import CliRunner

from fedkim.cli import app
from fedkim.data.siteformat import INDEX_COLUMNS, read_index, read_manifest, write_index
from tests.helpers import small_params_dict
from tests.helpers.collections import PTBXL_RECORDS, tree_digest, write_mimic, write_ptbxl
from tests.helpers.sites import build_site

runner = CliRunner()


def _params(tmp_path, **gate) -> str:
    path = tmp_path / "params.yaml"
    overrides = {f"data.gate.{key}": value for key, value in gate.items()}
    path.write_text(yaml.safe_dump(small_params_dict(tmp_path / "fed", **overrides)))
    return str(path)


def test_init_writes_an_empty_skeleton_and_refuses_a_folder_with_files(tmp_path):
    site = tmp_path / "new-site"
    result = runner.invoke(app, ["site", "init", str(site), "--description", "ward 4 export"])
    assert result.exit_code == 0, result.output
    assert {p.name for p in site.iterdir()} >= {"images", "ecg", "clinical", "text", "README.txt", "site.yaml",
                                                "index.parquet"}
    assert "docs/site-format.md" in (site / "README.txt").read_text()
    index = read_index(site)
    assert list(index.columns) == list(INDEX_COLUMNS) and len(index) == 0
    assert read_manifest(site).site_id == "new-site" and read_manifest(site).description == "ward 4 export"
    again = runner.invoke(app, ["site", "init", str(site)])
    assert again.exit_code == 2 and "not an empty folder" in again.output


def test_finalize_writes_site_yaml_then_gates_the_site(tmp_path):
    site = build_site(tmp_path)
    (site / "site.yaml").unlink()
    no_id = runner.invoke(app, ["site", "finalize", str(site)])
    assert no_id.exit_code == 2 and "--id" in no_id.output
    result = runner.invoke(app, ["site", "finalize", str(site), "--id", "ward-4", "--no-docs"])
    assert result.exit_code == 0, result.output
    assert "PASS ward-4" in result.output and read_manifest(site).counts["ecg_abnormal"] == {"train": 10, "val": 10}
    index = read_index(site)
    write_index(site, index.iloc[:-3])  # the last (task, split, label) drops below 5 samples
    failed = runner.invoke(app, ["site", "finalize", str(site), "--no-docs"])  # the id comes from site.yaml
    assert failed.exit_code == 1 and "FAIL ward-4" in failed.output and "counts.per_class" in failed.output


def test_import_ptbxl_writes_a_gated_site_and_prints_the_report(tmp_path):
    source = write_ptbxl(tmp_path / "ptb-xl")
    before = tree_digest(source)
    site = tmp_path / "ecg-site"
    result = runner.invoke(app, ["site", "import", "ptbxl", str(source), str(site), "--hz", "500", "--no-docs",
                                 "--params", _params(tmp_path, min_samples_per_class=1, min_samples_per_site=4)])
    assert result.exit_code == 0, result.output
    assert "10 samples" in result.output and "excluded fold 2" in result.output and "PASS ecg-site" in result.output
    assert json.loads((site / "reports/import.json").read_text())["counts"] == {"ecg_abnormal": {"train": 6,
                                                                                                 "val": 4}}
    assert tree_digest(source) == before
    strict = runner.invoke(app, ["site", "import", "ptbxl", str(source), str(tmp_path / "strict"), "--no-docs"])
    assert strict.exit_code == 1 and "counts.per_class" in strict.output  # written, but below the gate's minimum
    assert (tmp_path / "strict/site.yaml").is_file()


def test_import_refusals_exit_2_and_write_nothing(tmp_path):
    source = write_ptbxl(tmp_path / "ptb-xl", records=PTBXL_RECORDS[:2])
    table = pd.read_csv(source / "ptbxl_database.csv").drop(columns=["filename_lr"])
    table.to_csv(source / "ptbxl_database.csv", index=False)
    missing = runner.invoke(app, ["site", "import", "ptbxl", str(source), str(tmp_path / "a")])
    assert missing.exit_code == 2
    assert "ptbxl_database.csv" in missing.output and "required column 'filename_lr'" in missing.output
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "index.parquet").write_bytes(b"hospital data")
    mimic = write_mimic(tmp_path / "mimic", subjects=2)[0]
    refused = runner.invoke(app, ["site", "import", "chexpert", str(mimic), str(existing)])
    assert refused.exit_code == 2 and "not an empty folder" in refused.output
    assert (existing / "index.parquet").read_bytes() == b"hospital data"
    bad_policy = runner.invoke(app, ["site", "import", "chexpert", str(mimic), str(tmp_path / "b"),
                                     "--uncertain", "maybe"])
    assert bad_policy.exit_code == 2 and "--uncertain 'maybe'" in bad_policy.output
    unknown = runner.invoke(app, ["site", "import", "eeg", str(mimic), str(tmp_path / "c")])
    assert unknown.exit_code == 2 and "unknown collection kind 'eeg'" in unknown.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing", "mimic", "ptb-xl"]
