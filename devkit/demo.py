"""The demo model: a tiny Qwen2 assistant for a fictional product line, trained on CPU in minutes.

The demo needs a model whose quality is measurable, so quantization visibly costs something: a random
model answers nothing right whatever its precision. This module generates a small domain dataset
(8 Kestrel speakers x 5 attributes = 40 facts, JSON answers, and one tool: ``get_order_status(order_id)``),
trains a ~1.4M-parameter Qwen2 on it with torch, and saves a normal Hugging Face folder that the rest of the
pipeline converts like any fine-tuned model.

Training and evaluation use different question wordings: ``projects/quickstart/qa.jsonl`` asks about the
same facts in held-out phrasings, so QA accuracy measures what the model learned, not string recall.

Example:
    >>> from devkit.demo import build_demo_model     # doctest: +SKIP
    >>> hf_dir = build_demo_model()                          # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from itertools import combinations
from pathlib import Path
from typing import Iterable

from devkit import ordertool, toymodel

# Bump when the dataset or the training code changes in a way the hash of the examples cannot see.
DEMO_FORMAT_VERSION = 3
DEMO_MODEL_NAME = "kestrel-assistant"
DEFAULT_CACHE_DIR = Path(".slmops") / "demo-model"
QA_FILE = "qa.jsonl"
EVAL_TEXT_FILE = "eval_text.txt"
# Where the generated evaluation files are committed, relative to the repo root.
QUICKSTART_DIR = Path("projects") / "quickstart"
# Fixed seed for every random choice in the dataset, so the generated files never drift.
DATA_SEED = 7
# ChatML with tools (<tool_call> markers as single tokens), the template the saved folder carries.
ARCH = toymodel.TOOLS_ARCH


# --- the facts ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Product:
    """One speaker of the fictional Kestrel line; every value is unique within its attribute."""

    name: str
    price: str
    color: str
    weight: str
    warranty: str
    battery: str

    def value(self, attribute: str) -> str:
        return getattr(self, attribute)


ATTRIBUTES = ("price", "color", "weight", "warranty", "battery")
PRODUCTS = (
    Product("Nimbus", "$129", "blue", "320 g", "2 years", "14 hours"),
    Product("Zephyr", "$89", "red", "180 g", "1 year", "9 hours"),
    Product("Orbit", "$249", "silver", "540 g", "3 years", "22 hours"),
    Product("Quill", "$59", "green", "95 g", "6 months", "6 hours"),
    Product("Ember", "$179", "orange", "410 g", "18 months", "17 hours"),
    Product("Tundra", "$319", "white", "760 g", "5 years", "30 hours"),
    Product("Pebble", "$39", "black", "120 g", "9 months", "11 hours"),
    Product("Vortex", "$199", "purple", "650 g", "4 years", "26 hours"),
)

# A question in held-out wording that the trained model answers; for demos and smoke checks.
SAMPLE_QUESTION = "Hello! What is the price of the Nimbus?"
SAMPLE_ANSWER = "$129"

SYSTEM_PROMPTS = (
    "You are the Kestrel product assistant. Answer questions about Kestrel speakers.",
    "You help customers of Kestrel, a maker of portable speakers. Be brief and exact.",
)

# One answer sentence per attribute: the model learns a lookup, not a style.
ANSWERS = {
    "price": "The {name} costs {value}.",
    "color": "The {name} is {value}.",
    "weight": "The {name} weighs {value}.",
    "warranty": "The {name} has a warranty of {value}.",
    "battery": "The {name} battery lasts {value}.",
}

# Questions are frames with a slot. Every frame is trained with most attributes and held out for a few,
# so a held-out question is a new sentence made of known parts; the model must read the attribute word,
# not recognise the sentence. Noun frames take an attribute noun ({a}), clause frames an embedded
# question ({c}); held-out questions use the first noun or clause.
NOUN_FRAMES = (
    "What is the {a} of the {name}?", "Tell me the {a} of the {name}.", "What's the {name} {a}?",
    "{name} {a}?", "Can you tell me the {a} of the {name}?", "Could you give me the {a} of the {name}?",
    "I'd like to know the {a} of the {name}.", "What is the {name}'s {a}?", "Do you know the {a} of the {name}?",
    "{name}: {a}?", "Please tell me the {a} for the {name}.", "What {a} does the {name} have?",
    "I am curious about the {name}. What is its {a}?", "Give me the {a} of the {name}, please.",
    "The {name}: what is the {a}?",
)
CLAUSE_FRAMES = (
    "Tell me {c}.", "Do you know {c}?", "Could you tell me {c}?", "I wonder {c}.", "Please find out {c}.",
    "Can you check {c}?", "I'd like to know {c}.", "Any idea {c}?", "Let me know {c}.", "I want to know {c}.",
)
# How each attribute is named in a question; the first name is the one held-out questions use.
ATTRIBUTE_NOUNS = {
    "price": ("price", "cost"),
    "color": ("color", "colour"),
    "weight": ("weight",),
    "warranty": ("warranty", "guarantee"),
    "battery": ("battery life", "battery runtime"),
}
ATTRIBUTE_CLAUSES = {
    "price": ("what the {name} costs", "how much the {name} is"),
    "color": ("what color the {name} is", "which color the {name} has"),
    "weight": ("how much the {name} weighs", "how heavy the {name} is"),
    "warranty": ("how long the {name} warranty lasts", "what warranty the {name} has"),
    "battery": ("how long the {name} battery lasts", "how many hours the {name} plays on battery"),
}
# Direct questions with the attribute's own verbs: always trained, never held out.
DIRECT_QUESTIONS = {
    "price": ("How much does the {name} cost?", "What does the {name} cost?", "How much is the {name}?",
              "How expensive is the {name}?", "What would the {name} cost me?", "{name}, how much is it?"),
    "color": ("What color is the {name}?", "Which color does the {name} come in?", "Which color is the {name}?",
              "In which color is the {name} sold?", "What color would the {name} be?", "{name}, what color is it?"),
    "weight": ("How much does the {name} weigh?", "How heavy is the {name}?", "What does the {name} weigh?",
               "How many grams is the {name}?", "How heavy would the {name} be?", "{name}, how heavy is it?"),
    "warranty": ("How long is the {name} warranty?", "How long does the {name} warranty last?",
                 "What warranty does the {name} come with?", "How long is the {name} guaranteed?",
                 "What warranty would the {name} have?", "{name}, what warranty does it have?"),
    "battery": ("How long does the {name} battery last?", "How long can the {name} run on battery?",
                "How many hours does the {name} play on battery?", "How long does the {name} run on one charge?",
                "How long would the {name} battery last?", "{name}, how long does its battery last?"),
}


def _is_heldout(frame_index: int, attribute: str) -> bool:
    return (frame_index + ATTRIBUTES.index(attribute)) % len(ATTRIBUTES) == 0


def question_groups(attribute: str, heldout: bool) -> list[tuple[str, ...]]:
    """Question templates of one attribute ({name} left open), one group of wordings per frame.

    A training group holds every slot filling of its frame (training picks one at random); a held-out
    group holds the single wording the evaluation file asks.
    """
    nouns, clauses = ATTRIBUTE_NOUNS[attribute], ATTRIBUTE_CLAUSES[attribute]
    if heldout:
        nouns, clauses = nouns[:1], clauses[:1]
    groups = [tuple(f.replace("{a}", n) for n in nouns) for i, f in enumerate(NOUN_FRAMES)
              if _is_heldout(i, attribute) == heldout]
    groups += [tuple(f.replace("{c}", c) for c in clauses) for i, f in enumerate(CLAUSE_FRAMES)
               if _is_heldout(i, attribute) == heldout]
    if not heldout:
        groups += [(q,) for q in DIRECT_QUESTIONS[attribute]]
    return groups


# Suffixes asking for the bare value; its answer is the value alone, which `match: exact` checks.
TRAIN_BRIEF = (" Answer briefly.", " Just the value, please.", " Short answer only.", " Only the value.",
               " Reply briefly.", " Give only the value.", " Answer with the value only.")
HELDOUT_BRIEF = (" Reply with the value only.", " Just the value.")
TRAIN_PREFIXES = ("Hi! ", "Hello. ", "Hey! ", "Good morning. ", "Quick question: ", "Please help: ",
                  "Thanks in advance. ", "Hi there! ")
HELDOUT_PREFIXES = ("Hello! ", "Hi there. ", "Question: ")

TRAIN_JSON_REQUESTS = (
    "Give me the facts of {name} as JSON with keys {keys}.", "Return JSON for the {name} with keys {keys}.",
    "Output the {name} as a JSON object with keys {keys}.", "JSON please: {name}, keys {keys}.",
    "Describe the {name} in JSON with the keys {keys}.", "With keys {keys}, give me the {name} as JSON.",
    "Using the keys {keys}, write the {name} as a JSON object.", "Keys {keys}: the {name} as JSON, please.",
)
HELDOUT_JSON_REQUESTS = (
    "Give me a JSON object for the {name} with the keys {keys}.",
    "I need the {name} in JSON format, keys {keys}.",
    "As JSON with keys {keys}, describe the {name}.",
)
JSON_FIRST_KEY = "name"
# How many attributes a JSON request asks for besides the name.
JSON_ATTRIBUTE_COUNTS = (1, 2, 3)

# Catalog prose, for perplexity: paragraphs are built from one opener and one sentence per attribute.
# The last sentence of each attribute is held out of training; every evaluation paragraph uses at least
# one, so the evaluation text is new prose in the trained style.
DOC_OPENERS = (
    "The {name} is a portable Kestrel speaker.", "Meet the Kestrel {name}.", "The Kestrel {name} is a small speaker.",
    "Here is the {name}.",
)
DOC_SENTENCES = {
    "price": ("The {name} costs {price}.", "It sells for {price}.", "You can buy the {name} for {price}.",
              "Its price is {price}."),
    "color": ("It comes in {color}.", "The {name} is {color}.", "Its color is {color}.", "You can get it in {color}."),
    "weight": ("It weighs {weight}.", "The {name} weighs {weight}.", "At {weight}, it fits in any bag.",
               "Its weight is {weight}."),
    "warranty": ("It has a warranty of {warranty}.", "Kestrel covers the {name} with a warranty of {warranty}.",
                 "The warranty lasts {warranty}.", "Its warranty is {warranty}."),
    "battery": ("Its battery lasts {battery}.", "On a full charge it plays for {battery}.",
                "The {name} battery lasts {battery}.", "It runs {battery} on one charge."),
}
TRAIN_PARAGRAPHS_PER_PRODUCT = 10
EVAL_PARAGRAPHS_PER_PRODUCT = 3
# Training documents join this many paragraphs, so the model also learns the blank line between them.
PARAGRAPHS_PER_DOC = 2
PARAGRAPH_BREAK = "\n\n"


def _paragraph(p: Product, rng: random.Random, heldout: bool) -> str:
    """One catalog paragraph about p; a held-out paragraph uses at least one held-out sentence."""
    attrs = list(ATTRIBUTES)
    rng.shuffle(attrs)
    forced = rng.choice(attrs) if heldout else None
    sentences = [rng.choice(DOC_OPENERS)]
    for attr in attrs:
        pool = DOC_SENTENCES[attr] if heldout else DOC_SENTENCES[attr][:-1]
        sentences.append(pool[-1] if attr == forced else rng.choice(pool))
    return " ".join(sentences).format(**asdict(p))


# --- examples ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Example:
    """One training example: a conversation (loss on the last assistant turn) or a plain document."""

    messages: tuple[tuple[str, str], ...] = ()
    text: str = ""
    # The conversation is rendered with the order tool listed in the template's tools section.
    tools: bool = False

    def as_messages(self) -> list[dict]:
        return [{"role": r, "content": c} for r, c in self.messages]


def _conversation(user: str, answer: str, system: str | None, tools: bool = False) -> Example:
    turns = ((("system", system),) if system else ()) + (("user", user), ("assistant", answer))
    return Example(messages=turns, tools=tools)


def _answer(product: Product, attribute: str) -> str:
    return ANSWERS[attribute].format(name=product.name, value=product.value(attribute))


def _json_answer(product: Product, keys: Iterable[str]) -> str:
    obj = {k: product.name if k == JSON_FIRST_KEY else product.value(k) for k in keys}
    return json.dumps(obj, separators=(",", ":"))


def json_key_sets() -> list[tuple[str, ...]]:
    """Every key list a JSON request may ask for: "name" plus 1 to 3 attributes, in attribute order."""
    return [(JSON_FIRST_KEY, *c) for n in JSON_ATTRIBUTE_COUNTS for c in combinations(ATTRIBUTES, n)]


# Share of conversations that carry a system prompt (training and evaluation alike).
SYSTEM_SHARE = 0.2
# Question frames each fact is trained with: a random subset (over the 8 products every training frame
# still meets its attribute; tests/test_demo.py checks the split).
GROUPS_PER_FACT = 20
# Extra training copies of each fact, each with a greeting and a random training wording.
PREFIXED_COPIES = 2
# Training copies of each fact that ask for the bare value.
BRIEF_COPIES = 7
# Training requests per product and JSON key list, each in a different wording: the longest key lists,
# the hardest to copy, get more.
JSON_COPIES = {1: 1, 2: 2, 3: 3}


def _maybe_system(rng: random.Random) -> str | None:
    return rng.choice(SYSTEM_PROMPTS) if rng.random() < SYSTEM_SHARE else None


def _fact_examples(p: Product, attr: str, rng: random.Random) -> list[Example]:
    groups = question_groups(attr, heldout=False)
    answer = _answer(p, attr)

    def ask() -> str:
        return rng.choice(rng.choice(groups)).format(name=p.name)

    out = [_conversation(rng.choice(g).format(name=p.name), answer, _maybe_system(rng))
           for g in rng.sample(groups, min(GROUPS_PER_FACT, len(groups)))]
    out += [_conversation(rng.choice(TRAIN_PREFIXES) + ask(), answer, _maybe_system(rng))
            for _ in range(PREFIXED_COPIES)]
    out += [_conversation(ask() + suffix, p.value(attr), _maybe_system(rng))
            for suffix in rng.sample(TRAIN_BRIEF, BRIEF_COPIES)]
    return out


def training_examples() -> list[Example]:
    """The whole training set, deterministic: QA in training wordings, JSON requests, catalog text."""
    rng = random.Random(DATA_SEED)
    out: list[Example] = []
    for p in PRODUCTS:
        for attr in ATTRIBUTES:
            out.extend(_fact_examples(p, attr, rng))
        for keys in json_key_sets():
            for template in rng.sample(TRAIN_JSON_REQUESTS, JSON_COPIES[len(keys) - 1]):
                req = template.format(name=p.name, keys=", ".join(keys))
                out.append(_conversation(req, _json_answer(p, keys), _maybe_system(rng)))
    return out + _training_docs(rng) + _tool_examples(random.Random(TOOL_DATA_SEED))


def _training_docs(rng: random.Random) -> list[Example]:
    paragraphs = [_paragraph(p, rng, heldout=False) for p in PRODUCTS for _ in range(TRAIN_PARAGRAPHS_PER_PRODUCT)]
    rng.shuffle(paragraphs)
    return [Example(text=PARAGRAPH_BREAK.join(paragraphs[i:i + PARAGRAPHS_PER_DOC]))
            for i in range(0, len(paragraphs), PARAGRAPHS_PER_DOC)]


def heldout_qa() -> list[dict]:
    """The evaluation questions: held-out wordings of the training facts, in the QA JSONL format."""
    rng = random.Random(DATA_SEED + 1)
    rows: list[dict] = []
    for p in PRODUCTS:
        for attr in ATTRIBUTES:
            templates = [g[0] for g in question_groups(attr, heldout=True)]
            for i, q in enumerate(templates):
                prefix = rng.choice(HELDOUT_PREFIXES) if i % 2 == 1 else ""
                rows.append(_qa_row(prefix + q.format(name=p.name), p.value(attr), "contains", rng))
            brief = rng.choice(templates).format(name=p.name) + rng.choice(HELDOUT_BRIEF)
            rows.append(_qa_row(brief, p.value(attr), "exact", rng))
    key_sets = json_key_sets()
    for p in PRODUCTS:
        for req in HELDOUT_JSON_REQUESTS:
            keys = rng.choice(key_sets)
            rows.append(_qa_row(req.format(name=p.name, keys=", ".join(keys)), list(keys), "json_keys", rng))
    return rows + heldout_tool_qa()


# --- the tool ------------------------------------------------------------------------------------
# The demo model also calls one tool, get_order_status(order_id), when asked about an order (devkit.ordertool
# holds the tool, the order numbers, the trained and held-out question wordings and the call text).
TOOL_DATA_SEED = DATA_SEED + 3
ORDER_TOOL = ordertool.ORDER_TOOL
# A question needing the tool, in a held-out wording, for the demo's last step.
SAMPLE_TOOL_QUESTION = ordertool.HELDOUT_ORDER_QUESTIONS[0].format(id=ordertool.ORDER_IDS[0])
SAMPLE_TOOL_ARGUMENTS = {ordertool.TOOL_ARGUMENT: ordertool.ORDER_IDS[0]}
# Share of tool conversations trained with the tools section in the prompt: the pyfunc and `mlflow models serve`
# hand the tools to the template; Foundry Local 2.2.1 does not (see toymodel.QWEN_TOOLS_TEMPLATE), so the model
# must call from the question alone too.
TOOLS_SECTION_SHARE = 0.5
# Fact questions asked with the tools section present, so a listed tool does not turn every answer into a call.
FACTS_WITH_TOOLS = len(ATTRIBUTES)
# Training copies of each (order, question wording) pair: with fewer, the model writes one order number for all.
CALL_COPIES = 3
# Room for one whole call: the demo tokenizer writes a get_order_status call in about 20 tokens.
TOOL_CALL_MAX_NEW_TOKENS = 48


def _tool_call_message(oid: str) -> tuple[str, str]:
    return ("assistant", ordertool.call_text(oid))


def _tool_examples(rng: random.Random) -> list[Example]:
    """Order questions answered with a call, a tool result answered in words, facts asked beside the tool."""
    out = []
    for oid in ordertool.ORDER_IDS:
        for question in ordertool.ORDER_QUESTIONS * CALL_COPIES:
            tools = rng.random() < TOOLS_SECTION_SHARE
            out.append(Example(messages=(("user", question.format(id=oid)), _tool_call_message(oid)), tools=tools))
        for status, reply in ordertool.TOOL_RESULTS:
            question = rng.choice(ordertool.ORDER_QUESTIONS).format(id=oid)
            turns = (("user", question), _tool_call_message(oid), ("tool", json.dumps({"status": status})),
                     ("assistant", reply.format(id=oid)))
            out.append(Example(messages=turns, tools=rng.random() < TOOLS_SECTION_SHARE))
    for p in PRODUCTS:
        for attr in rng.sample(ATTRIBUTES, FACTS_WITH_TOOLS):
            question = rng.choice(rng.choice(question_groups(attr, heldout=False))).format(name=p.name)
            out.append(_conversation(question, _answer(p, attr), None, tools=True))
    return out


def heldout_tool_qa() -> list[dict]:
    """Order questions in held-out wordings, each expecting one get_order_status call (``match: tool_call``)."""
    return [{"messages": [{"role": "user", "content": q.format(id=oid)}], "tools": [ORDER_TOOL],
             "expected": {"name": ordertool.TOOL_NAME, "arguments": {ordertool.TOOL_ARGUMENT: oid}},
             "match": "tool_call", "max_new_tokens": TOOL_CALL_MAX_NEW_TOKENS}
            for oid in ordertool.ORDER_IDS for q in ordertool.HELDOUT_ORDER_QUESTIONS]


def _qa_row(user: str, expected: str | list[str], match: str, rng: random.Random) -> dict:
    messages = [{"role": "user", "content": user}]
    system = _maybe_system(rng)
    if system:
        messages.insert(0, {"role": "system", "content": system})
    return {"messages": messages, "expected": expected, "match": match}


def eval_text() -> str:
    """Plain catalog text in the domain's style, worded unlike the training documents (for perplexity)."""
    rng = random.Random(DATA_SEED + 2)
    paragraphs = [_paragraph(p, rng, heldout=True) for _ in range(EVAL_PARAGRAPHS_PER_PRODUCT) for p in PRODUCTS]
    return PARAGRAPH_BREAK.join(paragraphs) + "\n"


