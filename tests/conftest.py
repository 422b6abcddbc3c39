"""Session fixtures: small real HF models, converted once with the real Olive path, and tracking stores."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import bin_path, free_port, stop_process, wait_http

ROOT = Path(__file__).resolve().parents[1]
# Subprocess CLIs (mlflow models serve execs uvicorn) find the venv's tools as in an activated venv.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
# Tests never reach a hub; fail fast instead of retrying a network call.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def models_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session", autouse=True)
def _conversion_cache(models_root) -> None:
    """Conversions in tests and their subprocesses share one cache in the session folder, never ~/.cache."""
    from devkit.testing import TEST_CACHE_DIRNAME

    os.environ.setdefault("SLMOPS_CACHE_DIR", str(models_root / TEST_CACHE_DIRNAME))


@pytest.fixture(scope="session")
def hf_qwen(models_root) -> Path:
    """A 2-layer Qwen2 (ChatML) HF folder with random weights and a trained BPE tokenizer."""
    from devkit.toymodel import build_tiny_model

    return build_tiny_model(models_root / "hf-qwen2", "qwen2")


@pytest.fixture(scope="session")
def hf_llama(models_root) -> Path:
    """A 2-layer Llama (Llama-3 chat format) HF folder."""
    from devkit.toymodel import build_tiny_model

    return build_tiny_model(models_root / "hf-llama", "llama")


def _convert(hf_dir: Path, out: Path, preset: str) -> Path:
    from devkit.testing import convert_for_tests

    return convert_for_tests(hf_dir, out, preset)


@pytest.fixture(scope="session")
def genai_qwen_fp32(hf_qwen, models_root) -> Path:
    return _convert(hf_qwen, models_root / "genai-qwen-fp32", "fp32")


@pytest.fixture(scope="session")
def genai_qwen_int4(hf_qwen, models_root) -> Path:
    return _convert(hf_qwen, models_root / "genai-qwen-int4", "int4")


@pytest.fixture(scope="session")
def genai_llama_fp32(hf_llama, models_root) -> Path:
    return _convert(hf_llama, models_root / "genai-llama-fp32", "fp32")


@pytest.fixture(scope="session")
def demo_hf(tmp_path_factory) -> Path:
    """The trained demo model (devkit.demo): trained once per run, under 2 minutes on 2 cores.

    Under pytest-xdist the workers share the cache folder (the run's base folder), and build_demo_model's file lock
    lets the first worker train while the others wait and reuse the folder: test_demo and test_tool_calling both
    need it, usually on different workers.
    """
    from devkit.demo import build_demo_model

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    return build_demo_model(shared / "demo-cache", progress=False)


@pytest.fixture(scope="session")
def demo_genai_fp32(demo_hf, models_root) -> Path:
    return _convert(demo_hf, models_root / "genai-demo-fp32", "fp32")


@pytest.fixture(scope="session")
def demo_genai_int4(demo_hf, models_root) -> Path:
    return _convert(demo_hf, models_root / "genai-demo-int4", "int4")


@pytest.fixture()
def tracking(tmp_path, monkeypatch) -> str:
    """A fresh sqlite tracking store for one test, for this process and its subprocesses."""
    import mlflow
    from mlflow.tracking import fluent

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # mlflow.set_experiment (tracking.configure calls it) exports MLFLOW_EXPERIMENT_ID: an ID of this store
    # that must not reach the next test's store or subprocesses. Removed now, and again at teardown.
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", "")  # recorded, so teardown restores the value from before
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID")
    monkeypatch.setattr(fluent, "_active_experiment_id", None)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 with sqlite and served artifacts."""
    from tests.servers import start_mlflow_server

    root = tmp_path_factory.mktemp("mlflow-server")
    # Its output goes to root/server.log: an unread pipe fills with access-log lines and blocks the server.
    server = start_mlflow_server(f"sqlite:///{root / 'mlflow.db'}", root)
    try:
        yield server.url
    finally:
        stop_process(server.proc)


@pytest.fixture(scope="session")
def postgres():
    """A private PostgreSQL cluster on 127.0.0.1 (run as the postgres user), stopped and removed at the end."""
    from tests import servers

    servers.require_tool(servers.postgres_bin() is not None, "PostgreSQL (Debian package postgresql)")
    pg = servers.start_postgres()
    try:
        yield pg
    finally:
        servers.stop_postgres(pg)


@pytest.fixture(scope="session")
def mlflow_server_pg(postgres, tmp_path_factory):
    """A real `mlflow server` whose tracking and registry store is PostgreSQL, artifacts served over HTTP."""
    from tests import servers

    root = tmp_path_factory.mktemp("mlflow-server-pg")
    server = servers.start_mlflow_server(servers.create_database(postgres, "mlflow"), root)
    try:
        yield server.url
    finally:
        stop_process(server.proc)
