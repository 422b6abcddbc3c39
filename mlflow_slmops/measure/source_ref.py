"""The source-model reference: the user's own Hugging Face model, run in PyTorch over the evaluation chunks.

Every variant, fp32 included, is scored against these logits (``docs/metrics.md``, "Fidelity to the source"),
so an export that is wrong shows as a large ``src_kl_max`` on fp32 instead of looking like a perfect baseline.

The reference is built once per model and evaluation text, in its own subprocess
(``python -m mlflow_slmops.source_ref``). The model is read from the dtype it was saved in (bf16, fp16 or fp32,
sharded or not) and computed in fp32. Each chunk's logits go to disk as one float32 ``.npy`` as soon as they
are computed, so the process holds one chunk at a time; the quality stage memory-maps them back one chunk at a
time. A finished reference is a folder whose ``meta.json`` was written last, published by one rename, and keyed
by the model's content hash, so a re-sweep or a ``--resume`` reuses it.

Example:
    >>> ref = build_reference("./my-finetuned-model", "eval.txt", cache_dir="~/.cache/mlflow-slmops")  # doctest: +SKIP
    >>> ref.meta["source_dtype"], len(ref.chunks)
    ('bfloat16', 9)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mlflow_slmops import errors
from mlflow_slmops.measure import worker
from mlflow_slmops.measure.worker import ProgressFn

WORKER_MODULE = "mlflow_slmops.measure.source_ref"
# Bumped when the folder's layout or the way logits are computed changes, so old references are not reused.
REFERENCE_VERSION = 1
REFERENCES_DIRNAME = "source-ref"
META_FILE = "meta.json"
CHUNKS_FILE = "chunks.json"
CHUNK_FILE = "chunk-{:04d}.npy"
PARTIAL_TAG = ".partial-"
# safetensors: an 8-byte little-endian header length, then the JSON header naming each tensor's dtype.
_SAFETENSORS_LEN_BYTES = 8
_SAFETENSORS_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}
_CONFIG_DTYPE_KEYS = ("dtype", "torch_dtype")
DEFAULT_TIMEOUT_S = 6 * 3600


@dataclass
class SourceReference:
    """A finished reference folder: its chunk token ids and what was measured building it."""

    path: Path
    chunks: list[list[int]]
    meta: dict

    def logits(self, index: int) -> Any:
        """Chunk ``index``'s source logits, (chunk length, vocab) float32, memory-mapped (nothing read yet)."""
        import numpy as np

        return np.load(self.path / CHUNK_FILE.format(index), mmap_mode="r")

    @classmethod
    def open(cls, path: str | Path) -> "SourceReference":
        path = Path(path)
        meta_path = path / META_FILE
        if not meta_path.is_file():
            raise errors.SlmopsError(f"{path} is not a finished source reference (no {META_FILE})",
                                     "build it again: run the sweep without --no-source-check")
        return cls(path, json.loads((path / CHUNKS_FILE).read_text()), json.loads(meta_path.read_text()))


@dataclass(frozen=True)
class ReferenceConfig:
    """How the evaluation text becomes chunks: the same settings the quality stage scores with."""

    chunk_tokens: int
    max_chunks: int | None = None
    trust_remote_code: bool = False


def saved_dtype(model_dir: str | Path) -> str:
    """The dtype the model's weights were saved in: the commonest safetensors dtype, else config.json's."""
    path = Path(model_dir)
    counts: Counter[str] = Counter()
    for shard in sorted(path.glob("*.safetensors")):
        for tensor in _safetensors_header(shard).values():
            if isinstance(tensor, dict) and "dtype" in tensor:
                counts[_SAFETENSORS_DTYPES.get(tensor["dtype"], tensor["dtype"].lower())] += 1
    if counts:
        return counts.most_common(1)[0][0]
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    for key in _CONFIG_DTYPE_KEYS:
        if isinstance(config.get(key), str):
            return config[key]
    return "float32"


def _safetensors_header(shard: Path) -> dict:
    with open(shard, "rb") as f:
        size = int.from_bytes(f.read(_SAFETENSORS_LEN_BYTES), "little")
        return json.loads(f.read(size))


