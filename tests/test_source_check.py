"""Fidelity to the user's own model: the source reference (PyTorch), the src_* figures, and the export guard."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlflow
import numpy as np
import pytest

from mlflow_slmops import metrics as M
from mlflow_slmops.measure import quality, source_ref
from tests.helpers import assert_one_line_error, slmops

FEW = quality.QualityConfig(chunk_tokens=64, max_chunks=3)
NO_PROBES: tuple[str, ...] = ()


@pytest.fixture(scope="module")
def small_qa(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("qa") / "qa.jsonl"
    path.write_text(json.dumps({"prompt": "Say hi.", "expected": "hi"}) + "\n")
    return path


@pytest.fixture(scope="module")
def qwen_ref(hf_qwen):
    return quality.source_reference_for(hf_qwen, None, FEW)


@pytest.fixture(scope="module")
def hf_olmo(models_root) -> Path:
    """OLMo (v1) with clip_qkv: the genai 0.14.1 builder ignores the clamp and exports it wrong (docs/architectures.md)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from devkit.toymodel import DEFAULT_CORPUS, build_tiny_model, train_tokenizer

    tok = train_tokenizer(DEFAULT_CORPUS * 4, 512, "qwen2")
    eos = tok.token_to_id("<|im_end|>")
    config = AutoConfig.for_model("olmo", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048,
                                  clip_qkv=0.05, bos_token_id=tok.token_to_id("<|endoftext|>"), eos_token_id=eos, pad_token_id=eos)
    torch.manual_seed(0)
    return build_tiny_model(models_root / "hf-olmo-guard", "qwen2", tokenizer=tok,
                            model=AutoModelForCausalLM.from_config(config))


@pytest.fixture(scope="module")
def hf_qwen_bf16_sharded(models_root) -> Path:
    """A fine-tuned folder as they usually come: bf16 safetensors in several shards, with an index."""
    import torch
    from transformers import AutoModelForCausalLM

    from devkit.toymodel import (
        ARCHS,
        DEFAULT_CORPUS,
        build_config,
        build_tiny_model,
        train_tokenizer,
    )

    out = models_root / "hf-qwen-bf16-sharded"
    tok = train_tokenizer(DEFAULT_CORPUS * 4, 512, "qwen2")
    spec = ARCHS["qwen2"]
    config = build_config("qwen2", 512, 64, 2, 4, 2, 128, 2048, tok.token_to_id(spec.bos), tok.token_to_id(spec.eos))
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.config.torch_dtype = "bfloat16"
    build_tiny_model(out, "qwen2", tokenizer=tok, model=model)
    # Re-save in shards of 100 kB, as a multi-GB checkpoint comes in shards of a few GB.
    for f in out.glob("model*.safetensors"):
        f.unlink()
    model.save_pretrained(str(out), safe_serialization=True, max_shard_size="100KB")
    return out


def _numpy_reference(genai_dir: Path, ref) -> dict:
    """The src_* figures recomputed in float64 numpy, straight from both models' logits."""
    import onnxruntime_genai as og

    model = og.Model(str(genai_dir))
    kls, agree, dps, nll, src_nll, predictions = [], 0, [], 0.0, 0.0, 0
    for i, chunk in enumerate(ref.chunks):
        x = quality.chunk_logits(model, chunk).astype(np.float64)
        b = np.asarray(ref.logits(i), dtype=np.float64)
        lx = x - np.log(np.exp(x - x.max(1, keepdims=True)).sum(1, keepdims=True)) - x.max(1, keepdims=True)
        lb = b - np.log(np.exp(b - b.max(1, keepdims=True)).sum(1, keepdims=True)) - b.max(1, keepdims=True)
        kls.extend((np.exp(lb) * (lb - lx)).sum(1))
        top = b.argmax(1)
        agree += int((x.argmax(1) == top).sum())
        rows = np.arange(len(chunk))
        dps.extend(np.abs(np.exp(lx[rows, top]) - np.exp(lb[rows, top])))
        nxt = np.asarray(chunk[1:])
        nll -= lx[rows[:-1], nxt].sum()
        src_nll -= lb[rows[:-1], nxt].sum()
        predictions += len(chunk) - 1
    kl = np.maximum(np.asarray(kls), 0.0)
    ppl, src_ppl = math.exp(nll / predictions), math.exp(src_nll / predictions)
    return {M.SRC_KL_MEAN: kl.mean(), M.SRC_KL_MEDIAN: np.median(kl), M.SRC_KL_P99: np.percentile(kl, 99),
            M.SRC_KL_MAX: kl.max(), M.SRC_TOP1_AGREEMENT: agree / len(kl), M.SRC_DELTA_P_MEAN: np.mean(dps),
            M.SRC_PPL_DELTA_PCT: 100 * (ppl - src_ppl) / src_ppl, M.SRC_PERPLEXITY: src_ppl}


