"""The demo model, measured end to end: training time on CPU, size, and quality of fp32 and int4.

One run, side by side:
- trains the demo model from scratch in a fresh cache (wall and CPU time, machine load before and after),
  then calls ``build_demo_model`` again to time the cache hit;
- converts it to fp32 and int4 with the real Olive path (``testing.convert_for_tests``);
- scores both with ``quality.evaluate`` on ``projects/quickstart/qa.jsonl`` and ``eval_text.txt``
  (greedy decoding through ``GenaiModel.chat``), int4 against the fp32 baseline.

Run:  .venv/bin/python benchmarks/bench_demo_model.py     (writes benchmarks/out/demo_model.{json,md})
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out"
QUICKSTART = ROOT / "projects" / "quickstart"
PRECISIONS = ("fp32", "int4")


def train(cache: Path) -> dict:
    from devkit import demo

    load_before = os.getloadavg()[0]
    wall = time.perf_counter()
    hf = demo.build_demo_model(cache, force=True)
    wall = time.perf_counter() - wall
    hit = time.perf_counter()
    assert demo.build_demo_model(cache) == hf
    hit = time.perf_counter() - hit
    record = demo.read_training_record(hf)
    return {"hf_dir": str(hf), "build_s": round(wall, 1), "train_s": record.train_s, "train_cpu_s": record.train_cpu_s,
            "cache_hit_s": round(hit, 3), "parameters": record.parameters, "vocab_size": record.vocab_size,
            "examples": record.examples, "steps": record.steps, "final_loss": record.final_loss,
            "threads": record.config["threads"], "load_before": round(load_before, 2),
            "load_after": round(os.getloadavg()[0], 2)}


def score(hf: Path, work: Path) -> dict:
    from devkit.testing import convert_for_tests
    from mlflow_slmops.measure import quality

    dirs = {p: convert_for_tests(hf, work / p, p) for p in PRECISIONS}
    out, answers = {}, {}
    for p in PRECISIONS:
        res = quality.evaluate(dirs[p], QUICKSTART / "eval_text.txt", QUICKSTART / "qa.jsonl",
                               baseline_dir=None if p == "fp32" else dirs["fp32"], probes=())
        answers[p] = [r["answer"] for r in res.qa_rows]
        json_rows = [r for r in res.qa_rows if r["match"] == "json_keys"]
        tool_rows = [r for r in res.qa_rows if r["match"] == "tool_call"]
        text_rows = [r for r in res.qa_rows if r["match"] not in ("json_keys", "tool_call")]
        out[p] = {"qa_accuracy": res.qa_accuracy, "format_valid_rate": res.format_valid_rate,
                  "fact_accuracy": sum(r["correct"] for r in text_rows) / len(text_rows),
                  "json_format_valid_rate": sum(r["format_valid"] for r in json_rows) / len(json_rows),
                  "tool_call_valid_rate": res.tool_call_valid_rate,
                  "tool_call_correct": sum(r["correct"] for r in tool_rows) / len(tool_rows),
                  "counts": {"qa": len(res.qa_rows), "facts": len(text_rows), "json": len(json_rows),
                             "tool": len(tool_rows)},
                  "perplexity": res.perplexity, "kl_div": res.kl_div, "top1_agreement": res.top1_agreement,
                  "wrong": [(r["question"], r["expected"], r["answer"]) for r in res.qa_rows if not r["correct"]]}
    out["answers_differing"] = sum(a != b for a, b in zip(answers["fp32"], answers["int4"]))
    return out


def markdown(r: dict) -> str:
    t, f, q = r["train"], r["quality"]["fp32"], r["quality"]["int4"]
    n = f["counts"]
    rows = [
        "| measure | value |", "|---|---|",
        f"| parameters | {t['parameters']:,} (vocab {t['vocab_size']}) |",
        f"| training examples / optimizer steps | {t['examples']} / {t['steps']} |",
        f"| training ({t['threads']} thread) | {t['train_s']} s wall, {t['train_cpu_s']} s CPU (whole build "
        f"{t['build_s']} s; load average {t['load_before']} before, {t['load_after']} after) |",
        f"| second call (cache hit) | {t['cache_hit_s']} s |",
        "", f"| variant | qa_accuracy ({n['qa']}) | facts correct ({n['facts']}) | JSON format valid ({n['json']}) "
        f"| tool_call_valid_rate ({n['tool']}) | tool calls correct ({n['tool']}) | format_valid_rate "
        "| perplexity | kl_div | top1_agreement |", "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in (("fp32", f), ("int4", q)):
        kl = "-" if m["kl_div"] is None else f"{m['kl_div']:.4f}"
        top1 = "-" if m["top1_agreement"] is None else f"{m['top1_agreement']:.3f}"
        rows.append(f"| {name} | {m['qa_accuracy']:.3f} | {m['fact_accuracy']:.3f} | {m['json_format_valid_rate']:.3f} "
                    f"| {m['tool_call_valid_rate']:.3f} | {m['tool_call_correct']:.3f} "
                    f"| {m['format_valid_rate']:.3f} | {m['perplexity']:.3f} | {kl} | {top1} |")
    differing = r["quality"]["answers_differing"]
    rows.append(f"\nint4 and fp32 give different answers to {differing} of {n['qa']} questions.")
    return "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: a temp folder)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-demo-"))
    result = {"train": train(work / "cache")}
    result["quality"] = score(Path(result["train"]["hf_dir"]), work / "genai")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "demo_model.json").write_text(json.dumps(result, indent=2))
    md = markdown(result)
    (OUT / "demo_model.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
