"""Sustained load on the two serving paths of a model, with a bounded number of requests:

- **deploy**: the foundry-local deployment client's ``predict``, in this process, through the Foundry Local
  runtime (``get_deploy_client("foundry-local:...").predict(name, chat)``);
- **serve**: ``mlflow models serve`` of the same MLflow model (onnx_genai flavor) on 127.0.0.1, over HTTP.

Each path gets the same chat from N client threads (default 8) for a fixed time (default 120 s) or until a
request cap, whichever comes first. Reported per path: requests, errors (must be 0), throughput, latency
p50/p95, and the memory of the serving process(es): RSS after warm-up, at the end, and the growth between
them (a leak shows as growth that keeps climbing; the target is < 5%).

The model is the demo model's int4 variant (``devkit.demo.build_demo_model`` converted with the
product's converter), or any genai folder given with ``--genai-dir``.

Run:  .venv/bin/python benchmarks/bench_load.py [--duration 120] [--threads 8] [--paths deploy,serve]
      (writes benchmarks/out/load.{json,md}; tests/test_load.py runs a 12-second version)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import psutil

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out"
DEMO_DIR = OUT / "load-demo"
DEPLOYMENT = "load-test"
QUESTION = "Which of your products is waterproof?"
RSS_SAMPLE_S = 0.5
SERVER_START_S = 300
REQUEST_TIMEOUT_S = 300
MB = 1 << 20
P50, P95 = 50, 95


@dataclass
class LoadResult:
    """What one path did under load."""

    path: str
    threads: int
    duration_s: float
    warmup_s: float
    requests: int = 0
    errors: int = 0
    first_errors: list[str] = field(default_factory=list)
    throughput_rps: float = 0.0
    latency_p50_ms: float = 0.0
    latency_p95_ms: float = 0.0
    latency_mean_ms: float = 0.0
    completion_tokens_mean: float = 0.0
    rss_after_warmup_mb: float = 0.0
    rss_end_mb: float = 0.0
    rss_max_mb: float = 0.0
    rss_growth_pct: float = 0.0


def _percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(pct / 100 * (len(ordered) - 1))))]


def tree_rss(pid: int) -> int:
    """RSS of a process and all its children (a server's workers)."""
    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def run_load(name: str, call: Callable[[], int], rss: Callable[[], int], threads: int, duration_s: float,
             warmup_s: float, max_requests: int) -> LoadResult:
    """Call ``call()`` (returns completion tokens; raises on error) from N threads for duration_s."""
    result = LoadResult(name, threads, duration_s, warmup_s)
    latencies: list[float] = []
    tokens: list[int] = []
    lock = threading.Lock()
    start = time.monotonic()
    deadline = start + duration_s
    issued = [0]

    def worker() -> None:
        while time.monotonic() < deadline:
            with lock:
                if issued[0] >= max_requests:
                    return
                issued[0] += 1
            t0 = time.monotonic()
            try:
                n = call()
                if n <= 0:
                    raise RuntimeError(f"no tokens generated ({n})")
            except Exception as exc:  # every failure counts: the target is zero
                with lock:
                    result.errors += 1
                    if len(result.first_errors) < 5:
                        result.first_errors.append(f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}")
                continue
            elapsed = time.monotonic() - t0
            with lock:
                if t0 >= start + warmup_s:  # latencies after warm-up only
                    latencies.append(elapsed)
                    tokens.append(n)
                result.requests += 1

    workers = [threading.Thread(target=worker, daemon=True) for _ in range(threads)]
    for w in workers:
        w.start()
    samples: list[int] = []
    baseline = None
    while any(w.is_alive() for w in workers):
        time.sleep(RSS_SAMPLE_S)
        now = rss()
        if time.monotonic() >= start + warmup_s:
            baseline = baseline if baseline is not None else now
            samples.append(now)
    for w in workers:
        w.join()
    timed = max(time.monotonic() - start - warmup_s, 1e-9)
    if latencies:
        result.throughput_rps = len(latencies) / timed
        result.latency_p50_ms = _percentile(latencies, P50) * 1000
        result.latency_p95_ms = _percentile(latencies, P95) * 1000
        result.latency_mean_ms = statistics.fmean(latencies) * 1000
        result.completion_tokens_mean = statistics.fmean(tokens)
    end = rss()
    baseline = baseline or end
    result.rss_after_warmup_mb = baseline / MB
    result.rss_end_mb = end / MB
    result.rss_max_mb = max(samples or [end]) / MB
    result.rss_growth_pct = (end - baseline) / baseline * 100
    return result


def demo_genai_dir() -> Path:
    """The demo model, trained once, converted to int4 with the product's converter (cached under out/)."""
    from devkit.demo import build_demo_model
    from devkit.testing import convert_for_tests

    target = DEMO_DIR / "genai-int4"
    if not (target / "genai_config.json").is_file():
        hf = build_demo_model(DEMO_DIR / "hf", progress=False)
        convert_for_tests(hf, target, "int4")
    return target


def chat(max_tokens_key: str, max_tokens: int) -> dict:
    return {"messages": [{"role": "user", "content": QUESTION}], max_tokens_key: max_tokens}


def deploy_path(saved: Path, work: Path, args) -> LoadResult:
    """predict through the deployment client, in this process, through the Foundry Local runtime."""
    from mlflow.deployments import get_deploy_client

    client = get_deploy_client(f"foundry-local:{work / 'foundry-cache'}")
    client.create_deployment(DEPLOYMENT, str(saved))
    request = chat("max_tokens", args.max_new_tokens)

    def call() -> int:
        reply = client.predict(DEPLOYMENT, request)
        return int(reply["usage"]["completion_tokens"])

    me = os.getpid()
    return run_load("deploy", call, lambda: tree_rss(me), args.threads, args.duration, args.warmup, args.max_requests)


def serve_path(saved: Path, work: Path, args) -> LoadResult:
    """``mlflow models serve`` of the same model on 127.0.0.1, over HTTP."""
    import requests

    sys.path.insert(0, str(ROOT))
    from tests.helpers import bin_path, free_port, stop_process, wait_http

    port = free_port()
    log = open(work / "serve.log", "wb")
    proc = subprocess.Popen([bin_path("mlflow"), "models", "serve", "-m", str(saved), "--env-manager", "local",
                             "--host", "127.0.0.1", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True,
                            # `mlflow models serve` execs uvicorn: find it beside this interpreter, as in a venv.
                            env={**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"})
    url = f"http://127.0.0.1:{port}"
    local = threading.local()
    request = chat("max_new_tokens", args.max_new_tokens)

    def call() -> int:
        if not hasattr(local, "session"):
            local.session = requests.Session()
        reply = local.session.post(f"{url}/invocations", json=request, timeout=REQUEST_TIMEOUT_S)
        if reply.status_code != 200:
            raise RuntimeError(f"HTTP {reply.status_code}: {reply.text[:200]}")
        return int(reply.json()["usage"]["completion_tokens"])

    try:
        try:
            wait_http(f"{url}/ping", proc, timeout=SERVER_START_S)
        except Exception as exc:
            raise RuntimeError(f"mlflow models serve did not start: {(work / 'serve.log').read_text()[-3000:]}") from exc
        return run_load("serve", call, lambda: tree_rss(proc.pid), args.threads, args.duration, args.warmup,
                        args.max_requests)
    finally:
        stop_process(proc)
        log.close()


def machine() -> dict:
    from importlib.metadata import version

    from mlflow_slmops.sweep import machine_fingerprint

    info = {**machine_fingerprint(), "python": platform.python_version(),
            "load_average_1m": f"{os.getloadavg()[0]:.1f}"}
    for pkg in ("mlflow", "onnxruntime-genai", "foundry-local-sdk"):
        info[pkg] = version(pkg)
    return info


def markdown(results: list[LoadResult], meta: dict) -> str:
    rows = ["| Path | Threads | Seconds | Requests | Errors | Req/s | p50 ms | p95 ms | Tokens/reply | "
            "RSS after warm-up MB | RSS end MB | RSS growth |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        rows.append(f"| {r.path} | {r.threads} | {r.duration_s:.0f} | {r.requests} | {r.errors} | "
                    f"{r.throughput_rps:.1f} | {r.latency_p50_ms:.0f} | {r.latency_p95_ms:.0f} | "
                    f"{r.completion_tokens_mean:.1f} | {r.rss_after_warmup_mb:.0f} | {r.rss_end_mb:.0f} | "
                    f"{r.rss_growth_pct:+.1f}% |")
    rows.append("")
    rows.append("Machine: " + ", ".join(f"{k} {v}" for k, v in meta["machine"].items()))
    rows.append(f"Model: {meta['model']}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--genai-dir", default=None, help="genai folder to serve (default: the demo model, int4)")
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of load per path")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds before RSS and latency are recorded")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--max-requests", type=int, default=100_000, help="cap on requests per path")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--paths", default="deploy,serve")
    parser.add_argument("--json", default=str(OUT / "load.json"))
    args = parser.parse_args(argv)

    from mlflow_slmops import flavor

    genai = Path(args.genai_dir) if args.genai_dir else demo_genai_dir()
    model = f"{genai} ({'given' if args.genai_dir else 'demo model, int4'}), max_new_tokens {args.max_new_tokens}"
    work = Path(tempfile.mkdtemp(prefix="slmops-load-"))
    try:
        saved = work / "model"
        flavor.save_model(genai, saved)
        runners = {"deploy": deploy_path, "serve": serve_path}
        results = [runners[p](saved, work, args) for p in args.paths.split(",") if p]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    meta = {"machine": machine(), "model": model, "args": vars(args)}
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": [asdict(r) for r in results]}, indent=2))
    table = markdown(results, meta)
    out.with_suffix(".md").write_text(table + "\n")
    print(table)
    return 0 if all(r.errors == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
