"""Conversion speed and memory: the 4-variant sweep against standalone Olive runs and the bare builder.

On the Qwen2.5-0.5B-shaped model (benchmarks/make_qwen05_shape.py, 494M parameters), side by side in one run,
each measurement a fresh subprocess with its own empty cache, timed wall-clock, started after an os.sync() so it
does not pay for the writeback of the run before it. Peak RSS two ways: wait4's
(the largest single process among it and its descendants) and the process tree's summed RSS, sampled every
50 ms; the memory goal uses the tree's, since the sweep validates one variant while it builds the next:

- **slmops convert**: `convert_variants(fp32,int8,int4,int4-b128-asym)`, one process, in-process Olive
  workflows sharing one Olive cache, each variant validated (loads, generates): what `slmops convert` runs;
- **slmops sweep, whole run**: the real `slmops sweep` CLI on the same four (tiny measurement settings,
  `--no-source-check`); its conversion stage, which goes through the same `convert_variants` before any
  measurement, is the sweep run's own `conversion_s` metric (the row's wall time includes the measurements);
- **slmops convert, no overlap**: the same four through `convert_variant` one after another, each validated before
  the next build starts (what the sweep did before it converted through `convert_variants`);
- **slmops convert, stock Olive code**: with `SLMOPS_OLIVE_SPEEDUPS=0`, so Olive runs unpatched (the same
  weights, bit for bit; see mlflow_slmops/convert/olive/speedups.py);
- **slmops convert, heap trimmed**: with `MALLOC_TRIM_THRESHOLD_` at glibc's default, so the converter leaves
  glibc's heap policy alone and trims after each variant (what it did before it kept the freed heap for reuse);
- **slmops convert, cached**: the same again with the same cache into a new output folder;
- **single**: our converter on one variant at a time (fresh cache each): the largest one is the memory reference;
- **olive auto-opt**: `olive auto-opt --use_model_builder --precision fp32|int4`; int4-b128-asym is the same
  auto-opt workflow (saved with `--save_config_file --dry_run`) with `int4_block_size: 128` and
  `int4_is_symmetric: false` on its ModelBuilder pass, run with `olive run --config` (auto-opt has no flag
  for it; the dry run is not timed);
- **bare builder**: `python -m onnxruntime_genai.models.builder` for the same three.

Goals (issue 3): slmops convert <= 0.6 x the three standalone Olive runs; cached < 5% of the first;
its peak tree RSS <= 1.2 x the largest single conversion's.

With --ablate, slmops convert also runs once without each of the Olive speed-ups in turn (convert/olive/speedups.py PATCHES).

With --repeat N, every run is made N times (rounds, interleaved); the tables give the median time of each.

Run:  .venv/bin/python benchmarks/bench_convert.py [--work DIR] [--keep] [--ablate] [--repeat N]
      (writes benchmarks/out/convert.{json,md}; about 8 minutes a round on 2 cores, 3 more with --ablate,
      ~40 GB of scratch disk)
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
import threading
import time
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_qwen05_shape  # noqa: E402
from bench_load import tree_rss  # noqa: E402

from mlflow_slmops.convert.olive.speedups import PATCHES, SPEEDUPS_ENV  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out"
BIN = Path(sys.executable).parent
SWEEP_VARIANTS = ["fp32", "int8", "int4", "int4-b128-asym"]
STANDALONE = ["fp32", "int4", "int4-b128-asym"]
# The real sweep's measurements, kept small: its conversion stage is timed apart (conversion_s).
REAL_SWEEP_MEASURE = ["--prompt-len", "16", "--gen-len", "4", "--repeats", "1", "--no-source-check"]
TARGET_SPEED_RATIO = 0.6
TARGET_CACHED_RATIO = 0.05
TARGET_RSS_RATIO = 1.2
TREE_SAMPLE_S = 0.05
B128_ASYM = {"int4_block_size": 128, "int4_is_symmetric": False}
# Olive 0.13 sends a telemetry heartbeat before reading OLIVE_DISABLE_TELEMETRY and, offline, waits ~15 s at
# exit to flush it, unless it sees a CI variable: set for every run, so no side pays for it.
ENV = {**os.environ, "OLIVE_DISABLE_TELEMETRY": "1", "CI": "1", "HF_HUB_OFFLINE": "1"}

SWEEP_CODE = """
import json, sys
from pathlib import Path
from mlflow_slmops.convert import convert_variant, convert_variants
from mlflow_slmops import convert
from mlflow_slmops.variants import resolve_variants
convert.own_this_process()  # as the slmops CLI does
model, variants, out, cache, result_path, mode, left_out = sys.argv[1:8]
if left_out:  # --ablate: this sweep runs without one of the Olive speed-ups
    from mlflow_slmops.convert.olive import speedups as olive_speedups
    del olive_speedups.PATCHES[left_out]
