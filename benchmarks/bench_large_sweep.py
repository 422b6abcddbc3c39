"""A 1.5B model through the whole sweep: the real `slmops sweep` CLI, the source check included, with its memory.

The model has Qwen2.5-1.5B's exact shape (hidden 1536, 28 layers, 12 heads, 2 KV heads, intermediate 8960,
vocab 151936, tied embeddings, rope_theta 1e6, 32768 positions: 1.54B parameters) and random weights, saved as
bf16 in 1 GB safetensors shards as the Hub's checkpoint is (built once by make_qwen05_shape.build_shape, reused).

One run of `slmops sweep --model DIR --output DIR --quiet` with the default variants (fp32, int8, int4,
int4-b128-asym), in a fresh work folder: a new sqlite tracking store, a new conversion cache (SLMOPS_CACHE_DIR),
so everything is built, the source reference too. While it runs, every 0.5 s: the summed RSS of the sweep and all
its subprocesses (the source-reference, conversion-validation, benchmark and quality workers), the largest single
process, and the machine's available memory. If available memory falls below --min-available-gb the whole tree is
killed and the run is reported as stopped, rather than letting the kernel's OOM killer pick a process.

Afterwards the MLflow runs are read back: per variant its status, error, size, decode speed, peak RSS and its
fidelity to the source (src_kl_mean, src_kl_max, src_top1_agreement) and to fp32 (ppl_delta_pct); on the sweep run
source_check_s and its share of the wall time; and the source reference's meta.json. The weights are random, so
the quality figures say nothing about a real model, except that fp32 must match its source.

Run:  .venv/bin/python benchmarks/bench_large_sweep.py [--keep-work]
      (builds the model the first time, then about an hour on 2 cores; writes benchmarks/out/large_sweep.{json,md})
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path

import make_qwen05_shape
import psutil

from mlflow_slmops import metrics as M
from mlflow_slmops.variants import DEFAULT_VARIANTS

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out"
MODEL_DIR = OUT / "qwen15-shape"
WORK_DIR = OUT / "large-sweep"
SLMOPS = ROOT / ".venv" / "bin" / "slmops"
QWEN15_SHAPE = {"vocab_size": 151936, "hidden": 1536, "layers": 28, "heads": 12, "kv_heads": 2,
                "intermediate": 8960, "max_positions": 32768}
EXPECTED_PARAMS_M = 1544
SHARD_SIZE = "1GB"
VARIANTS = DEFAULT_VARIANTS
SAMPLE_S = 0.5
STAGE_MIN_S = 5.0
DEFAULT_MIN_AVAILABLE_GB = 1.0
MB = 1 << 20
GB = 1 << 30
KILLED_BY_SIGKILL = -signal.SIGKILL
# Olive's telemetry waits ~15 s at exit unless it sees CI (bench_convert.py does the same).
ENV_EXTRA = {"OLIVE_DISABLE_TELEMETRY": "1", "CI": "1", "HF_HUB_OFFLINE": "1"}
# Variables that would point the sweep at another run or experiment.
ENV_DROP = ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")
VARIANT_METRICS = (M.SIZE_MB, M.CONVERT_S, M.DECODE_TOK_S, M.TTFT_MS, M.PEAK_RSS_MB, M.PERPLEXITY, M.PPL_DELTA_PCT,
                   M.KL_DIV, M.SRC_KL_MEAN, M.SRC_KL_MAX, M.SRC_TOP1_AGREEMENT, M.SRC_PPL_DELTA_PCT)
TOOLS = ("torch", "transformers", "olive-ai", "onnxruntime-genai", "onnxruntime", "mlflow")


@dataclass
class MemoryTrace:
    """What the sampler saw of the sweep's process tree and the machine."""

    peak_tree_mb: float = 0.0
    peak_tree_at_s: float = 0.0
    peak_tree_top: str = ""  # the largest process at the tree's peak
    peak_process_mb: float = 0.0
    peak_process: str = ""
    min_available_mb: float = float("inf")
    min_available_at_s: float = 0.0
    samples: list[tuple[float, float, float]] = field(default_factory=list)  # (s, tree MB, available MB)
    stages: list[dict] = field(default_factory=list)  # runs of samples with the same workers alive
    stopped_by_guard: bool = False


