"""The onnx_genai flavor: save/log/load round trip, pyfunc input forms, real HTTP serving, bad folders."""

from __future__ import annotations

import json
import shutil
import subprocess

import mlflow
import pandas as pd
import pytest
import requests
import yaml

from mlflow_slmops import flavor
from mlflow_slmops.errors import SlmopsError
from mlflow_slmops.genai import modeldir
from tests.helpers import (
    assert_one_line_error,
    bin_path,
    free_port,
    slmops,
    stop_process,
    wait_http,
)

CHAT = {"messages": [{"role": "user", "content": "What is MLflow?"}]}


def test_save_model_records_flavor_config_and_full_folder(genai_qwen_int4, tmp_path):
    dst = tmp_path / "saved"
    flavor.save_model(genai_qwen_int4, dst, variant={"variant": "int4", "precision": "int4"},
                      inference_config={"max_new_tokens": 7})
    conf = yaml.safe_load((dst / "MLmodel").read_text())["flavors"]["onnx_genai"]
    assert conf["model_type"] == "qwen2"
    assert conf["context_length"] == 2048
    assert conf["precision"] == "int4" and conf["variant"] == "int4"
    assert conf["execution_provider"] == "cpu"
    assert conf["size_bytes"] == modeldir.dir_size_bytes(genai_qwen_int4)
    assert conf["weights_sha256"] == modeldir.weights_hash(genai_qwen_int4)
    assert conf["inference_config"] == {"max_new_tokens": 7}
    saved = dst / conf["model_dir"]
    for name in ("genai_config.json", "tokenizer.json", "chat_template.jinja", "model.onnx"):
        assert (saved / name).is_file(), name
    assert modeldir.weights_hash(saved) == conf["weights_sha256"]


def test_log_load_and_pyfunc_predict_round_trip(genai_qwen_int4, tracking):
    with mlflow.start_run():
        info = flavor.log_model(genai_qwen_int4, name="model")
    handle = flavor.load_model(info.model_uri)
    assert handle.model is not None and handle.tokenizer is not None
    pf = mlflow.pyfunc.load_model(info.model_uri)
    out = pf.predict(CHAT, params={"max_new_tokens": 4})
    assert out["object"] == "chat.completion"
    assert out["choices"][0]["message"]["role"] == "assistant"
    assert out["usage"]["completion_tokens"] == 4
    # Greedy decoding is deterministic: the pyfunc and the raw handle agree.
    direct = handle.chat(CHAT["messages"], max_new_tokens=4)
    assert direct["choices"][0]["message"]["content"] == out["choices"][0]["message"]["content"]


def test_pyfunc_accepts_every_documented_input_form(genai_qwen_int4, tracking):
    with mlflow.start_run():
        info = flavor.log_model(genai_qwen_int4, name="model")
    pf = mlflow.pyfunc.load_model(info.model_uri)
    params = {"max_new_tokens": 3}
    one_row = pd.DataFrame({"messages": [CHAT["messages"]]})
    assert pf.predict(one_row, params=params)[0]["object"] == "chat.completion"
    lists = pf.predict([CHAT["messages"], CHAT["messages"]], params=params)
    assert len(lists) == 2 and all(r["choices"] for r in lists)
    prompts = pf.predict(pd.DataFrame({"prompt": ["Hello", "World"]}), params=params)
    assert len(prompts) == 2 and all(isinstance(p, str) for p in prompts)
    assert len(pf.predict(["a", "b", "c"], params=params)) == 3


def test_pyfunc_params_are_declared_and_applied(genai_qwen_int4, tracking):
    with mlflow.start_run():
        info = flavor.log_model(genai_qwen_int4, name="model", inference_config={"max_new_tokens": 2})
    pf = mlflow.pyfunc.load_model(info.model_uri)
    declared = {p.name for p in pf.metadata.get_params_schema().params}
    assert declared == {"max_new_tokens", "temperature", "top_p", "top_k", "do_sample"}
    assert pf.predict(CHAT)["usage"]["completion_tokens"] == 2  # the saved default
    assert pf.predict(CHAT, params={"max_new_tokens": 6})["usage"]["completion_tokens"] == 6
    sampled = pf.predict(CHAT, params={"max_new_tokens": 5, "do_sample": True, "temperature": 0.7, "top_k": 5})
    assert sampled["usage"]["completion_tokens"] == 5


