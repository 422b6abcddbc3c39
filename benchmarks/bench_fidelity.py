"""Measurement fidelity on a Qwen2.5-0.5B-shaped model: do our benchmark and perplexity harnesses measure
what a bare onnxruntime-genai loop measures, and how close is each variant's decode to the memory roofline?

All figures come from one run on one machine, side by side:
- decode tok/s and TTFT of ``benchmark.run_benchmark`` (fresh subprocess) against a bare genai loop
  (this process), interleaved over several rounds so load from other processes hits both alike;
- decode roofline efficiency = decode tok/s x bytes streamed per token / copy bandwidth (numpy, same run);
- perplexity throughput (tokens/s) of ``quality.score_text`` against bare forward passes over the same chunks.

Run:  .venv/bin/python benchmarks/bench_fidelity.py            (writes benchmarks/out/fidelity.{json,md})
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from mlflow_slmops import variants

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out"
# Qwen2.5-0.5B's shape: 494M parameters with tied embeddings.
QWEN05_SHAPE = dict(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab_size=151936,
                    max_positions=32768)
BANDWIDTH_BYTES = 512 << 20
BANDWIDTH_TRIALS = 7
GB = 1e9
MS = 1000.0


def build_hf_model(work: Path) -> Path:
    """The HF folder: benchmarks/make_qwen05_shape.py's if it is there, else built here with the same shape."""
    hf = work / "hf-qwen05"
    if (hf / "config.json").is_file():
        return hf
    from devkit.toymodel import build_tiny_model

    print(f"building {hf} ...", flush=True)
    return build_tiny_model(hf, "qwen2", **QWEN05_SHAPE)


def convert(hf: Path, work: Path, names: str) -> dict[str, str]:
    from mlflow_slmops.convert import convert_variants
    from mlflow_slmops.variants import resolve_variants

    specs = resolve_variants(names, None)
    # A folder from an earlier run of this script is reused as it is: measuring, not converting, is the point.
    done = {s.name: str(work / "variants" / s.name) for s in specs
            if (work / "variants" / s.name / "genai_config.json").is_file()}
    todo = [s for s in specs if s.name not in done]
    results = convert_variants(hf, todo, work / "variants", cache_dir=work / "cache", progress=False) if todo else []
    failed = [f"{r.spec.name}: {r.error}" for r in results if r.status != "ok"]
    if failed:
        print("conversion failed:", *failed, sep="\n  ", file=sys.stderr)
    done.update({r.spec.name: r.output_dir for r in results if r.status == "ok"})
    return {s.name: done[s.name] for s in specs if s.name in done}


def copy_bandwidth() -> float:
    """STREAM-style copy bandwidth in GB/s: (bytes read + bytes written) / time, best of several trials."""
    src = np.ones(BANDWIDTH_BYTES // 8, dtype=np.float64)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(BANDWIDTH_TRIALS):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best / GB


def streamed_bytes(model_dir: str) -> tuple[int, int]:
    """(all initializer bytes, bytes a decode step streams): the second leaves out tables only read by Gather
    (the embedding table: one row per token)."""
    import onnx

    from mlflow_slmops.genai import modeldir

    total = modeldir.onnx_weight_bytes(model_dir)
    cfg = modeldir.read_genai_config(model_dir)
    graph = onnx.load(str(Path(model_dir) / cfg["model"]["decoder"]["filename"]), load_external_data=False).graph
    consumers: dict[str, set[str]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    gather_only = 0
    for init in graph.initializer:
        if consumers.get(init.name) == {"Gather"}:
            gather_only += _initializer_bytes(init)
    return total, total - gather_only


def _initializer_bytes(init) -> int:
    import onnx

    from mlflow_slmops.genai.modeldir import tensor_bytes

    if init.data_location == onnx.TensorProto.EXTERNAL:
        return int({e.key: e.value for e in init.external_data}.get("length", 0))
    size = tensor_bytes(init.data_type, init.dims)
    return size if size is not None else len(init.raw_data)


def bare_loop(model, ids: list[int], gen_len: int, warmup: int, repeats: int) -> dict:
    """The reference: benchmark_e2e.py's loop, nothing else."""
    import onnxruntime_genai as og

    ttft, decode = [], []
    for i in range(warmup + repeats):
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(ids) + gen_len, min_length=len(ids) + gen_len)
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens(ids)
        gen.generate_next_token()
        t1 = time.perf_counter()
        for _ in range(gen_len - 1):
            gen.generate_next_token()
        t2 = time.perf_counter()
        if i >= warmup:
            ttft.append((t1 - t0) * MS)
            decode.append((gen_len - 1) / (t2 - t1))
    return {"ttft_ms": ttft, "decode_tok_s": decode}


def bare_forward(model, chunks: list[list[int]]) -> float:
    """Seconds for one bare forward pass per chunk, reading the full logits out."""
    import onnxruntime_genai as og

    t0 = time.perf_counter()
    for chunk in chunks:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(chunk))
        gen = og.Generator(model, params)
        gen.append_tokens(chunk)
        gen.get_output("logits")
    return time.perf_counter() - t0


