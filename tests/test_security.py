"""Hostile artifacts: a model is data from someone else. Paths inside it (symlinks, MLmodel entries, the
genai config, ONNX external-data locations) must never lead outside the model folder, on load or on
deploy; and a Hugging Face model's custom code runs only with an explicit flag.
"""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow.deployments import get_deploy_client

from mlflow_slmops import convert, flavor, sweep
from mlflow_slmops.errors import SlmopsError
from mlflow_slmops.variants import PRESETS
from tests.faultkit import paths_snapshot
from tests.helpers import assert_one_line_error, mlflow_cli, slmops

OUTSIDE = "points outside the model folder"


@pytest.fixture()
def saved(genai_qwen_int4, tmp_path) -> Path:
    """A valid onnx_genai MLflow model folder, and a secret file beside it that no model may reach."""
    (tmp_path / "secret.txt").write_text("not a model file")
    path = tmp_path / "saved"
    flavor.save_model(genai_qwen_int4, path)
    return path


def set_mlmodel(saved: Path, edit) -> None:
    mlmodel = yaml.safe_load((saved / "MLmodel").read_text())
    edit(mlmodel)
    (saved / "MLmodel").write_text(yaml.safe_dump(mlmodel))


def set_external_location(onnx_path: Path, location: str) -> None:
    """Point every external-data tensor of an ONNX file at location (the bytes stay where they are)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    changed = 0
    for init in model.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                entry.value = location
                changed += 1
    assert changed, "the fixture model has no external data to redirect"
    onnx.save_model(model, str(onnx_path))


def _symlink_outside(saved: Path) -> None:
    outside = saved.parent / "tokenizer-outside.json"
    shutil.copy(saved / "model" / "tokenizer.json", outside)
    (saved / "model" / "tokenizer.json").unlink()
    (saved / "model" / "tokenizer.json").symlink_to(outside)


def _model_dir_folder_symlink(saved: Path) -> None:
    real = saved.parent / "real-genai"
    shutil.move(str(saved / "model"), real)
    (saved / "model").symlink_to(real, target_is_directory=True)


HOSTILE = {
    "symlink_to_a_file_outside": (_symlink_outside, OUTSIDE),
    "model_folder_is_a_symlink_outside": (_model_dir_folder_symlink, OUTSIDE),
    "mlmodel_model_dir_with_dotdot": (
        lambda s: (shutil.copytree(s / "model", s.parent / "x"),
                   set_mlmodel(s, lambda m: m["flavors"]["onnx_genai"].update(model_dir="../x"))), OUTSIDE),
    "mlmodel_model_dir_absolute": (
        lambda s: (shutil.copytree(s / "model", s.parent / "abs"),
                   set_mlmodel(s, lambda m: m["flavors"]["onnx_genai"].update(model_dir=str(s.parent / "abs")))),
        OUTSIDE),
    "external_data_location_dotdot": (
        lambda s: set_external_location(s / "model" / "model.onnx", "../../secret.txt"), OUTSIDE),
    "external_data_location_absolute": (
        lambda s: set_external_location(s / "model" / "model.onnx", str(s.parent / "secret.txt")), OUTSIDE),
    "genai_config_decoder_filename_dotdot": (
        lambda s: (shutil.copy(s / "model" / "model.onnx", s.parent / "decoder.onnx"),
                   _edit_genai_config(s, "../../decoder.onnx")), OUTSIDE),
}


def _edit_genai_config(saved: Path, filename: str) -> None:
    path = saved / "model" / "genai_config.json"
    cfg = json.loads(path.read_text())
    cfg["model"]["decoder"]["filename"] = filename
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_load_refuses_model_paths_that_lead_outside_the_model_folder(case, saved):
    breaker, needle = HOSTILE[case]
    breaker(saved)
    with pytest.raises(SlmopsError, match=needle):
        flavor.load_model(str(saved))
    with pytest.raises(SlmopsError, match=needle):
        mlflow.pyfunc.load_model(str(saved))


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_deploy_refuses_model_paths_that_lead_outside_the_model_folder(case, saved, tmp_path):
    breaker, needle = HOSTILE[case]
    breaker(saved)
    cache = tmp_path / "foundry-cache"
    client = get_deploy_client(f"foundry-local:{cache}")
    with pytest.raises(SlmopsError, match=needle):
        client.create_deployment("hostile", str(saved))
    assert not cache.exists() or paths_snapshot(cache) == {}


def test_pyfunc_data_entry_outside_the_model_folder_is_refused(saved):
    shutil.copytree(saved / "model", saved.parent / "elsewhere")
    set_mlmodel(saved, lambda m: m["flavors"]["python_function"].update(data="../elsewhere"))
    with pytest.raises(SlmopsError, match="is not inside an MLflow model folder|points outside"):
        mlflow.pyfunc.load_model(str(saved))


def test_deploy_cli_refuses_a_symlink_outside_in_one_line_and_writes_nothing(saved, tmp_path):
    _symlink_outside(saved)
    cache = tmp_path / "foundry-cache"
    done = mlflow_cli("deployments", "create", "-t", f"foundry-local:{cache}", "--name", "hostile", "-m", str(saved))
    assert_one_line_error(done, "symlink", OUTSIDE, "remove the symlink")
    assert not cache.exists() or paths_snapshot(cache) == {}


def test_a_model_that_stays_inside_its_folder_still_loads(saved):
    # The guard must not refuse the ordinary case: a relative model_dir and a relative URI with '..' in it.
    relative = Path("..") / saved.parent.name / saved.name
    model = mlflow.pyfunc.load_model(str(saved.parent / relative))
    reply = model.predict({"messages": [{"role": "user", "content": "Hi"}]}, params={"max_new_tokens": 2})
    assert reply["usage"]["completion_tokens"] == 2


# --- remote code -------------------------------------------------------------------------------------------------


@pytest.fixture()
def hf_with_remote_code(hf_qwen, tmp_path) -> Path:
    model = Path(shutil.copytree(hf_qwen, tmp_path / "hf-remote"))
    cfg = json.loads((model / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (model / "config.json").write_text(json.dumps(cfg))
    (model / "modeling_evil.py").write_text("raise SystemExit('custom code ran')\n")
    return model


def test_trust_remote_code_is_off_by_default_everywhere():
    for fn in (convert.check_hf_model_dir, convert.convert_variant, convert.convert_variants, convert.olive_config):
        assert inspect.signature(fn).parameters["trust_remote_code"].default is False, fn.__name__
    assert sweep.SweepRequest(model="m").trust_remote_code is False


def test_remote_code_needs_the_explicit_flag(hf_with_remote_code, tmp_path):
    with pytest.raises(SlmopsError, match="trust_remote_code.*--trust-remote-code"):
        convert.check_hf_model_dir(hf_with_remote_code)
    assert convert.check_hf_model_dir(hf_with_remote_code, trust_remote_code=True)["auto_map"]
    # Olive is asked to run the model's code only when the flag is given.
    spec = PRESETS["fp32"]
    assert "load_kwargs" not in convert.olive_config(hf_with_remote_code, spec, "out", None)["input_model"]
    assert convert.olive_config(hf_with_remote_code, spec, "out", None, trust_remote_code=True)[
        "input_model"]["load_kwargs"] == {"trust_remote_code": True}


def test_sweep_cli_refuses_remote_code_without_the_flag_before_any_run(hf_with_remote_code, tracking, tmp_path):
    done = slmops("sweep", "--model", str(hf_with_remote_code), "--variants", "fp32", "--output",
                  str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), "--quiet")
    assert_one_line_error(done, "asks for trust_remote_code", "modeling_evil", "--trust-remote-code")
    assert "custom code ran" not in done.stdout + done.stderr
    assert mlflow.search_runs(search_all_experiments=True).empty
    assert not (tmp_path / "out").exists()
