"""Derive Foundry Local's ``PromptTemplate`` from a model's own chat template.

The v1 ``foundry`` CLI (Windows, macOS) builds prompts from ``inference_model.json``'s ``PromptTemplate``:
one string per role with a ``{Content}`` placeholder. The 2.x runtime uses the folder's own chat template.
So a deployment needs both, and they must agree.

How: the chat family is recognised by its marker tokens (ChatML/Qwen, Llama-3, Phi-3). The template is then
rendered with jinja2, the way transformers does, on a conversation of sentinel messages; the text around each
sentinel gives that role's piece. The pieces are checked to rebuild the rendered conversation exactly. A template
of no known family, or whose pieces do not compose, is refused: a wrong template would silently degrade every
answer, so it is never guessed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mlflow_slmops.errors import SlmopsError
from mlflow_slmops.genai import modeldir
from mlflow_slmops.genai.template import render, special_tokens

CONTENT = "{Content}"
PIECE_KEYS = ("system", "user", "assistant", "prompt")
# Plain alphanumeric sentinels survive `| trim` and the other filters chat templates apply to content.
_SYS, _USER1, _ASSISTANT, _USER2 = "SlmopsSentinelSystem", "SlmopsSentinelUserOne", "SlmopsSentinelAssistant", "SlmopsSentinelUserTwo"
_OVERRIDE_HINT = "pass -C prompt_template='{\"prompt\": \"...{Content}...\"}' (a JSON object or a file)"


@dataclass(frozen=True)
class ChatFamily:
    """A chat format: the markers that identify it and where a message of a role starts."""

    name: str
    markers: tuple[str, ...]
    role_start: str  # formatted with role=...

    def start(self, role: str) -> str:
        return self.role_start.format(role=role)


FAMILIES: tuple[ChatFamily, ...] = (
    ChatFamily("chatml", ("<|im_start|>", "<|im_end|>"), "<|im_start|>{role}"),
    ChatFamily("llama3", ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
               "<|start_header_id|>{role}<|end_header_id|>"),
    ChatFamily("phi3", ("<|user|>", "<|assistant|>", "<|end|>"), "<|{role}|>"),
)


def detect_family(template: str) -> ChatFamily | None:
    """The known family whose markers all appear in the template, or None."""
    return next((f for f in FAMILIES if all(m in template for m in f.markers)), None)


def _unmappable(where: str, why: str) -> SlmopsError:
    return SlmopsError(f"the chat template of {where} cannot be mapped to a Foundry PromptTemplate: {why}", _OVERRIDE_HINT)


def _split_at(text: str, marker: str, where: str) -> tuple[str, str]:
    """Split the text between two messages into (end of the first, start of the second)."""
    cut = text.rfind(marker)
    if cut < 0:
        raise _unmappable(where, f"expected {marker!r} between two messages, found {text!r}")
    return text[:cut], text[cut:]


def _render_sentinels(template: str, tokens: dict, with_system: bool, where: str) -> tuple[str, list[str]]:
    msgs = [("system", _SYS)] if with_system else []
    msgs += [("user", _USER1), ("assistant", _ASSISTANT), ("user", _USER2)]
    try:
        text = render(template, [{"role": r, "content": c} for r, c in msgs], True, tokens)
    except Exception as exc:  # jinja2 raises TemplateError subclasses, templates may raise anything
        raise _unmappable(where, f"rendering it failed ({type(exc).__name__}: {exc})")
    return text, [c for _, c in msgs]


def _between(text: str, sentinels: list[str], where: str) -> list[str]:
    """The text before, between and after the sentinels, which must each appear once, in order."""
    parts, pos = [], 0
    for s in sentinels:
        at = text.find(s, pos)
        if at < 0 or text.count(s) != 1:
            raise _unmappable(where, "it does not render each message's content exactly once, in order")
        parts.append(text[pos:at])
        pos = at + len(s)
    parts.append(text[pos:])
    return parts


def derive(template: str, tokens: dict[str, str], where: str = "the model") -> dict[str, str | None]:
    """Derive ``{system, user, assistant, prompt}`` with ``{Content}`` from a chat template.

    Args:
        template: the jinja chat template text.
        tokens: special tokens the template may use (bos_token, eos_token, ...).
        where: how to name the model in errors.

    Returns:
        The PromptTemplate dict. ``system`` is None when the template drops system messages.

    Example:
        >>> from devkit.toymodel import CHATML_TEMPLATE
        >>> derive(CHATML_TEMPLATE, {})["prompt"]
        '<|im_start|>user\\n{Content}<|im_end|>\\n<|im_start|>assistant\\n'
    """
    family = detect_family(template)
    if family is None:
        raise _unmappable(where, "it is not ChatML/Qwen, Llama-3 or Phi-3 (no known role markers)")
    text, sentinels = _render_sentinels(template, tokens, True, where)
    with_system = _SYS in text
    if not with_system:  # some Phi-3 templates drop system messages
        text, sentinels = _render_sentinels(template, tokens, False, where)
    parts = _between(text, sentinels, where)
    head, tail = parts[0], parts[-1]
    gaps = parts[1:-1]
    system = None
    if with_system:
        sys_prefix = head[head.rfind(family.start("system")):] if family.start("system") in head else None
        if sys_prefix is None:
            raise _unmappable(where, f"no {family.start('system')!r} before the system message")
        sys_suffix, user_prefix = _split_at(gaps.pop(0), family.start("user"), where)
        system = sys_prefix + CONTENT + sys_suffix
    else:
        user_prefix = head[head.rfind(family.start("user")):] if family.start("user") in head else None
        if user_prefix is None:
            raise _unmappable(where, f"no {family.start('user')!r} before the user message")
    user_suffix, asst_prefix = _split_at(gaps[0], family.start("assistant"), where)
    asst_suffix, user_prefix2 = _split_at(gaps[1], family.start("user"), where)
    if user_prefix2 != user_prefix or not tail.startswith(user_suffix):
        raise _unmappable(where, "user messages are not rendered the same way each time")
    generation = tail[len(user_suffix):]
    if not generation.startswith(family.start("assistant")):
        raise _unmappable(where, "add_generation_prompt does not open an assistant message")
    pieces = {
        "system": system,
        "user": user_prefix + CONTENT + user_suffix,
        "assistant": asst_prefix + CONTENT + asst_suffix,
        "prompt": user_prefix + CONTENT + user_suffix + generation,
    }
    _check_composes(text, head, pieces, sentinels, with_system, where)
    return pieces


def _check_composes(text: str, head: str, pieces: dict, sentinels: list[str], with_system: bool, where: str) -> None:
    """The pieces, filled with the sentinels, must rebuild the rendered conversation after its leading text."""
    order = (["system"] if with_system else []) + ["user", "assistant", "prompt"]
    rebuilt = "".join(pieces[k].replace(CONTENT, s) for k, s in zip(order, sentinels))
    lead = head[: len(head) - len(pieces[order[0]].split(CONTENT)[0])]
    if lead + rebuilt != text:
        raise _unmappable(where, "its messages do not compose role by role")


def for_model(model_dir: str | Path, override: dict | None = None) -> dict[str, str | None]:
    """The PromptTemplate for a genai folder: the override if given, else derived from its chat template.

    A folder without any chat template is refused, even with an override: Foundry Local 2.x builds prompts
    from that template and would otherwise send raw text to the model.
    """
    model_dir = Path(model_dir)
    template = modeldir.read_chat_template(model_dir)
    if template is None:
        raise SlmopsError(
            f"model folder {model_dir.name} has no chat template, so Foundry Local cannot format chats for it",
            f"add {modeldir.CHAT_TEMPLATE_FILE} (the tokenizer's chat template) to the model folder and log it again",
        )
    if override is not None:
        return {k: override.get(k) for k in PIECE_KEYS}
    return derive(template, special_tokens(model_dir), where=f"model folder {model_dir.name}")


def parse_override(text: str) -> dict:
    """Check a ``prompt_template`` config value: a JSON object (or file) of role strings with {Content}."""
    from mlflow_slmops.deploy.foundry_local.config import read_json_or_path

    value = read_json_or_path(text, "-C prompt_template")
    if not isinstance(value, dict) or "prompt" not in value:
        raise SlmopsError("-C prompt_template must be a JSON object with at least a 'prompt' key", _OVERRIDE_HINT)
    unknown = sorted(set(value) - set(PIECE_KEYS))
    if unknown:
        raise SlmopsError(f"-C prompt_template has unknown keys {unknown}", f"use only {', '.join(PIECE_KEYS)}")
    for key, piece in value.items():
        if piece is not None and (not isinstance(piece, str) or CONTENT not in piece):
            raise SlmopsError(f"-C prompt_template key {key!r} must be a string containing {CONTENT}", _OVERRIDE_HINT)
    return value
