"""The one adapter to the Foundry Local runtime (foundry-local-sdk 2.2): the only module importing it.

Foundry Local runs in-process: ``FoundryLocalManager`` is a per-process singleton bound to one model cache.
``runtime_for(cache_dir)`` hands out the manager for a cache, closing and re-creating it when another cache
(or web-service address) is asked for, which the SDK allows after ``close()``.

Example:
    >>> rt = runtime_for(Path("/tmp/foundry-cache"))                           # doctest: +SKIP
    >>> rt.register("qwen-support:3", Path("/tmp/foundry-cache/mlflow-slmops/qwen-support-3"))
    >>> rt.chat("qwen-support:3", [{"role": "user", "content": "Hi"}], ChatOptions(max_tokens=16)).text
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from mlflow_slmops.deploy.foundry_local.cache import INFERENCE_MODEL_FILE
from mlflow_slmops.errors import SlmopsError
from mlflow_slmops.genai.modeldir import (
    GENAI_CONFIG,
    TOKENIZER_JSON,
    read_json_or_empty,
)

APP_NAME = "mlflow-slmops"
TASK = "chat-completion"
# What Foundry Local 2.2 asks for when a request gives no max_tokens (its error messages show it).
FOUNDRY_DEFAULT_OUTPUT_TOKENS = 2048
# Tokens the estimate may miss where the template's text and the rendered prompt tokenize differently.
PROMPT_TOKEN_MARGIN = 8
LOCAL_ROUTE = "/catalogs/local/v1"  # the web service serves registered local models only under this prefix
_ROLES = ("system", "user", "assistant", "developer", "tool")


@dataclass(frozen=True)
class ChatOptions:
    """Per-request search options; None keeps the model's genai_config.json default."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    do_sample: bool | None = None


@dataclass(frozen=True)
class ChatResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    # OpenAI-shaped tool calls ({"id", "type": "function", "function": {"name", "arguments"}}) the runtime returned.
    tool_calls: tuple[dict, ...] = ()


@dataclass(frozen=True)
class RegisteredModel:
    model_id: str
    path: str


def _error(action: str, exc: Exception) -> SlmopsError:
    # Native messages start with "file.cc:123 virtual ... Function(...)": keep only the last clause.
    text = " ".join(str(exc).split())
    text = text.rsplit(") ", 1)[-1] if ".cc:" in text else text
    return SlmopsError(f"Foundry Local could not {action}: {text}", "check the deployment with `mlflow deployments get`")


@dataclass
class ModelDefaults:
    """What a request without options gets, from the registered folder's own files.

    Foundry Local asks for 2048 output tokens when a request names none, and refuses the request when prompt
    plus output exceed the model's context. OpenAI's contract is "until a stop token or the context is full",
    so a request without ``max_tokens`` gets what is left of the context after its prompt, up to 2048.
    """

    do_sample: bool | None = None
    context_length: int | None = None
    prompt_template: dict = field(default_factory=dict)
    tokenizer: object | None = None

    @classmethod
    def read(cls, folder: Path) -> "ModelDefaults":
        config = read_json_or_empty(folder / GENAI_CONFIG)
        search, model = config.get("search", {}), config.get("model", {})
        template = read_json_or_empty(folder / INFERENCE_MODEL_FILE).get("PromptTemplate", {})
        tokenizer = None
        if (folder / TOKENIZER_JSON).is_file():
            from tokenizers import Tokenizer

            with contextlib.suppress(Exception):  # a tokenizer `tokenizers` cannot read: count bytes
                tokenizer = Tokenizer.from_file(str(folder / TOKENIZER_JSON))
        return cls(search.get("do_sample") if isinstance(search.get("do_sample"), bool) else None,
                   model.get("context_length") if isinstance(model.get("context_length"), int) else None,
                   template if isinstance(template, dict) else {}, tokenizer)

    def prompt_tokens(self, messages: list[dict]) -> int:
        """An upper estimate of the prompt's tokens: each message in its PromptTemplate, plus the reply's opening."""
        def fill(key: str, content: str) -> str:
            tpl = self.prompt_template.get(key)
            return tpl.replace("{Content}", content) if isinstance(tpl, str) else content

        text = "".join(fill(m["role"], m["content"]) for m in messages) + fill("prompt", "")
        if self.tokenizer is None:
            return len(text.encode())  # a byte-level BPE never needs more than one token per byte
        return len(self.tokenizer.encode(text, add_special_tokens=True).ids) + PROMPT_TOKEN_MARGIN

    def output_budget(self, messages: list[dict]) -> int | None:
        """max_output_tokens for a request that gives none; None leaves it to Foundry (which then explains)."""
        if self.context_length is None:
            return None
        left = self.context_length - self.prompt_tokens(messages)
        return min(FOUNDRY_DEFAULT_OUTPUT_TOKENS, left) if left > 0 else None


