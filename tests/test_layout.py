"""The package reads as the data flow: one adapter per external system, measurements free of MLflow, and the
flat layout's import paths still working."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGE = ROOT / "mlflow_slmops"


def _imported_roots(path: Path) -> set[str]:
    """Top-level module names a source file imports, at any depth (lazy imports inside functions included)."""
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def _importers(root: str) -> set[str]:
    return {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if root in _imported_roots(p)}


def test_olive_is_imported_only_by_the_olive_adapter():
    importers = _importers("olive")
    assert "convert/olive/__init__.py" in importers
    assert sorted(p for p in importers if not p.startswith("convert/olive/")) == []


def test_foundry_local_sdk_is_imported_only_by_the_runtime_module():
    assert _importers("foundry_local_sdk") == {"deploy/foundry_local/runtime.py"}


def test_measurements_and_conversion_import_no_mlflow():
    stages = ("measure/", "convert/", "genai/")
    assert sorted(p for p in _importers("mlflow") if p.startswith(stages)) == []


@pytest.mark.parametrize("old, new", [
    ("mlflow_slmops.modeldir", "mlflow_slmops.genai.modeldir"),
    ("mlflow_slmops.quality", "mlflow_slmops.measure.quality"),
    ("mlflow_slmops.olive_speedups", "mlflow_slmops.convert.olive.speedups"),
    ("mlflow_slmops.deployment", "mlflow_slmops.deploy.foundry_local"),
    ("mlflow_slmops.deployment.cache", "mlflow_slmops.deploy.foundry_local.cache"),
])
def test_a_moved_module_keeps_its_old_import_path_as_the_same_module(old, new):
    assert importlib.import_module(old) is importlib.import_module(new)


def test_monkeypatching_the_old_path_reaches_the_code_that_uses_it(monkeypatch):
    from mlflow_slmops.genai import modeldir

    old = importlib.import_module("mlflow_slmops.modeldir")
    monkeypatch.setattr(old, "GENAI_CONFIG", "patched.json")
    assert modeldir.GENAI_CONFIG == "patched.json"


def test_the_deployment_entry_point_loads_the_foundry_local_target():
    (ep,) = [e for e in entry_points(group="mlflow.deployments") if e.name == "foundry-local"]
    target = ep.load()
    assert target is importlib.import_module("mlflow_slmops.deploy.foundry_local")
    assert callable(target.run_local) and callable(target.target_help)


def test_an_unknown_module_under_an_old_path_still_fails_to_import():
    out = subprocess.run([sys.executable, "-c", "import mlflow_slmops.deployment.nothing_here"],
                         capture_output=True, text=True, cwd=str(ROOT))
    assert out.returncode != 0 and "ModuleNotFoundError" in out.stderr


def test_every_algorithm_a_spec_may_name_has_a_recipe_and_nothing_else_does():
    from mlflow_slmops import variants
    from mlflow_slmops.convert import recipe

    onnx_algos = [a for a in variants.ALGOS if a not in variants.CALIBRATED_ALGOS]
    assert set(recipe.ALGO_RECIPES) == set(onnx_algos)
    for algo in onnx_algos:
        bits = 4 if algo == "hqq" else 8
        spec = variants.VariantSpec("v", f"int{bits}", algo=algo)
        assert recipe.olive_passes(spec)["quantize"] == recipe.ALGO_RECIPES[algo].quantize(spec, bits)
    # A calibrated algorithm quantizes the PyTorch model before the export instead (recipe.pytorch_passes).
    for algo in variants.CALIBRATED_ALGOS:
        spec = variants.VariantSpec("v", "int4", algo=algo, is_symmetric=False)
        assert recipe.olive_passes(spec, {"name": "calibration"})[algo]["type"] == "Gptq"


# The stages in data-flow order; a module may import its own stage, an earlier one, or a shared piece.
STAGES = ("genai", "convert", "measure", "track", "flavor", "sweep", "promote", "deploy", "cli")
SHARED = {"errors", "_error_class", "metrics", "variants", "progress", "_files", "data", "calibration", "_moved",
          "__init__"}


def _stage(module: str) -> str | None:
    first = module.split(".")[0]
    return None if first in SHARED else first


def _imported_package_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("mlflow_slmops"):
            base = node.module.removeprefix("mlflow_slmops").lstrip(".")
            found |= {f"{base}.{a.name}".lstrip(".") if not base else base for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("mlflow_slmops.") for a in node.names if a.name.startswith("mlflow_slmops.")}
    return found


def test_no_module_imports_a_later_stage():
    later = []
    for path in PACKAGE.rglob("*.py"):
        own = _stage(str(path.relative_to(PACKAGE).with_suffix("")).replace("/", "."))
        for imported in _imported_package_modules(path):
            stage = _stage(imported)
            if own in STAGES and stage in STAGES and STAGES.index(stage) > STAGES.index(own):
                later.append(f"{path.relative_to(PACKAGE)} imports {imported}")
    assert later == []
