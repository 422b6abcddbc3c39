"""Helpers for tests and demos: build a genai folder from an HF folder with the real Olive path."""

from __future__ import annotations

from pathlib import Path


def convert_for_tests(hf_dir: str | Path, out: str | Path, preset: str) -> Path:
    """Convert one preset of hf_dir into out (a genai folder) through Olive, as the product does."""
    from olive.workflows import run as olive_run

    out = Path(out)
    passes: dict = {"builder": {"type": "ModelBuilder", "precision": "fp32"}}
    if preset == "int4":
        passes["quantize"] = {"type": "OnnxBlockWiseRtnQuantization", "bits": 4, "block_size": 32,
                              "is_symmetric": True, "accuracy_level": 4}
        passes["keep_logits"] = {"type": "GraphSurgeries", "surgeries": [
            {"surgeon": "RenameOutputs", "old_names": ["logits_Q4"], "new_names": ["logits"]}]}
    config = {
        "input_model": {"type": "HfModel", "model_path": str(hf_dir)},
        "systems": {"local": {"type": "LocalSystem", "accelerators": [
            {"device": "cpu", "execution_providers": ["CPUExecutionProvider"]}]}},
        "passes": passes, "host": "local", "target": "local",
        "cache_dir": str(out.parent / ".olive-cache"), "output_dir": str(out), "log_severity_level": 3,
    }
    olive_run(config)
    return out
