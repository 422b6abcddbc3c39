"""Concurrency between real processes: two conversions sharing one cache, a deploy and a delete of one name.

(Two deploys of one name, one winning and one reporting the lock, are in tests/test_deployment.py.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from mlflow_slmops import convert, flavor
from mlflow_slmops.deploy.foundry_local import cache as fcache
from mlflow_slmops.deploy.foundry_local import config as fconfig
from mlflow_slmops.genai import modeldir
from mlflow_slmops.variants import PRESETS
from tests.faultkit import WAIT_S, copy_warm_cache, wait_for
from tests.helpers import assert_one_line_error, bin_path, stop_process

NAME = "qwen-support"
PUBLISHER = fconfig.DEFAULT_PUBLISHER

# The runtime's own view of its catalog, in a fresh process (the runtime is a per-process singleton).
CATALOG_IDS = r"""
import json, sys
from foundry_local_sdk import CatalogType, Configuration, FoundryLocalManager
FoundryLocalManager.initialize(Configuration(app_name="mlflow-slmops", model_cache_dir=sys.argv[1]))
catalog = FoundryLocalManager.instance.get_catalog(CatalogType.LOCAL)
print(json.dumps(sorted(m.id for m in catalog.list_models())))
"""


def run_bg(argv: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    with open(log, "w") as fh:
        return subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **(env or {})})


def finish(proc: subprocess.Popen, log: Path) -> subprocess.CompletedProcess:
    try:
        proc.wait(timeout=WAIT_S)
    finally:
        stop_process(proc)
    return subprocess.CompletedProcess(proc.args, proc.returncode, log.read_text(), log.read_text())


# --- two conversions, one cache ------------------------------------------------------------------------------


def test_two_conversions_sharing_one_cache_both_succeed_and_build_each_entry_once(
        hf_qwen, models_root, genai_qwen_fp32, genai_qwen_int4, tmp_path):
    cache = copy_warm_cache(models_root, tmp_path / "cache", drop=("fp32", "int4"))
    model_hash = convert.input_model_hash(hf_qwen)
    entries = {name: cache / "variants" / convert.entry_key(model_hash, PRESETS[name], False)
               for name in ("fp32", "int4")}
    assert not any(e.exists() for e in entries.values())  # both entries must be built (from Olive's cache)
    outs = [tmp_path / "out-a", tmp_path / "out-b"]
    procs = [run_bg([bin_path("slmops"), "convert", "--model", str(hf_qwen), "--variants", "fp32,int4",
                     "--output", str(out), "--cache-dir", str(cache), "--quiet"], tmp_path / f"{out.name}.log")
             for out in outs]  # started together: both find the entries missing and race for them
    results = [finish(p, tmp_path / f"{out.name}.log") for p, out in zip(procs, outs)]
    for done in results:
        assert done.returncode == 0, done.stdout[-3000:]

    assert all(e.is_dir() for e in entries.values())
    assert list((cache / "tmp").iterdir()) == []
    for name in ("fp32", "int4"):
        entry = entries[name]
        manifest = json.loads((entry / convert.ENTRY_MANIFEST).read_text())
        modeldir.check_genai_dir(entry)
        assert modeldir.weights_hash(entry) == manifest["weights_sha256"]
        # Both outputs link the one entry: had both built it, the second build would have clobbered or failed.
        inodes = {(out / name / "model.onnx.data").stat().st_ino for out in outs}
        assert inodes == {(entry / "model.onnx.data").stat().st_ino}


# --- a deploy and a delete of one name -----------------------------------------------------------------------


def deploy_argv(verb: str, cache: Path, *args: str) -> list[str]:
    return [bin_path("mlflow"), "deployments", verb, "-t", f"foundry-local:{cache}", "--name", NAME, *args]


def catalog_ids(cache: Path) -> list[str]:
    done = subprocess.run([sys.executable, "-c", CATALOG_IDS, str(cache)], capture_output=True, text=True,
                          timeout=WAIT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def scanner_view(cache: Path) -> list[Path]:
    """Folders Foundry's cache scanner lists: genai_config.json + inference_model.json with a Name, no download.tmp."""
    visible = []
    for pub in (p for p in cache.iterdir() if p.is_dir()) if cache.is_dir() else ():
        for folder in (f for f in pub.iterdir() if f.is_dir()):
            if fcache.visible_to_scanner(folder):
                visible.append(folder)
    return visible


