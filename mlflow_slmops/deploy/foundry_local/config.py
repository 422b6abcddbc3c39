"""The ``-C key=value`` settings of the foundry-local target: parsing, validation and the key reference.

``mlflow deployments ... -C key=value`` hands every value over as a string. This module is the one place
that knows the keys, turns the strings into typed values, and prints the reference shown by
``mlflow deployments help -t foundry-local`` (and pasted into docs/deploy.md).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from mlflow_slmops.errors import SlmopsError

DEFAULT_PUBLISHER = "mlflow-slmops"
# Keys written into genai_config.json's "search" section (the model's generation defaults).
SEARCH_KEYS = ("max_length", "temperature", "top_p", "top_k", "repetition_penalty", "do_sample")
MAX_PORT = 65535


@dataclass(frozen=True)
class KeySpec:
    """One config key: its parser (string -> value) and the line of the key reference."""

    name: str
    kind: str
    default: str
    help: str
    parse: Callable[[str, str], Any]


def _float(key: str, text: str) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise SlmopsError(f"-C {key}={text!r} is not a number", f"pass a number, for example -C {key}=0.7")
    if not math.isfinite(value):
        raise SlmopsError(f"-C {key}={text!r} is not a finite number", f"pass a finite number for {key}")
    return value


def _int(key: str, text: str) -> int:
    try:
        return int(str(text).strip(), 10)
    except (TypeError, ValueError):
        raise SlmopsError(f"-C {key}={text!r} is not a whole number", f"pass an integer, for example -C {key}=2048")


def _positive_float(key: str, text: str) -> float:
    value = _float(key, text)
    if value <= 0:
        raise SlmopsError(f"-C {key}={text} must be greater than 0", f"pass a positive {key}")
    return value


def _top_p(key: str, text: str) -> float:
    value = _float(key, text)
    if not 0 < value <= 1:
        raise SlmopsError(f"-C {key}={text} must be in (0, 1]", "pass a value such as 0.9")
    return value


def _int_at_least(minimum: int) -> Callable[[str, str], int]:
    def parse(key: str, text: str) -> int:
        value = _int(key, text)
        if value < minimum:
            raise SlmopsError(f"-C {key}={text} must be at least {minimum}", f"pass an integer >= {minimum}")
        return value

    return parse


def _bool(key: str, text: str) -> bool:
    lowered = str(text).strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise SlmopsError(f"-C {key}={text!r} is not true or false", f"pass -C {key}=true or -C {key}=false")


def _switch(key: str, text: str) -> bool:
    lowered = str(text).strip().lower()
    if lowered in ("on", "true", "1", "yes"):
        return True
    if lowered in ("off", "false", "0", "no"):
        return False
    raise SlmopsError(f"-C {key}={text!r} is not on or off", f"pass -C {key}=on or -C {key}=off, or leave it out")


def _version(key: str, text: str) -> int:
    # Foundry model IDs want a canonical non-negative integer: no sign, no leading zero.
    text = str(text).strip()
    if not text.isdigit() or (len(text) > 1 and text.startswith("0")):
        raise SlmopsError(f"-C {key}={text!r} is not a version number", "pass a non-negative integer without leading zeros")
    return int(text)


def _publisher(key: str, text: str) -> str:
    from mlflow_slmops.deploy.foundry_local.cache import validate_name

    return validate_name(text, what="publisher")


def _port(key: str, text: str) -> int:
    value = _int(key, text)
    if not 0 <= value <= MAX_PORT:
        raise SlmopsError(f"-C {key}={text} is not a TCP port", f"pass 0 (any free port) to {MAX_PORT}")
    return value


def _prompt_template(key: str, text: str) -> dict:
    from mlflow_slmops.deploy.foundry_local.prompt_template import parse_override

    return parse_override(text)


KEYS: tuple[KeySpec, ...] = (
    KeySpec("publisher", "name", DEFAULT_PUBLISHER, "Publisher folder inside the cache.", _publisher),
    KeySpec("version", "integer >= 0", "registry version",
            "Version in the Foundry model ID `<name>:<version>`; without a registry version: 1, then +1 per "
            "update with a new model.", _version),
    KeySpec("max_length", "integer > 0", "model's", "genai_config.json search.max_length (prompt + output tokens); "
            "at most the model's context length.", _int_at_least(1)),
    KeySpec("temperature", "float > 0", "model's", "genai_config.json search.temperature.", _positive_float),
    KeySpec("top_p", "float in (0, 1]", "model's", "genai_config.json search.top_p.", _top_p),
    KeySpec("top_k", "integer >= 1", "model's", "genai_config.json search.top_k.", _int_at_least(1)),
    KeySpec("repetition_penalty", "float > 0", "model's", "genai_config.json search.repetition_penalty.",
            _positive_float),
    KeySpec("do_sample", "true or false", "model's",
            "genai_config.json search.do_sample; temperature, top_p and top_k only act when true.", _bool),
    KeySpec("prompt_template", "JSON object or path", "derived",
            "PromptTemplate for inference_model.json (keys system, user, assistant, prompt, each with {Content}); "
            "overrides the one derived from the model's chat template.", _prompt_template),
    KeySpec("tool_calling", "on or off", "detected",
            "Register the model with Foundry Local as calling tools, with the tool-call markers of its chat template "
            "(`<tool_call>`, `<|tool_call|>`, `<|python_tag|>`), so tool calls come back as structured `tool_calls`.",
            _switch),
    KeySpec("reasoning", "on or off", "detected",
            "Register the `<think>` markers so Foundry Local separates reasoning from the answer; `off` switches "
            "reasoning off in templates with `enable_thinking`.", _switch),
    KeySpec("port", "integer 0-65535", "0 (any free port)", "run-local only: port of Foundry Local's web service.",
            _port),
)
KEY_NAMES = tuple(k.name for k in KEYS)


@dataclass
class DeploymentConfig:
    """Parsed ``-C`` settings. ``None`` means "not given": keep the model's own value."""

    publisher: str | None = None
    version: int | None = None
    search: dict[str, Any] = field(default_factory=dict)
    prompt_template: dict | None = None
    tool_calling: bool | None = None
    reasoning: bool | None = None
    port: int | None = None

    def merged_over(self, previous: dict) -> "DeploymentConfig":
        """This config on top of a previous deployment's recorded config (what `update` keeps)."""
        base = from_record(previous)
        return DeploymentConfig(
            publisher=self.publisher or base.publisher,
            version=self.version,
            search={**base.search, **self.search},
            prompt_template=self.prompt_template or base.prompt_template,
            tool_calling=self.tool_calling if self.tool_calling is not None else base.tool_calling,
            reasoning=self.reasoning if self.reasoning is not None else base.reasoning,
            port=self.port,
        )

    def to_record(self) -> dict:
        """What the provenance file keeps: everything that shaped the deployed folder (no port)."""
        record = asdict(self)
        record.pop("port")
        record.pop("version")
        return record


