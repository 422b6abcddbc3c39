"""The calibrated int4 recipes (GPTQ, int8 embeddings, mixed precision): built, loaded and generated like every
other preset, calibrated on stored text that never overlaps the evaluation data, replayable from olive_config.json."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from mlflow_slmops import calibration, convert, data
from mlflow_slmops.errors import SlmopsError
from mlflow_slmops.genai import modeldir, weights
from mlflow_slmops.variants import PRESETS, VariantSpec, key_body, resolve_variants
from tests.helpers import assert_one_line_error, slmops

CALIBRATED = ("int4-gptq", "int4-e8", "int4-mixed")
# Text for the calibrated builds of the tiny model: not the evaluation text, not the packaged default.
CALIBRATION_TEXT = "\n".join(
    f"Order {n} of the hardware shop: {n % 7 + 1} boxes of screws, {n % 5 + 2} hinges and a tin of oil, "
    f"delivered to the yard behind the station on day {n % 28 + 1}." for n in range(60))


@pytest.fixture(scope="session")
def calibration_file(models_root) -> Path:
    path = models_root / "calibration-orders.txt"
    path.write_text(CALIBRATION_TEXT + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def calibrated_builds(hf_qwen, models_root, calibration_file) -> dict[str, convert.ConversionResult]:
    """int4, and the three calibrated presets of the tiny tied-embedding Qwen2, converted once (with validation)."""
    results = convert.convert_variants(hf_qwen, resolve_variants("int4," + ",".join(CALIBRATED)),
                                       models_root / "calibrated", progress=False, calibration=calibration_file)
    return {r.spec.name: r for r in results}


def _quantized_nodes(folder: str) -> dict[str, int]:
    """MatMulNBits and GatherBlockQuantized node name -> bits."""
    model = onnx.load(str(Path(folder) / "model.onnx"), load_external_data=False)
    found = {}
    for node in model.graph.node:
        if node.op_type in ("MatMulNBits", "GatherBlockQuantized"):
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            found[node.name] = attrs.get("bits", 4)
    return found


def test_calibrated_presets_build_and_pass_the_load_and_generate_check(calibrated_builds):
    for name in CALIBRATED:
        result = calibrated_builds[name]
        assert result.status == "ok", f"{name}: {result.error}"
        # convert_variants stores a variant only after validate_genai_dir loaded it and generated tokens.
        passes = json.loads(Path(result.olive_config_path).read_text())["passes"]
        assert passes["gptq"]["type"] == "Gptq" and passes["builder"]["type"] == "ModelBuilder"
        assert result.calibration is not None and result.calibration.sha256 in result.calibration.path


def test_int4_e8_keeps_tied_embeddings_and_lm_head_at_int8_in_one_copy(calibrated_builds):
    nodes = _quantized_nodes(calibrated_builds["int4-e8"].output_dir)
    assert nodes["/model/embed_tokens/GatherBlockQuantized"] == 8
    assert nodes["/lm_head/MatMulNBits"] == 8
    assert {bits for name, bits in nodes.items() if "/model/layers." in name} == {4}
    model = onnx.load(str(Path(calibrated_builds["int4-e8"].output_dir) / "model.onnx"), load_external_data=False)
    lm_head = next(n for n in model.graph.node if n.name == "/lm_head/MatMulNBits")
    initializers = {i.name for i in model.graph.initializer}
    assert lm_head.input[1] not in initializers  # tied: the lm_head reads the int8 embedding, no second copy


def test_int4_mixed_keeps_the_layers_its_rule_picks_at_int8(calibrated_builds):
    nodes = _quantized_nodes(calibrated_builds["int4-mixed"].output_dir)
    # k_quant_mixed on 2 layers: layer 0 (the first eighth) keeps qkv and down_proj at 8 bits, layer 1 is int4.
    assert nodes["/model/layers.0/attn/qkv_proj/MatMulNBits"] == 8
    assert nodes["/model/layers.0/mlp/down_proj/MatMulNBits"] == 8
    assert nodes["/model/layers.1/attn/qkv_proj/MatMulNBits"] == 4
    assert nodes["/model/layers.0/mlp/up_proj/MatMulNBits"] == 4


def test_gptq_weights_depend_on_the_calibration_text(hf_qwen, models_root, calibrated_builds):
    other = convert.convert_variant(hf_qwen, PRESETS["int4-gptq"], models_root / "gptq-default-calibration",
                                    cache_dir=None)  # None: the packaged default calibration text
    assert other.status == "ok", other.error
    assert other.calibration.sha256 != calibrated_builds["int4-gptq"].calibration.sha256
    assert other.weights_sha256 != calibrated_builds["int4-gptq"].weights_sha256


def test_olive_config_json_replays_the_calibrated_build(calibrated_builds, tmp_path):
    from olive.workflows import run as olive_run

    built = calibrated_builds["int4-gptq"]
    config = json.loads(Path(built.olive_config_path).read_text())
    data_params = config["passes"]["gptq"]["data_config"]["load_dataset_config"]["params"]
    assert data_params["sha256"] == built.calibration.sha256
    assert Path(data_params["path"]).read_text(encoding="utf-8") == CALIBRATION_TEXT + "\n"
    config.update(output_dir=str(tmp_path / "replay"), cache_dir=str(tmp_path / "olive-cache"))
    olive_run(config)
    assert modeldir.weights_hash(tmp_path / "replay") == built.weights_sha256


def test_the_calibration_loader_refuses_text_whose_hash_changed(tmp_path, hf_qwen):
    from mlflow_slmops.convert.olive.calibration_data import slmops_calibration_text

    path = tmp_path / "calibration.txt"
    path.write_text("edited after the config was written\n", encoding="utf-8")
    with pytest.raises(ValueError, match="has sha256 .*, the config names 0+"):
        slmops_calibration_text(str(path), "0" * 64, str(hf_qwen))


def test_calibration_is_never_the_evaluation_text_or_qa_file(tmp_path):
    eval_text, qa = data.path(data.EVAL_TEXT), data.path(data.QA_FILE)
    with pytest.raises(SlmopsError, match="is the evaluation text"):
        calibration.check_disjoint(eval_text, eval_text, qa)
    copy = tmp_path / "notes.txt"
    copy.write_text("My own notes.\n\n" + eval_text.read_text().split("\n\n")[1] + "\n", encoding="utf-8")
    with pytest.raises(SlmopsError, match="shares 1 passage"):
        calibration.check_disjoint(copy, eval_text, qa)
    with pytest.raises(SlmopsError, match="is the QA file"):
        calibration.check_disjoint(qa, eval_text, qa)
    calibration.check_disjoint(None, eval_text, qa)  # the packaged default is disjoint from both


def test_a_qa_jsonl_calibration_file_contributes_its_questions_and_answers(tmp_path):
    qa = tmp_path / "support.jsonl"
    qa.write_text(json.dumps({"prompt": "Which port is the charger?", "expected": "USB-C"}) + "\n"
                  + json.dumps({"messages": [{"role": "user", "content": "Reset it how?"}],
                                "expected": ["steps"], "match": "json_keys"}) + "\n", encoding="utf-8")
    text = calibration.read_calibration_text(qa)
    assert text.split("\n")[:4] == ["Which port is the charger?", "USB-C", "Reset it how?", '["steps"]']


def test_sweep_refuses_calibrating_on_the_evaluation_text(hf_qwen, tracking, tmp_path):
    proc = slmops("sweep", "--model", str(hf_qwen), "--variants", "int4-gptq", "--output", str(tmp_path / "out"),
                  "--calibration", str(data.path(data.EVAL_TEXT)), "--quiet")
    assert_one_line_error(proc, "calibration file", "is the evaluation text")
    assert not (tmp_path / "out").exists()


def test_calibrated_options_are_refused_where_they_do_not_apply():
    with pytest.raises(SlmopsError, match="embeds_bits applies to int4 variants"):
        VariantSpec("e8", "int8", embeds_bits=8)
    with pytest.raises(SlmopsError, match="invalid mixed_precision 'kld_gradient'"):
        VariantSpec("m", "int4", algo="gptq", is_symmetric=False, mixed_precision="kld_gradient")
    with pytest.raises(SlmopsError, match="invalid algo 'gptq' for precision int8"):
        VariantSpec("g", "int8", algo="gptq")


def test_older_presets_keep_their_cache_keys():
    # The new optional fields are left out of the key while unset, so no cached variant is rebuilt.
    assert "embeds_bits" not in key_body(PRESETS["int4"]) and "mixed_precision" not in key_body(PRESETS["int4"])
    assert key_body(PRESETS["int4-e8"])["embeds_bits"] == 8


def test_bits_per_weight_of_fp32_is_32_against_the_source_parameter_count(hf_llama, genai_llama_fp32):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_llama))
    assert weights.parameter_count(hf_llama) == sum(p.numel() for p in model.parameters())
    assert weights.bits_per_weight(genai_llama_fp32, weights.parameter_count(hf_llama)) == pytest.approx(32.0)


def test_bits_per_weight_of_the_int4_recipes_is_near_4_to_8(hf_qwen, calibrated_builds):
    params = weights.parameter_count(hf_qwen)
    for name, result in calibrated_builds.items():
        assert 4.0 < weights.bits_per_weight(result.output_dir, params) < 8.5, name
