"""The Olive speed-ups change nothing Olive writes: each is checked against Olive 0.13's own code.

End to end, `tests/test_convert.py::test_olive_config_reproduces_the_same_weights_with_olive_run` rebuilds
variants with stock `olive run` (no patches) and compares their weights hash with the sweep's.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from mlflow_slmops.convert.olive import speedups as olive_speedups
from mlflow_slmops.convert.olive.speedups import SPEEDUPS_ENV, block_quantize, speedups

# Rows past one chunk of block_quantize, so the chunked, threaded path is what is compared.
MANY_ROWS = olive_speedups.QUANT_ROWS_PER_CHUNK * 2 + 37
# (shape, quantize axis): whole blocks, a short last block, an odd axis length, 3-D, axis 0, many rows.
SHAPES = [((64, 96), 1), ((33, 100), 1), ((9, 45), 1), ((5, 33, 7), 1), ((40, 64), 0), ((MANY_ROWS, 64), 1)]


def _olive_rtn():
    from olive.passes.onnx.rtn_quantization import OnnxBlockWiseRtnQuantization

    return OnnxBlockWiseRtnQuantization


def _weights(shape: tuple, seed: int) -> np.ndarray:
    data = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    flat = data.reshape(-1)
    flat[:48] = 0.0  # whole blocks of zeros: scale 0, the where() branch
    flat[48:96] = 0.75  # constant blocks: max == min
    return data


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("is_symmetric", [True, False])
@pytest.mark.parametrize("block_size", [16, 32, 128])
@pytest.mark.parametrize(("shape", "axis"), SHAPES)
def test_block_quantize_matches_olive_bit_for_bit(shape, axis, block_size, is_symmetric, bits):
    data = _weights(shape, seed=block_size + bits)
    rtn = _olive_rtn()
    with np.errstate(divide="ignore", invalid="ignore"):  # Olive's own code warns on blocks of zeros
        expected = rtn._quantize_ndarray(rtn.__new__(rtn), data.copy(), axis, block_size, is_symmetric, bits)
    got = block_quantize(data, axis, block_size, is_symmetric, bits)
    assert len(got) == len(expected) == 3
    for ours, olives in zip(got, expected):
        if olives is None:
            assert ours is None
            continue
        assert ours.dtype == olives.dtype and ours.shape == olives.shape
        assert np.array_equal(ours, olives)


def _patched_attributes() -> dict[str, object]:
    import olive.model.config.model_config as model_config
    import onnx
    import onnx_ir

    rtn = _olive_rtn()
    return {"identifier": model_config.ModelConfig.get_model_identifier, "hash_file": model_config.hash_file,
            "quantize": rtn._quantize_ndarray, "rtn_run": rtn._run_for_config, "save": onnx_ir.save,
            "onnx_write": onnx.write_external_data_tensors, "onnx_load": onnx.load_external_data_for_model,
            "helper_write": onnx.external_data_helper.write_external_data_tensors,
            "helper_load": onnx.external_data_helper.load_external_data_for_model}


def test_speedups_patch_olive_inside_and_restore_it_even_after_an_error():
    before = _patched_attributes()
    with pytest.raises(RuntimeError, match="a pass failed"):
        with speedups():
            inside = _patched_attributes()
            raise RuntimeError("a pass failed")
    assert all(inside[name] is not before[name] for name in before)
    assert _patched_attributes() == before


def test_speedups_env_zero_runs_olive_unpatched(monkeypatch):
    monkeypatch.setenv(SPEEDUPS_ENV, "0")
    before = _patched_attributes()
    with speedups():
        assert _patched_attributes() == before


def _tiny_onnx_with_gather_and_matmul(folder: Path) -> Path:
    """A MatMul whose output is the graph output and a Gather over an embedding of many rows, external data."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    vocab, hidden, out = MANY_ROWS, 64, 96
    embedding = numpy_helper.from_array(_weights((vocab, hidden), seed=1), "embedding")
    weight = numpy_helper.from_array(_weights((hidden, out), seed=2), "weight")
    nodes = [helper.make_node("Gather", ["embedding", "ids"], ["hidden"], name="embed"),
             helper.make_node("MatMul", ["hidden", "weight"], ["logits"], name="lm_head")]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4, out])],
                              initializer=[embedding, weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    folder.mkdir(parents=True)
    path = folder / "model.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    return path


def _run_rtn(model: Path, out: Path, bits: int, is_symmetric: bool) -> dict[str, str]:
    """Olive's RTN pass through a real in-process workflow; returns the sha256 of every file it wrote."""
    from olive.workflows import run as olive_run

    olive_run({
        "input_model": {"type": "ONNXModel", "model_path": str(model)},
        "passes": {"rtn": {"type": "OnnxBlockWiseRtnQuantization", "bits": bits, "block_size": 32,
                           "is_symmetric": is_symmetric, "accuracy_level": 4, "save_as_external_data": True}},
        "output_dir": str(out), "cache_dir": str(out.parent / f"{out.name}-cache"), "log_severity_level": 3,
    })
    onnx_files = sorted(p for p in out.rglob("*") if p.is_file() and p.name.startswith("model.onnx"))
    assert onnx_files, f"Olive wrote no model into {out}"
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in onnx_files}