def measure_variant(name: str, folder: str, args, bandwidth: float) -> dict:
    import onnxruntime_genai as og

    from mlflow_slmops.measure import benchmark

    model = og.Model(folder)
    tok = og.Tokenizer(model)
    speed = _speed(name, folder, model, benchmark.prompt_ids(tok, args.prompt_len), args)
    ppl = _ppl_throughput(model, tok, args)
    total_bytes, stream = streamed_bytes(folder)
    return {"variant": name, "folder": folder, "weight_bytes": total_bytes, "streamed_bytes": stream,
            **speed, **ppl,
            "roofline_efficiency": speed["ours_decode_median"] * stream / (bandwidth * GB),
            "roofline_efficiency_best": speed["ours_decode_best"] * stream / (bandwidth * GB)}


def _speed(name: str, folder: str, model, ids: list[int], args) -> dict:
    """Bare loop (this process) and run_benchmark (fresh subprocess), alternating round by round."""
    from mlflow_slmops.measure import benchmark

    cfg = benchmark.BenchmarkConfig(prompt_len=args.prompt_len, gen_len=args.gen_len, warmup=args.warmup,
                                    repeats=args.repeats, prompt_lens=(args.prompt_len,),
                                    leak_generations=args.repeats)
    bare = {"ttft_ms": [], "decode_tok_s": []}
    ours = {"ttft_ms": [], "decode_tok_s": []}
    for r in range(args.rounds):
        print(f"  {name} speed round {r + 1}/{args.rounds}", flush=True)
        b = bare_loop(model, ids, args.gen_len, args.warmup, args.repeats)
        res = benchmark.run_benchmark(folder, cfg)
        for key in bare:
            bare[key] += b[key]
        ours["ttft_ms"] += [s.ttft_ms for s in res.samples]
        ours["decode_tok_s"] += [(args.gen_len - 1) / (s.decode_ms / MS) for s in res.samples]
    med = statistics.median
    alt = _alternating(model, ids, args)
    return {
        **alt,
        "bare_decode_mean": statistics.fmean(bare["decode_tok_s"]), "bare_decode_std": statistics.stdev(bare["decode_tok_s"]),
        "ours_decode_mean": statistics.fmean(ours["decode_tok_s"]), "ours_decode_std": statistics.stdev(ours["decode_tok_s"]),
        "ours_decode_median": med(ours["decode_tok_s"]), "ours_decode_best": max(ours["decode_tok_s"]),
        "decode_ratio_mean": statistics.fmean(ours["decode_tok_s"]) / statistics.fmean(bare["decode_tok_s"]),
        "decode_ratio_median": med(ours["decode_tok_s"]) / med(bare["decode_tok_s"]),
        "decode_ratio_best": max(ours["decode_tok_s"]) / max(bare["decode_tok_s"]),
        "bare_ttft_median": med(bare["ttft_ms"]), "ours_ttft_median": med(ours["ttft_ms"]),
        "ttft_ratio_median": med(ours["ttft_ms"]) / med(bare["ttft_ms"]),
        "ttft_ratio_best": min(ours["ttft_ms"]) / min(bare["ttft_ms"]),
        "speed_samples": {"bare": bare, "ours": ours},
    }


def _alternating(model, ids: list[int], args) -> dict:
    """Our timed generation (benchmark._generate) and the bare loop, alternating generation by generation in
    this process: isolates the harness from load drift, which the subprocess comparison cannot."""
    from mlflow_slmops.measure import benchmark

    bare_loop(model, ids, args.gen_len, args.warmup, 0)
    bare, ours = [], []
    for _ in range(args.rounds * args.repeats):
        bare.append(bare_loop(model, ids, args.gen_len, 0, 1)["decode_tok_s"][0])
        s = benchmark._generate(model, ids, args.gen_len)
        ours.append((args.gen_len - 1) / (s.decode_ms / MS))
    return {"alt_decode_ratio_median": statistics.median(ours) / statistics.median(bare),
            "alt_decode_ratio_mean": statistics.fmean(ours) / statistics.fmean(bare),
            "alt_samples": {"bare": bare, "ours": ours}}


