"""Build a Hugging Face folder with Qwen2.5-0.5B's exact shape and random weights (no download).

Shape of Qwen/Qwen2.5-0.5B-Instruct: hidden 896, 24 layers, 14 attention heads, 2 KV heads, intermediate 4864,
vocab 151936, tied embeddings, bf16 weights, 32768 positions: 494M parameters. The tokenizer is a small
byte-level BPE trained here; it is smaller than vocab_size, which the builder and genai accept (the extra
rows of the embedding are never looked up). Only conversion and speed are measured on this model, never
quality, so random weights are fine.

Run:  .venv/bin/python benchmarks/make_qwen05_shape.py [--out benchmarks/out/qwen05-shape] [--force]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "out" / "qwen05-shape"
QWEN05_SHAPE = {"vocab_size": 151936, "hidden": 896, "layers": 24, "heads": 14, "kv_heads": 2,
                "intermediate": 4864, "max_positions": 32768}
QWEN25_ROPE_THETA = 1000000.0
TOKENIZER_VOCAB = 4096
EXPECTED_PARAMS_M = 494


def build(out: Path = DEFAULT_OUT, force: bool = False) -> Path:
    """Build the folder once; reuse it when it already holds a complete model."""
    import torch
    from transformers import AutoModelForCausalLM

    from mlflow_slmops.toymodel import ARCHS, DEFAULT_CORPUS, build_config, build_tiny_model, train_tokenizer

    if (out / "model.safetensors").is_file() and (out / "config.json").is_file() and not force:
        return out
    shutil.rmtree(out, ignore_errors=True)
    tok = train_tokenizer(DEFAULT_CORPUS * 4, TOKENIZER_VOCAB, "qwen2")
    spec = ARCHS["qwen2"]
    s = QWEN05_SHAPE
    config = build_config("qwen2", s["vocab_size"], s["hidden"], s["layers"], s["heads"], s["kv_heads"],
                          s["intermediate"], s["max_positions"], tok.token_to_id(spec.bos), tok.token_to_id(spec.eos))
    config.rope_theta = QWEN25_ROPE_THETA
    if isinstance(getattr(config, "rope_parameters", None), dict):  # transformers 5 reads it from here
        config.rope_parameters["rope_theta"] = QWEN25_ROPE_THETA
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)  # the released checkpoint is bf16
    model.config.torch_dtype = "bfloat16"
    build_tiny_model(out, "qwen2", tokenizer=tok, model=model, max_positions=s["max_positions"])
    return out


def param_count_m(out: Path) -> float:
    from safetensors import safe_open

    total = 0
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        for key in f.keys():
            shape = f.get_slice(key).get_shape()
            n = 1
            for d in shape:
                n *= d
            total += n
    return total / 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--force", action="store_true", help="rebuild even if the folder exists")
    args = parser.parse_args()
    out = build(args.out, args.force)
    params = param_count_m(out)
    print(f"{out}: {params:.1f}M parameters")
    return 0 if round(params) == EXPECTED_PARAMS_M else 1


if __name__ == "__main__":
    sys.exit(main())
