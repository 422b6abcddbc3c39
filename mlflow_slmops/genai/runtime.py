"""The one onnxruntime-genai runtime wrapper: a loaded genai folder that formats chats with its own template,
generates (whole or streamed), answers OpenAI-shaped chat completions with tool calls, and exposes ``model`` and
``tokenizer`` for the measurements that need logits. The flavor's pyfunc, the benchmark and the quality stage all
load models through it; it imports no MLflow.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow_slmops.errors import SlmopsError
from mlflow_slmops.genai import chat, modeldir, template

# Generation defaults; a saved model's inference_config overrides them, predict params override both.
DEFAULT_INFERENCE_CONFIG: dict[str, Any] = {
    "max_new_tokens": 128,
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 50,
    "do_sample": False,
}


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


class GenaiModel:
    """A loaded genai folder: ``model`` (onnxruntime_genai.Model) and ``tokenizer``, plus chat helpers."""

    def __init__(self, genai_dir: str | os.PathLike, inference_config: dict | None = None):
        import onnxruntime_genai as og

        self.path = Path(genai_dir)
        info = modeldir.check_genai_dir(self.path)
        self.context_length = info.context_length
        self.defaults = {**DEFAULT_INFERENCE_CONFIG, **(inference_config or {})}
        self.chat_template = modeldir.read_chat_template(self.path)
        self._special_tokens = template.special_tokens(self.path)
        ids = modeldir.token_ids(self.path)
        self.tool_markers = chat.tool_markers(self.chat_template, ids)
        # Marker tokens are often special, which decoding drops: they are put back by id (see _decode).
        self._marker_text = {ids[m]: m for m in self.tool_markers or ()}
        try:
            self.model = og.Model(str(self.path))
            self.tokenizer = og.Tokenizer(self.model)
        except Exception as exc:  # genai raises RuntimeError/OrtException with the native message
            raise SlmopsError(f"onnxruntime-genai cannot load {self.path}: {exc}", "re-export the model folder")
        self._lock = threading.Lock()

    def apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        messages = chat.check_messages(messages)
        if self.chat_template is None:
            raise SlmopsError(
                f"{self.path} has no chat template, so chat input cannot be formatted",
                f"add {modeldir.CHAT_TEMPLATE_FILE} or a chat_template in {modeldir.TOKENIZER_CONFIG}",
            )
        if tools:
            # As transformers renders them, the tools the model was fine-tuned on: genai 0.14.1 would rewrite them.
            return template.render(self.chat_template, messages, True, self._special_tokens, tools=tools)
        return self.tokenizer.apply_chat_template(
            messages=json.dumps(messages), template_str=self.chat_template, add_generation_prompt=True)

    def _decode(self, ids: list[int]) -> str:
        """Decode, keeping tool-call marker tokens as their text."""
        if not self._marker_text:
            return self.tokenizer.decode(ids)
        parts, run = [], []
        for t in ids:
            if t in self._marker_text:
                parts += [self.tokenizer.decode(run) if run else "", self._marker_text[t]]
                run = []
            else:
                run.append(t)
        return "".join(parts) + (self.tokenizer.decode(run) if run else "")

    def generate(self, prompt: str, **params) -> Generation:
        """Generate a completion for a raw prompt string with the given search params."""
        pieces = self.generate_stream(prompt, **params)
        while True:
            try:
                next(pieces)
            except StopIteration as done:
                return done.value

    def generate_stream(self, prompt: str, **params):
        """Yield the completion's text as it grows (one piece per token); returns the ``Generation``."""
        import onnxruntime_genai as og

        opts = resolve_params(self.defaults, params)
        ids = self.tokenizer.encode(prompt)
        if len(ids) == 0:
            raise SlmopsError("the prompt is empty after tokenization", "send a prompt with at least one token")
        if len(ids) >= self.context_length:
            raise SlmopsError(
                f"the prompt has {len(ids)} tokens; the model's context is {self.context_length}",
                "shorten the prompt",
            )
        if opts["max_new_tokens"] == 0:
            return Generation("", len(ids), 0, "length")
        max_length = min(len(ids) + opts["max_new_tokens"], self.context_length)
        gp = og.GeneratorParams(self.model)
        gp.set_search_options(
            max_length=max_length, do_sample=opts["do_sample"], temperature=opts["temperature"],
            top_p=opts["top_p"], top_k=opts["top_k"],
        )
        generator = og.Generator(self.model, gp)
        generator.append_tokens(ids)
        out: list[int] = []
        eos = _eos_ids(self.path)
        shown = ""
        while not generator.is_done():
            generator.generate_next_token()
            out.append(int(generator.get_next_tokens()[0]))
            if out[-1] not in eos:
                text = self._decode(out)
                if len(text) > len(shown) and not text.endswith("\ufffd"):  # a whole character at a time
                    yield text[len(shown):]
                    shown = text
        finish = "stop" if out and out[-1] in eos else "length"
        if finish == "stop":
            out = out[:-1]
        return Generation(self._decode(out), len(ids), len(out) + (finish == "stop"), finish)

    def chat(self, messages: list[dict], tools: list[dict] | None = None, **params) -> dict:
        """OpenAI-style chat completion for one conversation; with ``tools``, calls come back as ``tool_calls``."""
        tools = chat.check_tools(tools)
        gen = self.generate(self.apply_chat_template(messages, tools), **params)
        return self._completion(gen, tools)

    def _completion(self, gen: Generation, tools: list[dict] | None) -> dict:
        text, calls = chat.split_tool_calls(gen.text, self.tool_markers if tools else None)
        return chat.completion(self.path.name, text, gen.finish_reason, gen.prompt_tokens, gen.completion_tokens,
                               tool_calls=calls)

    def chat_stream(self, messages: list[dict], tools: list[dict] | None = None, **params):
        """Yield ``chat.completion.chunk`` dicts; a tool call arrives whole, in one chunk, as OpenAI streams it."""
        tools = chat.check_tools(tools)
        stream = self.generate_stream(self.apply_chat_template(messages, tools), **params)
        start = self.tool_markers[0] if tools and self.tool_markers else None
        state = {"held": "", "sent": "", "gen": None}

        def pieces():
            while True:
                try:
                    state["held"] += next(stream)
                except StopIteration as done:
                    state["gen"] = done.value
                    return
                held = state["held"]
                # Text that is, or may become, a tool call is held back until the generation ends.
                if start is None or not (start.startswith(held.lstrip()) or start in held):
                    state["sent"] += held
                    state["held"] = ""
                    yield held

        def final() -> dict:
            done = self._completion(state["gen"], tools)
            message = done["choices"][0]["message"]
            if not message.get("tool_calls"):
                rest = state["gen"].text[len(state["sent"]):]
                message["content"] = rest  # what was held back, sent as the last piece
            return done

        yield from chat.chunks(self.path.name, pieces(), final)