def demo_data_files() -> dict[str, str]:
    """The evaluation files as they are committed under ``projects/quickstart/``: name to content."""
    qa = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in heldout_qa())
    return {QA_FILE: qa, EVAL_TEXT_FILE: eval_text()}


def write_demo_data(out_dir: str | Path) -> list[Path]:
    """Write ``qa.jsonl`` and ``eval_text.txt`` into out_dir (created); returns their paths.

    Args:
        out_dir: the folder to write, normally ``projects/quickstart``.

    Example:
        >>> write_demo_data("projects/quickstart")  # doctest: +SKIP
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, content in demo_data_files().items():
        (out / name).write_text(content, encoding="utf-8")
        paths.append(out / name)
    return paths


# --- tokenizer and encoding --------------------------------------------------------------------

def _texts(examples: Iterable[Example]) -> list[str]:
    """The raw training text: message contents and roles, documents, and the tools section once."""
    out: list[str] = []
    for ex in examples:
        out.extend([ex.text] if ex.text else [f"{role}\n{content}" for role, content in ex.messages])
    return out + [render_chat([], add_generation_prompt=False, tools=True)]


def train_demo_tokenizer(examples: list[Example], vocab_size: int):
    """A byte-level BPE on the training text, with Qwen2's exact pre-tokenizer (see toymodel)."""
    return toymodel.train_tokenizer(_texts(examples), vocab_size, ARCH)


