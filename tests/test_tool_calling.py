"""Tool calls, reasoning markers and pre-flight checks of the foundry-local target, against the real runtime.

The tool-calling model is the demo model (devkit.demo), trained once per session with its one tool,
get_order_status (devkit.ordertool): random-weight models cannot write a tool call. Its calls go through the real
`mlflow deployments run-local` (Foundry Local's own web service) with the real OpenAI client, and through the
deployment's in-process predict, streamed and not; the registration metadata is read back by a fresh
foundry-local-sdk process.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest

from devkit import ordertool
from mlflow_slmops import flavor
from mlflow_slmops.deploy.foundry_local import capabilities, preflight
from mlflow_slmops.errors import SlmopsError
from tests.helpers import (
    bin_path,
    free_port,
    wait_http,
    assert_one_line_error,
    mlflow_cli,
    stop_process,
    tree_snapshot,
)
from tests.test_deployment import WAIT_S, deploy_args, deploy_cli, model_dir, wait_for

NAME = "order-assistant"
ORDER_ID = "KS-237"
ORDER_QUESTION = f"Where is my order {ORDER_ID}?"  # a training phrasing: the small model calls reliably on it
ORDER_ARGUMENTS = {ordertool.TOOL_ARGUMENT: ORDER_ID}
# Output budget of a request with tools: Foundry Local's guided retry of a malformed call needs room (at 64 tokens,
# 1 of 8 sampled requests came back; at 200, 8 of 8).
TOOL_BUDGET = 200
SEEDS = 4

SDK_INFO = r"""
import json, sys
from foundry_local_sdk import CatalogType, Configuration, FoundryLocalManager
FoundryLocalManager.initialize(Configuration(app_name="mlflow-slmops", model_cache_dir=sys.argv[1]))
info = FoundryLocalManager.instance.get_catalog(CatalogType.LOCAL).get_model_variant(sys.argv[2]).info
print(json.dumps({"supports_tool_calling": info.supports_tool_calling,
                  "tool_call_start": info.get_string_property("tool_call_start"),
                  "tool_call_end": info.get_string_property("tool_call_end"),
                  "supports_reasoning": info.get_int_property("supports_reasoning", -1),
                  "reasoning_start": info.get_string_property("reasoning_start")}))