@pytest.mark.parametrize(("bits", "is_symmetric"), [(4, True), (4, False), (8, True)])
def test_olive_rtn_pass_writes_the_same_files_with_and_without_speedups(tmp_path, monkeypatch, bits,
                                                                         is_symmetric):
    from mlflow_slmops.convert.olive import quiet_telemetry

    quiet_telemetry()
    model = _tiny_onnx_with_gather_and_matmul(tmp_path / "fp32")
    with speedups():
        fast = _run_rtn(model, tmp_path / "fast", bits, is_symmetric)
    monkeypatch.setenv(SPEEDUPS_ENV, "0")
    with speedups():
        stock = _run_rtn(model, tmp_path / "stock", bits, is_symmetric)
    assert fast == stock


def test_olive_hashes_an_input_file_itself_unless_its_current_sha256_is_known(tmp_path):
    import olive.model.config.model_config as model_config

    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"weights v1")
    real = hashlib.sha256(b"weights v1").hexdigest()
    marker = "f" * 64  # not the real digest: proves the answer came from what was remembered
    with speedups():
        assert model_config.hash_file(weights) == real
        olive_speedups.remember_sha256(weights, weights.stat(), marker)
        assert model_config.hash_file(weights) == marker
        weights.write_bytes(b"weights v2, longer")  # changed: its size no longer matches what was remembered
        assert model_config.hash_file(weights) == hashlib.sha256(b"weights v2, longer").hexdigest()


def test_olive_model_identifier_is_the_same_with_the_hashes_the_conversion_cache_hands_over(hf_qwen, tmp_path,
                                                                                           monkeypatch):
    from olive.model.config.model_config import ModelConfig

    from mlflow_slmops.convert import input_model_hash

    config = ModelConfig.model_validate({"type": "HfModel", "config": {"model_path": str(hf_qwen.resolve())}})
    stock = config.get_model_identifier()
    monkeypatch.setattr(olive_speedups, "_OLIVE_ID_MEMO", {})  # compute it again, from the handed-over hashes
    input_model_hash(hf_qwen, tmp_path)
    with speedups():
        assert config.get_model_identifier() == stock


