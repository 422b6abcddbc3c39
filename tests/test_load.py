"""Sustained load, short version of benchmarks/bench_load.py: 8 client threads for 12 s on each serving path
(the deployment client's predict through Foundry Local, and `mlflow models serve` over HTTP). Asserts only
what must hold at any speed: no request fails, and memory does not grow after warm-up. No timings.

And promotion at scale: 200 variant runs in one experiment, and `slmops promote` still picks the right one.
"""

from __future__ import annotations

import json
import subprocess
import sys

import mlflow
import pytest

from benchmarks.bench_promote_many import make_many_runs
from mlflow_slmops import promote
from tests.conftest import ROOT
from tests.helpers import slmops

SECONDS_PER_PATH = "12"
WARMUP_S = "3"
MAX_RSS_GROWTH_PCT = 5.0  # the bound: a leak of a few KB per request shows in thousands of requests


def test_sustained_predicts_on_both_paths_never_fail_and_do_not_grow_memory(genai_qwen_int4, tmp_path):
    out = tmp_path / "load.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_load.py"), "--genai-dir", str(genai_qwen_int4),
         "--duration", SECONDS_PER_PATH, "--warmup", WARMUP_S, "--threads", "8", "--max-requests", "20000",
         "--max-new-tokens", "8", "--json", str(out)],
        capture_output=True, text=True, timeout=900)
    assert out.is_file(), done.stdout[-2000:] + done.stderr[-3000:]
    results = {r["path"]: r for r in json.loads(out.read_text())["results"]}
    assert set(results) == {"deploy", "serve"}
    for path, r in results.items():
        assert r["errors"] == 0, (path, r["first_errors"])
        assert r["requests"] > r["threads"], (path, r["requests"])  # every thread got answers, more than once
        assert r["completion_tokens_mean"] == 8  # fixed-length answers: the work per request is what was asked
        assert r["rss_growth_pct"] < MAX_RSS_GROWTH_PCT, (path, r)
    assert done.returncode == 0, done.stderr[-3000:]


RUNS = 200


@pytest.fixture()
def many_runs(tracking, genai_qwen_int4):
    return make_many_runs(genai_qwen_int4, RUNS)


def test_promote_picks_the_right_champion_among_200_variant_runs(many_runs):
    sweep_id, expected = many_runs
    done = slmops("promote", "--sweep-run-id", sweep_id, "--name", "many", "--max-ppl-delta-pct", "5")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"Champion: {expected}" in done.stdout
    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias("many", promote.DEFAULT_ALIAS)
    assert client.get_model_version("many", version.version).tags["slmops.variant"] == expected
    table_path = mlflow.artifacts.download_artifacts(run_id=sweep_id, artifact_path="promotion/many.json")
    table = json.loads(open(table_path).read())
    assert len(table["data"]) == RUNS  # every candidate is in the decision table, with its reason
