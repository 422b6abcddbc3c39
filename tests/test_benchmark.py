"""The benchmark stage: speed, memory and CPU measured in a fresh subprocess, its CLI and MLflow run."""

from __future__ import annotations

import json
import shutil

import mlflow
import pytest

from mlflow_slmops import metrics
from mlflow_slmops.errors import SlmopsError
from mlflow_slmops.measure import benchmark
from mlflow_slmops.measure.benchmark import BenchmarkConfig
from tests.helpers import assert_one_line_error, slmops

# Tiny runs: the fixture model is small and the CPU is shared; no wall times are asserted.
FAST = BenchmarkConfig(prompt_len=64, gen_len=4, warmup=1, repeats=3, prompt_lens=(16, 64, 4096), leak_generations=4)
FAST_CLI = ["--gen-len", "4", "--repeats", "2", "--warmup", "1"]
# More than the fixture's context of 2048.
TOO_LONG = 4096


@pytest.fixture(scope="module")
def int4_result(genai_qwen_int4) -> benchmark.BenchmarkResult:
    return benchmark.run_benchmark(genai_qwen_int4, FAST)


def test_benchmark_reports_every_speed_memory_and_cpu_metric(int4_result):
    got = int4_result.metrics()
    assert set(got) == set(metrics.SPEED_METRICS + metrics.MEMORY_METRICS)
    for key in (metrics.TTFT_MS, metrics.PREFILL_TOK_S, metrics.DECODE_TOK_S, metrics.LATENCY_P50_MS,
                metrics.PEAK_RSS_MB, metrics.CPU_PERCENT):
        assert got[key] > 0, key
    assert got[metrics.LATENCY_P95_MS] >= got[metrics.LATENCY_P50_MS]
    # The first token comes before the whole response, and the peak is at least what was resident.
    assert got[metrics.TTFT_MS] < got[metrics.LATENCY_P50_MS]
    assert got[metrics.PEAK_RSS_MB] >= int4_result.rss_after_generations_mb
    assert got[metrics.RSS_GROWTH_MB] == pytest.approx(
        int4_result.rss_after_generations_mb - int4_result.rss_after_warmup_mb)
    assert len(int4_result.samples) == FAST.repeats
    assert int4_result.decode_tok_s_std >= 0 and int4_result.ttft_ms_std >= 0


def test_latency_curve_is_keyed_by_prompt_length_and_skips_what_exceeds_the_context(int4_result):
    assert sorted(int4_result.latency_by_prompt_len_ms) == [16, 64]
    assert all(v > 0 for v in int4_result.latency_by_prompt_len_ms.values())
    assert set(int4_result.skipped_prompt_lens) == {TOO_LONG}
    assert "context length of 2048" in int4_result.skipped_prompt_lens[TOO_LONG]
    steps = {step for key, _, step in int4_result.step_metrics() if key == metrics.LATENCY_BY_PROMPT_LEN_MS}
    assert steps == {16, 64}


def test_result_survives_a_json_round_trip(int4_result):
    again = benchmark.BenchmarkResult.from_dict(json.loads(json.dumps(int4_result.to_dict())))
    assert again == int4_result


def test_memory_figures_belong_to_the_worker_not_the_caller(genai_qwen_int4):
    ballast_mb = 600
    ballast = bytearray(ballast_mb << 20)  # resident in this process only
    ballast[::4096] = b"x" * len(ballast[::4096])
    result = benchmark.run_benchmark(genai_qwen_int4, BenchmarkConfig(
        prompt_len=16, gen_len=2, warmup=0, repeats=1, prompt_lens=(16,), leak_generations=1))
    assert result.peak_rss_mb < ballast_mb
    del ballast


def test_prompt_lengths_are_exact_token_counts(genai_qwen_fp32):
    from mlflow_slmops.flavor import GenaiModel

    tok = GenaiModel(genai_qwen_fp32).tokenizer
    assert [len(benchmark.prompt_ids(tok, n)) for n in (1, 32, 777)] == [1, 32, 777]
    assert benchmark.prompt_ids(tok, 32) == benchmark.prompt_ids(tok, 32)


