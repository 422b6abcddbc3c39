"""Make Olive 0.13's workflows faster without changing one byte of what they write.

Every patch here is active only inside ``speedups()``, around one in-process Olive workflow, and each one keeps
Olive's output bit for bit: a variant's ``olive_config.json`` run by stock Olive (``olive run --config``) gives
the same weights. ``tests/test_olive_speedups.py`` checks each against Olive's own code.

- **Input model identifier.** Olive hashes every file of the input model at the start of each workflow (3 s
  for a 1 GB checkpoint, once per variant). Its own answer is remembered while no file's size, mtime or inode
  changed, so Olive's cache keys stay exactly what Olive computes.
- **Input files hashed once.** Olive's identifier is built from the sha256 of each input file, which the
  conversion cache has just computed (or remembered) for its own key: ``remember_sha256`` hands those over.
- **Block-wise quantization of embedding tables.** ``OnnxBlockWiseRtnQuantization`` quantizes a ``Gather``
  weight (the token embedding: 136M values for a Qwen2.5-0.5B) with a numpy loop over the blocks of one row
  at a time, single-threaded: 3 to 4 s per variant. ``block_quantize`` computes the same formulas on whole
  blocks at once, in row chunks on every core (numpy releases the GIL in its loops).
- **Weights read in place.** The RTN pass copies every fp32 weight out of the memory-mapped ONNX external
  data into fresh memory before it quantizes them (2.4 GB for a 0.5B model: 2 to 5 s, most of it the kernel
  handing out new pages) and then drops the copies it replaced. The quantizers read the mapped file as well;
  the output goes to a new file of Olive's cache, never onto the mapped one.
- **External data written on every core.** The genai builder and Olive's passes save through ``onnx_ir.save``
  one tensor after another; for the builder that includes casting each weight to fp32 and laying it out
  contiguously (13 s for a 0.5B model). ``onnx_ir`` 1.1 writes the same bytes with ``max_workers`` threads.
- **onnx's external data read and written on every core.** Passes built on ``onnx.load`` and ``onnx.save_model``
  (``GraphSurgeries``, which puts the ``logits`` name back after RTN) read and append one tensor after another.
  The replacement makes onnx's own bookkeeping first (each tensor at its file's end, onnx's location checks),
  then reads or writes the tensors at those offsets from a thread per core. Tensors with explicit offsets (an
  aligned layout) are left to onnx.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from mlflow_slmops.genai import modeldir

# Set to 0 to run Olive's own code unpatched (same output, slower): to rule the patches out when in doubt.
SPEEDUPS_ENV = "SLMOPS_OLIVE_SPEEDUPS"
# The exact versions whose internals the patches replace and were checked against, bit for bit
# (tests/test_olive_speedups.py). With any other version installed the patches stay off: stock code, same output.
VERIFIED_VERSIONS = {"olive-ai": "0.13.0", "onnx": "1.23.2", "onnx-ir": "1.1.0"}
logger = logging.getLogger(__name__)
# Olive's own answers for the input model's identifier, keyed by the files' path, size, mtime and inode.
_OLIVE_ID_MEMO: dict = {}
# sha256 hex digests of files whose content is known, by (path, size, mtime_ns, inode): see remember_sha256.
_KNOWN_SHA256: dict[tuple[str, int, int, int], str] = {}
# Rows of the weight per task of block_quantize: small enough that a chunk's temporaries stay in a few MB.
QUANT_ROWS_PER_CHUNK = 2048


@contextlib.contextmanager
def speedups() -> Iterator[None]:
    """Patch Olive for the duration of one workflow, unless ``SLMOPS_OLIVE_SPEEDUPS=0``.

    Each patch is undone on exit, error or not. They run only on the ``VERIFIED_VERSIONS`` of Olive, onnx and
    onnx_ir: on any other, Olive's own code runs (slower, never different), and one info line says so.
    """
    with contextlib.ExitStack() as stack:
        if os.environ.get(SPEEDUPS_ENV, "1") == "0" or unverified_versions():
            yield
            return
        for patch in PATCHES.values():
            stack.enter_context(patch())
        yield


def unverified_versions() -> dict[str, str]:
    """The installed versions that differ from ``VERIFIED_VERSIONS`` (empty when the speed-ups may run)."""
    found = {pkg: _installed_version(pkg) for pkg in VERIFIED_VERSIONS}
    off = {pkg: got for pkg, got in found.items() if got != VERIFIED_VERSIONS[pkg]}
    if off:
        _say_off_once(tuple(sorted(off.items())))
    return off


def _installed_version(pkg: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return "not installed"


@functools.cache
def _say_off_once(off: tuple[tuple[str, str], ...]) -> None:
    found = ", ".join(f"{pkg} {got} (verified: {VERIFIED_VERSIONS[pkg]})" for pkg, got in off)
    logger.info("Olive speed-ups are off for %s: conversion runs Olive's own code (slower, same output)", found)


@contextlib.contextmanager
def patched(owner, name: str, replacement) -> Iterator[object]:
    """Set ``owner.name`` to replacement for the block and yield the original; leave an absent name alone."""
    original = getattr(owner, name, None)
    if original is None:
        yield None
        return
    setattr(owner, name, replacement)
    try:
        yield original
    finally:
        setattr(owner, name, original)


@contextlib.contextmanager
def _memoized_model_identifier() -> Iterator[None]:
    from olive.model.config.model_config import ModelConfig

    original_id = ModelConfig.get_model_identifier

    def memoized_id(self):
        path = self.config.get("model_path")
        others = [k for k in ("adapter_path", "model_script", "script_dir") if self.config.get(k)]
        if self.type.lower() != "hfmodel" or not path or others or not Path(str(path)).is_dir():
            return original_id(self)
        files = sorted(p for p in Path(str(path)).rglob("*") if p.is_file())
        stamp = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns, p.stat().st_ino) for p in files)
        key = (stamp, json.dumps(self.config.get("model_attributes"), sort_keys=True, default=str))
        if key not in _OLIVE_ID_MEMO:
            _OLIVE_ID_MEMO[key] = original_id(self)
        return _OLIVE_ID_MEMO[key]

    with patched(ModelConfig, "get_model_identifier", memoized_id):
        yield


def remember_sha256(path: Path, stat: os.stat_result, digest: str) -> None:
    """Tell Olive's file hashing the sha256 of ``path`` as it is now (a later change of size, mtime or inode
    makes Olive hash the file itself again)."""
    _KNOWN_SHA256[(str(path), stat.st_size, stat.st_mtime_ns, stat.st_ino)] = digest


@contextlib.contextmanager
def _known_file_hashes() -> Iterator[None]:
    import olive.model.config.model_config as model_config

    original_hash_file = model_config.hash_file

    def hash_file(filename, block_size=4096):
        try:
            st = os.stat(filename)
        except OSError:
            return original_hash_file(filename, block_size)
        known = _KNOWN_SHA256.get((str(filename), st.st_size, st.st_mtime_ns, st.st_ino))
        return known if known is not None else original_hash_file(filename, block_size)

    with patched(model_config, "hash_file", hash_file):
        yield


@contextlib.contextmanager
def _fast_block_quantization() -> Iterator[None]:
    from olive.passes.onnx.rtn_quantization import OnnxBlockWiseRtnQuantization as Rtn

    def quantize_ndarray(self, data, quantize_axis, block_size, is_symmetric, bits=4):
        return block_quantize(data, quantize_axis, block_size, is_symmetric, bits)

    with patched(Rtn, "_quantize_ndarray", quantize_ndarray):
        yield


@contextlib.contextmanager
def _rtn_reads_weights_in_place() -> Iterator[None]:
    import onnx_ir
    from olive.passes.onnx.rtn_quantization import OnnxBlockWiseRtnQuantization as Rtn

    def run_for_config(self, model, config, output_model_path):
        # Olive's pass calls onnx_ir.external_data.load_to_model(ir_model) first: leave the tensors mapped.
        with patched(onnx_ir.external_data, "load_to_model", lambda ir_model: ir_model):
            return original(self, model, config, output_model_path)

    with patched(Rtn, "_run_for_config", run_for_config) as original:
        yield


@contextlib.contextmanager
def _parallel_external_data_writes() -> Iterator[None]:
    import inspect

    import onnx_ir

    original_save = onnx_ir.save
    if "max_workers" not in inspect.signature(original_save).parameters:  # an onnx_ir before 1.1
        yield
        return

    def save(model, path, *args, **kwargs):
        if kwargs.get("external_data") is not None and kwargs.get("max_workers") is None:
            kwargs["max_workers"] = os.cpu_count() or 1
        return original_save(model, path, *args, **kwargs)

    with patched(onnx_ir, "save", save):
        yield


@contextlib.contextmanager
def _parallel_onnx_external_data() -> Iterator[None]:
    import onnx
    import onnx.external_data_helper as helper

    original_write = helper.write_external_data_tensors

    def write_external_data_tensors(model, filepath):
        tensors = [t for t in helper._get_all_tensors(model) if helper.uses_external_data(t) and t.HasField("raw_data")]
        infos = [helper.ExternalDataInfo(t) for t in tensors]
        if any(info.offset is not None for info in infos):  # explicit offsets or alignment: onnx's own path
            return original_write(model, filepath)
        files: dict[str, list[int]] = {}  # location -> [fd, size before, end of file]
        spans = []  # (fd, offset, length) of each tensor
        try:
            for tensor, info in zip(tensors, infos):  # onnx's bookkeeping: each tensor appended at its file's end
                if info.location not in files:  # onnx's own checks of the location, and the file created
                    fd = helper._open_external_data_fd(filepath, info.location, tensor.name, False)
                    size = os.fstat(fd).st_size
                    files[info.location] = [fd, size, size]
                entry = files[info.location]
                spans.append((entry[0], entry[2], _raw_data_length(tensor)))
                entry[2] += spans[-1][2]
            sized_right = list(_on_every_core(
                lambda i: _pwrite_all(spans[i][0], tensors[i].raw_data, spans[i][1], spans[i][2]), range(len(tensors))))
            if not all(sized_right):  # raw_data that does not match its dims: undo, and let onnx write it
                for fd, size, _end in files.values():
                    os.ftruncate(fd, size)
                return original_write(model, filepath)
        finally:
            for fd, _size, _end in files.values():
                os.close(fd)
        for tensor, info, (_fd, offset, length) in zip(tensors, infos, spans):
            helper.set_external_data(tensor, info.location, offset, length)
            tensor.ClearField("raw_data")
        return model

    def load_external_data_for_model(model, base_dir):
        tensors = [t for t in helper._get_all_tensors(model) if helper.uses_external_data(t)]
        # onnx's own read of each tensor (with its bounds checks) on every core, a few tensors ahead of the
        # one filled in, so memory holds little more than with onnx's one-by-one reads
        data = _on_every_core(lambda tensor: helper._read_external_data_bytes(tensor, base_dir), tensors)
        for tensor, raw in zip(tensors, data):
            tensor.raw_data = raw
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]

    needed = ("_get_all_tensors", "uses_external_data", "ExternalDataInfo", "_open_external_data_fd",
              "_read_external_data_bytes", "set_external_data")
    if not all(hasattr(helper, name) for name in needed):  # another onnx layout: leave it alone
        yield
        return
    with contextlib.ExitStack() as stack:
        for owner in (helper, onnx):  # onnx.save_model and onnx.load_model call the names onnx/__init__ bound
            stack.enter_context(patched(owner, "write_external_data_tensors", write_external_data_tensors))
            stack.enter_context(patched(owner, "load_external_data_for_model", load_external_data_for_model))
        yield


def _on_every_core(fn: Callable, items) -> Iterator:
    """Yield fn(item) for each item in order, computed on a thread per core (numpy and file I/O release the
    GIL), at most two items per core ahead of the one yielded."""
    workers = os.cpu_count() or 1
    with ThreadPoolExecutor(workers) as pool:
        running: collections.deque = collections.deque()
        for item in items:
            running.append(pool.submit(fn, item))
            if len(running) >= 2 * workers:
                yield running.popleft().result()
        while running:
            yield running.popleft().result()


def _pwrite_all(fd: int, data: bytes, offset: int, length: int) -> bool:
    """Write data at offset if it is ``length`` bytes long; False (nothing written) if not."""
    if len(data) != length:
        return False
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written
    return True


def _raw_data_length(tensor) -> int:
    """len(tensor.raw_data) from its type and dims where the type has a fixed size: reading raw_data copies it."""
    size = modeldir.tensor_bytes(tensor.data_type, tensor.dims)
    return size if size is not None else len(tensor.raw_data)


# Each speed-up by name (benchmarks/bench_convert.py --ablate leaves them out one at a time).
PATCHES: dict[str, Callable[[], contextlib.AbstractContextManager]] = {
    "model-identifier-memo": _memoized_model_identifier,
    "known-file-hashes": _known_file_hashes,
    "vectorized-block-quantization": _fast_block_quantization,
    "rtn-weights-in-place": _rtn_reads_weights_in_place,
    "parallel-external-data-writes": _parallel_external_data_writes,
    "parallel-onnx-external-data": _parallel_onnx_external_data,
}


def block_quantize(data: np.ndarray, quantize_axis: int, block_size: int, is_symmetric: bool,
                   bits: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Olive 0.13's ``OnnxBlockWiseRtnQuantization._quantize_ndarray``, vectorized: the same result, bit for bit.

    Blocks of ``block_size`` values along ``quantize_axis`` share a scale (and, asymmetric, a zero point);
    4-bit values are packed two to a byte along that axis. Returns (quantized data, scales, zero points or None).

    Example:
        >>> q, scales, zp = block_quantize(np.ones((4, 64), np.float32), 1, 32, True, 4)
        >>> q.shape, scales.shape, zp
        ((4, 32), (4, 2), None)
    """
    m = int(np.prod(data.shape[:quantize_axis], dtype=np.int64))
    k = data.shape[quantize_axis]
    n = int(np.prod(data.shape[quantize_axis + 1:], dtype=np.int64))
    k_blocks = (k + block_size - 1) // block_size
    rows = data.reshape((m, k, n))
    packs = bits <= 4  # two values to a byte along the quantized axis, as Olive stores them
    quantized = np.empty((m, (k + 1) // 2 if packs else k, n), dtype=np.uint8)
    scales = np.empty((m, k_blocks, n), dtype=data.dtype)
    zero_points = None if is_symmetric else np.empty((m, (k_blocks + 1) // 2 if packs else k_blocks, n), np.uint8)
    # Olive stores symmetric values offset by 2^(bits-1) as uint8: int16(q) + offset, cast to uint8 (wrapping),
    # which is exactly the uint8 view of q plus the offset, wrapping.
    offset = np.uint8(1 << (bits - 1))
    whole = k // block_size
    # (first column, blocks, block length): the whole blocks at once, then the short last block if any.
    spans = [(0, whole, block_size)] if whole else []
    if whole * block_size < k:
        spans.append((whole * block_size, 1, k - whole * block_size))

    def quantize_rows(r0: int, r1: int) -> None:
        """Rows r0:r1 start to finish (quantize, offset, pack) on one thread: every step runs on every core."""
        q_rows = np.empty((r1 - r0, k, n), dtype=np.uint8)
        zp_rows = None if is_symmetric else np.empty((r1 - r0, k_blocks, n), dtype=np.uint8)
        for c0, count, length in spans:
            c1, b0 = c0 + count * length, c0 // block_size
            blocks = rows[r0:r1, c0:c1, :].reshape((r1 - r0, count, length, n))
            q, scale, zero_point = _quantize_blocks(blocks, bits, is_symmetric)
            if is_symmetric:
                q = q.view(np.uint8) + offset
            q_rows[:, c0:c1, :] = q.reshape((r1 - r0, count * length, n))
            scales[r0:r1, b0:b0 + count, :] = scale.reshape((r1 - r0, count, n))
            if zp_rows is not None:
                zp_rows[:, b0:b0 + count, :] = zero_point.reshape((r1 - r0, count, n))
        quantized[r0:r1] = _pack_int4(q_rows) if packs else q_rows
        if zero_points is not None:
            zero_points[r0:r1] = _pack_int4(zp_rows) if packs else zp_rows

    chunks = [(r, min(r + QUANT_ROWS_PER_CHUNK, m)) for r in range(0, m, QUANT_ROWS_PER_CHUNK)]
    list(_on_every_core(lambda chunk: quantize_rows(*chunk), chunks))
    return _olive_shapes(quantized, scales, zero_points, data.shape, quantize_axis)


def _quantize_blocks(blocks: np.ndarray, bits: int, is_symmetric: bool):
    """Olive's _quant_slice_symmetric / _quant_slice_asymmetric over axis 2 of (rows, blocks, length, n)."""
    with np.errstate(divide="ignore", invalid="ignore"):  # a block of zeros: scale 0, masked by the where
        if is_symmetric:
            qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
            max_val = blocks.max(axis=2, keepdims=True)
            min_val = blocks.min(axis=2, keepdims=True)
            abs_max = np.where(np.abs(max_val) > np.abs(min_val), max_val, min_val)
            scale = abs_max / float(qmin)
            q = np.where(scale == 0, 0, blocks / scale).round().clip(qmin, qmax).astype(np.int8)
            return q, scale, None
        qmax, mid = (1 << bits) - 1, 1 << (bits - 1)
        min_val = np.minimum(blocks.min(axis=2, keepdims=True), 0)
        max_val = np.maximum(blocks.max(axis=2, keepdims=True), 0)
        scale = (max_val - min_val) / float(qmax)
        zero_point = np.where(scale == 0, mid, -min_val / scale).round().clip(0, qmax).astype(np.uint8)
        q = np.where(scale == 0, mid, blocks / scale + zero_point).round().clip(0, qmax).astype(np.uint8)
        return q, scale, zero_point


def _olive_shapes(quantized: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, shape: tuple,
                 axis: int):
    """(m, k', n) results in Olive's shapes: the input's, with axis ``axis`` the packed or the block count."""
    def along_axis(array: np.ndarray) -> np.ndarray:
        return array.reshape([*shape[:axis], array.shape[1], *shape[axis + 1:]])

    return along_axis(quantized), along_axis(scales), None if zero_points is None else along_axis(zero_points)


def _pack_int4(data: np.ndarray) -> np.ndarray:
    """Two 4-bit values to a byte along axis 1 of (m, k, n), low nibble first; an odd k is padded with 0."""
    if data.shape[1] % 2:
        data = np.pad(data, [(0, 0), (0, 1), (0, 0)])
    return ((data[:, 0::2, :] & 0xF) | ((data[:, 1::2, :] & 0xF) << 4)).astype(np.uint8)
