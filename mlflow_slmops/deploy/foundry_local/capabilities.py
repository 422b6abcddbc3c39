"""What a deployed model can do beyond plain chat: tool calls and reasoning, read from its own files.

Foundry Local (foundry-local-sdk 2.2.1) returns structured ``tool_calls`` only when three things agree:

* the registration metadata says so: ``supports_tool_calling`` = 1 and the marker texts ``tool_call_start`` /
  ``tool_call_end`` (names from the SDK's ``foundry_local_c.h``; the native library reads them back);
* the runtime, onnxruntime-genai-core 0.18, publishes the markers as token ids: ``model.bot_token_id`` and
  ``model.eot_token_id`` in ``genai_config.json`` (``bor_token_id`` / ``eor_token_id`` for reasoning). Without
  them Foundry answers a request with tools by "automatic tool calls require distinct model-published tool
  boundary tokens";
* each marker is one token of the tokenizer, so the runtime's grammar can frame the call by token.

This module finds the markers in the chat template, checks them against the tokenizer, and turns the result
into those genai_config keys and that metadata. The deployed folder is the record: ``metadata_of(folder)``
derives the registration metadata from the folder's own genai_config.json and tokenizer.json, so a
re-registration (a reset catalog, a recovered deploy) registers the same capabilities.

Example:
    >>> caps = detect(Path("out/int4"), tool_calling=None, reasoning=None)        # doctest: +SKIP
    >>> caps.tool_call.start, caps.tool_call.end                                   # doctest: +SKIP
    ('<tool_call>', '</tool_call>')
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mlflow_slmops.errors import SlmopsError
from mlflow_slmops.genai import modeldir
from mlflow_slmops.genai.chat import TOOL_MARKERS, find_markers

REASONING_MARKERS: tuple[tuple[str, str], ...] = (("<think>", "</think>"),)
# The template variable Qwen3-style templates read to switch reasoning off.
THINKING_SWITCH = "enable_thinking"
THINKING_OFF_PREFIX = "{%- set enable_thinking = false %}\n"

# genai_config.json "model" keys of onnxruntime-genai 0.18 (strings in libonnxruntime-genai.so).
TOOL_TOKEN_KEYS = ("bot_token_id", "eot_token_id")
REASONING_TOKEN_KEYS = ("bor_token_id", "eor_token_id")
# Registration metadata keys (foundry_local_c.h: FOUNDRY_LOCAL_MODEL_PROP_*).
SUPPORTS_TOOL_CALLING = "supports_tool_calling"
TOOL_CALL_START, TOOL_CALL_END = "tool_call_start", "tool_call_end"
SUPPORTS_REASONING = "supports_reasoning"
REASONING_START, REASONING_END = "reasoning_start", "reasoning_end"


@dataclass(frozen=True)
class Markers:
    """A pair of marker texts and their token ids."""

    start: str
    end: str
    start_id: int
    end_id: int


@dataclass(frozen=True)
class Capabilities:
    """What to register: tool-call markers, reasoning markers, and whether reasoning is switched off."""

    tool_call: Markers | None = None
    reasoning: Markers | None = None
    thinking_off: bool = False

    def genai_model_keys(self) -> dict[str, int]:
        """The keys to add to genai_config.json's "model" section."""
        keys: dict[str, int] = {}
        if self.tool_call:
            keys.update(zip(TOOL_TOKEN_KEYS, (self.tool_call.start_id, self.tool_call.end_id)))
        if self.reasoning:
            keys.update(zip(REASONING_TOKEN_KEYS, (self.reasoning.start_id, self.reasoning.end_id)))
        return keys

    def to_record(self) -> dict:
        return {"tool_calling": bool(self.tool_call), "tool_call_markers": _pair(self.tool_call),
                "reasoning": bool(self.reasoning), "reasoning_markers": _pair(self.reasoning),
                "thinking_off": self.thinking_off}


def _pair(m: Markers | None) -> list[str] | None:
    return [m.start, m.end] if m else None


token_ids = modeldir.token_ids