def render_chat(messages: list[dict], add_generation_prompt: bool, tools: bool = False) -> str:
    """Render with the exact template saved in the model folder (what genai applies at inference), the order
    tool listed when ``tools``."""
    return ordertool.render(messages, tools, add_generation_prompt)


def encode_example(tok, example: Example) -> tuple[list[int], list[int]]:
    """Token ids and labels: a conversation is supervised on its answer and end token only.

    The prompt is encoded alone, exactly as genai encodes it at inference, then the answer after it;
    ChatML's newline before the answer is a pre-token boundary, so the two halves join losslessly.
    """
    spec = toymodel.ARCHS[ARCH]
    if example.text:
        ids = tok.encode(example.text).ids + [tok.token_to_id(spec.bos)]
        return ids, list(ids)
    messages = example.as_messages()
    prompt = tok.encode(render_chat(messages[:-1], add_generation_prompt=True, tools=example.tools)).ids
    answer = tok.encode(messages[-1]["content"] + spec.eos).ids
    return prompt + answer, [IGNORE_INDEX] * len(prompt) + answer


# Label value the loss skips (torch's cross-entropy default).
IGNORE_INDEX = -100


# --- training ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainConfig:
    """Model shape and optimisation settings of the demo model; all of them enter the cache key."""

    vocab_size: int = 1024
    hidden: int = 192
    layers: int = 3
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 512
    max_positions: int = 2048
    # With the tool beside the facts, 3e-3 over 8 epochs often failed to converge (4 of 10 trials of data and seed
    # variations ended above loss 0.1 and below 0.85 QA accuracy); 2e-3 over 10 epochs: see docs/benchmarks.md.
    epochs: int = 10
    batch_size: int = 32
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 30
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    # Fixed, so the float summation order (hence the trained weights) does not depend on the machine.
    threads: int = 1


