"""`slmops watch`: a real `mlflow server`, the real CLI, the real Foundry Local cache and catalog."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid

import mlflow
import pytest
from mlflow import MlflowClient

from mlflow_slmops import flavor
from tests.helpers import assert_one_line_error, bin_path, slmops, stop_process
from tests.test_deployment import WAIT_S, model_dir, wait_for

NAME = "watched-assistant"

SDK_IDS = r"""
import json, sys
from foundry_local_sdk import CatalogType, Configuration, FoundryLocalManager
FoundryLocalManager.initialize(Configuration(app_name="mlflow-slmops", model_cache_dir=sys.argv[1]))
catalog = FoundryLocalManager.instance.get_catalog(CatalogType.LOCAL)
print(json.dumps(sorted(v.id for m in catalog.list_models() for v in m.variants)))
"""


@pytest.fixture()
def served_registry(mlflow_server, genai_qwen_fp32, monkeypatch):
    """Two versions of one registered model on the real server, the alias on version 1."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    mlflow.set_tracking_uri(mlflow_server)
    client = MlflowClient()
    # Not mlflow.set_experiment: it exports MLFLOW_EXPERIMENT_ID, an ID of this server that later tests'
    # subprocesses (on their own stores) would inherit.
    exp_id = client.create_experiment(f"watch-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    versions = []
    for _ in range(2):
        with mlflow.start_run(experiment_id=exp_id):
            info = flavor.log_model(genai_qwen_fp32, name="model", registered_model_name=NAME)
        versions.append(str(info.registered_model_version))
    client.set_registered_model_alias(NAME, "champion", versions[0])
    yield client, versions
    mlflow.set_tracking_uri(None)


def registered_ids(cache) -> list[str]:
    done = subprocess.run([sys.executable, "-c", SDK_IDS, str(cache)], capture_output=True, text=True, timeout=WAIT_S)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_watch_once_deploys_the_alias_then_follows_it_when_it_moves(served_registry, tmp_path):
    client, (v1, v2) = served_registry
    cache = tmp_path / "cache"
    args = ("watch", "--name", NAME, "--alias", "champion", "-t", f"foundry-local:{cache}", "--once")
    first = slmops(*args)
    assert first.returncode == 0, first.stderr
    assert f"created {NAME}:{v1}" in first.stdout and model_dir(cache, int(v1), NAME).is_dir()
    again = slmops(*args)
    assert again.returncode == 0 and "deployed already" in again.stdout

    client.set_registered_model_alias(NAME, "champion", v2)
    moved = slmops(*args)
    assert moved.returncode == 0, moved.stderr
    assert f"updated {NAME}:{v2}" in moved.stdout
    assert model_dir(cache, int(v2), NAME).is_dir() and not model_dir(cache, int(v1), NAME).exists()
    assert registered_ids(cache) == [f"{NAME}:{v2}"]


def test_watch_loop_redeploys_when_the_alias_moves_and_stops_on_sigint(served_registry, tmp_path):
    client, (v1, v2) = served_registry
    cache, out_path = tmp_path / "cache", tmp_path / "watch.out"
    with open(out_path, "w") as out:
        proc = subprocess.Popen([bin_path("slmops"), "watch", "--name", NAME, "-t", f"foundry-local:{cache}",
                                 "--interval", "0.5", "--polls", "2000"], stdout=out, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
    try:
        wait_for(lambda: f"created {NAME}:{v1}" in out_path.read_text(), proc, "the first deploy")
        client.set_registered_model_alias(NAME, "champion", v2)
        wait_for(lambda: f"updated {NAME}:{v2}" in out_path.read_text(), proc, "the redeploy")
        assert model_dir(cache, int(v2), NAME).is_dir() and not model_dir(cache, int(v1), NAME).exists()
        os.kill(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=WAIT_S) != 0 and "Traceback" not in out_path.read_text()
    finally:
        stop_process(proc)


def test_watch_of_a_missing_alias_is_a_one_line_error(served_registry, tmp_path):
    done = slmops("watch", "--name", NAME, "--alias", "no-such-alias", "-t", f"foundry-local:{tmp_path / 'c'}",
                  "--once")
    assert_one_line_error(done, "no alias no-such-alias")
    assert not (tmp_path / "c").exists()
