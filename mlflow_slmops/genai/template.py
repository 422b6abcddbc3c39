"""A chat template rendered as transformers renders it: sandboxed jinja2 with the tokenizer's special tokens.

A fine-tuned model learned its prompts from this rendering (``tokenizer.apply_chat_template``), so where the
onnxruntime-genai renderer differs from it, this one is the reference: genai 0.14.1 rewrites OpenAI ``tools``
into its own shorter form before the template sees them, which no fine-tuning data ever held.

Example:
    >>> render("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }};{% endfor %}",
    ...        [{"role": "user", "content": "hi"}], False, {})
    'user: hi;'
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from pathlib import Path

from mlflow_slmops.genai import modeldir

# Distinct chat templates kept compiled: one per loaded model is the usual case.
COMPILED_TEMPLATES = 16


def special_tokens(model_dir: Path) -> dict[str, str]:
    """bos_token, eos_token, ... from tokenizer_config.json (values may be AddedToken dicts)."""
    path = model_dir / modeldir.TOKENIZER_CONFIG
    try:
        cfg = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        cfg = {}
    tokens = {}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = cfg.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        tokens[key] = value if isinstance(value, str) else ""
    return tokens


def render(template: str, messages: list[dict], add_generation_prompt: bool, tokens: dict[str, str],
           **context) -> str:
    """Render a chat template as transformers does (sandboxed jinja2, trim_blocks, lstrip_blocks, its tojson).

    ``context`` adds template variables such as ``tools`` (a list of OpenAI tool objects) or ``enable_thinking``.
    """
    return _compiled(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **tokens,
                                      **context)


@functools.lru_cache(maxsize=COMPILED_TEMPLATES)
def _compiled(template: str):
    """The template compiled once (the pyfunc renders every request with tools through it)."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    # transformers' own tojson: keys in their given order, no HTML escaping (jinja2's sorts and escapes).
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)
