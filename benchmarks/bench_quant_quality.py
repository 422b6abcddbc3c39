"""Quality per byte of every CPU preset, side by side in one sweep: which int4 recipe to compare first.

One run of the real ``slmops sweep`` path (``sweep.run_sweep``) over every CPU preset, into a fresh MLflow store
and a fresh conversion cache, so each conversion time is a real build. Per preset: size, bits per weight,
``src_kl_mean`` and ``src_kl_p99`` against the Hugging Face model run in PyTorch, top-1 agreement with it, QA
accuracy, and the conversion time. The calibrated presets are calibrated on the model's own training-style text
(for the demo model: its training documents and conversations), which the sweep checks shares no passage with
the evaluation text or the QA file.

The goal it checks: at no more than GOAL_SIZE_RATIO x the size of plain int4, the best calibrated recipe has at
most GOAL_KL_RATIO of plain int4's src_kl_mean.

Run:  .venv/bin/python benchmarks/bench_quant_quality.py                      (the trained demo model; writes
      benchmarks/out/quant_quality.{json,md} and the table in docs/benchmarks.md)
      .venv/bin/python benchmarks/bench_quant_quality.py --model DIR --calibration FILE [--text F --qa F]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out"
DOCS = ROOT / "docs" / "benchmarks.md"
QUICKSTART = ROOT / "projects" / "quickstart"
PRESETS = "fp32,int8,int4,int4-b128-asym,int4-kquant,int4-hqq,int4-gptq,int4-e8,int4-mixed"
CALIBRATED = ("int4-gptq", "int4-e8", "int4-mixed")
PLAIN_INT4 = "int4"
GOAL_SIZE_RATIO = 1.1
GOAL_KL_RATIO = 0.5
COLUMNS = ("variant", "size_mb", "bits_per_weight", "src_kl_mean", "src_kl_p99", "src_top1_agreement",
           "qa_accuracy", "convert_s")
DOC_START = "<!-- bench_quant_quality:start -->"
DOC_END = "<!-- bench_quant_quality:end -->"


def demo_inputs(work: Path) -> dict:
    """The trained demo model (cached in .slmops/demo-model), its evaluation files, and its training text."""
    from devkit import demo

    from mlflow_slmops import calibration as cal

    hf = demo.build_demo_model(ROOT / ".slmops" / "demo-model", progress=False)
    text, qa = QUICKSTART / "eval_text.txt", QUICKSTART / "qa.jsonl"
    # The training conversations open with the system prompt the QA file uses too: leave such shared lines out.
    evaluated = cal.passages(text.read_text(encoding="utf-8")) | cal.passages(cal.read_calibration_text(qa))
    lines = "\n\n".join(demo._texts(demo.training_examples())).splitlines()
    kept = [line for line in lines if " ".join(line.split()) not in evaluated]
    calibration = work / "demo-training-text.txt"
    calibration.write_text("\n".join(kept) + "\n", encoding="utf-8")
    return {"model": str(hf), "calibration": str(calibration), "text": str(text), "qa": str(qa),
            "calibration_lines_left_out": len(lines) - len(kept)}


def run(inputs: dict, work: Path, repeats: int) -> dict:
    import mlflow

    from mlflow_slmops import sweep

    os.environ["SLMOPS_CACHE_DIR"] = str(work / "cache")  # a fresh cache: every conversion time is a build
    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
    req = sweep.SweepRequest(model=inputs["model"], variants=PRESETS, output=str(work / "variants"),
                             cache_dir=str(work / "cache"), text=inputs.get("text"), qa=inputs.get("qa"),
                             repeats=repeats, calibration=inputs.get("calibration"))
    start = time.perf_counter()
    result = sweep.run_sweep(req, progress=False, experiment="bench-quant-quality")
    wall = time.perf_counter() - start
    run_data = mlflow.MlflowClient().get_run(result.parent_run_id).data
    rows = []
    for _, row in result.table.iterrows():
        rows.append({c: (None if row.get(c) is None or row.get(c) != row.get(c) else row.get(c)) for c in COLUMNS}
                    | {"status": row["status"], "error": row.get("error") or ""})
    return {"rows": rows, "sweep_s": round(wall, 1), "conversion_s": run_data.metrics.get("conversion_s"),
            "calibration_samples": run_data.metrics.get("calibration_samples"),
            "calibration_sha256": run_data.params.get("calibration_sha256"),
            "source_parameters": run_data.params.get("source_parameters")}


def goal(rows: list[dict]) -> dict:
    """The best calibrated recipe within GOAL_SIZE_RATIO x plain int4's size, and how it compares."""
    by = {r["variant"]: r for r in rows if r["status"] == "ok" and r["src_kl_mean"] is not None}
    base = by.get(PLAIN_INT4)
    if base is None:
        return {"met": False, "why": "plain int4 was not measured"}
    within = [by[v] for v in CALIBRATED if v in by and by[v]["size_mb"] <= GOAL_SIZE_RATIO * base["size_mb"]]
    if not within:
        return {"met": False, "why": f"no calibrated recipe within {GOAL_SIZE_RATIO}x int4's size"}
    best = min(within, key=lambda r: r["src_kl_mean"])
    kl_ratio = best["src_kl_mean"] / base["src_kl_mean"]
    return {"met": kl_ratio <= GOAL_KL_RATIO, "best": best["variant"], "size_ratio": best["size_mb"] / base["size_mb"],
            "kl_ratio": kl_ratio}