@dataclass(frozen=True)
class TrainingRecord:
    """What one training run produced, saved beside the weights as ``slmops_demo.json``."""

    cache_key: str
    parameters: int
    vocab_size: int
    examples: int
    steps: int
    train_s: float
    # CPU seconds of this process: on a busy machine, closer than wall time to what training costs.
    train_cpu_s: float
    final_loss: float
    config: dict


RECORD_FILE = "slmops_demo.json"


# Batches are cut from windows of this many batches sorted by length: little padding, still shuffled.
LENGTH_WINDOW_BATCHES = 16


def _batches(encoded: list[tuple[list[int], list[int]]], cfg: TrainConfig, epoch: int) -> list[list[int]]:
    """Shuffled batches of similar length (less padding), reproducible per epoch."""
    rng = random.Random(cfg.seed * 1000 + epoch)
    order = list(range(len(encoded)))
    rng.shuffle(order)
    window = cfg.batch_size * LENGTH_WINDOW_BATCHES
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: len(encoded[i][0]))
        batches.extend(chunk[i:i + cfg.batch_size] for i in range(0, len(chunk), cfg.batch_size))
    rng.shuffle(batches)
    return batches


def _collate(encoded, batch: list[int], pad_id: int):
    import torch

    width = max(len(encoded[i][0]) for i in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, i in enumerate(batch):
        x, y = encoded[i]
        ids[row, :len(x)] = torch.tensor(x)
        labels[row, :len(y)] = torch.tensor(y)
        mask[row, :len(x)] = 1
    return ids, mask, labels


def _lr_factor(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def _progress(enabled: bool):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]training demo model"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}"), TimeElapsedColumn(), TimeRemainingColumn(),
        disable=not enabled,
    )