def from_record(record: dict | None) -> DeploymentConfig:
    record = record or {}
    return DeploymentConfig(
        publisher=record.get("publisher"),
        search=dict(record.get("search") or {}),
        prompt_template=record.get("prompt_template"),
        tool_calling=record.get("tool_calling"),
        reasoning=record.get("reasoning"),
    )


def parse_config(config: dict | None) -> DeploymentConfig:
    """Turn the CLI's ``-C`` strings (or Python values) into a checked DeploymentConfig.

    Args:
        config: ``{"temperature": "0.2", ...}`` as ``mlflow deployments`` passes it; None for no settings.

    Example:
        >>> parse_config({"temperature": "0.2", "max_length": "1024"}).search
        {'temperature': 0.2, 'max_length': 1024}
    """
    specs = {k.name: k for k in KEYS}
    parsed = DeploymentConfig()
    for key, value in (config or {}).items():
        if key not in specs:
            raise SlmopsError(
                f"-C {key}=... is not a foundry-local setting",
                f"use one of {', '.join(KEY_NAMES)} (see `mlflow deployments help -t foundry-local`)",
            )
        text = value if isinstance(value, str) else json.dumps(value) if isinstance(value, dict) else str(value)
        typed = specs[key].parse(key, text)
        if key in SEARCH_KEYS:
            parsed.search[key] = typed
        else:
            setattr(parsed, key, typed)
    return parsed


def key_reference() -> str:
    """The config key table, as markdown (shown by `mlflow deployments help` and in docs/deploy.md)."""
    lines = ["| Key | Value | Default | Meaning |", "|---|---|---|---|"]
    lines += [f"| `{k.name}` | {k.kind} | {k.default} | {k.help} |" for k in KEYS]
    return "\n".join(lines)


def read_json_or_path(text: str, what: str) -> Any:
    """A JSON literal, or the path of a JSON file."""
    stripped = text.strip()
    if not stripped.startswith(("{", "[")):
        path = Path(stripped).expanduser()
        if not path.is_file():
            raise SlmopsError(f"{what} {text!r} is neither JSON nor an existing file", "pass a JSON object or a file path")
        stripped = path.read_text(encoding="utf-8")
    try:
        return json.loads(stripped)
    except json.JSONDecodeError as exc:
        raise SlmopsError(f"{what} is not valid JSON ({exc.msg} at line {exc.lineno})", "fix the JSON")