def test_src_figures_are_the_kl_statistics_of_the_two_models_logits(genai_qwen_int4, qwen_ref, small_qa):
    got = quality.evaluate(genai_qwen_int4, qa_path=small_qa, config=FEW, probes=NO_PROBES,
                           source_ref=qwen_ref.path).metrics()
    want = _numpy_reference(genai_qwen_int4, qwen_ref)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-12), key
    assert 0 < got[M.SRC_KL_MEAN] < got[M.SRC_KL_MAX]


def test_a_faithful_fp32_export_matches_its_source_to_float_rounding(genai_qwen_fp32, genai_qwen_int4, qwen_ref,
                                                                     small_qa):
    fp32 = quality.evaluate(genai_qwen_fp32, qa_path=small_qa, config=FEW, probes=NO_PROBES,
                            source_ref=qwen_ref.path).metrics()
    assert fp32[M.SRC_KL_MAX] < 1e-9
    assert fp32[M.SRC_TOP1_AGREEMENT] == 1.0
    assert abs(fp32[M.SRC_PPL_DELTA_PCT]) < 1e-4
    # Against fp32 and against the source, int4's error is then the same figure.
    int4 = quality.evaluate(genai_qwen_int4, qa_path=small_qa, baseline_dir=genai_qwen_fp32, config=FEW,
                            probes=NO_PROBES, source_ref=qwen_ref.path).metrics()
    assert int4[M.SRC_KL_MEAN] == pytest.approx(int4[M.KL_DIV], rel=1e-4)


def test_the_reference_is_one_float32_file_per_chunk_built_once(hf_qwen, qwen_ref):
    meta = qwen_ref.meta
    assert meta["chunks"] == len(qwen_ref.chunks) == FEW.max_chunks
    assert meta["source_dtype"] == "float32" and meta["compute_dtype"] == "float32"
    assert 0 < meta["peak_rss_mb"] < 4096  # the worker's own peak, not the peak of the process that started it
    for i, chunk in enumerate(qwen_ref.chunks):
        logits = qwen_ref.logits(i)
        assert logits.dtype == np.float32 and logits.shape == (len(chunk), meta["vocab_size"])
    stamp = (qwen_ref.path / source_ref.META_FILE).stat().st_mtime_ns
    again = quality.source_reference_for(hf_qwen, None, FEW)
    assert again.path == qwen_ref.path
    assert (again.path / source_ref.META_FILE).stat().st_mtime_ns == stamp  # reused, not rebuilt
    other = quality.source_reference_for(hf_qwen, None, quality.QualityConfig(chunk_tokens=32, max_chunks=1))
    assert other.path != qwen_ref.path and len(other.chunks[0]) == 32
    assert not [p for p in qwen_ref.path.parent.iterdir() if source_ref.PARTIAL_TAG in p.name]