def _label(proc: psutil.Process) -> str:
    """A short name for a process of the tree: a worker's module (and the variant it measures), else the program."""
    try:
        if proc.status() == psutil.STATUS_ZOMBIE:
            return "exited, not yet waited for"
        cmd = proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "?"
    if not cmd:
        return "?"
    if "-c" in cmd:  # convert.py's load-and-generate validation of a variant
        return "python -c (validation)"
    if "-m" in cmd and cmd.index("-m") + 1 < len(cmd):
        label = cmd[cmd.index("-m") + 1].removeprefix("mlflow_slmops.")
        if "--model-dir" in cmd and cmd.index("--model-dir") + 1 < len(cmd):
            label += f" {Path(cmd[cmd.index('--model-dir') + 1]).name}"
        return label
    return Path(cmd[1] if len(cmd) > 1 and "python" in Path(cmd[0]).name else cmd[0]).name


def sample_tree(pid: int) -> tuple[int, int, str, str]:
    """(summed RSS, largest process's RSS, its label, the labels of the workers below the root) of a tree."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0, "", ""
    total, largest, top = 0, 0, None
    for p in procs:
        try:
            rss = p.memory_info().rss
        except psutil.NoSuchProcess:
            continue
        total += rss
        if rss > largest:
            largest, top = rss, p
    workers = " + ".join(sorted({_label(p) for p in procs[1:]})) or "sweep process only"
    return total, largest, _label(top) if top else "", workers


def _add_to_stage(stages: list[dict], workers: str, now: float, tree_mb: float) -> None:
    if stages and stages[-1]["workers"] == workers:
        stage = stages[-1]
        stage["end_s"], stage["peak_tree_mb"] = now, max(stage["peak_tree_mb"], tree_mb)
    else:
        stages.append({"workers": workers, "start_s": now, "end_s": now, "peak_tree_mb": tree_mb})


def watch(proc: subprocess.Popen, start: float, min_available_gb: float) -> MemoryTrace:
    """Sample until the process exits; kill its whole session if the machine runs low on memory."""
    trace = MemoryTrace()
    while proc.poll() is None:
        now = time.monotonic() - start
        total, largest, top, workers = sample_tree(proc.pid)
        available = psutil.virtual_memory().available
        trace.samples.append((round(now, 1), round(total / MB), round(available / MB)))
        _add_to_stage(trace.stages, workers, round(now, 1), round(total / MB))
        if total / MB > trace.peak_tree_mb:
            trace.peak_tree_mb, trace.peak_tree_at_s, trace.peak_tree_top = total / MB, now, top
        if largest / MB > trace.peak_process_mb:
            trace.peak_process_mb, trace.peak_process = largest / MB, top
        if available / MB < trace.min_available_mb:
            trace.min_available_mb, trace.min_available_at_s = available / MB, now
        if available < min_available_gb * GB:
            trace.stopped_by_guard = True
            print(f"[{now:.0f} s] available memory {available / GB:.2f} GB < {min_available_gb} GB: "
                  f"killing the sweep (tree {total / GB:.1f} GB, largest {top})", flush=True)
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(SAMPLE_S)
    proc.wait()
    return trace


def tee(stream, log: Path, start: float, lines: list[tuple[float, str]]) -> None:
    """Copy the sweep's output to the log, each line stamped with the seconds since the start."""
    with open(log, "w", encoding="utf-8") as f:
        for raw in stream:
            line = raw.rstrip("\n")
            stamp = time.monotonic() - start
            lines.append((round(stamp, 1), line))
            f.write(f"[{stamp:7.1f}] {line}\n")
            f.flush()


