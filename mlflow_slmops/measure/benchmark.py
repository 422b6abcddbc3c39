"""Speed, memory and CPU of one genai model folder, measured in a fresh subprocess.

The method follows onnxruntime-genai's ``benchmark/python/benchmark_e2e.py`` and llama-bench:
warm-ups then repeats, greedy decoding, a fixed number of new tokens (``min_length = max_length``, so
an early EOS cannot shorten a run), TTFT = prompt processing + the first sampled token, decode speed =
tokens over the time of the later ``generate_next_token`` calls, each reported as mean with its spread.
``docs/metrics.md`` defines every figure.

Example:
    >>> from mlflow_slmops.measure.benchmark import BenchmarkConfig, run_benchmark     # doctest: +SKIP
    >>> result = run_benchmark("out/int4", BenchmarkConfig(repeats=3))
    >>> result.metrics()["decode_tok_s"]
    64.8
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from mlflow_slmops import data as packaged_data
from mlflow_slmops import metrics
from mlflow_slmops.errors import SlmopsError
from mlflow_slmops.genai import modeldir
from mlflow_slmops.measure import worker
from mlflow_slmops.measure.worker import ProgressFn

WORKER_MODULE = "mlflow_slmops.measure.benchmark"
DEFAULT_PROMPT_LEN = 128
DEFAULT_GEN_LEN = 32
DEFAULT_WARMUP = 2
DEFAULT_REPEATS = 5
DEFAULT_PROMPT_LENS = (32, 128, 512)
DEFAULT_LEAK_GENERATIONS = 20
# Decode speed needs at least one generate_next_token call after the first token.
MIN_GEN_LEN = 2
# Warm-ups per extra prompt length of the latency curve: new buffer sizes, one run to settle them.
CURVE_WARMUP = 1
P50, P95 = 50, 95
# slmops.role of a run logged by `slmops benchmark` on its own.
MS_PER_S = 1000.0
BYTES_PER_MB = 1 << 20


@dataclass
class BenchmarkConfig:
    """How to measure: prompt and generation lengths, warm-ups, repeats, the curve, the leak check.

    Args:
        prompt_len: prompt tokens for the headline speed metrics.
        gen_len: new tokens per generation (fixed: min_length = max_length).
        warmup: untimed generations before the repeats.
        repeats: timed generations at prompt_len.
        prompt_lens: prompt lengths of the latency curve; those that do not fit the context are skipped.
        leak_generations: generations after the warm-up (timed repeats included) before RSS is read again.
    """

    prompt_len: int = DEFAULT_PROMPT_LEN
    gen_len: int = DEFAULT_GEN_LEN
    warmup: int = DEFAULT_WARMUP
    repeats: int = DEFAULT_REPEATS
    prompt_lens: tuple[int, ...] = DEFAULT_PROMPT_LENS
    leak_generations: int = DEFAULT_LEAK_GENERATIONS

    def validate(self) -> None:
        checks = [("prompt_len", self.prompt_len, 1), ("gen_len", self.gen_len, MIN_GEN_LEN),
                  ("warmup", self.warmup, 0), ("repeats", self.repeats, 1),
                  ("leak_generations", self.leak_generations, 1)]
        checks += [("prompt_lens", n, 1) for n in self.prompt_lens]
        for name, value, low in checks:
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise SlmopsError(f"benchmark {name} is {value!r}, expected an integer >= {low}",
                                  f"pass a {name} of at least {low}")

    def to_dict(self) -> dict:
        return {**asdict(self), "prompt_lens": list(self.prompt_lens)}

    @classmethod
    def from_dict(cls, data: dict) -> "BenchmarkConfig":
        known = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in data.items() if k in known})
        cfg.prompt_lens = tuple(cfg.prompt_lens)
        return cfg


@dataclass
class GenerationSample:
    """The timings of one generation (milliseconds)."""

    prefill_ms: float  # append_tokens(prompt): the forward pass over the prompt
    ttft_ms: float  # prefill + the first generate_next_token (sampling the first token)
    decode_ms: float  # the later gen_len - 1 generate_next_token calls
    latency_ms: float  # generator creation to the last token: the full response time


@dataclass
class BenchmarkResult:
    """Speed, memory and CPU of one model folder. ``metrics()`` gives the MLflow metric dict."""

    model_dir: str
    config: dict
    context_length: int
    ttft_ms: float
    ttft_ms_std: float
    prefill_tok_s: float
    decode_tok_s: float
    decode_tok_s_std: float
    latency_p50_ms: float
    latency_p95_ms: float
    latency_by_prompt_len_ms: dict[int, float]
    skipped_prompt_lens: dict[int, str]
    peak_rss_mb: float
    rss_growth_mb: float
    cpu_percent: float
    rss_after_warmup_mb: float
    rss_after_generations_mb: float
    samples: list[GenerationSample] = field(default_factory=list)
    curve_samples_ms: dict[int, list[float]] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        """The scalar metrics, keyed by ``mlflow_slmops.metrics`` names. The curve is in ``step_metrics``."""
        return {
            metrics.TTFT_MS: self.ttft_ms,
            metrics.PREFILL_TOK_S: self.prefill_tok_s,
            metrics.DECODE_TOK_S: self.decode_tok_s,
            metrics.LATENCY_P50_MS: self.latency_p50_ms,
            metrics.LATENCY_P95_MS: self.latency_p95_ms,
            metrics.PEAK_RSS_MB: self.peak_rss_mb,
            metrics.RSS_GROWTH_MB: self.rss_growth_mb,
            metrics.CPU_PERCENT: self.cpu_percent,
        }

    def step_metrics(self) -> list[tuple[str, float, int]]:
        """(key, value, step) triples: the latency curve, logged with step = prompt length."""
        return [(metrics.LATENCY_BY_PROMPT_LEN_MS, v, n) for n, v in sorted(self.latency_by_prompt_len_ms.items())]

    def to_dict(self) -> dict:
        data = asdict(self)
        # JSON object keys are strings; from_dict turns them back into ints.
        data["latency_by_prompt_len_ms"] = {str(k): v for k, v in self.latency_by_prompt_len_ms.items()}
        data["skipped_prompt_lens"] = {str(k): v for k, v in self.skipped_prompt_lens.items()}
        data["curve_samples_ms"] = {str(k): v for k, v in self.curve_samples_ms.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "BenchmarkResult":
        data = dict(data)
        for key in ("latency_by_prompt_len_ms", "skipped_prompt_lens", "curve_samples_ms"):
            data[key] = {int(k): v for k, v in data.get(key, {}).items()}
        data["samples"] = [GenerationSample(**s) for s in data.get("samples", [])]
        return cls(**data)


def run_benchmark(model_dir: str | Path, config: BenchmarkConfig | None = None,
                  on_progress: ProgressFn | None = None, timeout_s: float | None = None) -> BenchmarkResult:
    """Benchmark one genai folder in a fresh subprocess, so its memory figures are its own.

    Args:
        model_dir: an ONNX Runtime GenAI model folder.
        config: what to measure; ``BenchmarkConfig()`` if None.
        on_progress: called with (task, completed, total) as generations finish.
        timeout_s: kill the worker after this many seconds (None: no limit).

    Raises:
        SlmopsError: a bad folder or config, a prompt length that does not fit the context, or a worker
            that failed (with its last error line).

    Example:
        >>> run_benchmark("out/int4", BenchmarkConfig(gen_len=16)).decode_tok_s   # doctest: +SKIP
    """
    config = config or BenchmarkConfig()
    config.validate()
    modeldir.check_genai_dir(model_dir)  # fail fast, before a subprocess starts
    outcome = worker.run_worker(
        WORKER_MODULE, ["--model-dir", str(model_dir), "--config", json.dumps(config.to_dict())],
        on_event=worker.progress_events(on_progress), timeout_s=timeout_s,
    )
    return BenchmarkResult.from_dict(worker.raise_for_outcome(outcome, f"benchmark of {model_dir}"))


def benchmark_in_process(model_dir: str | Path, config: BenchmarkConfig | None = None,
                         on_progress: ProgressFn | None = None) -> BenchmarkResult:
    """Benchmark in this process (the worker's body). Memory figures include whatever else it holds.

    Args:
        model_dir: an ONNX Runtime GenAI model folder.
        config: what to measure; ``BenchmarkConfig()`` if None.
        on_progress: called with (task, completed, total) as generations finish.
    """
    from mlflow_slmops.genai.runtime import GenaiModel

    config = config or BenchmarkConfig()
    config.validate()
    gm = GenaiModel(model_dir)
    ctx = gm.context_length
    reason = skip_reason(config.prompt_len, config.gen_len, ctx)
    if reason:
        raise SlmopsError(f"prompt length {config.prompt_len} is skipped for {model_dir}: {reason}",
                          f"pass a prompt length of at most {ctx - config.gen_len}")
    curve = [n for n in dict.fromkeys(config.prompt_lens) if n != config.prompt_len]
    skipped = {n: r for n in curve if (r := skip_reason(n, config.gen_len, ctx))}
    curve = [n for n in curve if n not in skipped]
    ids = prompt_ids(gm.tokenizer, max([config.prompt_len, *curve]))
    ticker = _Ticker(on_progress, f"benchmark {Path(model_dir).name}",
                     config.warmup + max(config.repeats, config.leak_generations)
                     + len(curve) * (CURVE_WARMUP + config.repeats))
    main = _measure_main(gm.model, ids[:config.prompt_len], config, ticker)
    by_len = {config.prompt_len: _percentile([s.latency_ms for s in main["samples"]], P50)}
    curve_samples = {config.prompt_len: [s.latency_ms for s in main["samples"]]}
    for n in curve:
        lat = _measure_curve_point(gm.model, ids[:n], config, ticker)
        curve_samples[n], by_len[n] = lat, _percentile(lat, P50)
    return BenchmarkResult(
        model_dir=str(model_dir), config=config.to_dict(), context_length=ctx,
        latency_by_prompt_len_ms=dict(sorted(by_len.items())), skipped_prompt_lens=skipped,
        peak_rss_mb=peak_rss_bytes() / BYTES_PER_MB, curve_samples_ms=curve_samples, **_summarise(main, config),
    )


def skip_reason(prompt_len: int, gen_len: int, context_length: int) -> str | None:
    """Why a prompt length cannot be measured on this context, or None if it fits."""
    need = prompt_len + gen_len
    if need <= context_length:
        return None
    return (f"{prompt_len} prompt tokens + {gen_len} new tokens need {need} positions, "
            f"more than the model's context length of {context_length}")


def prompt_ids(tokenizer: Any, n: int) -> list[int]:
    """Exactly n prompt token ids: the packaged prose, tokenized and repeated (deterministic)."""
    text = packaged_data.path(packaged_data.EVAL_TEXT).read_text(encoding="utf-8")
    base = [int(t) for t in tokenizer.encode(text)]
    return (base * (n // len(base) + 1))[:n]


class _Ticker:
    """Counts finished generations for one progress task."""

    def __init__(self, on_progress: ProgressFn | None, task: str, total: int):
        self.on_progress, self.task, self.total, self.done = on_progress, task, total, 0
        self.tick(0)

    def tick(self, n: int = 1) -> None:
        self.done += n
        if self.on_progress:
            self.on_progress(self.task, self.done, self.total)


def _generate(model: Any, ids: list[int], gen_len: int) -> GenerationSample:
    """One greedy generation of exactly gen_len new tokens, timed as benchmark_e2e.py does."""
    import onnxruntime_genai as og

    start = time.perf_counter()
    params = og.GeneratorParams(model)
    total = len(ids) + gen_len
    params.set_search_options(do_sample=False, max_length=total, min_length=total)
    generator = og.Generator(model, params)
    t0 = time.perf_counter()
    generator.append_tokens(ids)
    t1 = time.perf_counter()
    generator.generate_next_token()
    t2 = time.perf_counter()
    for _ in range(gen_len - 1):
        generator.generate_next_token()
    t3 = time.perf_counter()
    return GenerationSample(prefill_ms=(t1 - t0) * MS_PER_S, ttft_ms=(t2 - t0) * MS_PER_S,
                            decode_ms=(t3 - t2) * MS_PER_S, latency_ms=(t3 - start) * MS_PER_S)


def _measure_main(model: Any, ids: list[int], config: BenchmarkConfig, ticker: _Ticker) -> dict:
    """Warm-ups, RSS, timed repeats with CPU time, more generations for the leak check, RSS again."""
    for _ in range(config.warmup):
        _generate(model, ids, config.gen_len)
        ticker.tick()
    rss_warm = current_rss_bytes()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    samples = []
    for _ in range(config.repeats):
        samples.append(_generate(model, ids, config.gen_len))
        ticker.tick()
    cpu_s, wall_s = time.process_time() - cpu0, time.perf_counter() - wall0
    for _ in range(config.leak_generations - config.repeats):
        _generate(model, ids, config.gen_len)
        ticker.tick()
    return {"samples": samples, "cpu_s": cpu_s, "wall_s": wall_s,
            "rss_warm": rss_warm, "rss_after": current_rss_bytes()}


def _measure_curve_point(model: Any, ids: list[int], config: BenchmarkConfig, ticker: _Ticker) -> list[float]:
    for _ in range(CURVE_WARMUP):
        _generate(model, ids, config.gen_len)
        ticker.tick()
    out = []
    for _ in range(config.repeats):
        out.append(_generate(model, ids, config.gen_len).latency_ms)
        ticker.tick()
    return out


def _summarise(main: dict, config: BenchmarkConfig) -> dict:
    samples: list[GenerationSample] = main["samples"]
    ttft = [s.ttft_ms for s in samples]
    decode = [(config.gen_len - 1) / (s.decode_ms / MS_PER_S) for s in samples]
    prefill = [config.prompt_len / (s.prefill_ms / MS_PER_S) for s in samples]
    latency = [s.latency_ms for s in samples]
    return {
        "ttft_ms": statistics.fmean(ttft), "ttft_ms_std": _std(ttft),
        "prefill_tok_s": statistics.fmean(prefill),
        "decode_tok_s": statistics.fmean(decode), "decode_tok_s_std": _std(decode),
        "latency_p50_ms": _percentile(latency, P50), "latency_p95_ms": _percentile(latency, P95),
        "rss_growth_mb": (main["rss_after"] - main["rss_warm"]) / BYTES_PER_MB,
        "cpu_percent": 100.0 * main["cpu_s"] / main["wall_s"],
        "rss_after_warmup_mb": main["rss_warm"] / BYTES_PER_MB,
        "rss_after_generations_mb": main["rss_after"] / BYTES_PER_MB,
        "samples": samples,
    }


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _percentile(values: list[float], pct: float) -> float:
    """Linear-interpolation percentile (numpy's default), without numpy."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * pct / 100.0
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def current_rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int:
    """This process's peak resident set: VmHWM on Linux, else ru_maxrss."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # reported in kB
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, kB elsewhere


def _worker_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=WORKER_MODULE, description="internal: benchmark worker")
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--config", default="{}")
    parser.add_argument("--json", required=True)
    args = parser.parse_args(argv)
    config = BenchmarkConfig.from_dict(json.loads(args.config))
    return worker.run_guarded(
        lambda: benchmark_in_process(args.model_dir, config, worker.emit_progress).to_dict(), args.json)


if __name__ == "__main__":
    sys.exit(_worker_main())