def test_a_sweep_of_a_bf16_sharded_folder_reads_it_in_its_dtype_and_computes_in_fp32(hf_qwen_bf16_sharded, tmp_path):
    assert len(list(hf_qwen_bf16_sharded.glob("model-*-of-*.safetensors"))) > 1
    assert source_ref.saved_dtype(hf_qwen_bf16_sharded) == "bfloat16"
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    result = slmops("sweep", "--model", str(hf_qwen_bf16_sharded), "--variants", "fp32,int4",
                    "--output", str(tmp_path / "out"), "--prompt-len", "16", "--gen-len", "4", "--repeats", "1",
                    "--quiet", env=env, cwd=str(tmp_path), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "bfloat16, computed in fp32" in result.stdout
    runs = _runs(env)
    sweep = next(r for r in runs if r.data.tags.get(M.ROLE_TAG) == M.ROLE_SWEEP)
    fp32, int4 = (next(r for r in runs if r.data.tags.get(M.VARIANT_TAG) == v).data.metrics for v in ("fp32", "int4"))
    assert sweep.data.params["source_dtype"] == "bfloat16"
    # The builder upcasts the bf16 weights exactly as PyTorch does: no export error, int4's own error on top.
    assert fp32[M.SRC_KL_MAX] < 1e-9 and fp32[M.SRC_TOP1_AGREEMENT] == 1.0
    assert int4[M.SRC_KL_MEAN] > 1000 * fp32[M.SRC_KL_MEAN]
    assert sweep.data.tags[M.EXPORT_MISMATCH_TAG] == "false"


def _runs(env: dict) -> list:
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    try:
        client = mlflow.MlflowClient()
        return client.search_runs([e.experiment_id for e in client.search_experiments()])
    finally:
        mlflow.set_tracking_uri(None)


def test_a_variant_with_another_tokenizer_is_refused_against_the_source(genai_llama_fp32, qwen_ref, small_qa):
    from mlflow_slmops.errors import SlmopsError

    with pytest.raises(SlmopsError, match="other tokens than the source model's tokenizer"):
        quality.evaluate(genai_llama_fp32, qa_path=small_qa, config=FEW, probes=NO_PROBES, source_ref=qwen_ref.path)


def test_evaluate_cli_scores_against_a_source_model_and_logs_its_kl_histogram(hf_qwen, genai_qwen_int4, small_qa,
                                                                              tracking, tmp_path):
    out = tmp_path / "q.json"
    result = slmops("evaluate", "--model-dir", str(genai_qwen_int4), "--source-model", str(hf_qwen),
                    "--qa", str(small_qa), "--chunk-tokens", "64", "--json", str(out), "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "src_kl_mean" in result.stdout
    assert json.loads(out.read_text())["source"]["kl_mean"] > 0
    run_id = result.stdout.strip().splitlines()[-1].split()[-1]
    client = mlflow.MlflowClient()
    assert set(M.SOURCE_METRICS) <= set(client.get_run(run_id).data.metrics)
    assert "src_kl_histogram.png" in {a.path for a in client.list_artifacts(run_id)}


def test_evaluate_cli_refuses_a_source_that_is_not_a_model_folder(genai_qwen_int4, tmp_path):
    result = slmops("evaluate", "--model-dir", str(genai_qwen_int4), "--source-model", str(tmp_path / "nope"),
                    "--no-log", "--quiet")
    assert_one_line_error(result, "does not exist", "nope")


# ---------------------------------------------------------------- the export guard, through the real CLI


@pytest.fixture(scope="module")
def olmo_sweep(hf_olmo, tmp_path_factory):
    work = tmp_path_factory.mktemp("olmo-sweep")
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
    result = slmops("sweep", "--model", str(hf_olmo), "--variants", "fp32,int4", "--output", str(work / "out"),
                    "--prompt-len", "16", "--gen-len", "4", "--repeats", "1", "--quiet", env=env, cwd=str(work),
                    timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    client = mlflow.MlflowClient()
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    yield result, client, runs, env, work
    mlflow.set_tracking_uri(None)


def test_a_wrong_export_is_flagged_on_every_run_with_one_warning(olmo_sweep):
    result, client, runs, _, work = olmo_sweep
    assert len(runs) == 3
    assert {r.data.tags[M.EXPORT_MISMATCH_TAG] for r in runs} == {"true"}
    fp32 = next(r for r in runs if r.data.tags.get(M.VARIANT_TAG) == "fp32")
    assert fp32.data.metrics[M.SRC_KL_MAX] > M.EXPORT_MAX_SRC_KL
    warnings = [ln for ln in result.stderr.splitlines() if ln.startswith("Warning")]
    guard = [w for w in warnings if "src_kl_max" in w]
    assert len(guard) == 1 and "OlmoForCausalLM" in guard[0]
    # Known before any work, too: the architecture table names the builder gap.
    assert any("clip_qkv" in w for w in warnings if w not in guard)
    assert "## Export mismatch" in (work / "out" / "report" / "report.md").read_text()


def test_promote_refuses_a_wrong_export_unless_allowed(olmo_sweep):
    _, client, runs, env, work = olmo_sweep
    sweep_id = next(r.info.run_id for r in runs if r.data.tags.get(M.ROLE_TAG) == M.ROLE_SWEEP)
    args = ["promote", "--sweep-run-id", sweep_id, "--name", "olmo-bot", "--max-ppl-delta-pct", "1000"]
    refused = slmops(*args, env=env, cwd=str(work))
    assert_one_line_error(refused, "slmops.export_mismatch=true", "--allow-export-mismatch")
    assert not client.search_registered_models()
    allowed = slmops(*args, "--allow-export-mismatch", env=env, cwd=str(work))
    assert allowed.returncode == 0, allowed.stderr[-2000:]
    assert str(client.get_model_version_by_alias("olmo-bot", "champion").version) == "1"


def test_no_source_check_skips_the_source_model_and_says_so(hf_qwen, tmp_path):
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    result = slmops("sweep", "--model", str(hf_qwen), "--variants", "fp32", "--output", str(tmp_path / "out"),
                    "--prompt-len", "16", "--gen-len", "4", "--repeats", "1", "--no-source-check", "--quiet",
                    env=env, cwd=str(tmp_path), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = _runs(env)
    sweep = next(r for r in runs if r.data.tags.get(M.ROLE_TAG) == M.ROLE_SWEEP)
    fp32 = next(r for r in runs if r.data.tags.get(M.VARIANT_TAG) == "fp32")
    assert sweep.data.tags[M.SOURCE_CHECK_TAG] == "skipped"
    assert M.EXPORT_MISMATCH_TAG not in sweep.data.tags
    assert not set(M.SOURCE_METRICS) & set(fp32.data.metrics)
    assert M.KL_DIV in fp32.data.metrics  # the fp32 baseline is still measured