def _eos_ids(genai_dir: Path) -> set[int]:
    eos = modeldir.read_genai_config(genai_dir)["model"].get("eos_token_id", [])
    return set(eos if isinstance(eos, list) else [eos])


def resolve_params(defaults: dict, params: dict | None) -> dict:
    opts = dict(defaults)
    for key, value in (params or {}).items():
        if value is None:
            continue
        if key not in DEFAULT_INFERENCE_CONFIG:
            raise SlmopsError(f"unknown generation param {key!r}", f"use only {', '.join(DEFAULT_INFERENCE_CONFIG)}")
        opts[key] = value
    try:
        opts["max_new_tokens"] = int(opts["max_new_tokens"])
        opts["top_k"] = int(opts["top_k"])
        opts["temperature"] = float(opts["temperature"])
        opts["top_p"] = float(opts["top_p"])
        opts["do_sample"] = opts["do_sample"] in (True, "true", "True", 1, "1")
    except (TypeError, ValueError) as exc:
        raise SlmopsError(f"generation params must be numbers: {exc}", "pass numeric values")
    if opts["max_new_tokens"] < 0:
        raise SlmopsError(f"max_new_tokens is {opts['max_new_tokens']}, expected 0 or more", "pass a non-negative count")
    if opts["temperature"] <= 0 or not 0 < opts["top_p"] <= 1 or opts["top_k"] < 1:
        raise SlmopsError(
            f"temperature={opts['temperature']}, top_p={opts['top_p']}, top_k={opts['top_k']} are out of range",
            "use temperature > 0, 0 < top_p <= 1 and top_k >= 1",
        )
    return opts
