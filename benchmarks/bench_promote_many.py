"""Promotion at scale: one sweep run with 200 variant runs in one experiment, then `slmops promote`.

Side by side in one run, on one sqlite store:
- ``slmops promote`` as a user runs it (a fresh process: wall time and CPU time, start-up included);
- ``slmops --version``: the CLI's start-up alone, to separate it from the promotion's own work;
- ``promote.promote()`` in this process: the search, judging, decision table, registration and alias.

Only a few runs carry a logged model (the champion among them): promotion reads metrics and tags of every
run but registers one model, so the model files do not change what is measured. The goal is < 10 s.

Run:  .venv/bin/python benchmarks/bench_promote_many.py [--runs 200] [--repeats 3]
      (writes benchmarks/out/promote_many.{json,md}; tests/test_load.py checks the choice with 200 runs)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out"
FAILED_EVERY = 10  # every 10th variant failed: no metrics, like a variant that did not build
OVER_BUDGET = 20  # the fastest 20 exceed the perplexity budget, so the fastest is not the champion
PPL_BUDGET = 5.0
EXTRA_MODELS = 4


def _variant(i: int, n: int) -> dict:
    status = "failed" if i % FAILED_EVERY == FAILED_EVERY - 1 else "ok"
    tok_s = 10.0 + i
    ppl = PPL_BUDGET + 3.0 if i >= n - OVER_BUDGET else (i % 7) * 0.5
    return {"name": f"v{i:03d}", "status": status, "metrics": {
        "decode_tok_s": tok_s, "ttft_ms": 1000.0 / tok_s, "size_mb": 500.0 - i, "ppl_delta_pct": ppl,
        "kl_div": ppl / 100, "qa_accuracy": 0.9, "peak_rss_mb": 800.0} if status == "ok" else {}}


def make_many_runs(genai_dir: str | Path, n: int = 200) -> tuple[str, str]:
    """Log a sweep run with n variant children in the current tracking store; return (sweep ID, expected champion).

    The champion (the fastest variant within the 5% perplexity budget) and a few others get a logged model.
    """
    import mlflow
    from mlflow.entities import Metric

    from mlflow_slmops import flavor
    from mlflow_slmops import metrics as M
    from mlflow_slmops.track import tracking

    exp_id = tracking.configure()
    client = mlflow.MlflowClient()
    parent = client.create_run(exp_id, run_name="sweep-many", tags={M.ROLE_TAG: M.ROLE_SWEEP})
    parent_id = parent.info.run_id
    variants = [_variant(i, n) for i in range(n)]
    ok = [v for v in variants if v["status"] == "ok" and v["metrics"]["ppl_delta_pct"] <= PPL_BUDGET]
    expected = max(ok, key=lambda v: v["metrics"]["decode_tok_s"])["name"]
    with_model = {expected, *[v["name"] for v in ok[:EXTRA_MODELS]]}
    now = int(time.time() * 1000)
    for v in variants:
        run = client.create_run(exp_id, run_name=v["name"], tags={
            "mlflow.parentRunId": parent_id, M.ROLE_TAG: M.ROLE_VARIANT, M.VARIANT_TAG: v["name"],
            M.STATUS_TAG: v["status"]})
        if v["metrics"]:
            client.log_batch(run.info.run_id, metrics=[Metric(k, x, now, 0) for k, x in v["metrics"].items()])
        if v["name"] in with_model:
            with mlflow.start_run(run_id=run.info.run_id):
                flavor.log_model(genai_dir, name="model", variant={"variant": v["name"], "precision": "int4"})
        else:
            client.set_terminated(run.info.run_id)
    client.set_terminated(parent_id)
    return parent_id, expected


def _timed_cli(args: list[str], env: dict) -> tuple[float, float, subprocess.CompletedProcess]:
    """Wall and CPU seconds (user + system, children included) of one CLI run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, env={**os.environ, **env})
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--genai-dir", default=None, help="genai folder to log (default: the tiny Qwen2, converted)")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="slmops-promote-many-"))
    os.chdir(work)  # the sqlite store's artifacts go beside it
    uri = f"sqlite:///{work / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    import mlflow

    from mlflow_slmops import promote
    from mlflow_slmops.sweep import machine_fingerprint

    mlflow.set_tracking_uri(uri)
    genai = Path(args.genai_dir) if args.genai_dir else _tiny_genai(work)
    start = time.perf_counter()
    sweep_id, expected = make_many_runs(genai, args.runs)
    log_s = time.perf_counter() - start

    slmops = str(Path(sys.executable).parent / "slmops")
    startup, cli_wall, cli_cpu, inproc = [], [], [], []
    for i in range(args.repeats):
        wall, _, _ = _timed_cli([slmops, "--version"], {})
        startup.append(wall)
        wall, cpu, done = _timed_cli([slmops, "promote", "--sweep-run-id", sweep_id, "--name", f"cli-{i}"], {})
        assert done.returncode == 0 and f"Champion: {expected}" in done.stdout, done.stderr[-2000:]
        cli_wall.append(wall)
        cli_cpu.append(cpu)
        t0 = time.perf_counter()
        result = promote.promote(sweep_id, f"inproc-{i}")
        inproc.append(time.perf_counter() - t0)
        assert result.champion.variant == expected

    med = statistics.median
    summary = {"runs": args.runs, "champion": expected, "log_runs_s": log_s,
               "cli_promote_wall_s": med(cli_wall), "cli_promote_cpu_s": med(cli_cpu),
               "cli_startup_wall_s": med(startup), "inprocess_promote_s": med(inproc),
               "repeats": args.repeats, "machine": {**machine_fingerprint(), "load_average_1m": f"{os.getloadavg()[0]:.1f}"}}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "promote_many.json").write_text(json.dumps(summary, indent=2))
    table = "\n".join([
        "| Variant runs | `slmops promote` wall s | its CPU s | `slmops --version` wall s | `promote()` in-process s |",
        "|---|---|---|---|---|",
        f"| {args.runs} | {med(cli_wall):.1f} | {med(cli_cpu):.1f} | {med(startup):.1f} | {med(inproc):.2f} |",
        "",
        f"Median of {args.repeats}. Champion {expected} (the fastest within the perplexity budget) every time. "
        "Machine: " + ", ".join(f"{k} {v}" for k, v in summary["machine"].items()),
    ])
    (OUT / "promote_many.md").write_text(table + "\n")
    print(table)
    return 0


def _tiny_genai(work: Path) -> Path:
    from devkit.testing import convert_for_tests
    from devkit.toymodel import build_tiny_model

    return convert_for_tests(build_tiny_model(work / "hf"), work / "genai-int4", "int4")


if __name__ == "__main__":
    sys.exit(main())