class FoundryRuntime:
    """The Foundry Local manager of one cache folder, with the few operations the deployment needs."""

    def __init__(self, cache_dir: Path, web_urls: str | None = None):
        from foundry_local_sdk import Configuration, FoundryLocalManager

        self.cache_dir = Path(cache_dir)
        self.web_urls = web_urls
        web = Configuration.WebService(urls=web_urls) if web_urls else None
        try:
            FoundryLocalManager.initialize(
                Configuration(app_name=APP_NAME, model_cache_dir=str(self.cache_dir), web=web)
            )
        except Exception as exc:  # FoundryLocalException, or OSError from the native side
            raise _error(f"start on cache {self.cache_dir}", exc)
        self.manager = FoundryLocalManager.instance
        self._loaded: dict[str, object] = {}
        self._defaults: dict[str, ModelDefaults] = {}

    @property
    def _catalog(self):
        from foundry_local_sdk import CatalogType

        return self.manager.get_catalog(CatalogType.LOCAL)

    def registered(self) -> list[RegisteredModel]:
        """Every version of every model of the local catalog, with the folder it was registered from."""
        # list_models() gives one model per alias; its variants are all the registered versions of that alias.
        try:
            return [RegisteredModel(v.id, v.get_path()) for m in self._catalog.list_models() for v in m.variants]
        except Exception as exc:
            raise _error("list its local catalog", exc)

    def registered_path(self, model_id: str) -> str | None:
        """The folder a model ID is registered from, or None."""
        try:
            model = self._catalog.get_model_variant(model_id)
        except Exception as exc:
            raise _error(f"look up {model_id}", exc)
        return model.get_path() if model is not None else None

    def register(self, model_id: str, model_dir: Path) -> None:
        """Register (or re-register) a model folder in the local catalog as a chat-completion model."""
        from foundry_local_sdk import ModelInfoBuilder

        from mlflow_slmops.deploy.foundry_local.capabilities import metadata_of

        if self.registered_path(model_id) is not None:
            self.unregister(model_id)
        strings, ints = metadata_of(Path(model_dir))  # tool-calling and reasoning markers, from the folder itself
        try:
            with ModelInfoBuilder() as meta:
                meta.set_string_property("task", TASK)
                for key, text in strings.items():
                    meta.set_string_property(key, text)
                for key, number in ints.items():
                    meta.set_int_property(key, number)
                self._catalog.register_model(model_path=str(model_dir), model_id=model_id, metadata=meta)
        except Exception as exc:
            raise _error(f"register {model_id} from {model_dir}", exc)

    def unregister(self, model_id: str) -> bool:
        """Remove a model from the local catalog; False if it was not there."""
        if self.registered_path(model_id) is None:
            return False
        self._unload(model_id)
        try:
            self._catalog.unregister_model(model_id)
        except Exception as exc:
            raise _error(f"unregister {model_id}", exc)
        return True

    def load(self, model_id: str):
        """The loaded model handle (loaded once per runtime)."""
        if model_id in self._loaded:
            return self._loaded[model_id]
        try:
            model = self._catalog.get_model_variant(model_id)
        except Exception as exc:
            raise _error(f"look up {model_id}", exc)
        if model is None:
            raise SlmopsError(f"model {model_id} is not registered in Foundry Local's local catalog of {self.cache_dir}",
                              "deploy it again with `mlflow deployments update`")
        try:
            model.load()
        except Exception as exc:
            raise _error(f"load {model_id}", exc)
        self._loaded[model_id] = model
        return model

    def _unload(self, model_id: str) -> None:
        self._defaults.pop(model_id, None)
        model = self._loaded.pop(model_id, None)
        if model is not None:
            try:
                model.unload()
            except Exception:  # already unloaded by the runtime: nothing to release
                pass

    def _session(self, model_id: str, options: ChatOptions, messages: list[dict], tools: list[dict] | None):
        from foundry_local_sdk import ChatSession, RequestOptions, SearchOptions

        session = ChatSession(self.load(model_id))
        for tool in tools or ():  # OpenAI function tools, already checked by chat.check_tools
            fn = tool["function"]
            session.add_tool_definition(fn["name"], fn.get("description") or "",
                                        json.dumps(fn.get("parameters") or {"type": "object", "properties": {}}))
        defaults = self._defaults_of(model_id)
        # Foundry Local samples unless told otherwise, whatever genai_config.json says: pass the model's default.
        do_sample = options.do_sample if options.do_sample is not None else defaults.do_sample
        max_tokens = options.max_tokens if options.max_tokens is not None else defaults.output_budget(messages)
        search = SearchOptions(temperature=options.temperature, top_p=options.top_p, top_k=options.top_k,
                               max_output_tokens=max_tokens, seed=options.seed, do_sample=do_sample)
        session.set_options(RequestOptions(search=search))
        return session

    def _defaults_of(self, model_id: str) -> "ModelDefaults":
        if model_id not in self._defaults:
            path = self.registered_path(model_id)
            self._defaults[model_id] = ModelDefaults.read(Path(path)) if path else ModelDefaults()
        return self._defaults[model_id]

    @staticmethod
    def _request(messages: list[dict]):
        from foundry_local_sdk import Request

        request = Request()
        for msg in messages:
            if msg["role"] not in _ROLES:
                raise SlmopsError(f"message role {msg['role']!r} is not supported", f"use one of {', '.join(_ROLES)}")
            for item in _items_of(msg):
                request.add_item(item)
        return request

    def chat(self, model_id: str, messages: list[dict], options: ChatOptions,
             tools: list[dict] | None = None) -> ChatResult:
        """One chat completion through the runtime (the model's own chat template builds the prompt); with
        ``tools``, the runtime's structured calls come back in ``tool_calls``."""
        try:
            with self._session(model_id, options, messages, tools) as session, self._request(messages) as req:
                with session.process_request(req) as resp:
                    items = list(resp)
                    text = "".join(t for item in items for t in _texts_of(item))
                    usage = resp.get_usage()
                    return ChatResult(text, usage.prompt_tokens, usage.completion_tokens, _finish(resp.finish_reason),
                                      tuple(c for item in items for c in _calls_of(item)))
        except SlmopsError:
            raise
        except Exception as exc:
            raise _error(f"answer a chat with {model_id}", exc)

    def chat_stream(self, model_id: str, messages: list[dict], options: ChatOptions,
                    tools: list[dict] | None = None) -> Iterator[str | ChatResult]:
        """Yields text pieces as they are generated, then one ChatResult with the usage, finish reason and calls."""
        parts: list[str] = []
        calls: list[dict] = []
        try:
            with self._session(model_id, options, messages, tools) as session, self._request(messages) as req:
                session.set_streaming(True)
                with session.process_streaming_request(req) as stream:
                    for item in stream:
                        calls += _calls_of(item)
                        for piece in _texts_of(item):
                            parts.append(piece)
                            yield piece
                    with stream.final_response as final:
                        usage = final.get_usage()
                        calls = calls or [c for item in final for c in _calls_of(item)]
                        yield ChatResult("".join(parts), usage.prompt_tokens, usage.completion_tokens,
                                         _finish(final.finish_reason), tuple(calls))
        except SlmopsError:
            raise
        except Exception as exc:
            raise _error(f"stream a chat with {model_id}", exc)

    def serve(self, model_id: str) -> list[str]:
        """Load the model and start Foundry Local's own web service; returns its base URLs."""
        self.load(model_id)
        try:
            self.manager.start_web_service()
        except Exception as exc:
            raise _error("start its web service", exc)
        return list(self.manager.urls or [])

    def close(self) -> None:
        """Unload models, stop the web service, release the manager (idempotent)."""
        for model_id in list(self._loaded):
            self._unload(model_id)
        if self.manager is not None:
            try:
                if self.manager.urls is not None:
                    self.manager.stop_web_service()
            except Exception:
                pass
            self.manager.close()
            self.manager = None


