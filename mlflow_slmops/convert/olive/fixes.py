"""Correctness fixes to Olive passes, applied while our workflows run on the Olive version they were found on.

Unlike ``speedups`` (same bytes, faster), a fix changes what a pass writes: each one names the bug, and the
cache key of every variant it changes carries its name (``fixes_for``), so no entry built without it is reused.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from mlflow_slmops.convert.olive import speedups

# The Olive release the fixes below were written against; on any other Olive they are not applied.
FIXED_OLIVE_VERSION = "0.13.0"
HQQ_LAYOUT = "hqq-matmulnbits-layout"


def fixes_for(spec) -> list[str]:
    """The names of the fixes that change what this variant's workflow writes."""
    return [HQQ_LAYOUT] if spec.precision == "int4" and spec.algo == "hqq" else []


def hqq_matmulnbits_layout(self, b_ndarray, block_size: int, axis: int):
    """``OnnxHqqQuantization._quantize_internal_numpy`` writing the layout MatMulNBits reads.

    Olive 0.13 quantizes the ONNX weight B (shape [K, N]) with HQQ along axis 0 of a [block, -1] view, so a
    group is every (K / block)-th row of one column, not a block of consecutive rows, and packs two columns'
    values into each byte; MatMulNBits reads [N, K / block, block / 2] bytes, each two consecutive rows of
    one column. The weights decode to noise (the demo model's int4-hqq: KL 5.8 against fp32, top-1 0).
    Here B is quantized the way HQQ's own code does a Linear weight (B transposed, axis 1: consecutive K
    per group), then packed along K.
    """
    import torch

    del axis  # MatMulNBits blocks run along K only
    weights = torch.from_numpy(b_ndarray).T.contiguous()  # [N, K], HQQ's Linear layout
    q, scales, zero_points = self._quantize_internal(weights, group_size=block_size, axis=1)  # q: [N, K padded]
    q = q.to(torch.uint8)
    packed = q[:, 0::2] | (q[:, 1::2] << 4)
    cols, k_padded = q.shape
    packed = packed.reshape(cols, k_padded // block_size, block_size // 2).contiguous()
    return packed.numpy(), scales.reshape(-1).contiguous().numpy(), zero_points.reshape(-1).contiguous().numpy()


@contextlib.contextmanager
def olive_fixes() -> Iterator[None]:
    """Apply the fixes for the block, on ``FIXED_OLIVE_VERSION`` only; each is undone on exit."""
    from importlib.metadata import version

    if version("olive-ai") != FIXED_OLIVE_VERSION:
        yield
        return
    from olive.passes.onnx.hqq_quantization import OnnxHqqQuantization

    with speedups.patched(OnnxHqqQuantization, "_quantize_internal_numpy", hqq_matmulnbits_layout):
        yield


def replay(config_path: str) -> None:
    """``olive run --config`` with the fixes applied: replays an int4-hqq ``olive_config.json`` to its weights."""
    import json

    from olive.workflows import run

    with open(config_path, encoding="utf-8") as fh:
        config = json.load(fh)
    with olive_fixes():
        run(config)


if __name__ == "__main__":
    import sys

    replay(sys.argv[1])
