"""Bits per weight: what a variant spends on each parameter of the model it was converted from.

``bits_per_weight = weight bytes x 8 / parameters``. The weight bytes are the decoder's initializers, the rotary
cos/sin tables left out (the builder computes them; they are not weights); the parameters are counted in the
Hugging Face source's safetensors headers, so a tied lm_head counts once, as the source stores it. fp32 comes to
about 32; a variant that keeps a separate copy of a tied lm_head pays for it here.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from mlflow_slmops import errors
from mlflow_slmops.genai import modeldir

# Initializers the onnxruntime-genai builder adds that hold no model weights.
NON_WEIGHT_INITIALIZERS = ("cos_cache", "sin_cache")
_HEADER_LEN_BYTES = 8  # a safetensors file opens with its JSON header's length, little-endian u64
_METADATA_KEY = "__metadata__"


def parameter_count(hf_model_dir: str | Path) -> int:
    """The number of parameters in a Hugging Face folder's safetensors files, read from their headers only.

    Raises:
        SlmopsError: the folder has no safetensors weights, or a header is unreadable.
    """
    files = sorted(Path(hf_model_dir).glob("*.safetensors"))
    if not files:
        raise errors.SlmopsError(f"{hf_model_dir} has no *.safetensors weights to count parameters in",
                                 "save the model with save_pretrained(safe_serialization=True)")
    total = 0
    for path in files:
        try:
            with open(path, "rb") as fh:
                (length,) = struct.unpack("<Q", fh.read(_HEADER_LEN_BYTES))
                header = json.loads(fh.read(length))
        except (OSError, struct.error, ValueError) as exc:
            raise errors.SlmopsError(f"cannot read the safetensors header of {path} ({exc})",
                                     "re-save the model with save_pretrained")
        total += sum(math.prod(t["shape"]) for k, t in header.items() if k != _METADATA_KEY)
    return total


def weight_bytes(genai_dir: str | Path) -> int:
    """Bytes of the decoder's weights: every initializer but the builder's rotary tables."""
    return modeldir.onnx_weight_bytes(genai_dir, exclude=NON_WEIGHT_INITIALIZERS)


def bits_per_weight(genai_dir: str | Path, parameters: int) -> float:
    """Weight bytes x 8 over the source's parameter count."""
    return weight_bytes(genai_dir) * 8 / parameters