_current: FoundryRuntime | None = None


def runtime_for(cache_dir: Path, web_urls: str | None = None) -> FoundryRuntime:
    """The process's runtime on this cache; re-created when another cache or web address is needed."""
    global _current
    cache_dir = Path(os.path.abspath(cache_dir))
    if _current is not None and _current.manager is not None:
        if _current.cache_dir == cache_dir and (web_urls is None or _current.web_urls == web_urls):
            return _current
        _current.close()
    _current = FoundryRuntime(cache_dir, web_urls)
    return _current


def _texts_of(item) -> list[str]:
    from foundry_local_sdk import MessageItem, TextItem

    if isinstance(item, TextItem):
        return [item.text]
    if isinstance(item, MessageItem):
        return [p.text for p in item.parts if isinstance(p, TextItem)]
    return []


def _calls_of(item) -> list[dict]:
    """The OpenAI-shaped tool calls an item is or holds."""
    from foundry_local_sdk import MessageItem, ToolCallItem

    if isinstance(item, ToolCallItem):
        return [{"id": item.call_id, "type": "function", "function": {"name": item.name, "arguments": item.arguments}}]
    if isinstance(item, MessageItem):
        return [c for p in item.parts for c in _calls_of(p)]
    return []


def _items_of(msg: dict) -> list:
    """A chat message as the runtime's request items: an assistant's tool calls and a tool result are items of
    their own (the runtime takes only text, images and audio inside a message)."""
    from foundry_local_sdk import MessageItem, ToolCallItem, ToolResultItem

    if msg["role"] == "tool":
        return [ToolResultItem(msg.get("tool_call_id") or "", msg["content"])]
    calls = (msg.get("tool_calls") or []) if msg["role"] == "assistant" else []
    items = [getattr(MessageItem, msg["role"])(msg["content"])] if msg["content"] or not calls else []
    for call in calls:
        fn = call.get("function") or {}
        args = fn.get("arguments", "{}")
        items.append(ToolCallItem(call.get("id") or "", fn.get("name") or "",
                                  args if isinstance(args, str) else json.dumps(args)))
    return items


def _finish(reason) -> str:
    from foundry_local_sdk import FinishReason

    return {FinishReason.STOP: "stop", FinishReason.LENGTH: "length", FinishReason.TOOL_CALLS: "tool_calls"}.get(
        reason, "stop")
