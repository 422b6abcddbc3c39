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

import time
import uuid
from typing import Any

from mlflow_slmops import errors

MESSAGES_HINT = 'send {"messages": [{"role": "user", "content": "..."}]}'
# OpenAI's ids are "chatcmpl-" and a random suffix; 24 hex characters keep them unique per process and short.
ID_HEX_CHARS = 24


def check_messages(messages: Any) -> list[dict]:
    """The messages as plain ``{"role", "content"}`` dicts; a one-line error naming the first bad one.

    Raises:
        SlmopsError: not a non-empty list, or a message without string ``role`` and ``content``.
    """
    if not isinstance(messages, list) or not messages:
        raise errors.SlmopsError("chat input needs a non-empty list of messages", MESSAGES_HINT)
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) or not isinstance(msg.get("content"), str):
            raise errors.SlmopsError(f"message {i} is {msg!r}, expected an object with string 'role' and 'content'",
                                     "fix the message list")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:ID_HEX_CHARS]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(model: str, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> dict:
    """One ``chat.completion`` object with a single assistant choice."""
    return {
        "id": completion_id(), "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}],
        "usage": usage(prompt_tokens, completion_tokens),
    }
