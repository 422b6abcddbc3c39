"""Metric keys, defined once. docs/metrics.md mirrors this module: formulas and methods live there.

Every variant run logs exactly these keys so the MLflow UI lines variants up side by side.
"""

from __future__ import annotations

# Size
SIZE_MB = "size_mb"
COMPRESSION_RATIO = "compression_ratio"
CONVERT_S = "convert_s"
# Weight bytes x 8 / the source model's parameter count: quality per byte compares on it across models
BITS_PER_WEIGHT = "bits_per_weight"

# Speed, at the default prompt length
TTFT_MS = "ttft_ms"
PREFILL_TOK_S = "prefill_tok_s"
DECODE_TOK_S = "decode_tok_s"
LATENCY_P50_MS = "latency_p50_ms"
LATENCY_P95_MS = "latency_p95_ms"
# Logged once per prompt length with step = prompt length
LATENCY_BY_PROMPT_LEN_MS = "latency_by_prompt_len_ms"

# Memory and CPU
PEAK_RSS_MB = "peak_rss_mb"
RSS_GROWTH_MB = "rss_growth_mb"
CPU_PERCENT = "cpu_percent"

# Quality, against the sweep's fp32 variant
PERPLEXITY = "perplexity"
PPL_DELTA_PCT = "ppl_delta_pct"
KL_DIV = "kl_div"
TOP1_AGREEMENT = "top1_agreement"
QA_ACCURACY = "qa_accuracy"
FORMAT_VALID_RATE = "format_valid_rate"
EDGE_CASES_PASSED = "edge_cases_passed"
# Valid structured calls ÷ the QA file's tool_call questions: logged only when the QA file has such questions
TOOL_CALL_VALID_RATE = "tool_call_valid_rate"

# Fidelity, against the source: the user's Hugging Face model run in PyTorch (fp32) over the same chunks
SRC_KL_MEAN = "src_kl_mean"
SRC_KL_MEDIAN = "src_kl_median"
SRC_KL_P99 = "src_kl_p99"
SRC_KL_MAX = "src_kl_max"
SRC_TOP1_AGREEMENT = "src_top1_agreement"
SRC_DELTA_P_MEAN = "src_delta_p_mean"
SRC_PPL_DELTA_PCT = "src_ppl_delta_pct"
# The source model's own perplexity over the same chunks (the same on every variant run)
SRC_PERPLEXITY = "src_perplexity"
# On the sweep run: seconds of the conversion stage (every variant, cache look-ups included)
CONVERSION_S = "conversion_s"
# On the sweep run: seconds the source reference took to build (its first build, when reused)
SOURCE_CHECK_S = "source_check_s"

SIZE_METRICS = (SIZE_MB, COMPRESSION_RATIO, CONVERT_S, BITS_PER_WEIGHT)
SPEED_METRICS = (TTFT_MS, PREFILL_TOK_S, DECODE_TOK_S, LATENCY_P50_MS, LATENCY_P95_MS)
MEMORY_METRICS = (PEAK_RSS_MB, RSS_GROWTH_MB, CPU_PERCENT)
QUALITY_METRICS = (PERPLEXITY, PPL_DELTA_PCT, KL_DIV, TOP1_AGREEMENT, QA_ACCURACY, FORMAT_VALID_RATE, EDGE_CASES_PASSED)
SOURCE_METRICS = (SRC_KL_MEAN, SRC_KL_MEDIAN, SRC_KL_P99, SRC_KL_MAX, SRC_TOP1_AGREEMENT, SRC_DELTA_P_MEAN,
                  SRC_PPL_DELTA_PCT, SRC_PERPLEXITY)
# Every successful (benchmarkable) variant run carries all of these (SOURCE_METRICS unless --no-source-check).
VARIANT_METRICS = SIZE_METRICS + SPEED_METRICS + MEMORY_METRICS + QUALITY_METRICS + SOURCE_METRICS
# Carried only where the inputs ask for them (a QA file with tool_call questions); tables show them when present.
OPTIONAL_METRICS = (TOOL_CALL_VALID_RATE,)

# Which direction is better, for Pareto fronts and the champion's objective.
HIGHER_IS_BETTER = {
    COMPRESSION_RATIO, PREFILL_TOK_S, DECODE_TOK_S, TOP1_AGREEMENT, QA_ACCURACY, FORMAT_VALID_RATE, EDGE_CASES_PASSED,
    SRC_TOP1_AGREEMENT, TOOL_CALL_VALID_RATE,
}

# On the sweep run: how many samples the calibrated variants were calibrated on
CALIBRATION_SAMPLES = "calibration_samples"

# Run tags
ROLE_TAG = "slmops.role"
ROLE_SWEEP = "sweep"
ROLE_VARIANT = "variant"
STATUS_TAG = "slmops.status"
ERROR_TAG = "slmops.error"
VARIANT_TAG = "slmops.variant"
# A variant built for another execution provider: logged, never measured or promoted here.
BUILD_ONLY_TAG = "slmops.build_only"
# "true" when the variant came from the conversion cache; convert_s is then the time of the original build.
CONVERSION_CACHED_TAG = "slmops.conversion_cached"
# On the sweep run: "ran" or "skipped" (--no-source-check).
SOURCE_CHECK_TAG = "slmops.source_check"
# On the sweep run and every variant run: "true" when fp32 differs from the source beyond the export tolerance.
EXPORT_MISMATCH_TAG = "slmops.export_mismatch"

# The export guard: a faithful fp32 export matches its source to float rounding (max |logit diff| ~1e-6, KL ~1e-12
# nats). Past these, the export itself is wrong and every variant inherits the error. docs/metrics.md explains them.
EXPORT_MAX_SRC_KL = 1e-4
EXPORT_MIN_SRC_TOP1 = 0.99