if mode == "overlap":
    results = convert_variants(model, resolve_variants(variants), out, cache_dir=cache, progress=False)
else:  # one variant at a time: each validated before the next build starts
    results = [convert_variant(model, s, Path(out) / s.name, cache_dir=cache) for s in resolve_variants(variants)]
json.dump([r.to_dict() for r in results], open(result_path, "w"), indent=2)
sys.exit(0 if all(r.status == "ok" for r in results) else 1)
"""


class TreeRssSampler(threading.Thread):
    """The peak of the summed RSS of a process and all its descendants, sampled every TREE_SAMPLE_S.

    wait4's ru_maxrss is the peak of the largest single process; when the sweep validates one variant in a
    subprocess while it builds the next, what the machine must hold is the sum.
    """

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop = pid, 0, threading.Event()

    def run(self) -> None:
        while not self.stop.wait(TREE_SAMPLE_S):
            self.peak = max(self.peak, tree_rss(self.pid))


def measure(name: str, cmd: list[str], cwd: Path | None = None, env: dict | None = None) -> dict:
    """Run cmd to completion: wall seconds; peak RSS (MB) of its largest process (wait4) and of the whole
    process tree at once (sampled)."""
    os.sync()  # write back what the run before left dirty, so no run pays for another's writeback
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env={**ENV, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    sampler = TreeRssSampler(proc.pid)
    sampler.start()
    output = proc.stdout.read()
    sampler.stop.set()
    sampler.join()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    row = {"name": name, "seconds": seconds, "peak_rss_mb": usage.ru_maxrss / 1024,
           "peak_tree_rss_mb": max(sampler.peak / 2**20, usage.ru_maxrss / 1024), "exit_code": code,
           "load_before": load_before, "load_after": os.getloadavg()[0]}
    print(f"{name:<28} {seconds:7.1f} s  {row['peak_rss_mb']:7.0f} MB  tree {row['peak_tree_rss_mb']:7.0f} MB  "
          f"exit {code}  (load {load_before:.1f} -> {row['load_after']:.1f})", flush=True)
    if code != 0:
        print(output[-4000:], flush=True)
        raise SystemExit(f"{name} failed")
    return row


def our_convert(model: Path, variants: list[str], out: Path, cache: Path, name: str, mode: str = "overlap",
                env: dict | None = None, left_out: str = "") -> dict:
    result_path = out.parent / f"{out.name}.results.json"
    row = measure(name, [sys.executable, "-c", SWEEP_CODE, str(model), ",".join(variants), str(out), str(cache),
                         str(result_path), mode, left_out], env=env)
    row["variants"] = {r["spec"]["name"]: {"convert_s": r["convert_s"], "size_mb": r["size_bytes"] / 2**20,
                                           "cached": r["cached"]} for r in json.loads(result_path.read_text())}
    return row


def real_sweep(model: Path, out: Path, cache: Path, name: str) -> dict:
    """The real `slmops sweep` CLI; its conversion stage is the sweep run's own conversion_s metric."""
    store = out.parent / f"{out.name}.db"
    row = measure(name, [str(BIN / "slmops"), "sweep", "--model", str(model), "--variants", ",".join(SWEEP_VARIANTS),
                         "--output", str(out), "--cache-dir", str(cache), *REAL_SWEEP_MEASURE, "--quiet"],
                  cwd=out.parent, env={"MLFLOW_TRACKING_URI": f"sqlite:///{store}"})
    code = ("import json, sys, mlflow; c = mlflow.MlflowClient(); "
            "runs = c.search_runs([e.experiment_id for e in c.search_experiments()]); "
            "print(json.dumps([r.data.metrics['conversion_s'] for r in runs if 'conversion_s' in r.data.metrics]))")
    got = subprocess.run([sys.executable, "-c", code], env={**ENV, "MLFLOW_TRACKING_URI": f"sqlite:///{store}"},
                         capture_output=True, text=True, check=True)
    (row["conversion_s"],) = json.loads(got.stdout.strip().splitlines()[-1])
    print(f"{'':<28} conversion stage {row['conversion_s']:.1f} s", flush=True)
    return row