def _markers(pair: tuple[str, str], ids: dict[str, int], what: str, where: str, switch: str) -> Markers:
    missing = [m for m in pair if m not in ids]
    if missing:
        raise SlmopsError(
            f"the chat template of {where} marks {what} with {pair[0]!r} ... {pair[1]!r}, but {missing[0]!r} is not "
            "a single token of its tokenizer, so Foundry Local cannot recognise them",
            f"add the markers to the tokenizer as tokens (and fine-tune with them), or deploy with -C {switch}=off")
    if ids[pair[0]] == ids[pair[1]]:
        raise SlmopsError(f"the {what} markers of {where} are one and the same token", f"deploy with -C {switch}=off")
    return Markers(pair[0], pair[1], ids[pair[0]], ids[pair[1]])


def detect(model_dir: Path, tool_calling: bool | None, reasoning: bool | None) -> Capabilities:
    """The capabilities to deploy: detected from the chat template and tokenizer, or as ``-C`` overrides ask.

    Args:
        model_dir: the genai folder (chat_template.jinja or tokenizer_config.json, tokenizer.json).
        tool_calling: ``-C tool_calling``: None detects, True requires markers, False leaves tools off.
        reasoning: ``-C reasoning``: None detects, True requires ``<think>`` markers, False switches reasoning off
            in a template that supports it (``enable_thinking``).

    Raises:
        SlmopsError: markers that are not single tokens, ``on`` without markers, ``reasoning=off`` without switch.
    """
    model_dir = Path(model_dir)
    where = f"model folder {model_dir.name}"
    template = modeldir.read_chat_template(model_dir) or ""
    ids = token_ids(model_dir)
    tool = None
    if tool_calling is not False:
        pair = find_markers(template, TOOL_MARKERS, need_tools=True)
        if pair is None and tool_calling:
            known = ", ".join(f"{s} ... {e}" for s, e in TOOL_MARKERS)
            raise SlmopsError(f"-C tool_calling=on, but the chat template of {where} renders no tools with known "
                              f"tool-call markers ({known})", "use a model whose chat template takes tools, or leave "
                              "-C tool_calling out")
        tool = _markers(pair, ids, "tool calls", where, "tool_calling") if pair else None
    pair = find_markers(template, REASONING_MARKERS, need_tools=False)
    if reasoning is False:
        if pair is not None and THINKING_SWITCH not in template:
            raise SlmopsError(f"-C reasoning=off, but the chat template of {where} has no {THINKING_SWITCH} switch, "
                              "so its reasoning cannot be turned off", "leave -C reasoning out")
        return Capabilities(tool, None, thinking_off=pair is not None)
    if pair is None and reasoning:
        raise SlmopsError(f"-C reasoning=on, but the chat template of {where} has no <think> ... </think> markers",
                          "leave -C reasoning out")
    return Capabilities(tool, _markers(pair, ids, "reasoning", where, "reasoning") if pair else None)


def thinking_off_template(template: str) -> str:
    """The chat template with reasoning switched off, whatever a request's template variables say."""
    return THINKING_OFF_PREFIX + template


def metadata_of(folder: Path) -> tuple[dict[str, str], dict[str, int]]:
    """The registration metadata (string and int properties) the deployed folder's own files call for."""
    model = modeldir.read_json_or_empty(folder / modeldir.GENAI_CONFIG).get("model") or {}
    by_id = {v: k for k, v in token_ids(folder).items()}
    strings: dict[str, str] = {}
    ints: dict[str, int] = {}
    for keys, flag, names in ((TOOL_TOKEN_KEYS, SUPPORTS_TOOL_CALLING, (TOOL_CALL_START, TOOL_CALL_END)),
                              (REASONING_TOKEN_KEYS, SUPPORTS_REASONING, (REASONING_START, REASONING_END))):
        texts = [by_id.get(model.get(k)) for k in keys]
        if all(texts):
            ints[flag] = 1
            strings.update(zip(names, texts))
    return strings, ints


def describe(folder: Path) -> dict:
    """For ``get_deployment``: the tool-calling and reasoning markers registered for a deployed folder."""
    strings, ints = metadata_of(folder)
    return {"tool_calling": bool(ints.get(SUPPORTS_TOOL_CALLING)),
            "tool_call_markers": [strings[TOOL_CALL_START], strings[TOOL_CALL_END]] if TOOL_CALL_START in strings else None,
            "reasoning": bool(ints.get(SUPPORTS_REASONING)),
            "reasoning_markers": [strings[REASONING_START], strings[REASONING_END]] if REASONING_START in strings else None}


def dumps(caps: Capabilities) -> str:
    return json.dumps(caps.to_record(), sort_keys=True)