"""

QWEN3_THINK_TEMPLATE = ordertool.QWEN_TOOLS_TEMPLATE.replace(
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}",
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}")


def _variant(genai: Path, work: Path, name: str, template: str | None = None, edit=None) -> Path:
    """An MLflow model of the genai folder with another chat template or genai_config.json (edited after saving,
    the way a hand-edited artifact would arrive)."""
    saved = work / name
    flavor.save_model(genai, saved)
    folder = saved / "model"
    if template is not None:
        (folder / "chat_template.jinja").write_text(template)
    if edit is not None:
        path = folder / "genai_config.json"
        path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    return saved


@pytest.fixture(scope="module")
def models(tmp_path_factory, demo_genai_fp32, genai_qwen_fp32):
    """One tracking store: the tool model (registered), a reasoning variant, and folders the pre-flight refuses."""
    root = tmp_path_factory.mktemp("tool-registry")
    patch = pytest.MonkeyPatch()
    uri = f"sqlite:///{root / 'mlflow.db'}"
    patch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    exp = mlflow.create_experiment("tools", artifact_location=(root / "artifacts").as_uri())

    def log(folder: Path, **kw) -> str:
        with mlflow.start_run(experiment_id=exp):
            return flavor.log_model(folder, name="model", **kw).model_uri

    def unknown_key(cfg):
        cfg["model"]["sliding_window_size"] = 512
        return cfg

    def cuda(cfg):
        cfg["model"]["decoder"]["session_options"]["provider_options"] = [{"cuda": {}}]
        return cfg

    log(demo_genai_fp32, registered_model_name=NAME)
    thinking = _variant(demo_genai_fp32, root, "thinking", QWEN3_THINK_TEMPLATE)
    yield SimpleNamespace(
        uri=uri, tools=f"models:/{NAME}/1", thinking=str(thinking), chatml=str(_variant(genai_qwen_fp32, root, "chatml")),
        unknown_key=str(_variant(genai_qwen_fp32, root, "unknown-key", edit=unknown_key)),
        cuda=str(_variant(genai_qwen_fp32, root, "cuda", edit=cuda)),
        not_single=str(_variant(genai_qwen_fp32, root, "not-single", ordertool.QWEN_TOOLS_TEMPLATE)),
    )
    patch.undo()
    mlflow.set_tracking_uri(None)


def sdk_info(cache: Path, model_id: str) -> dict:
    done = subprocess.run([sys.executable, "-c", SDK_INFO, str(cache), model_id], capture_output=True, text=True,
                          timeout=WAIT_S)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


class NoCall(Exception):
    """A sampled answer that holds no structured call: the next seed may."""


def _first_call(ask, retry_on: tuple[type[Exception], ...] | None = None):
    """The first answer of up to SEEDS sampled tries that Foundry Local returns without an error.

    Foundry Local samples (it ignores do_sample=false), writes the model's call, checks it against the tool
    schema and, when the small model's call is malformed, retries it with grammar guidance; measured here, 15
    of 16 sampled requests with a 200-token budget came back as structured calls, and every greedy one failed.
    """
    import openai

    errors = []
    for seed in range(SEEDS):
        try:
            return ask(seed)
        except retry_on or (openai.APIError,) as exc:
            errors.append(str(exc)[:200])
    raise AssertionError(f"no try of {SEEDS} came back: {errors}")


def _stream_calls(stream) -> tuple[list[dict], str | None]:
    """Tool calls put together from streamed deltas, as an OpenAI client user would, and the finish reason."""
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"name": "", "arguments": ""})
                call["name"] += (delta.function.name or "") if delta.function else ""
                call["arguments"] += (delta.function.arguments or "") if delta.function else ""
            finish = choice.finish_reason or finish
    return [calls[i] for i in sorted(calls)], finish


def test_run_local_returns_structured_tool_calls_to_the_openai_client_streamed_and_not(models, tmp_path):
    import openai

    cache = tmp_path / "cache"
    out_path, err_path = tmp_path / "run-local.out", tmp_path / "run-local.err"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen(deploy_args("run-local", cache, NAME, "-m", models.tools), stdout=out, stderr=err,
                                text=True, start_new_session=True)
    try:
        wait_for(lambda: "model ID:" in out_path.read_text(), proc, "run-local to print its URL")
        lines = out_path.read_text().splitlines()
        base_url = next(ln.split("base URL:")[1].strip() for ln in lines if "base URL:" in ln)
        client = openai.OpenAI(base_url=base_url, api_key="unused")
        request = {"model": f"{NAME}:1", "messages": [{"role": "user", "content": ORDER_QUESTION}],
                   "tools": [ordertool.ORDER_TOOL], "max_tokens": TOOL_BUDGET}
        reply = _first_call(lambda seed: client.chat.completions.create(**request, seed=seed))
        calls = reply.choices[0].message.tool_calls
        assert reply.choices[0].finish_reason == "tool_calls" and calls, reply.model_dump()
        assert calls[0].type == "function" and calls[0].function.name == ordertool.TOOL_NAME
        assert json.loads(calls[0].function.arguments) == ORDER_ARGUMENTS
        assert ordertool.TOOL_CALL_START not in (reply.choices[0].message.content or "")

        streamed, finish = _first_call(
            lambda seed: _stream_calls(client.chat.completions.create(**request, seed=seed, stream=True)))
        # The small model may put more than one call in its array; each is a whole, structured call.
        assert finish == "tool_calls" and streamed and {c["name"] for c in streamed} == {ordertool.TOOL_NAME}, streamed
        assert all(isinstance(json.loads(c["arguments"]), dict) for c in streamed), streamed

        plain = client.chat.completions.create(model=f"{NAME}:1", max_tokens=12,
                                               messages=[{"role": "user", "content": "Hello!"}])
        assert not plain.choices[0].message.tool_calls and plain.choices[0].message.content
        os.kill(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=WAIT_S) == 0, err_path.read_text()[-3000:]
    finally:
        stop_process(proc)


def test_deployment_predict_takes_tools_and_returns_foundry_locals_structured_calls_in_process(models, tmp_path):
    """`mlflow deployments predict` (the in-process runtime, no web service): tools in, tool_calls out, streamed and
    not, and a tool result sent back is answered in words."""
    from mlflow.deployments import get_deploy_client

    client = get_deploy_client(f"foundry-local:{tmp_path / 'cache'}")
    client.create_deployment(NAME, models.tools)
    request = {"messages": [{"role": "user", "content": ORDER_QUESTION}], "tools": [ordertool.ORDER_TOOL],
               "max_tokens": TOOL_BUDGET}
    from mlflow.exceptions import MlflowException

    retry_on = (MlflowException, NoCall)
    reply = _first_call(lambda seed: _with_call(client.predict(deployment_name=NAME, inputs={**request, "seed": seed})),
                        retry_on)
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None, choice
    call = choice["message"]["tool_calls"][0]
    assert call["type"] == "function" and call["function"]["name"] == ordertool.TOOL_NAME and call["id"]
    assert json.loads(call["function"]["arguments"]) == ORDER_ARGUMENTS

    def streamed(seed: int) -> tuple[list[dict], dict]:
        chunks = list(client.predict_stream(deployment_name=NAME, inputs={**request, "seed": seed}))
        calls = [t for c in chunks for t in c["choices"][0]["delta"].get("tool_calls", [])]
        if not calls:
            raise NoCall(str(chunks))
        return calls, chunks[-1]

    calls, last = _first_call(streamed, retry_on)
    assert {c["function"]["name"] for c in calls} == {ordertool.TOOL_NAME} and calls[0]["index"] == 0
    assert last["choices"][0]["finish_reason"] == "tool_calls" and last["usage"]["completion_tokens"] > 0, last

    result = [{"role": "user", "content": ORDER_QUESTION}, {"role": "assistant", "content": None, "tool_calls": [call]},
              {"role": "tool", "tool_call_id": call["id"], "content": json.dumps({"status": "shipped"})}]
    answer = client.predict(deployment_name=NAME, inputs={"messages": result, "max_tokens": 32})["choices"][0]
    assert answer["finish_reason"] == "stop" and answer["message"]["content"].strip(), answer


def test_models_serve_and_the_deployment_answer_the_same_tool_request_with_the_same_call(demo_genai_fp32, tmp_path):
    """Pyfunc parity: one request with tools, to `mlflow models serve` over HTTP and to the foundry-local deployment
    in-process: both answer with a structured get_order_status call for the order asked about."""
    import requests
    from mlflow.deployments import get_deploy_client
    from mlflow.exceptions import MlflowException

    saved = tmp_path / "served"
    flavor.save_model(demo_genai_fp32, saved)
    port = free_port()
    proc = subprocess.Popen([bin_path("mlflow"), "models", "serve", "-m", str(saved), "--env-manager", "local",
                             "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    request = {"messages": [{"role": "user", "content": ORDER_QUESTION}], "tools": [ordertool.ORDER_TOOL]}
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", proc)
        served = requests.post(f"http://127.0.0.1:{port}/invocations", json={**request, "max_new_tokens": 48},
                               timeout=WAIT_S)
        assert served.status_code == 200, served.text
    finally:
        stop_process(proc)
    served_choice = served.json()["choices"][0]

    client = get_deploy_client(f"foundry-local:{tmp_path / 'cache'}")
    client.create_deployment(NAME, str(saved))
    deployed = _first_call(lambda seed: _with_call(client.predict(
        deployment_name=NAME, inputs={**request, "max_tokens": TOOL_BUDGET, "seed": seed})), (MlflowException, NoCall))
    deployed_choice = deployed["choices"][0]
    for choice in (served_choice, deployed_choice):
        assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None, choice
    (served_call,), (deployed_call,) = served_choice["message"]["tool_calls"], deployed_choice["message"]["tool_calls"]
    assert served_call["function"]["name"] == deployed_call["function"]["name"] == ordertool.TOOL_NAME
    assert json.loads(served_call["function"]["arguments"]) == json.loads(deployed_call["function"]["arguments"]) \
        == ORDER_ARGUMENTS


def test_mlflow_deployments_predict_cli_takes_tools_and_refuses_a_tool_that_is_no_function(models, tmp_path):
    cache = tmp_path / "cache"
    assert deploy_cli("create", cache, NAME, "-m", models.tools).returncode == 0
    request, out = tmp_path / "request.json", tmp_path / "out.json"
    # One row per conversation: pandas (which `--input-path` goes through) keeps the two lists apart.
    request.write_text(json.dumps({"messages": [[{"role": "user", "content": ORDER_QUESTION}]],
                                   "tools": [[ordertool.ORDER_TOOL]], "max_tokens": [TOOL_BUDGET]}))

    def ask(seed: int) -> dict:
        done = deploy_cli("predict", cache, NAME, "--input-path", str(request), "--output-path", str(out))
        if done.returncode != 0:
            raise NoCall(done.stderr[-300:])
        return _with_call(json.loads(out.read_text()))

    reply = _first_call(ask, (NoCall,))
    assert json.loads(reply["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]) == ORDER_ARGUMENTS

    request.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}], "tools": [{"name": "f"}]}))
    assert_one_line_error(deploy_cli("predict", cache, NAME, "--input-path", str(request)), "tools[0]")


def _with_call(reply: dict) -> dict:
    if not reply["choices"][0]["message"].get("tool_calls"):
        raise NoCall(str(reply["choices"][0]["message"]))
    return reply


def test_tool_calling_is_detected_registered_and_switched_off_with_config(models, tmp_path):
    on, off = tmp_path / "on", tmp_path / "off"
    assert deploy_cli("create", on, NAME, "-m", models.tools).returncode == 0
    done = deploy_cli("create", off, NAME, "-m", models.tools, "-C", "tool_calling=off")
    assert done.returncode == 0, done.stderr
    assert sdk_info(on, f"{NAME}:1")["supports_tool_calling"] is True
    assert sdk_info(on, f"{NAME}:1")["tool_call_start"] == ordertool.TOOL_CALL_START
    assert sdk_info(off, f"{NAME}:1")["supports_tool_calling"] is None
    on_cfg = json.loads((model_dir(on, 1, NAME) / "genai_config.json").read_text())["model"]
    off_cfg = json.loads((model_dir(off, 1, NAME) / "genai_config.json").read_text())["model"]
    assert {"bot_token_id", "eot_token_id"} <= set(on_cfg) and not {"bot_token_id", "eot_token_id"} & set(off_cfg)
    got = mlflow_cli("deployments", "get", "-t", f"foundry-local:{on}", "--name", NAME).stdout
    fields = dict(ln.split(": ", 1) for ln in got.splitlines() if ": " in ln)
    assert fields["tool_calling"] == "True" and fields["tool_call_markers"] == "['<tool_call>', '</tool_call>']"


def test_reasoning_markers_are_registered_and_reasoning_off_switches_the_template(models, tmp_path):
    from mlflow.deployments import get_deploy_client

    on, off = tmp_path / "on", tmp_path / "off"
    got = get_deploy_client(f"foundry-local:{on}").create_deployment("thinker", models.thinking)
    assert got["reasoning"] is True and got["reasoning_markers"] == ["<think>", "</think>"]
    info = sdk_info(on, "thinker:1")
    assert info["supports_reasoning"] == 1 and info["reasoning_start"] == "<think>"
    got = get_deploy_client(f"foundry-local:{off}").create_deployment("thinker", models.thinking,
                                                                      config={"reasoning": "off"})
    assert got["reasoning"] is False and sdk_info(off, "thinker:1")["supports_reasoning"] == -1
    template = (model_dir(off, 1, "thinker") / "chat_template.jinja").read_text()
    rendered = capabilities_render(template)
    assert rendered.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def capabilities_render(template: str) -> str:
    from mlflow_slmops.deploy.foundry_local.prompt_template import render

    return render(template, [{"role": "user", "content": "hi"}], True, {})


def test_markers_that_are_not_single_tokens_and_on_without_markers_are_one_line_errors(models, tmp_path):
    cases = {
        "not_single_tokens": (["-m", models.not_single], "is not a single token"),
        "on_without_markers": (["-m", models.chatml, "-C", "tool_calling=on"], "renders no tools"),
        "reasoning_off_without_switch": (["-m", models.tools, "-C", "reasoning=on"], "no <think>"),
        "bad_switch_value": (["-m", models.tools, "-C", "tool_calling=maybe"], "on or off"),
    }
    for case, (args, needle) in cases.items():
        cache = tmp_path / case
        assert_one_line_error(deploy_cli("create", cache, NAME, *args), needle)
        assert not cache.exists() or not any(cache.rglob("genai_config.json")), case
    done = deploy_cli("create", tmp_path / "off", NAME, "-m", models.not_single, "-C", "tool_calling=off")
    assert done.returncode == 0, done.stderr


def test_preflight_refuses_what_foundry_locals_runtime_would_not_load_and_writes_nothing(models, tmp_path):
    cases = {
        "key_genai_core_rejects": (models.unknown_key, "sliding_window_size"),
        "execution_provider_missing": (models.cuda, "cuda execution provider"),
    }
    for case, (uri, needle) in cases.items():
        cache = tmp_path / case
        cache.mkdir()
        before = tree_snapshot(cache)
        assert_one_line_error(deploy_cli("create", cache, NAME, "-m", uri), needle)
        assert tree_snapshot(cache) == before, case


def test_genai_core_parses_a_builder_config_and_names_an_unknown_key(genai_qwen_fp32):
    config = json.loads((genai_qwen_fp32 / "genai_config.json").read_text())
    assert preflight.genai_core_error(config) is None
    config["search"]["beam_width"] = 2
    assert "beam_width" in preflight.genai_core_error(config)
    config["search"].pop("beam_width")
    config["search"]["max_length"] = config["model"]["context_length"] + 1
    with pytest.raises(SlmopsError, match="exceeds its context length"):
        preflight.run(config, "model X")


def test_llama_python_tag_markers_are_detected_when_they_are_tokens(tmp_path, genai_qwen_fp32):
    folder = tmp_path / "llama31"
    shutil.copytree(genai_qwen_fp32, folder)
    (folder / "chat_template.jinja").write_text("{% if tools %}{{ tools | tojson }}{% endif %}<|python_tag|> <|eom_id|>")
    tok = json.loads((folder / "tokenizer.json").read_text())
    tok["added_tokens"] += [{"id": 900, "content": "<|python_tag|>", "special": True},
                            {"id": 901, "content": "<|eom_id|>", "special": True}]
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    caps = capabilities.detect(folder, tool_calling=None, reasoning=None)
    assert (caps.tool_call.start, caps.tool_call.end, caps.tool_call.start_id) == ("<|python_tag|>", "<|eom_id|>", 900)
    assert capabilities.detect(folder, tool_calling=False, reasoning=None).tool_call is None


def test_pyfunc_returns_openai_tool_calls_and_streams_the_same_call(demo_genai_fp32, tmp_path):
    saved = tmp_path / "mlmodel"
    flavor.save_model(demo_genai_fp32, saved)
    model = mlflow.pyfunc.load_model(str(saved))
    request = {"messages": [{"role": "user", "content": ORDER_QUESTION}], "tools": [ordertool.ORDER_TOOL]}
    reply = model.predict(request, params={"max_new_tokens": 48})
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None, choice
    call = choice["message"]["tool_calls"][0]
    assert call["type"] == "function" and call["function"]["name"] == ordertool.TOOL_NAME
    assert json.loads(call["function"]["arguments"]) == ORDER_ARGUMENTS

    chunks = list(model.predict_stream(request, params={"max_new_tokens": 48}))
    deltas = [c["choices"][0]["delta"] for c in chunks]
    streamed = [t for d in deltas for t in d.get("tool_calls", [])]
    assert [t["function"] for t in streamed] == [call["function"]]  # greedy: the same call as predict
    assert not any(d.get("content") for d in deltas), "a tool call must not leak into the streamed text"
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls" and chunks[-1]["usage"]["completion_tokens"] > 0

    plain = list(model.predict_stream({"messages": [{"role": "user", "content": "Hello!"}]},
                                      params={"max_new_tokens": 8}))
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in plain)
    assert text == model.predict({"messages": [{"role": "user", "content": "Hello!"}]},
                                 params={"max_new_tokens": 8})["choices"][0]["message"]["content"]


def test_tool_calls_are_split_from_text_in_every_marker_family():
    from mlflow_slmops.genai import chat

    text = 'Sure.<tool_call>\n[{"name": "f", "parameters": {"a": 1}}]\n</tool_call>'
    content, calls = chat.split_tool_calls(text, ("<tool_call>", "</tool_call>"))
    assert content == "Sure." and calls[0]["function"] == {"name": "f", "arguments": '{"a": 1}'}
    content, calls = chat.split_tool_calls('<|python_tag|>{"name": "g", "arguments": "{}"}', ("<|python_tag|>", "<|eom_id|>"))
    assert calls[0]["function"] == {"name": "g", "arguments": "{}"}
    assert chat.split_tool_calls("<tool_call>not json</tool_call>", ("<tool_call>", "</tool_call>")) == (
        "<tool_call>not json</tool_call>", [])
