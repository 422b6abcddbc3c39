"""The architecture matrix: a small model of every decoder the onnxruntime-genai builder lists, converted to fp32 by
the real conversion and compared with PyTorch on the same tokens; or refused before any work; or, for a known
builder gap, diverging by what ``mlflow_slmops.architectures`` records (so the table fails when upstream fixes it).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from devkit.testing import TEST_CACHE_DIRNAME
from mlflow_slmops import convert
from mlflow_slmops.convert import architectures as A
from mlflow_slmops.convert import inputs, olive
from mlflow_slmops.errors import SlmopsError
from mlflow_slmops.variants import resolve_variants
from tests.helpers import assert_one_line_error, slmops

VOCAB = 1024
COMPARED_TOKENS = 64
TOKEN_SEED = 0
# A divergence recorded in the table (measured by the benchmark at its own vocabulary) and the one measured here
# on the test's smaller vocabulary agree within this factor on max |logit diff|.
RECORDED_DIVERGENCE_FACTOR = 10.0


@pytest.fixture(scope="session")
def fp32():
    return resolve_variants("fp32", None)[0]


@pytest.fixture(scope="session")
def tiny_arch(models_root):
    """Builds (once per session) the HF folder of one TINY_SHAPES case; all share one trained tokenizer."""
    from devkit.toymodel import DEFAULT_CORPUS, build_tiny_architecture, train_tokenizer

    tokenizer = train_tokenizer(DEFAULT_CORPUS * 4, VOCAB, "qwen2")
    built: dict[str, Path] = {}

    def build(case: str) -> Path:
        if case not in built:
            built[case] = build_tiny_architecture(models_root / f"hf-arch-{case}", case, vocab_size=VOCAB,
                                                  tokenizer=tokenizer)
        return built[case]

    return build


def _token_ids() -> list[int]:
    return [int(i) for i in np.random.default_rng(TOKEN_SEED).integers(0, VOCAB, COMPARED_TOKENS)]


def _divergence(hf_dir: Path, genai_dir: Path) -> A.Divergence:
    import onnxruntime_genai as og
    import torch
    from transformers import AutoModelForCausalLM

    from mlflow_slmops.measure.quality import chunk_logits

    ids = _token_ids()
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        reference = model(torch.tensor([ids])).logits[0].numpy()
    return A.Divergence.between(reference, chunk_logits(og.Model(str(genai_dir)), ids))


def _config(hf_dir: Path) -> dict:
    return json.loads((hf_dir / "config.json").read_text())


def _gaps(config: dict, action: str) -> list[A.BuilderGap]:
    arch = config["architectures"][0]
    return [g for g in A.BUILDER_GAPS if g.architecture == arch and g.action == action and g.applies(config)]


@pytest.mark.parametrize("case", sorted(A.TINY_SHAPES))
def test_fp32_export_matches_pytorch_unless_refused_or_a_recorded_gap(case, tiny_arch, fp32, models_root):
    hf_dir = tiny_arch(case)
    config = _config(hf_dir)
    arch = config["architectures"][0]
    out = models_root / f"genai-arch-{case}"
    if _gaps(config, A.REFUSE):
        with pytest.raises(SlmopsError, match=f"^{arch} cannot be converted here: ") as refused:
            convert.convert_variant(hf_dir, fp32, out, cache_dir=models_root / TEST_CACHE_DIRNAME)
        assert "\n" not in refused.value.message and not out.exists()
        return
    result = convert.convert_variant(hf_dir, fp32, out, cache_dir=models_root / TEST_CACHE_DIRNAME)
    assert result.status == "ok", result.error
    got = _divergence(hf_dir, out)
    flagged = _gaps(config, A.FLAG)
    if not flagged:
        assert got.matches(), f"{case} ({arch}): {got.summary()}"
        return
    (gap,) = flagged
    assert not got.matches(), f"{case}: {gap.reason!r} no longer diverges ({got.summary()}): update the table"
    assert gap.case == case and gap.measured is not None, "record the benchmark's figures for this gap"
    ratio = got.max_abs_diff / gap.measured.max_abs_diff
    assert 1 / RECORDED_DIVERGENCE_FACTOR <= ratio <= RECORDED_DIVERGENCE_FACTOR, \
        f"{case}: {got.summary()}, the table records {gap.measured.summary()}"


def test_every_builder_architecture_is_in_the_matrix_or_excluded_with_a_reason():
    covered = {shape.architecture for shape in A.TINY_SHAPES.values()}
    listed = set(convert.supported_architectures())
    assert not listed - covered - set(A.UNTESTED), "add a TINY_SHAPES case, or an UNTESTED reason"
    assert not covered & set(A.UNTESTED)
    assert all(reason.strip() for reason in A.UNTESTED.values())
    assert {g.architecture for g in A.BUILDER_GAPS} <= listed, "a gap names an architecture the builder lacks"


def test_every_flagged_gap_has_a_matrix_case_that_shows_it():
    for gap in (g for g in A.BUILDER_GAPS if g.action == A.FLAG):
        shape = A.TINY_SHAPES[gap.case]
        assert shape.architecture == gap.architecture
        assert gap.applies({"architectures": [shape.architecture], **shape.config})


@pytest.mark.parametrize("arch", sorted({g.architecture for g in A.BUILDER_GAPS if g.action == A.REFUSE}))
def test_refused_architecture_gets_one_line_naming_it_and_the_gap(arch, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": [arch]}))
    with pytest.raises(SlmopsError) as refused:
        convert.check_hf_model_dir(model)
    (gap,) = [g for g in A.BUILDER_GAPS if g.architecture == arch]
    assert refused.value.message.startswith(f"{arch} cannot be converted here: {gap.reason}")
    assert A.DOCS in refused.value.message


def test_refusal_comes_before_any_work(tiny_arch, fp32, tmp_path, monkeypatch):
    def no_work(*_args, **_kwargs):
        raise AssertionError("the conversion started work on a refused architecture")

    monkeypatch.setattr(inputs, "input_model_hash", no_work)
    monkeypatch.setattr(olive, "run", no_work)
    out, cache = tmp_path / "out" / "fp32", tmp_path / "cache"
    with pytest.raises(SlmopsError, match="^PhiMoEForCausalLM cannot be converted here"):
        convert.convert_variant(tiny_arch("phimoe"), fp32, out, cache_dir=cache)
    assert not (tmp_path / "out").exists() and not cache.exists()


def test_slmops_convert_refuses_with_one_error_line(tiny_arch, tmp_path):
    out = tmp_path / "out"
    result = slmops("convert", "--model", str(tiny_arch("phimoe")), "--variants", "fp32", "--output", str(out))
    assert_one_line_error(result, "PhiMoEForCausalLM cannot be converted here", "CUDA")
    assert not out.exists()


def test_flagged_config_converts_with_a_warning_naming_the_gap():
    warning = A.check_convertible({"architectures": ["OlmoForCausalLM"], "clip_qkv": 8.0})
    assert warning.startswith("OlmoForCausalLM converts, but its logits will differ") and "clip_qkv" in warning
    assert A.check_convertible({"architectures": ["OlmoForCausalLM"], "clip_qkv": None}) is None


def test_olive_config_names_the_fixes_an_export_was_built_with(tiny_arch, fp32, models_root):
    phi = convert.olive_config(tiny_arch("phi"), fp32, "out", None)["passes"]["builder"]
    assert phi["extra_options"][A.FIXES_OPTION] == "phi-partial-rotary"
    qwen = convert.olive_config(tiny_arch("qwen2"), fp32, "out", None)["passes"]["builder"]
    assert "extra_options" not in qwen  # an architecture without fixes keeps stock Olive's exact config


def test_builder_fixes_are_undone_outside_the_conversion():
    from onnxruntime_genai.models import builder

    def methods():
        return {f.name: getattr(builder, f.builder_class).__dict__[f.method] for f in A.BUILDER_FIXES}

    before = methods()
    with A.builder_fixes():
        assert all(method is not before[name] for name, method in methods().items())
    assert methods() == before


def test_builder_fixes_apply_only_to_the_builder_they_were_checked_against(monkeypatch):
    from onnxruntime_genai.models import builder

    olmo = {"architectures": ["OlmoForCausalLM"]}
    assert A.fixes_for(olmo) == ["olmo-layernorm"]
    present = [(getattr(builder, f.builder_class), f.method) for f in A.BUILDER_FIXES
               if f.method in getattr(getattr(builder, f.builder_class, None), "__dict__", {})]
    stock = {(cls, method): cls.__dict__[method] for cls, method in present}
    with A.builder_fixes():  # on the verified builder they are in place
        assert any(cls.__dict__[method] is not stock[cls, method] for cls, method in present)
    monkeypatch.setattr(A, "VERIFIED_BUILDER_VERSION", "0.13.0")
    assert A.fixes_for(olmo) == []
    with A.builder_fixes():  # on any other, the builder runs as it is
        assert all(cls.__dict__[method] is stock[cls, method] for cls, method in present)
    assert all(cls.__dict__[method] is stock[cls, method] for cls, method in present)
