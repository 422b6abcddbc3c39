"""Faults mid-flight, caused for real: a sweep killed with SIGKILL, a conversion killed while it writes, the
tracking server killed under a running sweep. Nothing finished may be lost, nothing half-written may be used.

The sweeps run on the tiny Qwen2 with a warm conversion cache (a private copy of the session's), so the
time goes into measuring and logging, which is where these faults matter.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from mlflow import MlflowClient

from mlflow_slmops import convert
from mlflow_slmops import metrics as M
from mlflow_slmops.genai import modeldir
from tests.faultkit import WAIT_S, copy_warm_cache, paths_snapshot, wait_for
from tests.helpers import assert_one_line_error, bin_path, slmops, stop_process
from tests.servers import start_mlflow_server

VARIANTS = "fp32,int4"
TINY = ["--prompt-len", "16", "--gen-len", "4", "--repeats", "1"]
REPORT_ARTIFACTS = {"report.md", "variants.csv", "variants_table.json", "pareto_size_vs_quality.png"}
# Fail a request to a dead server at once (connection refused), and give a slow live one time: only the
# sweep's own retries (sweep.with_retry, with back-off) decide how long logging keeps trying.
DEAD_SERVER_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "120"}


@pytest.fixture()
def warm_cache(models_root, genai_qwen_fp32, genai_qwen_int4, tmp_path) -> Path:
    return copy_warm_cache(models_root, tmp_path / "cache")


def sweep_argv(hf: Path, out: Path, cache: Path) -> list[str]:
    return [bin_path("slmops"), "sweep", "--model", str(hf), "--variants", VARIANTS, "--output", str(out),
            "--cache-dir", str(cache), *TINY, "--quiet"]


def start(argv: list[str], log: Path, env: dict | None = None, cwd: Path | None = None) -> subprocess.Popen:
    """A CLI in its own process group (so a kill takes its measuring workers too), output to a file."""
    with open(log, "w") as fh:
        return subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **(env or {})}, cwd=cwd)


def kill_group(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=WAIT_S)


def sweep_run(client: MlflowClient):
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string=f"tags.`{M.ROLE_TAG}` = '{M.ROLE_SWEEP}'")
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


def variant_runs(client: MlflowClient, parent_id: str) -> dict[str, list]:
    exp = client.get_run(parent_id).info.experiment_id
    found: dict[str, list] = {}
    for run in client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'"):
        found.setdefault(run.data.tags.get(M.VARIANT_TAG), []).append(run)
    return found


def finished_ok(client: MlflowClient) -> set[str]:
    """Variants logged as ok whose run is also ended (so logging them is over). Polled while another process writes."""
    try:
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                  filter_string=f"tags.`{M.STATUS_TAG}` = 'ok'")
    except Exception:  # the writer may hold the sqlite lock for a moment
        return set()
    return {r.data.tags[M.VARIANT_TAG] for r in runs if r.info.status == "FINISHED"}


def measured(client: MlflowClient, run) -> dict[str, list]:
    """Every metric of a run with its full history (value, timestamp, step): a re-measure would change it."""
    return {key: sorted((m.value, m.timestamp, m.step) for m in client.get_metric_history(run.info.run_id, key))
            for key in run.data.metrics}


def assert_completed(client: MlflowClient, parent_id: str) -> dict:
    """The same sweep run is FINISHED with its report, and has exactly one ok run per variant."""
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    assert REPORT_ARTIFACTS <= {a.path for a in client.list_artifacts(parent_id)}
    runs = variant_runs(client, parent_id)
    assert sorted(runs) == sorted(VARIANTS.split(","))
    assert all(len(found) == 1 for found in runs.values()), {k: len(v) for k, v in runs.items()}
    for name, (run,) in runs.items():
        assert run.data.tags[M.STATUS_TAG] == "ok", (name, run.data.tags.get(M.ERROR_TAG))
        assert {M.DECODE_TOK_S, M.TTFT_MS, M.KL_DIV, M.SIZE_MB} <= set(run.data.metrics), name
    return {name: found[0] for name, found in runs.items()}


def test_sweep_killed_with_sigkill_keeps_logged_variants_and_resume_measures_only_the_rest(
        hf_qwen, warm_cache, tracking, tmp_path):
    client = MlflowClient(tracking)
    proc = start(sweep_argv(hf_qwen, tmp_path / "variants", warm_cache), tmp_path / "sweep.log")
    try:
        wait_for(lambda: bool(finished_ok(client)), proc, "the first variant to be logged")
        kill_group(proc)
    finally:
        stop_process(proc)

    parent = sweep_run(client)
    assert parent.info.status == "RUNNING"  # nobody ended it: the process died
    kept = {name: runs[0] for name, runs in variant_runs(client, parent.info.run_id).items()
            if runs[0].data.tags.get(M.STATUS_TAG) == "ok"}
    assert set(kept) == {"fp32"}, "the kill should land while int4 is still being measured"
    before = {name: (run.info.run_id, measured(client, run)) for name, run in kept.items()}

    done = slmops("sweep", "--resume", parent.info.run_id, "--quiet")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert f"Sweep run ID: {parent.info.run_id}" in done.stdout

    runs = assert_completed(client, parent.info.run_id)
    for name, (run_id, metrics) in before.items():
        assert runs[name].info.run_id == run_id  # the same run, not a new one
        assert measured(client, runs[name]) == metrics  # nothing re-measured or re-logged


def test_conversion_killed_mid_write_leaves_only_complete_cache_entries_and_the_next_run_rebuilds(
        hf_qwen, models_root, genai_qwen_fp32, genai_qwen_int4, tmp_path):
    cache = copy_warm_cache(models_root, tmp_path / "cache", drop=("int4",))
    entries_before = {e.name: paths_snapshot(e) for e in (cache / "variants").iterdir()}
    out = tmp_path / "out"
    argv = [bin_path("slmops"), "convert", "--model", str(hf_qwen), "--variants", "int4", "--output", str(out),
            "--cache-dir", str(cache), "--quiet"]
    proc = start(argv, tmp_path / "convert.log")
    # The most tempting moment: Olive has written a whole-looking model into tmp/, not yet validated.
    written = lambda: any((cache / "tmp").glob(f"*/model/{modeldir.GENAI_CONFIG}"))  # noqa: E731
    try:
        wait_for(written, proc, "Olive to write the model into the cache's tmp folder")
        kill_group(proc)
    finally:
        stop_process(proc)

    leftovers = list((cache / "tmp").iterdir())
    assert leftovers, "the kill should leave a half-finished build behind"
    leftover_inodes = {p.stat().st_ino for p in (cache / "tmp").glob("*/model")}
    assert {e.name: paths_snapshot(e) for e in (cache / "variants").iterdir()} == entries_before
    assert not out.exists() or not [p for p in out.iterdir()]

    again = subprocess.run(argv, capture_output=True, text=True, timeout=WAIT_S)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    assert list((cache / "tmp").iterdir()) == []  # the next run under the lock removed the debris
    new = [e for e in (cache / "variants").iterdir() if e.name not in entries_before]
    assert len(new) == 1 and new[0].stat().st_ino not in leftover_inodes  # rebuilt, not adopted
    for entry in (cache / "variants").iterdir():
        manifest = json.loads((entry / convert.ENTRY_MANIFEST).read_text())
        modeldir.check_genai_dir(entry)
        assert modeldir.weights_hash(entry) == manifest["weights_sha256"]
    assert modeldir.weights_hash(out / "int4") == json.loads((new[0] / convert.ENTRY_MANIFEST).read_text())[
        "weights_sha256"]


def test_tracking_server_killed_mid_sweep_spools_measurements_and_resume_replays_them(
        hf_qwen, warm_cache, tmp_path):
    root = tmp_path / "server"
    root.mkdir()
    backend = f"sqlite:///{root / 'mlflow.db'}"
    direct = MlflowClient(backend)  # the server's own store, read without asking the server
    out = tmp_path / "variants"
    server = start_mlflow_server(backend, root)
    try:
        proc = start(sweep_argv(hf_qwen, out, warm_cache), tmp_path / "sweep.log",
                     env={"MLFLOW_TRACKING_URI": server.url, **DEAD_SERVER_ENV}, cwd=tmp_path)
        try:
            wait_for(lambda: bool(finished_ok(direct)), proc, "the first variant to be logged")
            kill_group(server.proc)
            proc.wait(timeout=WAIT_S)
        finally:
            stop_process(proc)
    finally:
        stop_process(server.proc)

    parent_id = sweep_run(direct).info.run_id
    log = (tmp_path / "sweep.log").read_text()
    assert_one_line_error(subprocess.CompletedProcess([], proc.returncode, "", log),
                          "failed after 3 attempts", "kept in the local spool", f"slmops sweep --resume {parent_id}")
    spool = out / ".spool" / parent_id / "int4.json"
    assert spool.is_file(), "the int4 measurement was taken while the server was down: it must be on disk"
    spooled = json.loads(spool.read_text())["metrics"]
    fp32 = variant_runs(direct, parent_id)["fp32"][0]
    fp32_before = measured(direct, fp32)

    server = start_mlflow_server(backend, root)  # the same backend store, on a new port
    try:
        done = slmops("sweep", "--resume", parent_id, "--quiet",
                      env={"MLFLOW_TRACKING_URI": server.url, **DEAD_SERVER_ENV}, cwd=str(tmp_path))
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        runs = assert_completed(MlflowClient(server.url), parent_id)
    finally:
        stop_process(server.proc)
    # Replayed, not re-measured: timings are never bit-identical between two measurements.
    assert {k: runs["int4"].data.metrics[k] for k in spooled} == pytest.approx(spooled, rel=0, abs=0, nan_ok=True)
    assert not spool.exists()
    assert runs["fp32"].info.run_id == fp32.info.run_id and measured(direct, fp32) == fp32_before
