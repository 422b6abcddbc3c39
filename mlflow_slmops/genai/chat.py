"""OpenAI-style chat in one place: checking a list of messages, and the shapes of chat.completion responses.

Shared by the ``onnx_genai`` flavor's pyfunc, the quality stage's QA files and the foundry-local deployment, so
the three accept the same messages, refuse the same mistakes in the same words, and answer in the same shape.

Example:
    >>> check_messages([{"role": "user", "content": "hi"}])
    [{'role': 'user', 'content': 'hi'}]
    >>> completion("int4", "Hello!", "stop", prompt_tokens=3, completion_tokens=2)["usage"]["total_tokens"]
    5
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any, Callable, Iterator

from mlflow_slmops import errors

MESSAGES_HINT = 'send {"messages": [{"role": "user", "content": "..."}]}'
# OpenAI's ids are "chatcmpl-" and a random suffix; 24 hex characters keep them unique per process and short.
ID_HEX_CHARS = 24


# Keys a message may carry beyond role and content: an assistant's tool calls, a tool result's call id.
TOOL_MESSAGE_KEYS = ("tool_calls", "tool_call_id")
# Tool-call markers of the chat families Foundry Local serves: Qwen2.5/Qwen3/Hermes, Phi-4-mini, Llama 3.1.
TOOL_MARKERS: tuple[tuple[str, str], ...] = (
    ("<tool_call>", "</tool_call>"),
    ("<|tool_call|>", "<|/tool_call|>"),
    ("<|python_tag|>", "<|eom_id|>"),
)
TOOLS_HINT = 'send "tools": [{"type": "function", "function": {"name": "...", "parameters": {...}}}]'


def check_messages(messages: Any) -> list[dict]:
    """The messages as plain ``{"role", "content"}`` dicts; a one-line error naming the first bad one.

    An assistant message with ``tool_calls`` may have no content, and a ``tool`` message keeps its
    ``tool_call_id``: the chat template renders both.

    Raises:
        SlmopsError: not a non-empty list, or a message without string ``role`` and ``content``.
    """
    if not isinstance(messages, list) or not messages:
        raise errors.SlmopsError("chat input needs a non-empty list of messages", MESSAGES_HINT)
    out = []
    for i, msg in enumerate(messages):
        calls = isinstance(msg, dict) and isinstance(msg.get("tool_calls"), list) and msg.get("tool_calls")
        content_ok = isinstance(msg, dict) and (isinstance(msg.get("content"), str) or
                                                (calls and msg.get("content") is None))
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) or not content_ok:
            raise errors.SlmopsError(f"message {i} is {msg!r}, expected an object with string 'role' and 'content'",
                                     "fix the message list")
        clean = {"role": msg["role"], "content": msg.get("content") or ""}
        clean.update({k: msg[k] for k in TOOL_MESSAGE_KEYS if msg.get(k) is not None})
        out.append(clean)
    return out


def check_tools(tools: Any) -> list[dict] | None:
    """OpenAI function tools, checked: each ``{"type": "function", "function": {"name": ..., ...}}``."""
    if tools is None or (isinstance(tools, list) and not tools):
        return None
    if not isinstance(tools, list):
        raise errors.SlmopsError(f"tools is a {type(tools).__name__}, expected a list", TOOLS_HINT)
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or tool.get("type") != "function" or not isinstance(fn.get("name"), str):
            raise errors.SlmopsError(f"tools[{i}] is {tool!r}, expected a function tool with a name", TOOLS_HINT)
    return tools


_TOOLS_VARIABLE = re.compile(r"\btools\b")


def find_markers(template: str | None, pairs: tuple[tuple[str, str], ...], need_tools: bool) -> tuple[str, str] | None:
    """The first marker pair a chat template holds (with ``need_tools``, only a template that reads ``tools``).

    The one marker finder: the runtime (``tool_markers``) and the foundry-local deployment's capabilities use it.
    """
    if not template or (need_tools and not _TOOLS_VARIABLE.search(template)):
        return None
    return next(((s, e) for s, e in pairs if s in template and e in template), None)


def tool_markers(template: str | None, token_ids: dict[str, int]) -> tuple[str, str] | None:
    """The tool-call markers a chat template renders tools with, when both are single tokens."""
    pair = find_markers(template, TOOL_MARKERS, need_tools=True)
    return pair if pair and all(m in token_ids for m in pair) else None


def _calls_in(body: str) -> list[dict]:
    """The calls of one marked block: a JSON object or array of objects with name and arguments (or parameters)."""
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        return []
    out = []
    for call in value if isinstance(value, list) else [value]:
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return []
        args = call.get("arguments", call.get("parameters", {}))
        out.append({"id": f"call_{uuid.uuid4().hex[:ID_HEX_CHARS]}", "type": "function",
                    "function": {"name": call["name"],
                                 "arguments": args if isinstance(args, str) else json.dumps(args)}})
    return out


def split_tool_calls(text: str, markers: tuple[str, str] | None) -> tuple[str, list[dict]]:
    """The text outside tool-call blocks, and the OpenAI ``tool_calls`` parsed from the blocks.

    An end marker may be missing at the end of the text (generation stopped on it). A block that does not
    parse stays in the text, as Foundry Local leaves text it cannot read as a call.
    """
    if markers is None or markers[0] not in text:
        return text, []
    start, end = markers
    kept, calls, pos = [], [], 0
    while (at := text.find(start, pos)) >= 0:
        stop = text.find(end, at + len(start))
        stop = len(text) if stop < 0 else stop
        found = _calls_in(text[at + len(start):stop].strip())
        kept.append(text[pos:at] if found else text[pos:stop + len(end)])
        calls += found
        pos = stop + len(end)
    kept.append(text[pos:])
    return "".join(kept).strip() if calls else text, calls


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:ID_HEX_CHARS]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(model: str, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int,
               tool_calls: list[dict] | None = None) -> dict:
    """One ``chat.completion`` object with a single assistant choice (with ``tool_calls`` when the model called)."""
    message: dict = {"role": "assistant", "content": text}
    if tool_calls:
        message = {"role": "assistant", "content": text or None, "tool_calls": tool_calls}
        finish_reason = "tool_calls"
    return {
        "id": completion_id(), "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chunks(model: str, pieces: Iterator[str], final: Callable[[], dict]) -> Iterator[dict]:
    """``chat.completion.chunk`` dicts: one per text piece, then the tool calls (if any), then the finish and usage.

    ``final()``, called once the pieces are exhausted, gives the finished ``completion()`` of the generation;
    its message content is text not yet sent as a piece.
    """
    base = {"id": completion_id(), "object": "chat.completion.chunk", "created": int(time.time()), "model": model}
    for piece in pieces:
        yield {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": piece},
                                    "finish_reason": None}]}
    done = final()
    choice = done["choices"][0]
    calls = choice["message"].get("tool_calls")
    if choice["message"].get("content") and not calls:
        yield {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": choice["message"]["content"]},
                                    "finish_reason": None}]}
    if calls:
        deltas = [{"index": i, **call} for i, call in enumerate(calls)]
        yield {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "tool_calls": deltas},
                                    "finish_reason": None}]}
    yield {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": choice["finish_reason"]}],
           "usage": done["usage"]}
