"""Helpers for tests and demos: build a genai folder from an HF folder with the product's own converter."""

from __future__ import annotations

from pathlib import Path

# Fixtures convert into sibling folders; one cache beside them lets them share the fp32 export.
TEST_CACHE_DIRNAME = ".slmops-cache"


def convert_for_tests(hf_dir: str | Path, out: str | Path, preset: str) -> Path:
    """Convert one preset of hf_dir into out (a genai folder) with mlflow_slmops.convert, as the product does."""
    from mlflow_slmops.convert import convert_variant
    from mlflow_slmops.variants import PRESETS

    out = Path(out)
    result = convert_variant(hf_dir, PRESETS[preset], out, cache_dir=out.parent / TEST_CACHE_DIRNAME)
    if result.status != "ok":
        raise RuntimeError(f"converting {hf_dir} to {preset} failed: {result.error}")
    return out
