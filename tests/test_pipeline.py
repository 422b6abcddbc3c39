"""One conversion pipeline for `slmops sweep` and `slmops convert`, and default outputs keyed by model."""

from __future__ import annotations

import re
from pathlib import Path

import mlflow

from mlflow_slmops import metrics as M
from tests.helpers import slmops

KEYED = re.compile(r"^(?P<name>[\w.-]+)-(?P<key>[0-9a-f]{8})$")


def _converted_folder(stdout: str, variant: str) -> Path:
    line = next(ln for ln in stdout.splitlines() if ln.strip().startswith(f"{variant}: ok -> "))
    return Path(line.split(" -> ", 1)[1].strip())


def test_a_sweep_converts_every_variant_before_it_measures_any(hf_qwen, tmp_path):
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    result = slmops("sweep", "--model", str(hf_qwen), "--variants", "fp32,int4", "--output", str(tmp_path / "out"),
                    "--prompt-len", "16", "--gen-len", "4", "--repeats", "1", "--quiet", env=env, cwd=str(tmp_path),
                    timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    converted = [i for i, ln in enumerate(lines) if re.match(r"^\s+(fp32|int4): ok -> ", ln)]
    measuring = next(i for i, ln in enumerate(lines) if ln.strip().startswith("source model:"))
    assert len(converted) == 2 and max(converted) < measuring
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    try:
        client = mlflow.MlflowClient()
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    finally:
        mlflow.set_tracking_uri(None)
    sweep = next(r for r in runs if r.data.tags.get(M.ROLE_TAG) == M.ROLE_SWEEP)
    assert sweep.data.metrics[M.CONVERSION_S] > 0


def test_default_output_is_keyed_by_model_so_two_models_share_a_project(hf_qwen, hf_llama, tmp_path):
    first = slmops("convert", "--model", str(hf_qwen), "--variants", "fp32", "--quiet", cwd=str(tmp_path))
    other = slmops("convert", "--model", str(hf_llama), "--variants", "fp32", "--quiet", cwd=str(tmp_path))
    again = slmops("convert", "--model", str(hf_qwen), "--variants", "fp32", "--quiet", cwd=str(tmp_path))
    for result in (first, other, again):
        assert result.returncode == 0, result.stderr[-3000:]
    folders = sorted(p.name for p in (tmp_path / ".slmops" / "variants").iterdir())
    assert len(folders) == 2
    names = {KEYED.match(f).group("name") for f in folders}
    assert names == {hf_qwen.name, hf_llama.name}
    qwen = next(f for f in folders if f.startswith(hf_qwen.name))
    assert (tmp_path / ".slmops" / "variants" / qwen / "fp32" / "genai_config.json").is_file()
    assert qwen in again.stdout  # a re-run of the same model reuses its folder
