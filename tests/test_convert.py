"""Conversion: every preset builds, loads and generates; cache, reproduction with `olive run`, bad input,
full disk and Ctrl-C leave nothing partial behind."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

from devkit.testing import TEST_CACHE_DIRNAME
from mlflow_slmops import convert
from mlflow_slmops.convert import olive, process, validate
from mlflow_slmops.convert.olive import fixes
from mlflow_slmops.genai import modeldir
from mlflow_slmops.variants import PRESETS, VariantSpec
from tests.helpers import (
    assert_one_line_error,
    bin_path,
    run_cli,
    slmops,
    tree_snapshot,
)

CPU_PRESETS = [name for name, spec in PRESETS.items() if not spec.build_only]
OLIVE_CLUTTER = ("footprint.json", "output_footprint.json", "run_history.txt", "model_config.json")
# Bigger than any small file a conversion writes, smaller than the tiny model's fp32 weights (~690 KB).
FILE_SIZE_QUOTA = 256 * 1024
SIGINT_WAIT_S = 300


def _generate(folder: Path, n_new: int = 4) -> list[int]:
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    tokenizer = og.Tokenizer(model)
    prompt = tokenizer.encode("The quick brown fox")
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + n_new, min_length=len(prompt) + n_new)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt)
    while not gen.is_done():
        gen.generate_next_token()
    return list(gen.get_sequence(0))[len(prompt):]


def _graph_outputs(folder: Path) -> list[str]:
    import onnx

    return [o.name for o in onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.output]


def _incomplete_olive_runs(cache: Path) -> list[Path]:
    runs = cache / "olive" / "default_workflow" / "runs"
    return [r for r in runs.iterdir() if not (r / "run.json").is_file()] if runs.is_dir() else []


def _assert_cache_holds_only_complete_entries(cache: Path) -> None:
    for folder in ("tmp", "locks"):  # no build in flight, no key lock left behind
        if (cache / folder).is_dir():
            assert list((cache / folder).iterdir()) == []
    assert _incomplete_olive_runs(cache) == []
    for entry in (cache / "variants").iterdir() if (cache / "variants").is_dir() else ():
        manifest = json.loads((entry / convert.ENTRY_MANIFEST).read_text())
        modeldir.check_genai_dir(entry)
        assert modeldir.weights_hash(entry) == manifest["weights_sha256"]


@pytest.fixture(scope="session")
def shared_cache(models_root) -> Path:
    """The conversion cache the conftest genai fixtures use too: the fp32 export is made once."""
    return models_root / TEST_CACHE_DIRNAME


@pytest.fixture(scope="session")
def qwen_variants(hf_qwen, models_root, shared_cache) -> dict[str, convert.ConversionResult]:
    """Every preset of the tiny Qwen2, converted once in one sweep."""
    results = convert.convert_variants(hf_qwen, list(PRESETS.values()), models_root / "qwen-variants",
                                       cache_dir=shared_cache, progress=False)
    return {r.spec.name: r for r in results}


@pytest.mark.parametrize("name", CPU_PRESETS)
def test_every_cpu_preset_builds_loads_and_generates(qwen_variants, name):
    result = qwen_variants[name]
    assert result.status == "ok", result.error
    folder = Path(result.output_dir)
    assert folder.name == name and not result.build_only
    assert len(_generate(folder)) == 4
    assert result.size_bytes == modeldir.dir_size_bytes(folder)
    assert result.weights_sha256 == modeldir.weights_hash(folder)
    assert Path(result.olive_config_path) == folder / "olive_config.json"


def test_llama_with_its_own_lm_head_converts_to_rtn_and_hqq(hf_llama, shared_cache, tmp_path):
    # Llama unties embeddings: lm_head is its own weight, the one RTN and HQQ rename the output of.
    results = convert.convert_variants(hf_llama, [PRESETS["int4"], PRESETS["int4-hqq"], PRESETS["int8"]],
                                       tmp_path / "llama", cache_dir=shared_cache, progress=False)
    for result in results:
        assert result.status == "ok", result.error
        assert _graph_outputs(Path(result.output_dir))[0] == "logits"
        assert len(_generate(Path(result.output_dir))) == 4


def test_quantized_presets_are_smaller_than_fp32(qwen_variants):
    fp32 = modeldir.onnx_weight_bytes(qwen_variants["fp32"].output_dir)
    for name in ("int8", "int4", "int4-b128-asym", "int4-kquant", "int4-hqq"):
        assert modeldir.onnx_weight_bytes(qwen_variants[name].output_dir) < 0.6 * fp32, name
    assert modeldir.onnx_weight_bytes(qwen_variants["int4"].output_dir) < \
        modeldir.onnx_weight_bytes(qwen_variants["int8"].output_dir)


@pytest.mark.parametrize("name", [n for n in CPU_PRESETS if n != "fp32"])
def test_every_quantized_cpu_preset_decodes_close_to_fp32(qwen_variants, name):
    # A weight layout the kernel reads differently from how the pass wrote it still loads and generates, so only
    # the logits show it (Olive 0.13's HQQ pass: top-1 0 against fp32 until convert/olive/fixes.py).
    from mlflow_slmops.flavor import GenaiModel
    from mlflow_slmops.measure import quality

    base = GenaiModel(qwen_variants["fp32"].output_dir)
    text = quality.read_eval_text(quality._default_paths(None, None)[0])
    chunks = quality.text_chunks([int(t) for t in base.tokenizer.encode(text)], 64, 4, "eval text")
    scores = quality.score_text(GenaiModel(qwen_variants[name].output_dir).model, chunks, base.model)
    assert scores.kl_div < 0.01 and scores.top1_agreement >= 0.9, (scores.kl_div, scores.top1_agreement)


def test_hqq_variant_holds_no_leftover_fp32_weights(qwen_variants):
    import onnx

    model = onnx.load(str(Path(qwen_variants["int4-hqq"].output_dir) / "model.onnx"), load_external_data=False)
    used = {i for node in model.graph.node for i in node.input}
    assert [init.name for init in model.graph.initializer if init.name not in used] == []
    assert any(node.op_type == "MatMulNBits" for node in model.graph.node)


def test_fp16_cuda_preset_builds_and_is_marked_build_only(qwen_variants):
    import onnx

    result = qwen_variants["fp16-cuda"]
    assert result.status == "ok", result.error
    assert result.build_only is True
    folder = Path(result.output_dir)
    info = modeldir.check_genai_dir(folder)
    assert info.execution_provider == "cuda"
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    matmul_weights = [i for i in model.graph.initializer if i.name.endswith("MatMul.weight")]
    assert matmul_weights and all(i.data_type == onnx.TensorProto.FLOAT16 for i in matmul_weights)
    assert _graph_outputs(folder)[0] == "logits"


@pytest.mark.parametrize("name,renamed", [("int8", "logits_Q8"), ("int4", "logits_Q4"), ("int4-hqq", "logits_Q4")])
def test_rtn_and_hqq_variants_keep_the_logits_output_genai_needs(qwen_variants, name, renamed):
    folder = Path(qwen_variants[name].output_dir)
    assert "logits" in _graph_outputs(folder) and renamed not in _graph_outputs(folder)
    passes = json.loads((folder / "olive_config.json").read_text())["passes"]
    surgery = passes["keep_logits_name"]["surgeries"][0]
    assert surgery == {"surgeon": "RenameOutputs", "old_names": [renamed], "new_names": ["logits"]}


def test_without_the_rename_genai_refuses_the_quantized_model(hf_qwen, shared_cache, tmp_path):
    """The reason for the rename pass: the same workflow without it gives a model genai cannot load."""
    out = tmp_path / "no-rename"
    config = convert.olive_config(hf_qwen, PRESETS["int4"], str(out), str(shared_cache / "olive"))
    del config["passes"]["keep_logits_name"]
    olive.finish_copies(olive.run(config, tmp_path / "olive.log"), link=False)  # Olive leaves it to us
    assert "logits_Q4" in _graph_outputs(out)
    with pytest.raises(Exception, match="Model output was not found: logits"):
        _generate(out)


def _olive_cache_files_sharing(path: Path, cache: Path) -> list[Path]:
    runs = cache / "olive" / "default_workflow" / "runs"
    return [p for p in runs.rglob(path.name) if p.is_file() and os.path.samefile(p, path)]


def test_quantized_entries_share_olives_files_and_the_fp32_export_stays_unlinked(qwen_variants, shared_cache):
    # A quantized variant's final model is read by no later Olive pass: its entry links Olive's output (no bytes
    # written twice). Every quantized workflow reads the fp32 export, and onnx_ir refuses linked external
    # data, so the fp32 entry holds its own copy and Olive's export keeps a single link.
    entries = {json.loads(m.read_text())["spec"]["name"]: m.parent
               for m in (shared_cache / "variants").glob(f"*/{convert.ENTRY_MANIFEST}")}
    for name in ("int8", "int4", "int4-hqq"):
        assert _olive_cache_files_sharing(entries[name] / "model.onnx.data", shared_cache), name
    fp32_data = entries["fp32"] / "model.onnx.data"
    assert _olive_cache_files_sharing(fp32_data, shared_cache) == []
    runs = shared_cache / "olive" / "default_workflow" / "runs"
    exports = [p for p in runs.rglob("model.onnx.data") if p.stat().st_size == fp32_data.stat().st_size]
    assert exports and all(p.stat().st_nlink == 1 for p in exports)


def test_variant_folders_are_clean_genai_folders(qwen_variants):
    for result in qwen_variants.values():
        folder = Path(result.output_dir)
        names = {p.name for p in folder.iterdir()}
        assert {"genai_config.json", "model.onnx", "model.onnx.data", "tokenizer.json", "chat_template.jinja",
                "olive_config.json"} <= names
        assert not names & set(OLIVE_CLUTTER), names
        assert all(p.stat().st_mode & 0o044 == 0o044 for p in folder.iterdir()), "files must be readable by all"


def test_cached_rerun_converts_nothing_and_links_the_cached_files(qwen_variants, hf_qwen, shared_cache,
                                                                  tmp_path, monkeypatch):
    def no_olive(*_args, **_kwargs):
        raise AssertionError("Olive ran for a cached variant")

    monkeypatch.setattr(olive, "run", no_olive)
    again = convert.convert_variants(hf_qwen, list(PRESETS.values()), tmp_path / "again", cache_dir=shared_cache,
                                     progress=False)
    assert [(r.spec.name, r.status, r.cached) for r in again] == [(n, "ok", True) for n in PRESETS]
    for result in again:
        first = Path(qwen_variants[result.spec.name].output_dir)
        assert result.weights_sha256 == qwen_variants[result.spec.name].weights_sha256
        # the sweep logs this as convert_s: the original build time, not the near-zero reuse time
        assert result.build_s == qwen_variants[result.spec.name].build_s > result.convert_s
        assert os.path.samefile(first / "model.onnx.data", Path(result.output_dir) / "model.onnx.data")


def test_cached_cli_rerun_never_imports_mlflow(qwen_variants, hf_qwen, shared_cache, tmp_path):
    """A cached sweep takes a fraction of the second `import mlflow` costs, so `slmops convert` goes without it."""
    code = ("import sys\nfrom mlflow_slmops.cli import main\ntry:\n    main(sys.argv[1:])\n"
            "except SystemExit as exc:\n    print('mlflow imported:', 'mlflow' in sys.modules)\n    raise\n")
    out = tmp_path / "out"
    proc = run_cli([sys.executable, "-c", code, "convert", "--model", str(hf_qwen), "--variants", "fp32,int4",
                    "--output", str(out), "--cache-dir", str(shared_cache), "--quiet"])
    assert proc.returncode == 0, proc.stderr
    assert "mlflow imported: False" in proc.stdout
    for name in ("fp32", "int4"):
        assert modeldir.weights_hash(out / name) == qwen_variants[name].weights_sha256


def test_conversion_errors_are_still_mlflow_errors_once_raised(tmp_path):
    """The error class is built on first use, and is the MlflowException that serving answers with HTTP 400."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, ErrorCode

    from mlflow_slmops import errors

    with pytest.raises(errors.SlmopsError) as raised:
        convert.check_hf_model_dir(tmp_path / "nope")
    assert isinstance(raised.value, MlflowException)
    assert raised.value.error_code == ErrorCode.Name(INVALID_PARAMETER_VALUE)
    assert type(raised.value).__module__ == "mlflow_slmops.errors"
    with pytest.raises(ImportError):
        from mlflow_slmops.errors import NoSuchError  # noqa: F401