def _model_of_many_tensors():
    """Initializers of many sizes: some under onnx's 1024-byte threshold (stay inline), one empty, several MB."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(7)
    sizes = [0, 3, 200, 255, 256, 4096, 70_000, 1_500_000] * 4
    initializers = [numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), f"w{i}")
                    for i, n in enumerate(sizes)]
    nodes = [helper.make_node("Identity", [t.name], [f"out{i}"]) for i, t in enumerate(initializers)]
    outputs = [helper.make_tensor_value_info(f"out{i}", TensorProto.FLOAT, None) for i in range(len(initializers))]
    graph = helper.make_graph(nodes, "many", [], outputs, initializer=initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize(("one_file", "raw_data_fits_dims"), [(True, True), (False, True), (True, False)])
def test_onnx_external_data_is_written_and_read_the_same_with_and_without_speedups(tmp_path, monkeypatch,
                                                                                   one_file, raw_data_fits_dims):
    import onnx

    model = _model_of_many_tensors()
    if not raw_data_fits_dims:  # sized from its dims, this tensor would be cut short: onnx's own writer takes over
        model.graph.initializer[5].raw_data += b"\x01" * 100

    def save_and_load(folder: Path) -> tuple[dict[str, bytes], bytes]:
        folder.mkdir()
        onnx.save_model(onnx.ModelProto.FromString(model.SerializeToString()), str(folder / "m.onnx"),
                        save_as_external_data=True, all_tensors_to_one_file=one_file,
                        location="m.onnx.data" if one_file else None, size_threshold=1024)
        files = {p.name: p.read_bytes() for p in sorted(folder.iterdir())}
        return files, onnx.load(str(folder / "m.onnx")).SerializeToString()

    with speedups():
        fast = save_and_load(tmp_path / "fast")
    monkeypatch.setenv(SPEEDUPS_ENV, "0")
    with speedups():
        stock = save_and_load(tmp_path / "stock")
    assert (len(fast[0]) == 2) if one_file else (len(fast[0]) > 2)  # the graph; its data in one file or per tensor
    assert fast == stock
    loaded = onnx.load(str(tmp_path / "fast" / "m.onnx"))
    assert [t.raw_data for t in loaded.graph.initializer] == [t.raw_data for t in model.graph.initializer]


def test_onnx_external_data_with_explicit_offsets_is_left_to_onnx(tmp_path):
    """A model whose tensors already name their offsets (an aligned layout) is written by onnx's own code."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, set_external_data

    model = _model_of_many_tensors()
    big = [t for t in model.graph.initializer if len(t.raw_data) >= 1024]
    expected = {t.name: t.raw_data for t in big}
    offsets, offset = {}, 0
    for tensor in big:
        offsets[tensor.name] = offset
        set_external_data(tensor, "m.onnx.data", offset=offset)
        offset += (len(tensor.raw_data) + 4095) // 4096 * 4096  # 4 KiB aligned: gaps between tensors
    with speedups():
        onnx.save_model(model, str(tmp_path / "m.onnx"))
    header = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    assert {t.name: ExternalDataInfo(t).offset for t in header.graph.initializer if t.name in offsets} == offsets
    loaded = onnx.load(str(tmp_path / "m.onnx"))
    assert {t.name: t.raw_data for t in loaded.graph.initializer if t.name in expected} == expected


def test_speedups_run_only_on_the_verified_olive_version(monkeypatch, caplog):
    rtn = _olive_rtn()
    stock = rtn._quantize_ndarray
    assert olive_speedups.unverified_versions() == {}  # this environment is the verified one
    with speedups():
        assert rtn._quantize_ndarray is not stock
    monkeypatch.setitem(olive_speedups.VERIFIED_VERSIONS, "olive-ai", "0.12.0")
    with caplog.at_level("INFO", logger=olive_speedups.__name__):
        for _ in range(2):
            with speedups():
                assert rtn._quantize_ndarray is stock  # another Olive: its own code, untouched
    lines = [r.getMessage() for r in caplog.records if r.name == olive_speedups.__name__]
    assert lines == ["Olive speed-ups are off for olive-ai 0.13.0 (verified: 0.12.0): conversion runs Olive's own "
                     "code (slower, same output)"]
    assert rtn._quantize_ndarray is stock