def assert_consistent(cache: Path) -> list[str]:
    """Either one whole deployment, visible and registered, or none at all; no half-made or half-removed folder."""
    visible = scanner_view(cache)
    assert len(visible) <= 1, visible
    for folder in visible:
        modeldir.check_genai_dir(folder)
        prov = json.loads((folder / fcache.PROVENANCE_FILE).read_text())
        assert modeldir.weights_hash(folder) == prov["weights_sha256"]
    leftovers = [p for pub in cache.iterdir() if pub.is_dir() for p in pub.iterdir()
                 if fcache.STAGING_TAG in p.name or fcache.TRASH_TAG in p.name] if cache.is_dir() else []
    assert leftovers == []
    ids = catalog_ids(cache)
    expected = [json.loads((f / fcache.INFERENCE_MODEL_FILE).read_text())["Name"] for f in visible]
    assert ids == expected, "Foundry's catalog disagrees with the folders on disk"
    return ids


@pytest.fixture()
def registered(tracking, genai_qwen_int4) -> str:
    with mlflow.start_run():
        info = flavor.log_model(genai_qwen_int4, name="model", registered_model_name=NAME)
    MlflowClient().set_registered_model_alias(NAME, "champion", info.registered_model_version)
    return f"models:/{NAME}@champion"


def test_delete_during_a_deploy_of_the_same_name_reports_the_lock_and_leaves_a_consistent_state(
        registered, tmp_path):
    cache = tmp_path / "foundry-cache"
    created = subprocess.run(deploy_argv("create", cache, "-m", registered), capture_output=True, text=True,
                             timeout=WAIT_S)
    assert created.returncode == 0, created.stderr[-3000:]
    release, log = tmp_path / "release", tmp_path / "update.log"
    update = run_bg(deploy_argv("update", cache, "-C", "top_k=5"), log, env={fcache.PAUSE_ENV: str(release)})
    try:
        wait_for(lambda: "paused before commit" in log.read_text(), update, "the update to hold the lock")
        deleted = subprocess.run(deploy_argv("delete", cache), capture_output=True, text=True, timeout=WAIT_S)
        assert_one_line_error(deleted, f"deployment {NAME} is being written by another process", "retry")
        release.touch()
        assert finish(update, log).returncode == 0, log.read_text()[-3000:]
    finally:
        stop_process(update)
    assert assert_consistent(cache) == [f"{NAME}:1"]
    (folder,) = scanner_view(cache)
    assert json.loads((folder / "genai_config.json").read_text())["search"]["top_k"] == 5  # the update won

    again = subprocess.run(deploy_argv("delete", cache), capture_output=True, text=True, timeout=WAIT_S)
    assert again.returncode == 0, again.stderr[-3000:]
    assert assert_consistent(cache) == []


def test_a_deploy_and_a_delete_started_together_leave_all_or_nothing(registered, tmp_path):
    cache = tmp_path / "foundry-cache"
    logs = {verb: tmp_path / f"{verb}.log" for verb in ("create", "delete")}
    procs = {"create": run_bg(deploy_argv("create", cache, "-m", registered), logs["create"]),
             "delete": run_bg(deploy_argv("delete", cache), logs["delete"])}
    done = {verb: finish(proc, logs[verb]) for verb, proc in procs.items()}
    for verb, result in done.items():
        if result.returncode != 0:  # the only acceptable failure: the other one held the name's lock
            assert_one_line_error(result, f"deployment {NAME} is being written by another process")
    ids = assert_consistent(cache)
    assert ids in ([], [f"{NAME}:1"])
    if done["create"].returncode == 0 and done["delete"].returncode != 0:
        assert ids == [f"{NAME}:1"]