def olive_standalone(model: Path, preset: str, work: Path) -> dict:
    cwd = work / f"olive-{preset}"
    cwd.mkdir(parents=True)
    out = cwd / "out"
    base = [str(BIN / "olive"), "auto-opt", "-m", str(model), "--use_model_builder", "--device", "cpu",
            "--provider", "CPUExecutionProvider", "--log_level", "3"]
    if preset in ("fp32", "int4"):
        return measure(f"olive auto-opt {preset}", base + ["-o", str(out), "--precision", preset], cwd)
    # int4-b128-asym: auto-opt's own config, with the block size and asymmetry it has no flag for.
    dry = cwd / "dry"
    subprocess.run(base + ["-o", str(dry), "--precision", "int4", "--save_config_file", "--dry_run"],
                   cwd=cwd, env=ENV, check=True, capture_output=True)
    config = json.loads((dry / "config.json").read_text())
    builder = next(p for p in config["passes"].values() if p["type"] == "ModelBuilder")
    builder.update(B128_ASYM)
    config["output_dir"] = str(out)
    (cwd / "config.json").write_text(json.dumps(config, indent=2))
    return measure(f"olive run (auto-opt) {preset}", [str(BIN / "olive"), "run", "--config", str(cwd / "config.json")],
                   cwd)


def bare_builder(model: Path, preset: str, work: Path) -> dict:
    out = work / f"builder-{preset}"
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model), "-o", str(out),
           "-p", "fp32" if preset == "fp32" else "int4", "-e", "cpu", "-c", str(work / f"builder-cache-{preset}")]
    if preset == "int4-b128-asym":
        cmd += ["--extra_options", "int4_block_size=128", "int4_is_symmetric=false"]
    return measure(f"bare builder {preset}", cmd)


def machine() -> dict:
    cpu = platform.processor()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    import psutil

    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(),
            **{pkg: version(pkg) for pkg in ("olive-ai", "onnxruntime-genai", "onnxruntime", "torch", "transformers")}}


def run(work: Path, model: Path | None = None, ablate: bool = False, repeat: int = 1) -> dict:
    model = model or make_qwen05_shape.build()
    rounds = []
    for i in range(repeat):
        if repeat > 1:
            print(f"--- round {i + 1} of {repeat}", flush=True)
        rounds.append(measure_round(model, work, ablate=ablate and i == 0))
    return summarize(rounds)


def measure_round(model: Path, work: Path, ablate: bool) -> dict[str, dict]:
    """Every row once, interleaved, so a change in machine load falls on every kind of run alike."""
    rows: dict[str, dict] = {}

    def drop(*paths: Path) -> None:  # keep scratch disk bounded: ~2.4 GB per fp32 copy
        for p in paths:
            shutil.rmtree(p, ignore_errors=True)

    for preset in STANDALONE:
        rows[f"olive:{preset}"] = olive_standalone(model, preset, work)
        drop(work / f"olive-{preset}")
        rows[f"builder:{preset}"] = bare_builder(model, preset, work)
        drop(work / f"builder-{preset}", work / f"builder-cache-{preset}")
    for preset in SWEEP_VARIANTS:
        rows[f"single:{preset}"] = our_convert(model, [preset], work / f"single-{preset}",
                                               work / f"cache-single-{preset}", f"single {preset}")
        drop(work / f"single-{preset}", work / f"cache-single-{preset}")
    rows["sweep_serial"] = our_convert(model, SWEEP_VARIANTS, work / "sweep-serial", work / "cache-serial",
                                       "slmops convert, no overlap", mode="serial")
    drop(work / "sweep-serial", work / "cache-serial")
    rows["sweep_stock"] = our_convert(model, SWEEP_VARIANTS, work / "sweep-stock", work / "cache-stock",
                                      "slmops convert, stock Olive code", env={SPEEDUPS_ENV: "0"})
    drop(work / "sweep-stock", work / "cache-stock")
    rows["sweep_trimmed"] = our_convert(model, SWEEP_VARIANTS, work / "sweep-trimmed", work / "cache-trimmed",
                                        "slmops convert, heap trimmed", env={"MALLOC_TRIM_THRESHOLD_": str(128 * 1024)})
    drop(work / "sweep-trimmed", work / "cache-trimmed")
    rows["real_sweep"] = real_sweep(model, work / "real-sweep", work / "cache-real-sweep",
                                    "slmops sweep, whole run (4 variants)")
    drop(work / "real-sweep", work / "cache-real-sweep")
    rows["sweep"] = our_convert(model, SWEEP_VARIANTS, work / "sweep", work / "cache-sweep",
                                "slmops convert: convert_variants (4 variants)")
    rows["sweep_cached"] = our_convert(model, SWEEP_VARIANTS, work / "sweep-again", work / "cache-sweep",
                                       "slmops convert, cached")
    drop(work / "sweep", work / "sweep-again", work / "cache-sweep")
    if ablate:  # the sweep once without each speed-up, to show what each is worth
        for patch in PATCHES:
            rows[f"without:{patch}"] = our_convert(model, SWEEP_VARIANTS, work / "sweep-ablate",
                                                   work / "cache-ablate", f"slmops convert without {patch}", left_out=patch)
            drop(work / "sweep-ablate", work / "cache-ablate")
    return rows


