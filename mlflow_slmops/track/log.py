"""Logging measurements into MLflow: the one place a benchmark or quality result becomes metrics, step metrics,
JSON, tables and figures, for a sweep's variant run and for a standalone ``slmops benchmark``/``evaluate`` run."""

from __future__ import annotations

import json

from mlflow_slmops import metrics as M
from mlflow_slmops.measure.benchmark import BenchmarkResult
from mlflow_slmops.measure.quality import QualityResult
from mlflow_slmops.track import report, tracking

ROLE_BENCHMARK = "benchmark"
ROLE_EVALUATE = "evaluate"
SRC_KL_TITLE = "KL against the source model, per position"


def log_latency_curve(curve: dict[int, float], figure: bool = True) -> None:
    """The latency curve as a step metric (step = prompt length) and, with ``figure``, its plot."""
    import mlflow

    for length, ms in sorted(curve.items()):
        mlflow.log_metric(M.LATENCY_BY_PROMPT_LEN_MS, ms, step=int(length))
    if figure and curve:
        mlflow.log_figure(report.latency_curve_figure({"this variant": curve}), "latency_by_prompt_len.png")


def log_quality_artifacts(quality: dict, qa_rows: list[dict], probe_rows: list[dict]) -> None:
    """quality.json, the QA answers and probe outcomes as tables, and the source-KL histogram when there is one."""
    import mlflow

    mlflow.log_dict(quality, "quality.json")
    if qa_rows:
        mlflow.log_table(_as_table(qa_rows), "qa_answers.json")
    if probe_rows:
        mlflow.log_table(_as_table(probe_rows), "edge_cases.json")
    source = quality.get("source")
    if source:
        mlflow.log_figure(report.kl_histogram_figure(source["histogram"], SRC_KL_TITLE), "src_kl_histogram.png")


def log_benchmark(result: BenchmarkResult, log_params: bool = True) -> None:
    """Log a result into the active MLflow run: metrics, the latency curve by step, benchmark.json.

    Args:
        result: what ``run_benchmark`` returned.
        log_params: also log the benchmark config as params (prompt_len, gen_len, ...).

    Example:
        >>> with mlflow.start_run():                      # doctest: +SKIP
        ...     log_benchmark(run_benchmark("out/int4"))
    """
    import mlflow

    if log_params:
        cfg = result.config
        mlflow.log_params({k: (",".join(map(str, v)) if isinstance(v, list) else v) for k, v in cfg.items()})
    mlflow.log_metrics(result.metrics())
    log_latency_curve(result.latency_by_prompt_len_ms, figure=False)
    mlflow.log_dict(result.to_dict(), "benchmark.json")


def log_benchmark_run(result: BenchmarkResult) -> str:
    """Log a result as its own MLflow run in the current experiment; return the run ID.

    Example:
        >>> log_benchmark_run(run_benchmark("out/int4"))        # doctest: +SKIP
    """
    return tracking.log_standalone_run("benchmark", ROLE_BENCHMARK, result.model_dir, lambda: log_benchmark(result))


def log_quality(result: QualityResult, log_params: bool = True) -> None:
    """Log a result into the active MLflow run: metrics, the QA answers and probe outcomes as tables, quality.json.

    Args:
        result: what ``run_evaluate`` or ``evaluate`` returned.
        log_params: also log the inputs (text, QA file, baseline, chunk size) as params.

    Example:
        >>> with mlflow.start_run():                                    # doctest: +SKIP
        ...     log_quality(run_evaluate("out/int4", baseline_dir="out/fp32"))
    """
    import mlflow

    if log_params:
        mlflow.log_params({"eval_text": result.text_path, "qa_file": result.qa_path,
                           "baseline_dir": result.baseline_dir or "", "chunk_tokens": result.chunk_tokens,
                           "source_ref": result.source_ref or ""})
    mlflow.log_metrics(result.metrics())
    log_quality_artifacts(result.to_dict(), result.qa_rows, result.probe_rows)


def log_quality_run(result: QualityResult) -> str:
    """Log a result as its own MLflow run in the current experiment; return the run ID.

    Example:
        >>> log_quality_run(run_evaluate("out/int4"))        # doctest: +SKIP
    """
    return tracking.log_standalone_run("evaluate", ROLE_EVALUATE, result.model_dir, lambda: log_quality(result))


def _as_table(rows: list[dict]) -> dict[str, list]:
    """Rows as the column dict ``mlflow.log_table`` takes; a nested value becomes its JSON text."""
    cols: dict[str, list] = {}
    for row in rows:
        for key in row:
            cols.setdefault(key, [])
    for row in rows:
        for key in cols:
            value = row.get(key)
            cols[key].append(value if isinstance(value, (str, int, float, bool)) or value is None else json.dumps(value))
    return cols