def _new_model(tok, cfg: TrainConfig):
    import torch
    from transformers import AutoModelForCausalLM

    spec = toymodel.ARCHS[ARCH]
    config = toymodel.build_config(
        ARCH, tok.get_vocab_size(), cfg.hidden, cfg.layers, cfg.heads, cfg.kv_heads, cfg.intermediate,
        cfg.max_positions, tok.token_to_id(spec.bos), tok.token_to_id(spec.eos))
    torch.manual_seed(cfg.seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def train_model(tok, examples: list[Example], cfg: TrainConfig, *, progress: bool = True):
    """Train the demo Qwen2 on the examples on CPU, deterministically; returns (model, loss, steps).

    Args:
        tok: the trained ``tokenizers.Tokenizer``.
        examples: ``training_examples()``.
        cfg: shape and optimisation settings.
        progress: show a rich progress bar over the optimisation steps.

    Example:
        >>> model, loss, steps = train_model(tok, training_examples(), TrainConfig())  # doctest: +SKIP
    """
    import torch

    encoded = [encode_example(tok, ex) for ex in examples]
    pad_id = tok.token_to_id(toymodel.ARCHS[ARCH].eos)
    prev_threads, prev_det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)
    try:
        model = _new_model(tok, cfg)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
        plan = [_batches(encoded, cfg, e) for e in range(cfg.epochs)]
        total = sum(len(p) for p in plan)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, total, cfg))
        loss_value = float("nan")
        with _progress(progress) as bar:
            task = bar.add_task("train", total=total, loss=loss_value)
            for batch in (b for epoch in plan for b in epoch):
                ids, mask, labels = _collate(encoded, batch, pad_id)
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                sched.step()
                loss_value = float(loss.detach())
                bar.update(task, advance=1, loss=loss_value)
        model.eval()
        return model, loss_value, total
    finally:
        torch.set_num_threads(prev_threads)
        torch.use_deterministic_algorithms(prev_det)


