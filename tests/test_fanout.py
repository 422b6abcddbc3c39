"""docs/scaling.md's examples: a fan-out of `mlflow run` jobs against one tracking server, and the
Kubernetes project files, checked by MLflow's own parsers (no cluster here)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from mlflow_slmops import metrics as M
from tests.helpers import run_cli

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
FANOUT = ROOT / "projects" / "fanout.py"
K8S = ROOT / "projects" / "kubernetes"
EXPERIMENT = "fanout"


@pytest.fixture(scope="module")
def fanout(mlflow_server, hf_qwen, tmp_path_factory):
    """The documented fan-out, for real: two jobs (fp32, int4) submitted at once to one server."""
    work = tmp_path_factory.mktemp("fanout")
    env = {"MLFLOW_TRACKING_URI": mlflow_server, "SLMOPS_CACHE_DIR": str(work / "cache")}
    result = run_cli([sys.executable, str(FANOUT), "--model", str(hf_qwen), "--variants", "fp32,int4",
                      "--output", str(work / "out"), "--experiment", EXPERIMENT, "--prompt-len", "16",
                      "--repeats", "1"], env=env, cwd=str(work), timeout=1800)
    return result, mlflow_server


def test_fanout_runs_one_job_per_variant_on_one_server(fanout):
    import mlflow

    result, url = fanout
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    submitted = re.search(r"Submitted 2 jobs \(slmops\.fanout=(\S+)\): fp32=(\w+), int4=(\w+)", result.stdout)
    assert submitted, result.stdout
    fanout_id, fp32_job, int4_job = submitted.groups()
    client = mlflow.MlflowClient(tracking_uri=url)
    exp = client.get_experiment_by_name(EXPERIMENT)
    jobs = client.search_runs([exp.experiment_id], f"tags.`slmops.fanout` = '{fanout_id}'")
    assert {r.info.run_id for r in jobs} == {fp32_job, int4_job}
    assert all(r.info.status == "FINISHED" for r in jobs)
    # Each job measured its own variant (and the fp32 baseline) under its own sweep run.
    for job_id, variant in ((fp32_job, "fp32"), (int4_job, "int4")):
        children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{job_id}'")
        by_variant = {c.data.tags[M.VARIANT_TAG]: c for c in children}
        assert variant in by_variant
        assert by_variant[variant].data.metrics[M.DECODE_TOK_S] > 0
    # The summary table lists both jobs with their numbers.
    for variant, job_id in (("fp32", fp32_job), ("int4", int4_job)):
        assert re.search(rf"^{variant}\s+{job_id}\s+ok\s+\d", result.stdout, re.M), result.stdout


def test_fanout_jobs_run_at_the_same_time(fanout):
    """Submitted asynchronously: the second job starts before the first one ends."""
    import mlflow

    result, url = fanout
    assert result.returncode == 0, result.stderr[-3000:]
    client = mlflow.MlflowClient(tracking_uri=url)
    exp = client.get_experiment_by_name(EXPERIMENT)
    jobs = sorted(client.search_runs([exp.experiment_id], "tags.`slmops.fanout` != ''"),
                  key=lambda r: r.info.start_time)
    assert len(jobs) == 2
    first, second = jobs
    assert second.info.start_time < first.info.end_time


def test_kubernetes_project_is_accepted_by_mlflow(monkeypatch):
    """The docs' Kubernetes files: MLflow reads the project, its docker_env and the backend config."""
    from mlflow.projects import _parse_kubernetes_config
    from mlflow.projects._project_spec import load_project

    project = load_project(str(K8S))
    assert project.docker_env["image"].startswith("registry.example.com/")
    command = project.get_entry_point("sweep").compute_command(
        {"model": "/models/my-model", "variants": "int4"}, storage_dir=None)
    assert command.startswith("slmops sweep --model /models/my-model --variants int4")
    # The config names the template relative to the repository root, where `mlflow run` is started.
    monkeypatch.chdir(ROOT)
    config = _parse_kubernetes_config(json.loads((K8S / "kubernetes_config.json").read_text()))
    template = config["kube-job-template"]
    assert template["kind"] == "Job"
    container = template["spec"]["template"]["spec"]["containers"][0]
    assert {m["mountPath"] for m in container["volumeMounts"]} >= {"/models", "/cache"}