def run_sweep(model: Path, work: Path, min_available_gb: float) -> dict:
    """The real CLI in its own session (so the guard can kill the tree), timed and watched."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k not in ENV_DROP}
    env.update(ENV_EXTRA, MLFLOW_TRACKING_URI=f"sqlite:///{work / 'mlflow.db'}", SLMOPS_CACHE_DIR=str(work / "cache"))
    cmd = [str(SLMOPS), "sweep", "--model", str(model), "--output", str(work / "variants"), "--variants", VARIANTS,
           "--quiet"]
    os.sync()  # the model's own writeback is not the sweep's cost
    before = {"load_avg_1m": os.getloadavg()[0], "available_mb": psutil.virtual_memory().available / MB}
    lines: list[tuple[float, str]] = []
    start = time.monotonic()
    # cwd: MLflow's default artifact root (./mlruns) lands in the work folder.
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    reader = threading.Thread(target=tee, args=(proc.stdout, work / "sweep.log", start, lines), daemon=True)
    reader.start()
    trace = watch(proc, start, min_available_gb)
    wall = time.monotonic() - start
    reader.join(timeout=10)
    return {"command": " ".join(cmd), "returncode": proc.returncode, "wall_s": wall, "before": before,
            "after": {"load_avg_1m": os.getloadavg()[0]}, "memory": asdict(trace), "output": lines}


def read_runs(work: Path) -> dict:
    """The sweep run and its variant runs, from the benchmark's own tracking store."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    exp_ids = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(exp_ids, max_results=1000) if exp_ids else []
    sweeps = [r for r in runs if r.data.tags.get(M.ROLE_TAG) == M.ROLE_SWEEP]
    if not sweeps:
        return {"sweep": None, "variants": []}
    parent = sweeps[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    order = VARIANTS.split(",")

    def rank(run) -> int:
        name = run.data.tags.get(M.VARIANT_TAG, "")
        return order.index(name) if name in order else len(order)

    variants = [{"variant": r.data.tags.get(M.VARIANT_TAG, r.info.run_name),
                 "status": r.data.tags.get(M.STATUS_TAG, r.info.status.lower()),
                 "error": r.data.tags.get(M.ERROR_TAG),
                 "conversion_cached": r.data.tags.get(M.CONVERSION_CACHED_TAG),
                 **{k: r.data.metrics.get(k) for k in VARIANT_METRICS}} for r in sorted(children, key=rank)]
    sweep = {"run_id": parent.info.run_id, "status": parent.info.status,
             "source_check_s": parent.data.metrics.get(M.SOURCE_CHECK_S),
             "conversion_s": parent.data.metrics.get(M.CONVERSION_S),
             "source_check": parent.data.tags.get(M.SOURCE_CHECK_TAG),
             "export_mismatch": parent.data.tags.get(M.EXPORT_MISMATCH_TAG),
             "source_dtype": parent.data.params.get("source_dtype"),
             "source_parameters": parent.data.params.get("source_parameters")}
    return {"sweep": sweep, "variants": variants}


def source_meta(work: Path) -> dict | None:
    metas = sorted((work / "cache" / "source-ref").glob("*/meta.json"))
    return json.loads(metas[0].read_text()) if metas else None


def output_stamps(lines: list[tuple[float, str]]) -> dict[str, float]:
    """When the sweep printed its stage lines: every conversion's outcome, then the source reference's."""
    stamps = {}
    for t, line in lines:
        text = line.strip()
        if text.startswith("source model:"):
            stamps.setdefault("source reference ready", t)
        elif any(text.startswith(f"{name}:") for name in VARIANTS.split(",")):
            stamps.setdefault("conversions done", t)
    return stamps


def _stage_table(stages: list[dict]) -> list[str]:
    """Runs of samples with the same workers alive, the short ones (a validation's few seconds) left out."""
    rows = ["| seconds | workers alive below the sweep process | peak tree RSS MB |", "|---|---|---:|"]
    rows += [f"| {s['start_s']:.0f}-{s['end_s']:.0f} | {s['workers']} | {s['peak_tree_mb']:.0f} |"
             for s in stages if s["end_s"] - s["start_s"] >= STAGE_MIN_S]
    return rows


def machine() -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(psutil.virtual_memory().total / GB, 1),
            "python": platform.python_version(), **{pkg: version(pkg) for pkg in TOOLS}}


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != 0 and abs(value) < 10 ** -digits:
            return f"{value:.1e}"
        return f"{value:.{digits}f}"
    return str(value)


