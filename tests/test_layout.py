"""The library's layout rules, read from the source: what may import what, and how long a module may grow."""

import ast
from pathlib import Path

import pytest

from tests.helpers import REPO

LIBRARY = REPO / "fedkim"
MAX_MODULE_LINES = 450


def modules(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def imported(path: Path) -> set[str]:
    """Every module name a file imports, at any depth (function-level imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def imports_any(path: Path, prefixes: tuple[str, ...]) -> list[str]:
    return sorted(n for n in imported(path) if any(n == p or n.startswith(p + ".") for p in prefixes))


def test_the_library_imports_no_orchestrator():
    offenders = {str(p.relative_to(REPO)): imports_any(p, ("prefect", "dvc", "flows", "pipelines"))
                 for p in modules(LIBRARY) if LIBRARY / "ops" not in p.parents}
    assert not {k: v for k, v in offenders.items() if v}


@pytest.mark.parametrize("part", ["central", "rounds.py", "tracking"])
def test_models_rounds_and_serving_do_not_import_the_experiment_harness(part):
    target = LIBRARY / part
    files = [target] if target.is_file() else modules(target)
    assert files and not {str(p.relative_to(REPO)): imports_any(p, ("fedkim.experiment",)) for p in files
                          if imports_any(p, ("fedkim.experiment",))}


@pytest.mark.parametrize("module", ["central/m3oe.py", "central/gates.py", "config.py"])
def test_domain_free_modules_import_no_task_catalogue(module):
    assert imports_any(LIBRARY / module, ("fedkim.data.catalogue", "fedkim.data")) == []


def test_no_library_module_outgrows_the_limit():
    sizes = {str(p.relative_to(REPO)): len(p.read_text().splitlines()) for p in modules(LIBRARY)}
    assert max(sizes.values()) < MAX_MODULE_LINES, sorted(sizes.items(), key=lambda kv: -kv[1])[:3]


def test_test_modules_share_code_only_through_helpers():
    tests = REPO / "tests"
    offenders = {}
    for path in modules(tests):
        if tests / "helpers" in path.parents:
            continue
        bad = [n for n in imported(path) if n.startswith("tests.") and not n.startswith("tests.helpers")]
        if bad:
            offenders[str(path.relative_to(REPO))] = bad
    assert not offenders
