"""Build a Hugging Face folder with Qwen2.5-0.5B's exact shape and random weights (no download).

Shape of Qwen/Qwen2.5-0.5B-Instruct: hidden 896, 24 layers, 14 attention heads, 2 KV heads, intermediate 4864,
vocab 151936, tied embeddings, bf16 weights, 32768 positions: 494M parameters. The tokenizer is a small
byte-level BPE trained here; it is smaller than vocab_size, which the builder and genai accept (the extra
rows of the embedding are never looked up). Only conversion and speed are measured on this model, never
quality, so random weights are fine.

Run:  .venv/bin/python benchmarks/make_qwen05_shape.py [--out benchmarks/out/qwen05-shape] [--force]

`build_shape` builds any Qwen2 shape the same way, optionally as sharded safetensors (benchmarks/bench_large_sweep.py
uses it for a Qwen2.5-1.5B shape).
"""

from __future__ import annotations

import argparse
import json
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
    return build_shape(out, QWEN05_SHAPE, force=force)


def build_shape(out: Path, shape: dict, *, force: bool = False, max_shard_size: str | None = None) -> Path:
    """A Qwen2.5-style folder of this shape (keys as QWEN05_SHAPE), random bf16 weights; reused when complete.

    Args:
        max_shard_size: save sharded safetensors of at most this size ("1GB"); None writes one model.safetensors.
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from devkit.toymodel import (
        ARCHS,
        DEFAULT_CORPUS,
        build_config,
        build_tiny_model,
        save_tokenizer,
        train_tokenizer,
    )

    if _weights_complete(out) and (out / "config.json").is_file() and not force:
        return out
    shutil.rmtree(out, ignore_errors=True)
    tok = train_tokenizer(DEFAULT_CORPUS * 4, TOKENIZER_VOCAB, "qwen2")
    spec = ARCHS["qwen2"]
    s = shape
    bos_id, eos_id = tok.token_to_id(spec.bos), tok.token_to_id(spec.eos)
    config = build_config("qwen2", s["vocab_size"], s["hidden"], s["layers"], s["heads"], s["kv_heads"],
                          s["intermediate"], s["max_positions"], bos_id, eos_id)
    config.rope_theta = QWEN25_ROPE_THETA
    if isinstance(getattr(config, "rope_parameters", None), dict):  # transformers 5 reads it from here
        config.rope_parameters["rope_theta"] = QWEN25_ROPE_THETA
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)  # the released checkpoints are bf16
    model.config.torch_dtype = "bfloat16"
    if max_shard_size is None:
        build_tiny_model(out, "qwen2", tokenizer=tok, model=model, max_positions=s["max_positions"])
        return out
    # build_tiny_model saves one shard; the same three files, with the weights sharded as the Hub's are.
    out.mkdir(parents=True)
    save_tokenizer(tok, out, "qwen2", model_max_length=s["max_positions"])
    model.save_pretrained(str(out), max_shard_size=max_shard_size)
    GenerationConfig(bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=eos_id).save_pretrained(str(out))
    return out


def _weights_complete(out: Path) -> bool:
    """One model.safetensors, or an index whose every shard is on disk."""
    if (out / "model.safetensors").is_file():
        return True
    index = out / "model.safetensors.index.json"
    if not index.is_file():
        return False
    shards = set(json.loads(index.read_text())["weight_map"].values())
    return all((out / name).is_file() for name in shards)


def param_count_m(out: Path) -> float:
    from safetensors import safe_open

    total = 0
    for shard in sorted(out.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
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
