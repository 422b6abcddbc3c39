"""Architecture coverage: every ``architectures.TINY_SHAPES`` case built with a realistic vocabulary, converted to fp32
by ``slmops``'s own conversion and by the onnxruntime-genai builder alone, and compared with PyTorch.

Each case is a small random-weight model (``toymodel.build_tiny_architecture``) with a ``--vocab``-row embedding and
lm_head (default 151936, Qwen2.5's). Its fp32 export's logits over ``--tokens`` random token ids are compared with
the Hugging Face model's in PyTorch (fp32, one forward pass each): max |logit diff|, mean KL(PyTorch || export),
top-1 agreement. "Builder alone" is the same export without ``architectures.builder_fixes()``: what stock
``olive run`` gives.

Run:  .venv/bin/python benchmarks/bench_architectures.py   (writes docs/architectures.md and
      benchmarks/out/architectures/results.json; --vocab 1024 --no-doc for a quick look)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import sys
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mlflow_slmops.convert import architectures as A  # noqa: E402

WORK = ROOT / "benchmarks" / "out" / "architectures"
DOC = ROOT / "docs" / "architectures.md"
DEFAULT_VOCAB = 151936
DEFAULT_TOKENS = 200
TOKEN_SEED = 0
TOOLS = ("onnxruntime-genai", "olive-ai", "onnxruntime", "transformers", "torch")
GIB = 2 ** 30


def token_ids(vocab: int, count: int) -> list[int]:
    return [int(i) for i in np.random.default_rng(TOKEN_SEED).integers(0, vocab, count)]


def pytorch_logits(hf_dir: Path, ids: list[int]) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def genai_logits(folder: Path, ids: list[int]) -> np.ndarray:
    import onnxruntime_genai as og

    from mlflow_slmops.measure.quality import chunk_logits

    return chunk_logits(og.Model(str(folder)), ids)


def ours(hf_dir: Path, out: Path, cache: Path) -> tuple[Path | None, str]:
    """Convert with slmops; returns the folder, or None and the refusal or failure."""
    from mlflow_slmops.convert import convert_variant
    from mlflow_slmops.errors import SlmopsError
    from mlflow_slmops.variants import resolve_variants

    shutil.rmtree(out, ignore_errors=True)
    try:
        result = convert_variant(hf_dir, resolve_variants("fp32", None)[0], out, cache_dir=cache)
    except SlmopsError as exc:
        return None, f"refused: {exc.message}"
    return (out, "") if result.status == "ok" else (None, f"failed: {result.error}")


def builder_alone(hf_dir: Path, out: Path) -> tuple[Path | None, str]:
    """The builder's own fp32 export, as Olive's ModelBuilder pass calls it, without our fixes."""
    from onnxruntime_genai.models.builder import create_model

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    try:
        with open(out / "builder.log", "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            create_model(model_name=str(hf_dir), input_path=str(hf_dir), output_dir=str(out), precision="fp32",
                         execution_provider="cpu", cache_dir=str(out / "cache"), filename="model.onnx")
    except Exception as exc:  # noqa: BLE001 - whatever the builder raises is the finding
        return None, f"{type(exc).__name__}: {exc}".splitlines()[0]
    return out, ""


def measure(case: str, args, tokenizer) -> dict:
    from devkit.toymodel import build_tiny_architecture

    shape = A.TINY_SHAPES[case]
    start = time.perf_counter()
    hf_dir = build_tiny_architecture(WORK / "hf" / case, case, vocab_size=args.vocab, tokenizer=tokenizer)
    ids = token_ids(args.vocab, args.tokens)
    reference = None
    row = {"case": case, "architecture": shape.architecture, "why": shape.why,
           "fixes": A.fixes_for(json.loads((hf_dir / "config.json").read_text()))}
    for label, (folder, error) in (("ours", ours(hf_dir, WORK / "ours" / case, WORK / "cache")),
                                   ("builder", builder_alone(hf_dir, WORK / "builder" / case))):
        if folder is None:
            row[label] = {"error": error}
            continue
        reference = pytorch_logits(hf_dir, ids) if reference is None else reference
        got = A.Divergence.between(reference, genai_logits(folder, ids))
        row[label] = {"max_abs_diff": got.max_abs_diff, "mean_kl": got.mean_kl, "top1": got.top1,
                      "matches": got.matches()}
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def machine() -> dict:
    import psutil

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(psutil.virtual_memory().total / GIB, 1),
            "python": platform.python_version(), **{pkg: version(pkg) for pkg in TOOLS},
            "date": time.strftime("%Y-%m-%d")}


def _figures(cell: dict) -> tuple[str, str, str, str]:
    if "error" in cell:
        converts = "refused" if cell["error"].startswith("refused") else "no"
        return converts, "", "", ""
    return ("yes", f"{cell['max_abs_diff']:.2g}", f"{cell['mean_kl']:.2g}", f"{cell['top1']:.3f}")


def _builder_cell(cell: dict) -> str:
    if "error" in cell:
        return f"fails: `{cell['error'][:90]}`"
    verdict = "matches" if cell["matches"] else "**differs**"
    return f"{verdict} ({cell['max_abs_diff']:.2g}, top-1 {cell['top1']:.3f})"


def _note(row: dict) -> str:
    cell = row["ours"]
    if "error" in cell:
        return "refused before any work" if cell["error"].startswith("refused") else cell["error"]
    flagged = [g for g in A.BUILDER_GAPS if g.case == row["case"]]
    if flagged:
        return f"**flagged** by the export guard: {flagged[0].condition}"
    return f"fixed: {', '.join(row['fixes'])}" if row["fixes"] else ""


def markdown(rows: list[dict], info: dict, args) -> str:
    lines = [
        "# Architectures",
        "",
        "<!-- Generated by benchmarks/bench_architectures.py; edit that script, not this page. -->",
        "",
        "Every decoder architecture the onnxruntime-genai 0.14.1 model builder lists, built as a small "
        "random-weight model, converted to fp32 by `slmops` and compared with the Hugging Face model in PyTorch "
        "on the same tokens. The per-architecture knowledge behind this page is `mlflow_slmops/convert/architectures.py`; "
        "`tests/test_architectures.py` checks the same matrix on every `make test` (with a 1024-token vocabulary).",
        "",
        f"Each model has {A.TINY_BASE['num_hidden_layers']} layers (more where noted), hidden size 64 to 160 and a "
        f"{args.vocab}-token embedding and lm_head; {args.tokens} random token ids, one forward pass each, fp32. "
        "A conversion *matches* when no logit differs by more than "
        f"{A.MATCH_MAX_ABS_DIFF:g} and the top-1 token agrees at {A.MATCH_MIN_TOP1:g} of positions or more. "
        "*Builder alone* is the same export without the conversion's fixes, which is what stock "
        "`olive run --config olive_config.json` builds.",
        "",
        "| Architecture | Case | Converts | max \\|logit diff\\| | mean KL (nats) | top-1 agreement | Note | "
        "Builder alone |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        converts, diff, kl, top1 = _figures(row["ours"])
        lines.append(f"| `{row['architecture']}` | {row['case']} | {converts} | {diff} | {kl} | {top1} | "
                     f"{_note(row)} | {_builder_cell(row['builder'])} |")
    lines += ["", f"Measured {info['date']} on {info['cpu']} ({info['cores']} cores, "
              f"{info['ram_gib']} GiB), Python {info['python']}, "
              + ", ".join(f"{pkg} {info[pkg]}" for pkg in TOOLS) + ".", ""]
    lines += _fixes_section() + _refused_section() + _flagged_section(rows) + _untested_section() + _shapes(rows)
    return "\n".join(lines) + "\n"


def _fixes_section() -> list[str]:
    lines = [
        "## What the conversion fixes",
        "",
        "Each fix wraps one method of one builder class while `slmops` runs Olive (`architectures.builder_fixes()`), "
        "and is named in the variant's `olive_config.json` (`extra_options.slmops_builder_fixes` of the "
        "ModelBuilder pass; the builder ignores it, Olive's cache keys on it). Stock `olive run` on that file "
        "rebuilds the builder's own export: see *Builder alone* above. The fixes apply only to the builder they "
        f"were written and checked against (onnxruntime-genai {A.VERIFIED_BUILDER_VERSION}, "
        "`architectures.VERIFIED_BUILDER_VERSION`); with any other the builder runs as it is.",
        "",
        "| Fix | Architectures | What the builder does wrong | Upstream |",
        "|---|---|---|---|",
    ]
    for fix in A.BUILDER_FIXES:
        lines.append(f"| `{fix.name}` | {', '.join(f'`{a}`' for a in fix.architectures)} | {fix.gap} | "
                     f"{fix.upstream} |")
    return lines + [""]


def _refused_section() -> list[str]:
    lines = [
        "## Refused",
        "",
        "`slmops convert` and `slmops sweep` stop before any work (no hashing, no Olive run, no output folder) "
        "with one line: `<architecture> cannot be converted here: <reason>; convert a text-only causal LM of "
        f"another architecture (see {A.DOCS}).`",
        "",
        "| Architecture | Reason |",
        "|---|---|",
    ]
    by_reason: dict[str, list[str]] = {}
    for gap in (g for g in A.BUILDER_GAPS if g.action == A.REFUSE):
        by_reason.setdefault(gap.reason, []).append(f"`{gap.architecture}`")
    lines += [f"| {', '.join(archs)} | {reason} |" for reason, archs in by_reason.items()]
    return lines + [""]


def _flagged_section(rows: list[dict]) -> list[str]:
    lines = [
        "## Converted, but flagged",
        "",
        "These convert, so they are not refused: `slmops convert` logs a warning naming the gap, and the sweep's "
        "export guard (docs/metrics.md) measures the fp32 variant against the source model and tags every run of "
        "the sweep `slmops.export_mismatch=true`; `slmops promote` then refuses it unless given "
        "`--allow-export-mismatch`. The figures recorded in `architectures.BUILDER_GAPS` are the ones above; "
        "`tests/test_architectures.py` fails if the gap closes.",
        "",
        "| Architecture | When | Why it differs | Recorded |",
        "|---|---|---|---|",
    ]
    measured = {row["case"]: row["ours"] for row in rows}
    for gap in (g for g in A.BUILDER_GAPS if g.action == A.FLAG):
        cell = measured.get(gap.case, {})
        recorded = gap.measured.summary().replace("|", "\\|") if gap.measured else "not yet"
        stale = "" if not cell or "error" in cell or gap.measured is None or \
            abs(np.log10(cell["max_abs_diff"] / gap.measured.max_abs_diff)) < 1 else " (stale: re-record)"
        lines.append(f"| `{gap.architecture}` | {gap.condition} | {gap.reason} | {recorded}{stale} |")
    return lines + [""]


def _untested_section() -> list[str]:
    by_reason: dict[str, list[str]] = {}
    for arch, why in sorted(A.UNTESTED.items()):
        by_reason.setdefault(why, []).append(f"`{arch}`")
    lines = ["## Not built here", "", "| Architectures | Why |", "|---|---|"]
    lines += [f"| {', '.join(archs)} | {why} |" for why, archs in by_reason.items()]
    return lines + [""]


def _shapes(rows: list[dict]) -> list[str]:
    lines = [
        "## The shapes",
        "",
        f"Over the base shape ({', '.join(f'{k} {v}' for k, v in A.TINY_BASE.items())}), each case keeps what of "
        "the real models the builder or its kernels depend on. Where the tiny shape itself would break a kernel, "
        "the ratio of the real model is kept instead: the GroupQueryAttention kernel needs the cos/sin cache "
        "width (rotary dimensions / 2) to be a multiple of 8, so heads of 16 with partial rotary 0.75 or 0.5 fail "
        "to run where Phi-4-mini's heads of 128 do not.",
        "",
        "| Case | Config over the base | Why |",
        "|---|---|---|",
    ]
    for row in rows:
        shape = A.TINY_SHAPES[row["case"]]
        config = json.dumps(shape.config, separators=(", ", ": "))
        config = config if len(config) <= 160 else config[:157] + "..."
        lines.append(f"| {row['case']} | `{config}` | {shape.why} |")
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=DEFAULT_VOCAB)
    parser.add_argument("--tokens", type=int, default=DEFAULT_TOKENS)
    parser.add_argument("--cases", default=",".join(A.TINY_SHAPES), help="comma-separated TINY_SHAPES keys")
    parser.add_argument("--no-doc", action="store_true", help=f"do not rewrite {DOC.relative_to(ROOT)}")
    parser.add_argument("--render", action="store_true",
                        help="rewrite the page from the last run's results.json, measuring nothing")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.render:
        saved = json.loads((WORK / "results.json").read_text())
        args.vocab, args.tokens = saved["vocab"], saved["tokens"]
        DOC.write_text(markdown(saved["rows"], saved["machine"], args), encoding="utf-8")
        print(f"wrote {DOC}")
        return

    from devkit.toymodel import DEFAULT_CORPUS, TOKENIZER_VOCAB_CAP, train_tokenizer

    tokenizer = train_tokenizer(DEFAULT_CORPUS * 4, min(args.vocab, TOKENIZER_VOCAB_CAP), "qwen2")
    rows = []
    for case in args.cases.split(","):
        row = measure(case, args, tokenizer)
        print(json.dumps({k: row[k] for k in ("case", "ours", "builder", "seconds")}), flush=True)
        rows.append(row)
    info = machine()
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / "results.json").write_text(json.dumps({"machine": info, "vocab": args.vocab, "tokens": args.tokens,
                                                   "rows": rows}, indent=2))
    if not args.no_doc:
        DOC.write_text(markdown(rows, info, args), encoding="utf-8")
        print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
