"""The shipped MLprojects parse, name every entry point, and their data files are valid inputs."""

from __future__ import annotations

import pytest
from mlflow.projects._project_spec import load_project

from mlflow_slmops.measure.quality import load_qa
from mlflow_slmops.variants import resolve_variants
from tests.conftest import ROOT

ROOT_ENTRY_POINTS = {"main", "sweep", "convert", "benchmark", "evaluate", "promote", "demo"}


def test_root_mlproject_lists_every_entry_point_with_typed_defaults():
    project = load_project(str(ROOT))
    assert ROOT_ENTRY_POINTS <= set(project._entry_points)
    sweep = project.get_entry_point("sweep")
    assert sweep.parameters["model"].type == "path"
    assert sweep.parameters["prompt_len"].default == 128
    # main is an alias of sweep: same parameters, same command.
    assert project.get_entry_point("main").command == sweep.command


@pytest.mark.parametrize("folder", ["quickstart", "bring-your-own-model"])
def test_project_folders_parse(folder):
    project = load_project(str(ROOT / "projects" / folder))
    assert "main" in project._entry_points


def test_bring_your_own_model_template_files_are_valid_inputs():
    byom = ROOT / "projects" / "bring-your-own-model"
    specs = resolve_variants("int4,int4-custom", str(byom / "variants.yaml"))
    assert [s.name for s in specs] == ["int4", "int4-custom"]
    assert {item.match for item in load_qa(byom / "qa.jsonl")} == {"contains", "regex", "json_keys"}
