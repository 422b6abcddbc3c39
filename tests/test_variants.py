"""Variant specs: presets, validation messages, variants files (including the documented examples)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from mlflow_slmops.errors import SlmopsError
from mlflow_slmops.variants import (
    PRESETS,
    VariantSpec,
    load_variants_file,
    resolve_variants,
    spec_key,
)
from tests.helpers import assert_one_line_error, slmops

DOCS = Path(__file__).resolve().parents[1] / "docs" / "variants.md"


def test_presets_are_the_ten_documented_names():
    assert list(PRESETS) == ["fp32", "int8", "int4", "int4-b128-asym", "int4-kquant", "int4-hqq", "fp16-cuda",
                             "int4-gptq", "int4-e8", "int4-mixed"]
    for name, spec in PRESETS.items():
        assert spec.name == name


def test_int4_preset_is_rtn_block32_symmetric_accuracy4():
    spec = PRESETS["int4"]
    assert (spec.precision, spec.algo, spec.block_size, spec.is_symmetric, spec.accuracy_level) == \
        ("int4", "rtn", 32, True, 4)
    asym = PRESETS["int4-b128-asym"]
    assert (asym.block_size, asym.is_symmetric) == (128, False)
    assert PRESETS["int8"].precision == "int8" and PRESETS["int8"].algo == "rtn"
    assert PRESETS["int4-kquant"].algo == "k_quant" and PRESETS["int4-hqq"].algo == "hqq"


def test_only_the_cuda_preset_is_build_only_on_a_cpu_machine():
    assert [n for n, s in PRESETS.items() if s.build_only] == ["fp16-cuda"]
    cuda = PRESETS["fp16-cuda"]
    assert (cuda.precision, cuda.execution_provider, cuda.device) == ("fp16", "cuda", "gpu")


@pytest.mark.parametrize("spec", list(PRESETS.values()), ids=list(PRESETS))
def test_every_preset_round_trips_through_a_dict(spec):
    data = json.loads(json.dumps(spec.to_dict()))
    assert VariantSpec.from_dict(data) == spec


@pytest.mark.parametrize("field,value,choices", [
    ("precision", "int3", "fp32, fp16, int8, int4"),
    ("block_size", 100, "16, 32, 64, 128, 256"),
    ("algo", "awq", "rtn, k_quant, hqq, gptq"),
    ("accuracy_level", 7, "0, 1, 2, 3, 4"),
    ("execution_provider", "tpu", "cpu, cuda, dml, webgpu"),
    ("device", "npu", "cpu, gpu"),
])
def test_invalid_field_value_error_lists_the_valid_choices(field, value, choices):
    data = {"name": "mine", "precision": "int4", field: value}
    with pytest.raises(SlmopsError) as err:
        VariantSpec.from_dict(data)
    assert f"invalid {field} {value!r}" in err.value.message
    assert choices in err.value.message
    assert "'mine'" in err.value.message


def test_unknown_field_error_lists_the_spec_fields():
    with pytest.raises(SlmopsError, match="invalid field 'bits'.*name, precision, block_size"):
        VariantSpec.from_dict({"name": "x", "precision": "int4", "bits": 4})


def test_combinations_that_cannot_be_built_are_refused():
    with pytest.raises(SlmopsError, match="fp16 is built for a GPU"):
        VariantSpec("x", "fp16")
    with pytest.raises(SlmopsError, match="invalid algo 'hqq' for precision int8; valid choices: rtn, k_quant"):
        VariantSpec("x", "int8", algo="hqq")
    with pytest.raises(SlmopsError, match="is_symmetric True for algo k_quant"):
        VariantSpec("x", "int4", algo="k_quant", is_symmetric=True)
    with pytest.raises(SlmopsError, match="block_size applies to int8/int4 variants, not fp32"):
        VariantSpec("x", "fp32", block_size=32)
    with pytest.raises(SlmopsError, match="invalid device 'cpu' for execution_provider 'cuda'"):
        VariantSpec("x", "fp16", execution_provider="cuda", device="cpu")
    with pytest.raises(SlmopsError, match="builder_options key 'precision'"):
        VariantSpec("x", "int4", builder_options={"precision": "int4"})


def test_quantized_defaults_follow_the_algorithm():
    assert VariantSpec("a", "int4").to_dict() == PRESETS["int4"].to_dict() | {"name": "a"}
    hqq = VariantSpec("b", "int4", algo="hqq", block_size=64)
    assert hqq.is_symmetric is False and hqq.accuracy_level == 4


def test_spec_key_is_stable_ignores_the_name_and_sees_every_setting():
    assert spec_key(PRESETS["int4"]) == spec_key(VariantSpec("my-int4", "int4"))
    assert spec_key(PRESETS["int4"]) == spec_key(VariantSpec.from_dict(PRESETS["int4"].to_dict()))
    assert spec_key(PRESETS["int4"]) != spec_key(VariantSpec("int4", "int4", block_size=64))
    assert spec_key(PRESETS["int4"]) != spec_key(VariantSpec("int4", "int4", accuracy_level=0))
    assert re.fullmatch(r"[0-9a-f]{64}", spec_key(PRESETS["fp32"]))


def test_resolve_keeps_order_and_drops_duplicates():
    assert [s.name for s in resolve_variants(" int4 ,fp32,int4")] == ["int4", "fp32"]
    assert [s.name for s in resolve_variants(["int8", "fp16-cuda"])] == ["int8", "fp16-cuda"]


def test_unknown_variant_name_error_lists_the_presets():
    with pytest.raises(SlmopsError) as err:
        resolve_variants("fp32,int5")
    assert "unknown variant 'int5'" in err.value.message
    assert "fp32, int8, int4, int4-b128-asym, int4-kquant, int4-hqq, fp16-cuda" in err.value.message


def test_variants_file_names_join_the_presets(tmp_path):
    path = tmp_path / "v.json"
    path.write_text(json.dumps({"variants": [{"name": "int4-b64", "precision": "int4", "block_size": 64}]}))
    specs = resolve_variants("fp32,int4-b64", str(path))
    assert [s.name for s in specs] == ["fp32", "int4-b64"]
    assert specs[1].block_size == 64 and specs[1].algo == "rtn"
    with pytest.raises(SlmopsError, match=r"unknown variant 'int4-b32'.*in .*v\.json: int4-b64"):
        resolve_variants("int4-b32", str(path))


@pytest.mark.parametrize("text,message", [
    ("variants: [", "is not valid YAML or JSON"),
    ("just a string", "has no list of variants"),
    ("variants:\n  - {name: a, precision: int4}\n  - {name: a, precision: int8}\n", "defines 'a' twice"),
    ("variants:\n  - {name: a}\n", "variant 'a' has no 'precision'"),
])
def test_broken_variants_file_is_reported_with_its_path(tmp_path, text, message):
    path = tmp_path / "v.yaml"
    path.write_text(text)
    with pytest.raises(SlmopsError, match=message) as err:
        load_variants_file(path)
    assert "v.yaml" in err.value.message or "variant 'a'" in err.value.message


def _doc_blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", DOCS.read_text(encoding="utf-8"), flags=re.S)


@pytest.mark.parametrize("lang,suffix", [("yaml", ".yaml"), ("json", ".json")])
def test_documented_variants_file_examples_load(tmp_path, lang, suffix):
    blocks = [b for b in _doc_blocks(lang) if "variants" in b]
    assert blocks, f"docs/variants.md has no {lang} variants example"
    for i, block in enumerate(blocks):
        path = tmp_path / f"example{i}{suffix}"
        path.write_text(block)
        specs = load_variants_file(path)
        assert specs and all(isinstance(s, VariantSpec) for s in specs.values())


def test_cli_refuses_unknown_variant_with_the_preset_list(tmp_path, hf_qwen):
    result = slmops("convert", "--model", str(hf_qwen), "--variants", "int4,int3", "--output", str(tmp_path / "out"))
    assert_one_line_error(result, "unknown variant 'int3'", "int4-b128-asym", "fp16-cuda")
    assert not (tmp_path / "out").exists()
