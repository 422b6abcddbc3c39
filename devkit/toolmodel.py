"""A tiny tool-calling assistant, trained on CPU in well under a minute: the model behind the tool-call tests.

Random-weight test models cannot call a tool, and Foundry Local only returns structured ``tool_calls`` when the
model itself writes a well-formed call between its tool markers. This module trains a 2-layer Qwen2 with a
Qwen2.5-style chat template (``<tools>`` in the system turn, ``<tool_call>`` / ``</tool_call>`` as single
tokens) to call one tool, ``get_order_status(order_id)``, when asked about an order, and to answer a greeting
in plain text. The folder is a normal Hugging Face model that the product converts like any other.

Example:
    >>> from devkit.toolmodel import build_tool_model      # doctest: +SKIP
    >>> hf_dir = build_tool_model(Path("/tmp/tool-model"))   # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from devkit import toymodel

TOOL_FORMAT_VERSION = 8
TOOL_CALL_START, TOOL_CALL_END = toymodel.TOOL_CALL_START, toymodel.TOOL_CALL_END
REASONING_MARKERS = toymodel.REASONING_MARKERS
TOOL_NAME = "get_order_status"
TOOL_ARGUMENT = "order_id"
ORDER_TOOL = {
    "type": "function",
    "function": {
        "name": TOOL_NAME,
        "description": "Look up the delivery status of an order.",
        "parameters": {"type": "object", "properties": {TOOL_ARGUMENT: {"type": "string"}},
                       "required": [TOOL_ARGUMENT]},
    },
}

ARCH = toymodel.TOOLS_ARCH
QWEN_TOOLS_TEMPLATE = toymodel.QWEN_TOOLS_TEMPLATE
_BASE = toymodel.ARCHS["qwen2"]

ORDER_QUESTIONS = (
    "Where is my order {id}?", "What is the status of order {id}?", "Has order {id} shipped yet?",
    "Can you check order {id} for me?", "I want to track order {id}.", "Any news on my order {id}?",
    "When will order {id} arrive?", "Please look up order {id}.", "Status of {id}, please.",
    "Is my order {id} on its way?", "Check the delivery of order {id}.", "Track {id} for me, please.",
)
HELDOUT_ORDER_QUESTIONS = (
    "Could you tell me where order {id} is?", "I'm waiting on order {id}, any update?",
    "What happened to my order {id}?", "Look up the status of {id}.",
)
GREETINGS = (("Hello!", "Hello! How can I help?"), ("Hi there.", "Hi! How can I help?"),
             ("Thanks!", "You are welcome."), ("Good morning.", "Good morning! How can I help?"))
TOOL_RESULTS = (("shipped", "Your order {id} has shipped."), ("delivered", "Your order {id} was delivered."),
                ("processing", "Your order {id} is being prepared."))
DATA_SEED = 11
EXAMPLES = 320


# A few order numbers, each seen many times: a model this small learns to tell them apart, not to copy any digits.
ORDER_IDS = ("KS-104", "KS-237", "KS-358", "KS-461", "KS-592", "KS-615", "KS-783", "KS-926")


def order_id(rng: random.Random) -> str:
    return rng.choice(ORDER_IDS)


def call_text(oid: str) -> str:
    """The call the model is trained to write: the JSON array of {"name", "parameters"} that Foundry Local's tool
    grammar (foundry-local-sdk 2.2.1, ``tool_json_call``) admits between the markers, compact, as the grammar
    forces its fixed parts (``{"name":``, ``,"parameters":{``)."""
    args = json.dumps({TOOL_ARGUMENT: oid}, separators=(",", ":"))
    return f'{TOOL_CALL_START}[{{"name":"{TOOL_NAME}","parameters":{args}}}]{TOOL_CALL_END}'


def _examples(rng: random.Random, n: int) -> list[tuple[list[dict], str, bool]]:
    """(prompt messages, answer, tools in the template) triples: tool calls, tool results, greetings.

    Half of the tool conversations have no tools section: with tools and tool output allowed, Foundry Local
    2.2.1 does not hand the tools to the chat template but sends its own tool protocol as a system message
    (373 tokens here, measured by prompt_tokens; the wording is in its native library, BuildChatPrompt).
    A real model reads it; a 2-layer model cannot learn to read that in a minute, so this model's template
    renders no system message at all (a test-model accommodation; the product code is not involved).
    """
    return [(msgs, answer, tools and rng.random() >= 0.5) for msgs, answer, tools in _turns(rng, n)]


def _turns(rng: random.Random, n: int) -> list[tuple[list[dict], str, bool]]:
    out = []
    for i in range(n):
        kind = i % 6
        oid = order_id(rng)
        if kind < 4:
            out.append(([{"role": "user", "content": rng.choice(ORDER_QUESTIONS).format(id=oid)}], call_text(oid), True))
        elif kind == 4:
            status, reply = rng.choice(TOOL_RESULTS)
            q = rng.choice(ORDER_QUESTIONS).format(id=oid)
            args = json.dumps({TOOL_ARGUMENT: oid}, separators=(",", ":"))
            msgs = [{"role": "user", "content": q},
                    {"role": "assistant", "content": "", "tool_calls": [
                        {"id": "call_1", "type": "function", "function": {"name": TOOL_NAME, "arguments": args}}]},
                    {"role": "tool", "content": json.dumps({"status": status})}]
            out.append((msgs, reply.format(id=oid), True))
        else:
            user, reply = rng.choice(GREETINGS)
            out.append(([{"role": "user", "content": user}], reply, rng.random() < 0.5))
    return out


def render(messages: list[dict], tools: bool, add_generation_prompt: bool = True) -> str:
    """The prompt as transformers renders the saved template (what genai applies at inference)."""
    from mlflow_slmops.deploy.foundry_local.prompt_template import render as render_template

    tokens = {"bos_token": _BASE.bos, "eos_token": _BASE.eos}
    return render_template(QWEN_TOOLS_TEMPLATE, messages, add_generation_prompt, tokens,
                           tools=[ORDER_TOOL] if tools else None)


@dataclass(frozen=True)
class ToolTrainConfig:
    vocab_size: int = 640
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 192
    max_positions: int = 2048
    epochs: int = 6
    batch_size: int = 16
    lr: float = 5e-3
    seed: int = 0


def _encode(tok, messages: list[dict], answer: str, tools: bool) -> tuple[list[int], list[int]]:
    prompt = tok.encode(render(messages, tools)).ids
    target = tok.encode(answer + _BASE.eos).ids
    return prompt + target, [-100] * len(prompt) + target


def _train(folder: Path, cfg: ToolTrainConfig, progress: bool) -> None:
    import torch

    from devkit import demo

    rng = random.Random(DATA_SEED)
    data = _examples(rng, EXAMPLES)
    texts = [render(m, t, False) + a for m, a, t in data]
    tok = toymodel.train_tokenizer(texts, cfg.vocab_size, ARCH)
    encoded = [_encode(tok, m, a, t) for m, a, t in data]
    torch.manual_seed(cfg.seed)
    config = toymodel.build_config(ARCH, tok.get_vocab_size(), cfg.hidden, cfg.layers, cfg.heads, cfg.kv_heads,
                                   cfg.intermediate, cfg.max_positions, tok.token_to_id(_BASE.bos),
                                   tok.token_to_id(_BASE.eos))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    dcfg = demo.TrainConfig(batch_size=cfg.batch_size, seed=cfg.seed, warmup_steps=20, lr=cfg.lr)
    plan = [b for e in range(cfg.epochs) for b in demo._batches(encoded, dcfg, e)]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: demo._lr_factor(s, len(plan), dcfg))
    pad = tok.token_to_id(_BASE.eos)
    with demo._progress(progress) as bar:
        task = bar.add_task("train", total=len(plan), loss=float("nan"))
        for batch in plan:
            ids, mask, labels = demo._collate(encoded, batch, pad)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            bar.update(task, advance=1, loss=float(loss.detach()))
    model.eval()
    toymodel.build_tiny_model(folder, ARCH, tokenizer=tok, model=model, max_positions=cfg.max_positions)


def build_tool_model(cache_dir: Path, *, progress: bool = False, config: ToolTrainConfig | None = None) -> Path:
    """Train the tool-calling test model once per cache folder (keyed by data, settings and this file)."""
    from filelock import FileLock

    cfg = config or ToolTrainConfig()
    key = hashlib.sha256(json.dumps({"v": TOOL_FORMAT_VERSION, "cfg": asdict(cfg), "n": EXAMPLES,
                                     "src": Path(__file__).read_text()}, sort_keys=True).encode()).hexdigest()
    root = Path(cache_dir)
    final = root / f"tool-model-{key[:12]}"
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{final.name}.lock")):
        if final.is_dir():
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=root))
        try:
            _train(tmp, cfg, progress)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final