def _ppl_throughput(model, tok, args) -> dict:
    """Bare forward passes against quality.score_text, alternating chunk by chunk so load drift hits both."""
    from mlflow_slmops import data as packaged_data
    from mlflow_slmops.measure import quality

    text = packaged_data.path(packaged_data.EVAL_TEXT).read_text()
    chunks = quality.text_chunks([int(t) for t in tok.encode(text)], args.chunk_tokens, args.ppl_chunks, "eval")
    bare_forward(model, chunks[:1])  # warm-ups, as the first of many chunks of a real evaluation would be
    quality.score_text(model, chunks[:1])
    bare_s = [[0.0] * args.rounds for _ in chunks]
    ours_s = [[0.0] * args.rounds for _ in chunks]
    for r in range(args.rounds):
        for i, chunk in enumerate(chunks):
            bare_s[i][r] = bare_forward(model, [chunk])
            t0 = time.perf_counter()
            quality.score_text(model, [chunk])
            ours_s[i][r] = time.perf_counter() - t0
    tokens = sum(len(c) for c in chunks)
    bare_total = sum(map(sum, bare_s)) / args.rounds
    ours_total = sum(map(sum, ours_s)) / args.rounds
    bare_best, ours_best = sum(map(min, bare_s)), sum(map(min, ours_s))
    return {"ppl_tokens": tokens, "bare_fwd_tok_s": tokens / bare_total, "ours_ppl_tok_s": tokens / ours_total,
            "ppl_ratio_mean": bare_total / ours_total, "ppl_ratio_best": bare_best / ours_best,
            "ppl_samples": {"bare_s": bare_s, "ours_s": ours_s}}


def machine() -> dict:
    import onnxruntime
    import onnxruntime_genai
    import psutil

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
            "onnxruntime_genai": onnxruntime_genai.__version__, "numpy": np.__version__}


def markdown(results: list[dict], info: dict) -> str:
    lines = [
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['ram_gib']} GiB RAM; onnxruntime "
        f"{info['onnxruntime']}, onnxruntime-genai {info['onnxruntime_genai']}. Copy bandwidth (numpy, "
        f"read + write, best of {BANDWIDTH_TRIALS}): {info['bandwidth_gb_s']:.1f} GB/s at the start, "
        f"{info['bandwidth_end_gb_s']:.1f} GB/s at the end. Load average (1 min) {info['load_start']:.1f} at the "
        f"start, {info['load_end']:.1f} at the end. Prompt {info['prompt_len']} tokens, {info['gen_len']} new "
        f"tokens, {info['rounds']} alternating rounds x {info['repeats']} repeats each side; perplexity over "
        f"{results[0]['ppl_tokens'] if results else 0} tokens, alternating chunk by chunk.",
        "",
        "| variant | decode tok/s bare | decode tok/s ours | ours/bare mean | median | best | alternating, median "
        "| TTFT ms bare | TTFT ms ours | ours/bare median | best | streamed MB/token | roofline eff. median | best "
        "| ppl tok/s bare fwd | ppl tok/s ours | ours/bare mean | best |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['variant']} | {r['bare_decode_mean']:.1f} ± {r['bare_decode_std']:.1f} "
            f"| {r['ours_decode_mean']:.1f} ± {r['ours_decode_std']:.1f} | {r['decode_ratio_mean']:.3f} "
            f"| {r['decode_ratio_median']:.3f} | {r['decode_ratio_best']:.3f} | {r['alt_decode_ratio_median']:.3f} "
            f"| {r['bare_ttft_median']:.0f} | {r['ours_ttft_median']:.0f} | {r['ttft_ratio_median']:.3f} "
            f"| {r['ttft_ratio_best']:.3f} | {r['streamed_bytes'] / 1e6:.0f} | {r['roofline_efficiency']:.0%} "
            f"| {r['roofline_efficiency_best']:.0%} | {r['bare_fwd_tok_s']:.0f} | {r['ours_ppl_tok_s']:.0f} "
            f"| {r['ppl_ratio_mean']:.3f} | {r['ppl_ratio_best']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=variants.DEFAULT_VARIANTS)
    parser.add_argument("--work", type=Path, default=OUT / "qwen05")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--gen-len", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chunk-tokens", type=int, default=128)
    parser.add_argument("--ppl-chunks", type=int, default=8)
    parser.add_argument("--prepare-only", action="store_true", help="Build and convert the model, measure nothing.")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    folders = convert(build_hf_model(args.work), args.work, args.variants)
    if args.prepare_only:
        print(json.dumps(folders, indent=2))
        return
    info = {**machine(), "load_start": os.getloadavg()[0], "bandwidth_gb_s": copy_bandwidth(),
            **{k: getattr(args, k) for k in ("prompt_len", "gen_len", "repeats", "rounds")}}
    print(f"copy bandwidth {info['bandwidth_gb_s']:.1f} GB/s", flush=True)
    results = [measure_variant(name, folder, args, info["bandwidth_gb_s"]) for name, folder in folders.items()]
    info["bandwidth_end_gb_s"], info["load_end"] = copy_bandwidth(), os.getloadavg()[0]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "fidelity.json").write_text(json.dumps({"machine": info, "results": results}, indent=2))
    table = markdown(results, info)
    (OUT / "fidelity.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