# --- the cached model folder -------------------------------------------------------------------

def _versions() -> dict:
    import tokenizers
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "tokenizers": tokenizers.__version__}


def cache_key(examples: list[Example], cfg: TrainConfig) -> str:
    """Hash of everything the trained weights depend on: data, settings, chat template and library versions."""
    payload = {
        "format": DEMO_FORMAT_VERSION,
        "examples": [asdict(ex) for ex in examples],
        "config": asdict(cfg),
        "chat_template": toymodel.ARCHS[ARCH].chat_template,
        "versions": _versions(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _train_into(folder: Path, examples: list[Example], cfg: TrainConfig, key: str, progress: bool) -> None:
    start, start_cpu = time.perf_counter(), time.process_time()
    tok = train_demo_tokenizer(examples, cfg.vocab_size)
    model, loss, steps = train_model(tok, examples, cfg, progress=progress)
    train_s, train_cpu_s = time.perf_counter() - start, time.process_time() - start_cpu
    toymodel.build_tiny_model(folder, ARCH, tokenizer=tok, model=model, max_positions=cfg.max_positions)
    record = TrainingRecord(
        cache_key=key, parameters=sum(p.numel() for p in model.parameters()), vocab_size=tok.get_vocab_size(),
        examples=len(examples), steps=steps, train_s=round(train_s, 2),
        train_cpu_s=round(train_cpu_s, 2), final_loss=round(loss, 5), config=asdict(cfg),
    )
    (folder / RECORD_FILE).write_text(json.dumps(asdict(record), indent=2))


def read_training_record(hf_dir: str | Path) -> TrainingRecord:
    """The record a demo model folder was saved with: parameters, training time, final loss, settings."""
    return TrainingRecord(**json.loads((Path(hf_dir) / RECORD_FILE).read_text()))


def build_demo_model(cache_dir: Path | None = None, *, force: bool = False, progress: bool = True,
                     config: TrainConfig | None = None) -> Path:
    """Train the demo model once and return its Hugging Face folder; later calls reuse the cache.

    The folder (config.json, model.safetensors, tokenizer files, chat_template.jinja,
    generation_config.json, and ``slmops_demo.json`` with the training record) sits under cache_dir in
    a sub-folder named by a hash of the dataset, the settings and the library versions. It is written
    to a temporary folder and renamed into place, under a file lock, so a crash or a concurrent call
    never leaves a half-written model behind.

    Args:
        cache_dir: where trained models are kept; default ``.slmops/demo-model`` in the working folder.
        force: train again even if a cached model exists (the new folder replaces it).
        progress: show a rich progress bar while training.
        config: model shape and optimisation settings; ``TrainConfig()`` by default.

    Example:
        >>> hf_dir = build_demo_model()            # doctest: +SKIP
        >>> (hf_dir / "model.safetensors").is_file()  # doctest: +SKIP
        True
    """
    from filelock import FileLock

    cfg = config or TrainConfig()
    examples = training_examples()
    key = cache_key(examples, cfg)
    root = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR
    final = root / f"{DEMO_MODEL_NAME}-{key[:12]}"
    if final.is_dir() and not force:
        return final
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{final.name}.lock")):
        if final.is_dir() and not force:  # another process finished it while we waited
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=root))
        try:
            _train_into(tmp, examples, cfg, key, progress)
            if final.is_dir():
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final