def test_llama_chat_template_is_applied(genai_llama_fp32, tracking):
    handle = flavor.GenaiModel(genai_llama_fp32)
    prompt = handle.apply_chat_template(CHAT["messages"])
    assert prompt.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>")
    assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_max_new_tokens_zero_and_too_long_prompt_are_clean(genai_qwen_int4):
    handle = flavor.GenaiModel(genai_qwen_int4)
    assert handle.chat(CHAT["messages"], max_new_tokens=0)["choices"][0]["message"]["content"] == ""
    with pytest.raises(SlmopsError, match="context is 2048"):
        handle.generate("word " * 3000, max_new_tokens=1)


def test_models_serve_answers_chat_over_http(genai_qwen_int4, tracking, tmp_path):
    saved = tmp_path / "served"
    flavor.save_model(genai_qwen_int4, saved)
    port = free_port()
    proc = subprocess.Popen(
        [bin_path("mlflow"), "models", "serve", "-m", str(saved), "--env-manager", "local",
         "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", proc)
        r = requests.post(f"http://127.0.0.1:{port}/invocations", json={**CHAT, "max_new_tokens": 5}, timeout=60)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["choices"][0]["message"]["role"] == "assistant"
        assert body["usage"]["completion_tokens"] == 5
        bad = requests.post(f"http://127.0.0.1:{port}/invocations",
                            json={"messages": [{"role": "user"}]}, timeout=60)
        assert bad.status_code == 400 and "content" in bad.text
    finally:
        stop_process(proc)


def _broken_copy(src, tmp_path, name):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _truncate_weights(d):
    data = d / "model.onnx.data"
    if data.exists():
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
        return
    # Tiny models keep weights inline: move them to external data, then truncate it.
    import onnx

    m = onnx.load(str(d / "model.onnx"))
    onnx.save_model(m, str(d / "model.onnx"), save_as_external_data=True, location="model.onnx.data",
                    size_threshold=0)
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])


BAD_FOLDERS = {
    "missing": (lambda d: shutil.rmtree(d), "does not exist"),
    "no-genai-config": (lambda d: (d / "genai_config.json").unlink(), "no genai_config.json"),
    "corrupt-genai-config": (lambda d: (d / "genai_config.json").write_text("{not json"), "not valid JSON"),
    "no-tokenizer": (lambda d: [(d / f).unlink() for f in ("tokenizer.json",)], "no tokenizer"),
    "truncated-weights": (_truncate_weights, "truncated"),
}


@pytest.mark.parametrize("case", sorted(BAD_FOLDERS))
def test_save_model_refuses_bad_folder_and_writes_nothing(case, genai_qwen_fp32, tmp_path):
    breaker, needle = BAD_FOLDERS[case]
    src = _broken_copy(genai_qwen_fp32, tmp_path, "src")
    breaker(src)
    dst = tmp_path / "dst"
    with pytest.raises(SlmopsError, match=needle):
        flavor.save_model(src, dst)
    assert not dst.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".dst")] == []


@pytest.mark.parametrize("case", sorted(BAD_FOLDERS))
def test_log_model_cli_reports_bad_folder_in_one_line(case, genai_qwen_fp32, tmp_path, tracking):
    breaker, needle = BAD_FOLDERS[case]
    src = _broken_copy(genai_qwen_fp32, tmp_path, "src")
    breaker(src)
    result = slmops("log-model", "--model-dir", str(src))
    assert_one_line_error(result, needle, str(src))


def test_pyfunc_refuses_malformed_messages(genai_qwen_int4):
    wrapper = flavor._GenaiPyfuncWrapper(flavor.GenaiModel(genai_qwen_int4))
    with pytest.raises(SlmopsError, match="message 0"):
        wrapper.predict({"messages": [{"role": "user", "content": 3}]})
    with pytest.raises(SlmopsError, match="out of range"):
        wrapper.predict(CHAT, params={"temperature": -1})