@pytest.mark.parametrize("field,value", [("gen_len", 1), ("repeats", 0), ("prompt_lens", (32, -1))])
def test_bad_benchmark_config_is_refused_before_any_work(genai_qwen_fp32, field, value):
    with pytest.raises(SlmopsError, match=field):
        benchmark.run_benchmark(genai_qwen_fp32, BenchmarkConfig(**{field: value}))


def test_cli_refuses_a_prompt_longer_than_the_context_saying_why(genai_qwen_fp32):
    result = slmops("benchmark", "--model-dir", str(genai_qwen_fp32), "--prompt-len", str(TOO_LONG), "--no-log",
                    "--quiet", *FAST_CLI)
    assert_one_line_error(result, f"prompt length {TOO_LONG} is skipped", "context length of 2048")


def test_cli_reports_a_worker_crash_as_one_line_with_its_cause(genai_qwen_int4, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(genai_qwen_int4, broken)
    cfg = json.loads((broken / "genai_config.json").read_text())
    cfg["model"]["decoder"]["num_key_value_heads"] = 3  # loads, then fails in the first forward pass
    (broken / "genai_config.json").write_text(json.dumps(cfg))
    result = slmops("benchmark", "--model-dir", str(broken), "--no-log", "--quiet", *FAST_CLI)
    assert_one_line_error(result, "worker process", "RuntimeError", "past_key_values")


def test_cli_prints_writes_json_and_logs_an_mlflow_run(genai_qwen_int4, tracking, tmp_path):
    out = tmp_path / "bench.json"
    result = slmops("benchmark", "--model-dir", str(genai_qwen_int4), "--prompt-lens", f"16,{TOO_LONG}",
                    "--json", str(out), *FAST_CLI)
    assert result.returncode == 0, result.stderr
    assert "decode_tok_s" in result.stdout
    assert f"Skipped prompt length {TOO_LONG}" in result.stderr
    data = json.loads(out.read_text())
    assert data["decode_tok_s"] > 0 and data["skipped_prompt_lens"] == {str(TOO_LONG): data["skipped_prompt_lens"][str(TOO_LONG)]}

    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("slmops")
    (run,) = client.search_runs([exp.experiment_id])
    assert set(metrics.SPEED_METRICS + metrics.MEMORY_METRICS) <= set(run.data.metrics)
    assert run.data.metrics[metrics.DECODE_TOK_S] == pytest.approx(data["decode_tok_s"])
    assert run.data.params["prompt_len"] == "128" and run.data.params["gen_len"] == "4"
    curve = client.get_metric_history(run.info.run_id, metrics.LATENCY_BY_PROMPT_LEN_MS)
    assert sorted(m.step for m in curve) == [16, 128]
    assert "benchmark.json" in [a.path for a in client.list_artifacts(run.info.run_id)]


def test_cli_no_log_leaves_the_store_empty(genai_qwen_int4, tracking, tmp_path):
    result = slmops("benchmark", "--model-dir", str(genai_qwen_int4), "--prompt-lens", "16", "--no-log", "--quiet",
                    *FAST_CLI)
    assert result.returncode == 0, result.stderr
    exp = mlflow.MlflowClient().get_experiment_by_name("slmops")
    assert exp is None or not mlflow.MlflowClient().search_runs([exp.experiment_id])


def test_cli_reports_an_unreachable_tracking_server_before_measuring(genai_qwen_int4):
    from tests.helpers import free_port

    url = f"http://127.0.0.1:{free_port()}"
    result = slmops("benchmark", "--model-dir", str(genai_qwen_int4), "--quiet", *FAST_CLI,
                    env={"MLFLOW_TRACKING_URI": url})
    assert_one_line_error(result, url, "cannot be reached")
    assert "benchmark" not in result.stdout  # no metrics table: nothing was measured