def _fmt(value, column: str) -> str:
    if value is None:
        return "-"
    if column == "variant":
        return f"`{value}`"
    if column in ("src_kl_mean", "src_kl_p99"):
        return f"{value:.3g}"
    if column == "size_mb":
        return f"{value:.3f}"
    return f"{value:.3f}" if column in ("src_top1_agreement", "qa_accuracy") else f"{value:.2f}"


def markdown(record: dict) -> str:
    rows, g = record["rows"], record["goal"]
    base = next((r for r in rows if r["variant"] == PLAIN_INT4), None)
    header = [*COLUMNS, "size / int4", "src_kl_mean / int4"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| `{r['variant']}` | failed: {r['error'][:80]} |" + " |" * (len(header) - 2))
            continue
        ratios = ["-", "-"]
        if base and base["size_mb"] and base["src_kl_mean"]:
            ratios = [f"{r['size_mb'] / base['size_mb']:.2f}", f"{r['src_kl_mean'] / base['src_kl_mean']:.2f}"]
        lines.append("| " + " | ".join([*(_fmt(r[c], c) for c in COLUMNS), *ratios]) + " |")
    m = record["machine"]
    verdict = (f"**Goal met**: `{g['best']}` at {g['size_ratio']:.2f}x int4's size has {g['kl_ratio']:.2f}x its "
               f"src_kl_mean (goal: at most {GOAL_KL_RATIO}x at {GOAL_SIZE_RATIO}x the size)." if g.get("met") else
               f"**Goal not met**: {g.get('why') or ''}" + (
                   f"the best calibrated recipe within {GOAL_SIZE_RATIO}x int4's size, `{g['best']}` "
                   f"({g['size_ratio']:.2f}x), has {g['kl_ratio']:.2f}x int4's src_kl_mean (goal {GOAL_KL_RATIO}x)."
                   if g.get("best") else ""))
    return "\n".join([
        f"Model: `{record['model_name']}` ({record['source_parameters']} parameters); calibration: "
        f"{record['calibration_samples']:.0f} samples of up to 128 tokens (sha256 "
        f"`{(record['calibration_sha256'] or '')[:12]}`). One sweep, {m['cores']} cores ({m['cpu']}), "
        f"conversion stage {record['conversion_s']:.0f} s, whole sweep {record['sweep_s']:.0f} s; convert_s is "
        "each preset's own build (a quantized preset starts from the cached fp32 export, or from the PyTorch model "
        "for the calibrated ones).", "", *lines, "", verdict])


def write_docs(section: str) -> None:
    text = DOCS.read_text(encoding="utf-8")
    block = f"{DOC_START}\n{section}\n{DOC_END}"
    pattern = re.compile(re.escape(DOC_START) + ".*?" + re.escape(DOC_END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{DOCS} has no {DOC_START} ... {DOC_END} block to fill")
    DOCS.write_text(pattern.sub(lambda _m: block, text), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="A Hugging Face model folder (default: the trained demo model).")
    parser.add_argument("--calibration", help="Calibration text of the calibrated presets (with --model).")
    parser.add_argument("--text", help="Evaluation text (with --model; default: bundled).")
    parser.add_argument("--qa", help="QA JSONL file (with --model; default: bundled).")
    parser.add_argument("--repeats", type=int, default=3, help="Timed generations per variant.")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-quant-quality-") as tmp:
        work = Path(tmp)
        inputs = demo_inputs(work) if not args.model else {
            "model": args.model, "calibration": args.calibration, "text": args.text, "qa": args.qa}
        record = run(inputs, work, args.repeats)
    from mlflow_slmops.sweep import machine_fingerprint

    fingerprint = machine_fingerprint()
    record.update({"model_name": Path(inputs["model"]).name, "goal": goal(record["rows"]),
                   "machine": {"cpu": fingerprint["machine_cpu"], "cores": fingerprint["machine_cores"]}})
    name = "quant_quality" if not args.model else f"quant_quality-{Path(args.model).name}"
    (OUT / f"{name}.json").write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
    section = markdown(record)
    (OUT / f"{name}.md").write_text(section + "\n", encoding="utf-8")
    if not args.model:
        write_docs(section)
    print(section)


if __name__ == "__main__":
    main()