def test_a_sweep_freezes_survivors_only_while_it_runs_and_leaves_a_host_freeze_alone():
    import gc

    assert gc.get_freeze_count() == 0
    with process.gc_walks_only_new_objects():
        convert.release_memory()
        assert gc.get_freeze_count() > 0  # the next collection skips what survived this one
    assert gc.get_freeze_count() == 0
    gc.freeze()  # a host application that froze its own objects (a pre-fork server, say)
    try:
        host = gc.get_freeze_count()
        with process.gc_walks_only_new_objects():
            fresh = [[] for _ in range(1000)]  # alive through the collection: frozen, if anything were
            convert.release_memory()
        # Neither unfrozen nor frozen further (a frozen object can still die, so the count may drop a little).
        assert host // 2 < gc.get_freeze_count() < host + len(fresh)
    finally:
        gc.unfreeze()


_HEAP_PROBE = """
import sys
import psutil
from mlflow_slmops.convert import process

if sys.argv[1] == "owned":  # as the slmops CLI does
    process.own_this_process()

MB = 1 << 20
rss = lambda: psutil.Process().memory_info().rss // MB

def freed_mb():
    with process.heap_reused_between_variants():
        block = b"x" * (256 * MB)  # written, so every page is resident
        before = rss()
        del block
        process.release_memory()  # a variant's end: collect, and trim unless the heap is kept
        return before - rss()

with process.heap_reused_between_variants():
    freed_nested = freed_mb()  # an inner call keeps the outer policy
    before_exit = rss()
after_exit = rss()
freed_plain = freed_mb()
print(freed_nested, before_exit - after_exit, freed_plain)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the heap policy is glibc's")
@pytest.mark.parametrize("tuned_env, owner", [(None, "owned"), ({"MALLOC_MMAP_MAX_": "65536"}, "owned"),
                                              ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072"}, "owned"),
                                              (None, "host")])
def test_a_conversion_reuses_its_freed_heap_and_gives_it_back_at_the_end(tuned_env, owner):
    """Inside a conversion a freed 256 MB model stays with the process for the next one (no page is faulted in
    twice); once the conversion is over it goes back to the OS. A user who tuned glibc's heap keeps their
    setting, and so does a host application that imports the library: there the block goes back at once."""
    env = {**os.environ, **(tuned_env or {})}
    proc = subprocess.run([sys.executable, "-c", _HEAP_PROBE, owner], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    freed_nested, returned_at_exit, freed_plain = map(int, proc.stdout.split())
    if tuned_env or owner == "host":
        assert freed_nested > 200 and freed_plain > 200  # glibc's own policy: the block is unmapped on free
    else:
        assert freed_nested < 50  # kept, even through a nested conversion's end
        assert returned_at_exit > 200  # given back when the conversion ends
        assert freed_plain < 50  # and kept again in the next conversion


def test_a_new_copy_of_a_cached_model_imports_olive_aside_and_leaves_no_thread_running(qwen_variants, hf_qwen,
                                                                                         shared_cache, tmp_path):
    """Unseen input files start Olive's import on a thread beside the hashing; if every variant then turns out
    cached, the conversion still waits for that import before it returns, so nothing imports Olive beside it."""
    copy = tmp_path / "copy-of-qwen"
    shutil.copytree(hf_qwen, copy)
    code = ("import sys, threading\nfrom mlflow_slmops.convert import convert_variants\n"
            "from mlflow_slmops.variants import resolve_variants\n"
            "results = convert_variants(sys.argv[1], resolve_variants('int4'), sys.argv[2], cache_dir=sys.argv[3],"
            " progress=False)\n"
            "print('cached:', [r.cached for r in results])\n"
            "print('olive imported:', 'olive.workflows' in sys.modules)\n"
            "print('threads:', sorted(t.name for t in threading.enumerate()))\n")
    proc = run_cli([sys.executable, "-c", code, str(copy), str(tmp_path / "out"), str(shared_cache)])
    assert proc.returncode == 0, proc.stderr
    assert "cached: [True]" in proc.stdout
    assert "olive imported: True" in proc.stdout  # imported aside while the new files were hashed
    assert "slmops-import-olive" not in proc.stdout  # and waited for: no thread left behind


def test_copy_mode_gives_folders_onnx_load_accepts(qwen_variants, hf_qwen, shared_cache, tmp_path):
    import onnx

    linked = Path(qwen_variants["int4"].output_dir)
    assert (linked / "model.onnx.data").stat().st_nlink > 1
    with pytest.raises(Exception, match="hard link"):  # onnx's own guard, the reason for link=False
        onnx.load(str(linked / "model.onnx"))
    result = convert.convert_variant(hf_qwen, PRESETS["int4"], tmp_path / "int4", cache_dir=shared_cache, link=False)
    assert result.status == "ok" and result.cached
    copied = Path(result.output_dir)
    assert all(p.stat().st_nlink == 1 for p in copied.iterdir())
    assert onnx.load(str(copied / "model.onnx")).graph.output[0].name == "logits"
    assert modeldir.weights_hash(copied) == qwen_variants["int4"].weights_sha256


def test_rerun_into_the_same_output_keeps_the_existing_folders(qwen_variants, hf_qwen, shared_cache):
    root = Path(qwen_variants["fp32"].output_dir).parent
    before = tree_snapshot(root)
    again = convert.convert_variants(hf_qwen, [PRESETS["fp32"], PRESETS["int4"]], root, cache_dir=shared_cache,
                                     progress=False)
    assert [r.status for r in again] == ["ok", "ok"] and all(r.cached for r in again)
    assert tree_snapshot(root) == before


def test_existing_different_folder_is_never_overwritten(qwen_variants, hf_qwen, shared_cache, tmp_path):
    mine = tmp_path / "out" / "int4"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("my own work")
    result = convert.convert_variant(hf_qwen, PRESETS["int4"], mine, cache_dir=shared_cache)
    assert result.status == "failed" and "already exists" in result.error
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_changed_input_model_changes_the_cache_key(hf_qwen, tmp_path):
    copy = Path(shutil.copytree(hf_qwen, tmp_path / "copy"))
    cache = tmp_path / "cache"
    same = convert.input_model_hash(copy, cache)
    assert same == convert.input_model_hash(hf_qwen, cache)
    cfg = json.loads((copy / "generation_config.json").read_text())
    (copy / "generation_config.json").write_text(json.dumps({**cfg, "temperature": 0.3}))
    changed = convert.input_model_hash(copy, cache)
    assert changed != same
    assert convert.entry_key(same, PRESETS["int4"]) != convert.entry_key(changed, PRESETS["int4"])


def test_failing_variant_is_recorded_and_the_sweep_goes_on(qwen_variants, hf_qwen, shared_cache, tmp_path):
    # A real variant-level failure: without lm_head the model has no logits output, so validation fails.
    broken = VariantSpec("no-lm-head", "fp32", builder_options={"exclude_lm_head": True})
    results = convert.convert_variants(hf_qwen, [PRESETS["fp32"], broken, PRESETS["int4"]], tmp_path / "out",
                                       cache_dir=shared_cache, progress=False)
    assert [r.status for r in results] == ["ok", "failed", "ok"]
    assert "no 'logits' output" in results[1].error
    assert not (tmp_path / "out" / "no-lm-head").exists()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["fp32", "int4"]
    _assert_cache_holds_only_complete_entries(shared_cache)


# Stock `olive run` has none of the in-process speed-ups (mlflow_slmops.olive_speedups): each of these also
# checks that they leave the weights unchanged (builder export, RTN 4- and 8-bit, symmetric and not, HQQ).
@pytest.mark.parametrize("name", ["fp32", "int8", "int4", "int4-b128-asym", "int4-hqq"])
def test_olive_config_reproduces_the_same_weights_with_olive_run(qwen_variants, tmp_path, name):
    result = qwen_variants[name]
    if fixes.fixes_for(result.spec):  # stock Olive 0.13 writes HQQ's broken layout: replay with the fix only
        cmd = [sys.executable, "-m", "mlflow_slmops.convert.olive.fixes", result.olive_config_path]
    else:
        cmd = [bin_path("olive"), "run", "--config", result.olive_config_path]
    proc = run_cli(cmd, cwd=str(tmp_path), env={"OLIVE_DISABLE_TELEMETRY": "1", "CI": "1"})  # CI: no heartbeat
    assert proc.returncode == 0, proc.stderr[-3000:]
    rebuilt = tmp_path / "olive-output" / name
    assert modeldir.weights_hash(rebuilt) == result.weights_sha256


def test_cli_converts_documented_yaml_variants_and_names_each_folder(qwen_variants, hf_qwen, shared_cache,
                                                                     tmp_path):
    doc = (Path(__file__).resolve().parents[1] / "docs" / "variants.md").read_text()
    yaml_example = doc.split("```yaml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "my-variants.yaml").write_text(yaml_example)
    out = tmp_path / "variants"
    proc = slmops("convert", "--model", str(hf_qwen), "--variants-file", str(tmp_path / "my-variants.yaml"),
                  "--variants", "int4,int4-b64", "--output", str(out), "--cache-dir", str(shared_cache))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("int4", "int4-b64"):
        assert f"{name}: {out / name}" in proc.stderr
        assert name in proc.stdout
        assert len(_generate(out / name)) == 4
    assert json.loads((out / "int4-b64" / "olive_config.json").read_text())["passes"]["quantize"]["block_size"] == 64


# ---------------------------------------------------------------- bad input, through the real CLI

def _bad_model(tmp_path: Path, hf_qwen: Path, config_edit) -> Path:
    model = Path(shutil.copytree(hf_qwen, tmp_path / "model"))
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(config_edit(cfg)))
    return model


def _convert_cli(model: Path, out: Path, *extra: str):
    return slmops("convert", "--model", str(model), "--variants", "int4", "--output", str(out), *extra)


def test_cli_missing_model_folder(tmp_path):
    result = _convert_cli(tmp_path / "nope", tmp_path / "out")
    assert_one_line_error(result, f"model folder {tmp_path / 'nope'} does not exist")
    assert not (tmp_path / "out").exists()


def test_cli_folder_without_config_json(tmp_path, hf_qwen):
    model = Path(shutil.copytree(hf_qwen, tmp_path / "model"))
    (model / "config.json").unlink()
    result = _convert_cli(model, tmp_path / "out")
    assert_one_line_error(result, "has no config.json", "save_pretrained")
    assert not (tmp_path / "out").exists()


def test_cli_unsupported_architecture_lists_the_supported_ones(tmp_path, hf_qwen):
    model = _bad_model(tmp_path, hf_qwen, lambda c: {**c, "architectures": ["BertForMaskedLM"], "model_type": "bert"})
    result = _convert_cli(model, tmp_path / "out")
    assert_one_line_error(result, "architecture 'BertForMaskedLM'", "supported:", "Qwen2ForCausalLM",
                          "LlamaForCausalLM", "Phi3ForCausalLM")
    assert not (tmp_path / "out").exists()


def test_cli_refuses_remote_code_unless_allowed(tmp_path, hf_qwen):
    model = _bad_model(tmp_path, hf_qwen, lambda c: {**c, "auto_map": {
        "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}})
    result = _convert_cli(model, tmp_path / "out")
    assert_one_line_error(result, "trust_remote_code", "modeling_custom", "--trust-remote-code")
    assert not (tmp_path / "out").exists()
    # With the flag the same folder passes the check (the conversion itself is not attempted here).
    assert convert.check_hf_model_dir(model, trust_remote_code=True)["auto_map"]


def _with_file_size_quota():
    # SIGXFSZ would kill the process; ignored, an oversized write fails with EFBIG like a full quota.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_QUOTA, FILE_SIZE_QUOTA))


def test_cli_write_failure_mid_conversion_leaves_nothing_partial(tmp_path, hf_qwen):
    cache, out = tmp_path / "cache", tmp_path / "out"
    proc = subprocess.run([bin_path("slmops"), "convert", "--model", str(hf_qwen), "--variants", "fp32,int4",
                           "--output", str(out), "--cache-dir", str(cache), "--quiet"],
                          capture_output=True, text=True, preexec_fn=_with_file_size_quota, timeout=900)
    assert_one_line_error(proc, "every variant failed")
    assert "fp32: FAILED: File too large" in proc.stderr and "int4: FAILED: File too large" in proc.stderr
    assert not out.exists()
    assert list((cache / "variants").iterdir()) == []
    _assert_cache_holds_only_complete_entries(cache)


@pytest.fixture()
def tiny_disk(tmp_path):
    """A 640 KB tmpfs: too small for the tiny model's fp32 variant, big enough for its int4 one."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=640k", "tmpfs", str(disk)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root; the file-size-quota test covers write failures")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_disk_full_while_publishing_removes_the_partial_folder(qwen_variants, hf_qwen, shared_cache, tiny_disk):
    (tiny_disk / "mine.txt").write_text("already here")
    out = tiny_disk / "out"
    results = convert.convert_variants(hf_qwen, [PRESETS["fp32"], PRESETS["int4"]], out, cache_dir=shared_cache,
                                       progress=False)
    assert results[0].status == "failed" and "No space left on device" in results[0].error
    assert results[1].status == "ok", results[1].error
    assert sorted(p.name for p in out.iterdir()) == ["int4"]  # no fp32, no hidden partial folder
    assert len(_generate(out / "int4")) == 4
    assert (tiny_disk / "mine.txt").read_text() == "already here"