def markdown(res: dict) -> str:
    info, sweep, mem, meta = res["machine"], res["runs"]["sweep"], res["sweep"]["memory"], res["source_ref"]
    wall = res["sweep"]["wall_s"]
    lines = [
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['ram_gib']} GiB RAM, no swap; torch {info['torch']}, "
        f"transformers {info['transformers']}, olive-ai {info['olive-ai']}, onnxruntime-genai "
        f"{info['onnxruntime-genai']}, onnxruntime {info['onnxruntime']}, mlflow {info['mlflow']}. Model: "
        f"Qwen2.5-1.5B shape, random bf16 weights in {res['model']['shards']} shards, "
        f"{res['model']['params_m']:.0f}M parameters. Load average (1 min) {res['sweep']['before']['load_avg_1m']:.1f}"
        f" at the start, {res['sweep']['after']['load_avg_1m']:.1f} at the end.",
        "",
        f"Exit code {res['sweep']['returncode']}; wall {wall:.0f} s ({wall / 60:.1f} min).",
        "",
        "| variant | status | size MB | convert s | decode tok/s | peak RSS MB | ppl delta % (vs fp32) | src_kl_mean "
        "| src_kl_max | src_top1_agreement |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for v in res["runs"]["variants"]:
        lines.append(f"| {v['variant']} | {v['status']} | {_fmt(v['size_mb'], 0)} | {_fmt(v['convert_s'], 1)} | "
                     f"{_fmt(v['decode_tok_s'], 1)} | {_fmt(v['peak_rss_mb'], 0)} | {_fmt(v['ppl_delta_pct'])} | "
                     f"{_fmt(v['src_kl_mean'], 4)} | {_fmt(v['src_kl_max'], 4)} | "
                     f"{_fmt(v['src_top1_agreement'], 3)} |")
    lines.append("")
    for v in res["runs"]["variants"]:
        if v["error"]:
            lines.append(f"- {v['variant']} failed: {v['error']}")
    check = sweep["source_check_s"] if sweep else None
    conversion = sweep["conversion_s"] if sweep else None
    lines += [
        f"- Whole-tree peak RSS {mem['peak_tree_mb']:.0f} MB at {mem['peak_tree_at_s']:.0f} s (largest process "
        f"then: {mem['peak_tree_top']}); largest single process {mem['peak_process_mb']:.0f} MB "
        f"({mem['peak_process']}); lowest available memory {mem['min_available_mb']:.0f} MB at "
        f"{mem['min_available_at_s']:.0f} s.",
        f"- Source check: source_check_s {_fmt(check, 1)} s = "
        f"{_fmt(check / wall * 100 if check else None, 1)}% of the wall time; conversion_s (all four variants) "
        f"{_fmt(conversion, 1)} s (each variant's convert s is its own clock, and the builds overlap).",
    ]
    if meta:
        lines.append(f"- Source reference: {meta['source_dtype']} read, computed in {meta['compute_dtype']}, "
                     f"{meta['chunks']} chunks of {meta['chunk_tokens']} tokens; load {meta['load_s']:.1f} s, "
                     f"total {meta['seconds']:.1f} s, peak_rss_mb {meta['peak_rss_mb']:.0f} (its ru_maxrss).")
    stamps = ", ".join(f"{k} {v:.0f} s" for k, v in res["stamps"].items())
    lines.append(f"- From the sweep's output: {stamps or 'no stage lines'}.")
    oom = res["sweep"]["returncode"] == KILLED_BY_SIGKILL
    verdict = "stopped by the memory guard" if mem["stopped_by_guard"] else "killed (SIGKILL)" if oom else "no"
    lines += [f"- Out of memory: {verdict}.", "", *_stage_table(mem["stages"])]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=MODEL_DIR, help="model folder (built here if absent)")
    parser.add_argument("--work", type=Path, default=WORK_DIR, help="work folder (emptied first)")
    parser.add_argument("--min-available-gb", type=float, default=DEFAULT_MIN_AVAILABLE_GB,
                        help="kill the sweep if the machine's available memory falls below this")
    parser.add_argument("--keep-work", action="store_true", help="keep the variants, cache and store afterwards")
    args = parser.parse_args()

    started = time.monotonic()
    model = make_qwen05_shape.build_shape(args.model, QWEN15_SHAPE, max_shard_size=SHARD_SIZE)
    params = make_qwen05_shape.param_count_m(model)
    print(f"{model}: {params:.1f}M parameters ({time.monotonic() - started:.0f} s)", flush=True)
    if round(params) != EXPECTED_PARAMS_M:
        print(f"expected {EXPECTED_PARAMS_M}M parameters, found {params:.1f}M", file=sys.stderr)
        return 1
    shards = len(list(model.glob("*.safetensors")))
    sweep = run_sweep(model, args.work, args.min_available_gb)
    res = {"machine": machine(), "model": {"dir": str(model), "params_m": params, "shards": shards,
                                           "shape": QWEN15_SHAPE},
           "sweep": sweep, "runs": read_runs(args.work), "source_ref": source_meta(args.work),
           "stamps": output_stamps(sweep["output"])}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "large_sweep.json").write_text(json.dumps(res, indent=2))
    md = markdown(res)
    (OUT / "large_sweep.md").write_text(md)
    print(md)
    if not args.keep_work:
        shutil.rmtree(args.work / "variants", ignore_errors=True)
        shutil.rmtree(args.work / "cache", ignore_errors=True)
        shutil.rmtree(args.work / "mlruns", ignore_errors=True)
    return 0 if sweep["returncode"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