def _combine(runs: list[dict]) -> dict:
    """One row from its runs in every round: the median time (each kept), the highest peaks."""
    row = dict(runs[0])
    row["seconds_each"] = [r["seconds"] for r in runs]
    row["seconds"] = statistics.median(row["seconds_each"])
    row["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    row["peak_tree_rss_mb"] = max(r["peak_tree_rss_mb"] for r in runs)
    row["load_after"] = runs[-1]["load_after"]
    if "conversion_s" in row:
        row["conversion_s_each"] = [r["conversion_s"] for r in runs]
        row["conversion_s"] = statistics.median(row["conversion_s_each"])
    return row


def summarize(rounds: list[dict[str, dict]]) -> dict:
    rows = {key: _combine([r[key] for r in rounds if key in r]) for key in rounds[0]}
    each_round = [r["sweep"]["seconds"] / sum(r[f"olive:{p}"]["seconds"] for p in STANDALONE) for r in rounds]
    olive_sum = sum(rows[f"olive:{p}"]["seconds"] for p in STANDALONE)
    builder_sum = sum(rows[f"builder:{p}"]["seconds"] for p in STANDALONE)
    largest_single = max(rows[f"single:{p}"]["peak_tree_rss_mb"] for p in SWEEP_VARIANTS)
    sweep, cached = rows["sweep"], rows["sweep_cached"]
    ratios = {
        "sweep_vs_olive_sum": sweep["seconds"] / olive_sum,
        "real_sweep_conversion_vs_olive_sum": rows["real_sweep"]["conversion_s"] / olive_sum,
        "real_sweep_conversion_vs_sweep": rows["real_sweep"]["conversion_s"] / sweep["seconds"],
        "sweep_vs_no_overlap": sweep["seconds"] / rows["sweep_serial"]["seconds"],
        "sweep_vs_stock_olive_code": sweep["seconds"] / rows["sweep_stock"]["seconds"],
        "sweep_vs_builder_sum": sweep["seconds"] / builder_sum,
        "sweep_vs_heap_trimmed": sweep["seconds"] / rows["sweep_trimmed"]["seconds"],
        "cached_vs_sweep": cached["seconds"] / sweep["seconds"],
        "sweep_rss_vs_largest_single": sweep["peak_tree_rss_mb"] / largest_single,
    }
    goals = {
        "speed": ratios["sweep_vs_olive_sum"] <= TARGET_SPEED_RATIO,
        "cached": ratios["cached_vs_sweep"] < TARGET_CACHED_RATIO,
        "memory": ratios["sweep_rss_vs_largest_single"] <= TARGET_RSS_RATIO,
    }
    return {"machine": machine(), "rows": rows, "rounds": len(rounds), "speed_ratio_each_round": each_round,
            "olive_sum_s": olive_sum, "builder_sum_s": builder_sum,
            "largest_single_rss_mb": largest_single, "ratios": ratios, "goals_met": goals}


def markdown(res: dict) -> str:
    m, r, rows = res["machine"], res["ratios"], res["rows"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gb']} GB RAM; olive-ai {m['olive-ai']}, "
        f"onnxruntime-genai {m['onnxruntime-genai']}, onnxruntime {m['onnxruntime']}, torch {m['torch']}, "
        f"transformers {m['transformers']}. Model: Qwen2.5-0.5B shape, random bf16 weights, 494M parameters.",
        "",
        f"Rounds: {res['rounds']} (wall time: the median; in brackets each round's, in order; peaks: the highest).",
        "",
        "| Run | Wall s | Peak RSS MB, largest process | Peak RSS MB, process tree | Load avg before → after |",
        "|---|---:|---:|---:|---|",
    ]
    for row in rows.values():
        each = f" ({', '.join(f'{t:.1f}' for t in row['seconds_each'])})" if len(row["seconds_each"]) > 1 else ""
        lines.append(f"| {row['name']} | {row['seconds']:.1f}{each} | {row['peak_rss_mb']:.0f} | "
                     f"{row['peak_tree_rss_mb']:.0f} | "
                     f"{row['load_before']:.1f} → {row['load_after']:.1f} |")
    per_variant = ", ".join(f"{k} {v['convert_s']:.1f} s ({v['size_mb']:.0f} MB)"
                            for k, v in rows["sweep"]["variants"].items())
    lines += [
        "",
        f"slmops convert, per variant (including validation; first round): {per_variant}.",
        "",
        "Speed ratio (slmops convert / the three Olive runs) in each round: "
        f"{', '.join(f'{x:.2f}' for x in res['speed_ratio_each_round'])}.",
        "",
        "| Ratio | Measured | Goal | Met |",
        "|---|---:|---:|---|",
        f"| slmops convert / (olive fp32 + int4 + int4-b128-asym) = {rows['sweep']['seconds']:.0f} / "
        f"{res['olive_sum_s']:.0f} s | {r['sweep_vs_olive_sum']:.2f} | ≤ {TARGET_SPEED_RATIO} | "
        f"{'yes' if res['goals_met']['speed'] else 'no'} |",
        f"| slmops sweep's conversion stage (`conversion_s`) / (the same three Olive runs) = "
        f"{rows['real_sweep']['conversion_s']:.0f} / {res['olive_sum_s']:.0f} s | "
        f"{r['real_sweep_conversion_vs_olive_sum']:.2f} | ≤ {TARGET_SPEED_RATIO} | - |",
        f"| slmops sweep's conversion stage / slmops convert = "
        f"{rows['real_sweep']['conversion_s']:.0f} / {rows['sweep']['seconds']:.0f} s | "
        f"{r['real_sweep_conversion_vs_sweep']:.2f} | - | - |",
        f"| slmops convert / the same without overlap = {rows['sweep']['seconds']:.0f} / {rows['sweep_serial']['seconds']:.0f} s | "
        f"{r['sweep_vs_no_overlap']:.2f} | - | - |",
        f"| slmops convert / the same on stock Olive code = {rows['sweep']['seconds']:.0f} / "
        f"{rows['sweep_stock']['seconds']:.0f} s | {r['sweep_vs_stock_olive_code']:.2f} | - | - |",
        f"| slmops convert / the same with the heap trimmed after each variant = {rows['sweep']['seconds']:.0f} / "
        f"{rows['sweep_trimmed']['seconds']:.0f} s | {r['sweep_vs_heap_trimmed']:.2f} | - | - |",
        f"| slmops convert / bare builder (same three) = {rows['sweep']['seconds']:.0f} / {res['builder_sum_s']:.0f} s | "
        f"{r['sweep_vs_builder_sum']:.2f} | - | - |",
        f"| slmops convert cached / first | {r['cached_vs_sweep']:.3f} | < {TARGET_CACHED_RATIO} | "
        f"{'yes' if res['goals_met']['cached'] else 'no'} |",
        f"| slmops convert peak tree RSS / largest single conversion = {rows['sweep']['peak_tree_rss_mb']:.0f} / "
        f"{res['largest_single_rss_mb']:.0f} MB | {r['sweep_rss_vs_largest_single']:.2f} | ≤ {TARGET_RSS_RATIO} | "
        f"{'yes' if res['goals_met']['memory'] else 'no'} |",
    ]
    left_out = {k.split(":", 1)[1]: row for k, row in rows.items() if k.startswith("without:")}
    if left_out:
        lines += ["", "| slmops convert without this speed-up | Wall s | / with all |", "|---|---:|---:|"]
        lines += [f"| {patch} | {row['seconds']:.1f} | {row['seconds'] / rows['sweep']['seconds']:.2f} |"
                  for patch, row in left_out.items()]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=OUT / "convert-work", help="scratch folder (emptied first)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder afterwards")
    parser.add_argument("--ablate", action="store_true",
                        help="also run the sweep once without each Olive speed-up (about 3 more minutes)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds of every run, interleaved; the tables give medians (about 7 minutes a round)")
    parser.add_argument("--model", type=Path, default=None,
                        help="another HF folder (a smoke run on a tiny model); default: the Qwen2.5-0.5B shape")
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    try:
        res = run(args.work, args.model, args.ablate, args.repeat)
    finally:
        if not args.keep:
            shutil.rmtree(args.work, ignore_errors=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "convert.json").write_text(json.dumps(res, indent=2))
    md = markdown(res)
    (OUT / "convert.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