def reference_key(input_hash: str, text: str, config: ReferenceConfig) -> str:
    """Content address of a reference: the model's files, the text, the chunking and the tool versions."""
    from importlib.metadata import version

    parts = {"input": input_hash, "text": hashlib.sha256(text.encode("utf-8")).hexdigest(),
             "config": asdict(config), "version": REFERENCE_VERSION,
             "tools": {pkg: version(pkg) for pkg in ("torch", "transformers")}}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def build_reference(model_dir: str | Path, text_path: str | Path, config: ReferenceConfig, *,
                    cache_dir: str | Path | None = None, on_progress: ProgressFn | None = None,
                    timeout_s: float | None = DEFAULT_TIMEOUT_S) -> SourceReference:
    """Build (or reuse) the source reference of a Hugging Face model over a text, in a fresh subprocess.

    Args:
        model_dir: the user's Hugging Face model folder (the conversion's input).
        text_path: the evaluation text, read as UTF-8.
        config: chunk size and count, as the quality stage will score them.
        cache_dir: the conversion cache; references live in its ``source-ref/`` folder.
        on_progress: called with (task, completed, total) per chunk.
        timeout_s: kill the worker after this many seconds.

    Raises:
        SlmopsError: the model cannot be loaded by transformers, or the text is shorter than one chunk.
    """
    from filelock import FileLock

    from mlflow_slmops import convert
    from mlflow_slmops.measure import quality

    text = quality.read_eval_text(text_path)
    cache_root = convert.check_cache_dir(cache_dir)
    root = cache_root / REFERENCES_DIRNAME
    # The cache root holds the per-file hash memo, so an unchanged multi-GB model is not read again.
    key = reference_key(convert.input_model_hash(model_dir, cache_root), text, config)
    final = root / key
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{key}.lock")):
        if (final / META_FILE).is_file():
            return SourceReference.open(final)
        partial = root / f"{key}{PARTIAL_TAG}{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        try:
            args = ["--model", str(model_dir), "--text", str(text_path), "--out", str(partial),
                    "--config", json.dumps(asdict(config))]
            outcome = worker.run_worker(WORKER_MODULE, args, worker.progress_events(on_progress), timeout_s)
            worker.raise_for_outcome(outcome, f"the source-model reference of {model_dir}")
            os.replace(partial, final)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return SourceReference.open(final)


# ---------------------------------------------------------------- worker side


def load_source_model(model_dir: str | Path, trust_remote_code: bool = False) -> Any:
    """The Hugging Face model, read from its saved dtype and upcast to fp32, in eval mode."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    # transformers 5 names the argument `dtype`; 4.x `torch_dtype`.
    dtype_arg = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code,
                                                     **{dtype_arg: torch.float32})
    except Exception as exc:  # transformers raises many types; the message is what the user needs
        raise errors.SlmopsError(
            f"transformers cannot load {model_dir} as a causal LM for the source check ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'no message'})",
            "fix the model folder, or pass --no-source-check to skip comparing variants with it")
    return model.eval()


def source_logits(model: Any, ids: list[int]) -> Any:
    """Logits for every position of one chunk, (len(ids), vocab) float32: one forward pass, no KV cache."""
    import numpy as np
    import torch

    with torch.inference_mode():
        out = model(input_ids=torch.tensor([ids], dtype=torch.long), use_cache=False)
    return np.ascontiguousarray(out.logits[0].float().numpy())


def source_chunks(model_dir: str | Path, text: str, config: ReferenceConfig, max_positions: int | None,
                  text_path: str | Path) -> list[list[int]]:
    """The text tokenized by the source model's own tokenizer, cut into the quality stage's chunks."""
    from transformers import AutoTokenizer

    from mlflow_slmops.measure import quality

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=config.trust_remote_code)
    ids = [int(t) for t in tokenizer(text)["input_ids"]]
    chunk_len = min(config.chunk_tokens, max_positions) if max_positions else config.chunk_tokens
    return quality.text_chunks(ids, chunk_len, config.max_chunks, text_path)


def write_reference(model_dir: str | Path, text_path: str | Path, config: ReferenceConfig, out: Path,
                    on_progress: ProgressFn | None = None) -> dict:
    """Worker body: tokenize, run the model chunk by chunk, write each chunk's logits, then meta.json."""
    import numpy as np

    from mlflow_slmops.measure import quality

    # VmHWM, not ru_maxrss: a worker started by vfork+exec inherits its parent's ru_maxrss on Linux.
    from mlflow_slmops.measure.benchmark import peak_rss_bytes

    start = time.perf_counter()
    text = quality.read_eval_text(text_path)
    model = load_source_model(model_dir, config.trust_remote_code)
    loaded = time.perf_counter()
    chunks = source_chunks(model_dir, text, config, getattr(model.config, "max_position_embeddings", None), text_path)
    out.mkdir(parents=True)
    (out / CHUNKS_FILE).write_text(json.dumps(chunks))
    vocab = None
    for i, chunk in enumerate(chunks):
        logits = source_logits(model, chunk)
        vocab = logits.shape[1]
        np.save(out / CHUNK_FILE.format(i), logits)
        del logits
        if on_progress:
            on_progress("source model chunks", i + 1, len(chunks))
    meta = {"model_dir": str(Path(model_dir).resolve()), "architecture": (model.config.architectures or ["?"])[0],
            "source_dtype": saved_dtype(model_dir), "compute_dtype": "float32",
            "parameters": sum(p.numel() for p in model.parameters()), "vocab_size": vocab,
            "chunks": len(chunks), "chunk_tokens": len(chunks[0]), "load_s": loaded - start,
            "seconds": time.perf_counter() - start,
            "peak_rss_mb": peak_rss_bytes() / 2**20,
            "version": REFERENCE_VERSION}
    (out / META_FILE).write_text(json.dumps(meta, indent=2))  # last: the folder is complete
    return meta


def _worker_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=WORKER_MODULE, description="internal: source-model reference worker")
    parser.add_argument("--model", required=True)
    parser.add_argument("--text", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--config", required=True)
    parser.add_argument("--json", required=True)
    args = parser.parse_args(argv)
    config = ReferenceConfig(**json.loads(args.config))
    return worker.run_guarded(
        lambda: write_reference(args.model, args.text, config, Path(args.out), worker.emit_progress), args.json)


if __name__ == "__main__":
    sys.exit(_worker_main())
