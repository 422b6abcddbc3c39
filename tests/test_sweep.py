"""The sweep end to end: a real `mlflow run . -e sweep` subprocess on a tiny model, checked in the store."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest

from mlflow_slmops import metrics as M
from tests.conftest import ROOT
from tests.helpers import assert_one_line_error, mlflow_cli, slmops

TINY_BENCH = ["-P", "prompt_len=16", "-P", "repeats=1"]


def children(client, parent_id):
    exp = client.get_run(parent_id).info.experiment_id
    runs = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    return {r.data.tags[M.VARIANT_TAG]: r for r in runs}


@pytest.fixture(scope="module")
def mlflow_run_sweep(hf_qwen, tmp_path_factory):
    """One real `mlflow run . -e sweep` with a variant that cannot build, shared by the tests below."""
    work = tmp_path_factory.mktemp("sweep")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    variants_file = work / "variants.yaml"
    # A valid spec that builds a model without the lm_head: genai cannot load it, so it fails validation.
    variants_file.write_text("variants:\n  - name: int4-broken\n    precision: fp32\n"
                             "    builder_options: {exclude_lm_head: true}\n")
    result = mlflow_cli(
        "run", str(ROOT), "-e", "sweep", "--env-manager", "local", "--experiment-name", "sweep-test",
        "-P", f"model={hf_qwen}", "-P", "variants=fp32,int4,int4-broken",
        "-P", f"variants_file={variants_file}", "-P", f"output={work / 'variants'}", *TINY_BENCH,
        env={"MLFLOW_TRACKING_URI": uri, "SLMOPS_CACHE_DIR": str(work / "cache")}, timeout=1200, cwd=str(work),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("sweep-test")
    parent = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get(M.ROLE_TAG) == M.ROLE_SWEEP]
    assert len(parent) == 1
    yield client, parent[0], work
    mlflow.set_tracking_uri(None)


def test_sweep_run_holds_one_child_per_variant(mlflow_run_sweep):
    client, parent, _ = mlflow_run_sweep
    kids = children(client, parent.info.run_id)
    assert set(kids) == {"fp32", "int4", "int4-broken"}
    assert all(k.data.tags[M.ROLE_TAG] == M.ROLE_VARIANT for k in kids.values())
    exp = client.get_experiment(parent.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"


def test_every_successful_child_has_every_metric_and_param(mlflow_run_sweep):
    client, parent, _ = mlflow_run_sweep
    for name in ("fp32", "int4"):
        run = children(client, parent.info.run_id)[name]
        assert run.data.tags[M.STATUS_TAG] == "ok"
        assert run.data.tags[M.CONVERSION_CACHED_TAG] == "false"  # a fresh conversion cache
        missing = [k for k in M.VARIANT_METRICS if k not in run.data.metrics]
        assert not missing, f"{name} lacks {missing}"
        for p in ("variant", "precision", "block_size", "is_symmetric", "algo", "accuracy_level",
                  "execution_provider", "olive-ai_version", "onnxruntime-genai_version", "onnxruntime_version",
                  "machine_cpu", "machine_cores", "machine_ram_gb"):
            assert p in run.data.params, p
        curve = client.get_metric_history(run.info.run_id, M.LATENCY_BY_PROMPT_LEN_MS)
        assert {32, 128, 512} <= {m.step for m in curve}


def test_fp32_against_itself_is_the_quality_baseline(mlflow_run_sweep):
    client, parent, _ = mlflow_run_sweep
    kids = children(client, parent.info.run_id)
    fp32 = kids["fp32"].data.metrics
    assert fp32[M.KL_DIV] == pytest.approx(0.0, abs=1e-6)
    assert fp32[M.TOP1_AGREEMENT] == 1.0
    assert fp32[M.COMPRESSION_RATIO] == 1.0
    int4 = kids["int4"].data.metrics
    assert int4[M.COMPRESSION_RATIO] > 1.5
    assert int4[M.KL_DIV] > 0


def test_every_variant_is_scored_against_the_hugging_face_source(mlflow_run_sweep):
    client, parent, _ = mlflow_run_sweep
    kids = children(client, parent.info.run_id)
    fp32, int4 = kids["fp32"].data.metrics, kids["int4"].data.metrics
    # Qwen2 exports exactly: fp32 matches its PyTorch source to float rounding, and int4's error is its own.
    assert fp32[M.SRC_KL_MAX] < 1e-9 and fp32[M.SRC_TOP1_AGREEMENT] == 1.0
    assert int4[M.SRC_KL_MEAN] > 1000 * fp32[M.SRC_KL_MEAN]
    assert int4[M.SRC_KL_MEAN] == pytest.approx(int4[M.KL_DIV], rel=1e-3)
    assert parent.data.tags[M.SOURCE_CHECK_TAG] == "ran"
    assert parent.data.params["source_dtype"] == "float32"
    assert parent.data.metrics[M.SOURCE_CHECK_S] > 0
    for run in (parent, kids["fp32"], kids["int4"]):
        assert client.get_run(run.info.run_id).data.tags[M.EXPORT_MISMATCH_TAG] == "false"
    assert "src_kl_histogram.png" in {a.path for a in client.list_artifacts(kids["int4"].info.run_id)}


def test_failed_variant_is_recorded_and_others_go_on(mlflow_run_sweep):
    client, parent, _ = mlflow_run_sweep
    broken = children(client, parent.info.run_id)["int4-broken"]
    assert broken.data.tags[M.STATUS_TAG] == "failed"
    assert broken.data.tags[M.ERROR_TAG]


def test_children_carry_model_olive_config_and_raw_json(mlflow_run_sweep):
    client, parent, _ = mlflow_run_sweep
    run = children(client, parent.info.run_id)["int4"]
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"olive_config.json", "benchmark.json", "quality.json", "qa_answers.json",
            "latency_by_prompt_len.png"} <= names
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    assert model.metadata.flavors["onnx_genai"]["precision"] == "int4"


def test_sweep_run_carries_table_plots_and_report(mlflow_run_sweep):
    client, parent, _ = mlflow_run_sweep
    names = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"variants.csv", "variants_table.json", "pareto_size_vs_quality.png",
            "pareto_speed_vs_quality.png", "pareto_size_vs_source_kl.png", "report.md"} <= names
    report = Path(mlflow.artifacts.download_artifacts(run_id=parent.info.run_id, artifact_path="report.md")).read_text()
    assert "## Winners" in report and "int4-broken" in report


def test_sweep_cli_refuses_unreachable_tracking_server_before_converting(hf_qwen, tmp_path):
    out = tmp_path / "variants"
    result = slmops("sweep", "--model", str(hf_qwen), "--variants", "fp32", "--output", str(out), "--quiet",
                    env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"})
    assert_one_line_error(result, "cannot be reached", "http://127.0.0.1:9")
    assert not out.exists()
