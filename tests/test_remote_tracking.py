"""The whole flow against a remote tracking server: sweep, promote, deploy from `models:/NAME@champion`.

The server is a real `mlflow server` subprocess on 127.0.0.1 with `--serve-artifacts`, so every artifact
(variant models, report, decision table) goes up and comes back over HTTP; the client never sees the
server's folders. It runs on the two stores a team would use: sqlite and PostgreSQL.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.helpers import mlflow_cli, slmops

pytestmark = pytest.mark.slow

BACKENDS = {"sqlite": "mlflow_server", "postgresql": "mlflow_server_pg"}
VARIANTS = "fp32,int4"
TINY_BENCHMARK = ("--prompt-len", "16", "--gen-len", "4", "--repeats", "1")
# What a local store would leave in the working folder; with a remote server nothing may appear.
LOCAL_STORE_NAMES = ("mlruns", "mlflow.db", "mlartifacts")


@pytest.fixture(params=list(BACKENDS), ids=list(BACKENDS))
def remote(request, monkeypatch):
    """(backend name, server URL): one real `mlflow server` per backend, shared by the session.

    This process and its subprocesses track to it for the test.
    """
    import mlflow

    url = request.getfixturevalue(BACKENDS[request.param])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    mlflow.set_tracking_uri(url)
    yield request.param, url
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def conversion_cache(tmp_path_factory) -> Path:
    # Shared by both backends: the second converts nothing, so each run spends its time on the server.
    return tmp_path_factory.mktemp("conversion-cache")


def _flow_env(url: str, backend: str, cache: Path) -> dict[str, str]:
    return {"MLFLOW_TRACKING_URI": url, "MLFLOW_EXPERIMENT_NAME": f"remote-{backend}",
            "SLMOPS_CACHE_DIR": str(cache)}


def _sweep(hf_dir: Path, work: Path, env: dict) -> str:
    result = slmops("sweep", "--model", str(hf_dir), "--variants", VARIANTS, "--output", str(work / "variants"),
                    *TINY_BENCHMARK, "--quiet", env=env, cwd=str(work), timeout=1200)
    assert result.returncode == 0, result.stdout + result.stderr
    found = re.search(r"Sweep run ID: (\w+)", result.stdout)
    assert found, result.stdout
    return found.group(1)


def _deployment_fields(stdout: str) -> dict[str, str]:
    """`mlflow deployments get` prints one `key: value` line per field."""
    return dict(line.split(": ", 1) for line in stdout.splitlines() if ": " in line)


def test_sweep_promote_deploy_through_remote_tracking_server(remote, hf_qwen, conversion_cache, tmp_path):
    import mlflow

    backend, url = remote
    env = _flow_env(url, backend, conversion_cache)
    name = f"remote-{backend}-bot"

    sweep_id = _sweep(hf_qwen, tmp_path, env)
    client = mlflow.MlflowClient(tracking_uri=url, registry_uri=url)
    sweep_run = client.get_run(sweep_id)
    # Served artifacts: the run points at the server's artifact proxy, not at a folder we could read.
    assert sweep_run.info.artifact_uri.startswith("mlflow-artifacts:"), sweep_run.info.artifact_uri
    logged = {f.path for f in client.list_artifacts(sweep_id)}
    assert {"report.md", "variants.csv", "pareto_speed_vs_quality.png"} <= logged, logged

    promoted = slmops("promote", "--sweep-run-id", sweep_id, "--name", name, env=env, cwd=str(tmp_path))
    assert promoted.returncode == 0, promoted.stdout + promoted.stderr
    assert f"models:/{name}@champion" in promoted.stdout
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.tags["slmops.sweep_run_id"] == sweep_id

    cache = tmp_path / "foundry-cache"
    target = f"foundry-local:{cache}"
    created = mlflow_cli("deployments", "create", "-t", target, "--name", name, "-m", f"models:/{name}@champion",
                         env=env, cwd=str(tmp_path), timeout=600)
    assert created.returncode == 0, created.stdout + created.stderr
    got = mlflow_cli("deployments", "get", "-t", target, "--name", name, env=env, cwd=str(tmp_path))
    assert got.returncode == 0, got.stdout + got.stderr
    fields = _deployment_fields(got.stdout)
    assert fields.get("registered_model_version") == str(champion.version), got.stdout
    # The weights that came over HTTP are the champion's, byte for byte.
    champion_model = mlflow.models.get_model_info(f"models:/{name}@champion")
    assert fields.get("weights_sha256") == champion_model.flavors["onnx_genai"]["weights_sha256"], got.stdout

    request = tmp_path / "chat.json"
    request.write_text(json.dumps({"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}))
    answer = mlflow_cli("deployments", "predict", "-t", target, "--name", name, "--input-path", str(request),
                        env=env, cwd=str(tmp_path), timeout=600)
    assert answer.returncode == 0, answer.stdout + answer.stderr
    assert '"chat.completion"' in answer.stdout, answer.stdout

    left_behind = [n for n in LOCAL_STORE_NAMES if (tmp_path / n).exists()]
    assert not left_behind, f"a local store appeared in the working folder: {left_behind}"


def test_missing_system_tool_fails_under_ci_instead_of_skipping(monkeypatch):
    """PostgreSQL and Chromium are installed by .ci/run; under CI their absence is a failure, not a skip."""
    from tests.servers import require_tool

    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="refusing to skip under CI"):
        require_tool(False, "PostgreSQL")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="PostgreSQL is not installed"):
        require_tool(False, "PostgreSQL")