def _interrupt_conversion(hf_qwen: Path, tmp_path: Path, ready: Callable[[subprocess.Popen], object],
                          what: str) -> object:
    """Run `slmops convert` of three variants, press Ctrl-C once ready(proc) is truthy, and check what every
    interrupted conversion must give: exit 130, one line and no traceback, no partial folder in the output,
    only complete entries in the cache. Returns what ready() returned."""
    cache, out = tmp_path / "cache", tmp_path / "out"
    proc = subprocess.Popen([bin_path("slmops"), "convert", "--model", str(hf_qwen), "--variants", "fp32,int8,int4",
                             "--output", str(out), "--cache-dir", str(cache), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + SIGINT_WAIT_S
    while not (seen := ready(proc)):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"never saw {what}"
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=SIGINT_WAIT_S)
    assert proc.returncode == 130, stderr[-3000:]
    assert "Interrupted" in stderr and "Traceback" not in stderr
    leftovers = [p.name for p in out.iterdir()] if out.exists() else []
    assert not [n for n in leftovers if n.startswith(".")], leftovers
    for name in leftovers:  # a variant that finished (or whose check ended) before Python saw the signal is whole
        modeldir.check_genai_dir(out / name)
    _assert_cache_holds_only_complete_entries(cache)
    return seen


def test_ctrl_c_mid_conversion_leaves_no_partial_folder_and_only_complete_cache_entries(tmp_path, hf_qwen):
    cache = tmp_path / "cache"
    runs = cache / "olive" / "default_workflow" / "runs"
    # Olive is writing a model: a build in flight in the cache's tmp folder.
    _interrupt_conversion(hf_qwen, tmp_path, lambda _proc: runs.is_dir() and any(runs.iterdir())
                          and any((cache / "tmp").iterdir()), "a build in flight")


@pytest.mark.parametrize("one_variant", [True, False])
def test_ctrl_c_that_an_extension_import_turned_into_an_import_error_still_interrupts(monkeypatch, hf_qwen,
                                                                                      tmp_path, one_variant):
    """pybind11 reports a KeyboardInterrupt raised while its module initializes as `ImportError: initialization
    failed`; a Ctrl-C then must still stop the conversion, not fail a variant and go on to the next."""
    def olive_importing_an_extension(*_args, **_kwargs):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        except KeyboardInterrupt as exc:
            raise ImportError("initialization failed") from exc
        raise AssertionError("no KeyboardInterrupt")

    monkeypatch.setattr(olive, "run", olive_importing_an_extension)
    out, cache = tmp_path / "out", tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        if one_variant:
            convert.convert_variant(hf_qwen, PRESETS["fp32"], out / "fp32", cache_dir=cache)
        else:
            convert.convert_variants(hf_qwen, [PRESETS["fp32"], PRESETS["int4"]], out, cache_dir=cache,
                                     progress=False)
    assert not out.exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    _assert_cache_holds_only_complete_entries(cache)


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(convert.CACHE_ENV, str(tmp_path / "c"))
    assert convert.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv(convert.CACHE_ENV)
    assert convert.default_cache_dir() == Path("~/.cache/mlflow-slmops").expanduser()


def test_results_serialize_to_plain_json(qwen_variants):
    data = json.loads(json.dumps(qwen_variants["int4"].to_dict()))
    assert data["spec"]["name"] == "int4" and data["status"] == "ok"
    assert data["weights_sha256"] == qwen_variants["int4"].weights_sha256


def test_publish_removes_partial_folders_a_killed_run_left_and_keeps_a_running_ones(qwen_variants, hf_qwen,
                                                                                    shared_cache, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    dead = out / f".fp32{convert.PARTIAL_TAG}{2**22 + 1}-0badc0de"  # above Linux's pid_max: no such process
    running = out / f".fp32{convert.PARTIAL_TAG}{os.getpid()}-0badc0de"
    for folder in (dead, running):
        folder.mkdir()
        (folder / "model.onnx").write_bytes(b"half")
    result = convert.convert_variant(hf_qwen, PRESETS["fp32"], out / "fp32", cache_dir=shared_cache)
    assert result.status == "ok", result.error
    assert sorted(p.name for p in out.iterdir()) == sorted(["fp32", running.name])


def _validation_children(pid: int) -> list:
    """The load-and-generate check subprocesses running under pid."""
    import psutil

    found = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if validate.VALIDATE_SCRIPT in child.cmdline():
                found.append(child)
        except psutil.NoSuchProcess:
            continue
    return found


def test_ctrl_c_while_one_variant_validates_and_the_next_builds_leaves_no_process_and_nothing_partial(
        tmp_path, hf_qwen):
    import psutil

    # The overlap: a variant's load-and-generate check running while Olive builds the next one.
    validating = _interrupt_conversion(hf_qwen, tmp_path, lambda proc: _validation_children(proc.pid),
                                       "a validation subprocess")
    for child in validating:  # killed and reaped, not orphaned
        assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE


def test_a_build_removes_debris_of_dead_builds_and_keeps_the_folder_of_a_live_one(qwen_variants, hf_qwen, models_root,
                                                                                   tmp_path):
    from tests.faultkit import copy_warm_cache

    cache = copy_warm_cache(models_root, tmp_path / "cache", drop=("int4",))  # int4 must be built (Olive)
    dead = cache / "tmp" / f"0123456789abcdef-{2**22 + 1}-zz"  # above Linux's pid_max: no such process
    live = cache / "tmp" / f"0123456789abcdef-{os.getpid()}-zz"  # another sweep validating this build
    for folder in (dead, live):
        (folder / "model").mkdir(parents=True)
        (folder / "model" / "model.onnx").write_bytes(b"half")
    result = convert.convert_variant(hf_qwen, PRESETS["int4"], tmp_path / "out" / "int4", cache_dir=cache)
    assert result.status == "ok" and not result.cached, result.error
    assert [p.name for p in (cache / "tmp").iterdir()] == [live.name]
    assert (live / "model" / "model.onnx").read_bytes() == b"half"
    assert list((cache / "locks").iterdir()) == []


def test_two_names_for_one_spec_in_one_conversion_build_it_once_and_publish_both(qwen_variants, hf_qwen,
                                                                                   models_root, tmp_path):
    """The second name waits for the first's entry (same cache key) instead of failing on its own lock."""
    from dataclasses import replace

    from tests.faultkit import copy_warm_cache

    cache = copy_warm_cache(models_root, tmp_path / "cache", drop=("int4",))
    twins = [PRESETS["int4"], replace(PRESETS["int4"], name="int4-again")]
    results = convert.convert_variants(hf_qwen, twins, tmp_path / "out", cache_dir=cache, progress=False)
    assert [(r.spec.name, r.status, r.cached) for r in results] == [("int4", "ok", False), ("int4-again", "ok", True)]
    assert results[0].weights_sha256 == results[1].weights_sha256
    assert len(_generate(tmp_path / "out" / "int4-again")) == 4
    _assert_cache_holds_only_complete_entries(cache)
