"""Small Hugging Face causal LMs built locally: no hub, real architectures, real tokenizers.

Tests, the demo and the benchmarks build their models here, so the loading code they exercise
stays the real code a user's fine-tuned folder goes through.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

# Qwen2's exact pre-tokenizer. A plain ByteLevel pre-tokenizer reloads through AutoTokenizer as
# Qwen2Tokenizer with this one swapped in, so digits would tokenize differently after a reload.
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"
# Tokens of the tokenizer only (never trained on): tests give a folder a reasoning template to detect them.
REASONING_MARKERS = ("<think>", "</think>")

# Qwen2.5's tool format, shortened: tools listed in the system turn, calls as JSON between <tool_call> markers
# (an array of {name, parameters}, the form Foundry Local's grammar guides a call into), tool results in a user
# turn between <tool_response> markers. No system message is rendered: with tools, Foundry Local 2.2.1 sends its
# own tool protocol (373 tokens) as a system message instead of handing the tools to the template, and a model of
# a few million parameters cannot learn to read that (a small-model accommodation; a real model's template keeps
# its system turn).
QWEN_TOOLS_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{{- '# Tools\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\nCall a function with <tool_call></tool_call>.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}"
    "{%- elif message['role'] == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + message['content'] + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- elif message['role'] == 'assistant' and message.tool_calls %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- for tc in message.tool_calls %}"
    "{%- if tc.function is defined %}{%- set tc = tc.function %}{%- endif %}"
    "{{- '<tool_call>[{\"name\":\"' + tc.name + '\",\"parameters\":' }}"
    "{%- if tc.arguments is string %}{{- tc.arguments }}{%- else %}{{- tc.arguments | tojson }}{%- endif %}"
    "{{- '}]</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# A BPE trained on DEFAULT_CORPUS runs out of merges well before this; asking for more only costs time.
TOKENIZER_VOCAB_CAP = 2048

DEFAULT_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Small language models run well on a laptop CPU when they are quantized to 4 bits.",
    "MLflow tracks runs, metrics, parameters and models; the registry keeps versions and aliases.",
    "Foundry Local serves ONNX models through an OpenAI-compatible chat completions API.",
    "Numbers such as 128, 2048 and 3.14 are split into single digits by the Qwen2 pre-tokenizer.",
    "Emoji 🚀 and non-Latin text such as 日本語 and Ελληνικά must survive a round trip.",
    '{"product": "Nimbus", "price": 42, "color": "blue"}',
]


@dataclass(frozen=True)
class ArchSpec:
    """How to build one architecture: its transformers config class and its chat format."""

    model_type: str
    chat_template: str
    bos: str
    eos: str
    specials: tuple[str, ...]
    extra_config: dict = field(default_factory=dict)


ARCHS: dict[str, ArchSpec] = {
    "qwen2": ArchSpec(
        model_type="qwen2",
        chat_template=CHATML_TEMPLATE,
        bos="<|endoftext|>",
        eos="<|im_end|>",
        specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        extra_config={"tie_word_embeddings": True},
    ),
    "llama": ArchSpec(
        model_type="llama",
        chat_template=LLAMA3_TEMPLATE,
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",
        specials=("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        extra_config={"tie_word_embeddings": False},
    ),
}
# ChatML with tools, the demo model's template; the tool-call markers are single special tokens.
TOOLS_ARCH = "qwen2-tools"
ARCHS[TOOLS_ARCH] = ArchSpec(
    model_type="qwen2", chat_template=QWEN_TOOLS_TEMPLATE, bos=ARCHS["qwen2"].bos, eos=ARCHS["qwen2"].eos,
    specials=ARCHS["qwen2"].specials + (TOOL_CALL_START, TOOL_CALL_END) + REASONING_MARKERS,
    extra_config=ARCHS["qwen2"].extra_config)


def train_tokenizer(corpus: Iterable[str], vocab_size: int, arch: str = "qwen2"):
    """Train a byte-level BPE tokenizer with Qwen2's pre-tokenizer and NFC normaliser."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )

    spec = ARCHS[arch]
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(spec.specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer=trainer)
    return tok


def save_tokenizer(tok, out: Path, arch: str = "qwen2", model_max_length: int = 2048) -> None:
    """Write tokenizer.json, tokenizer_config.json and chat_template.jinja the way transformers does."""
    from transformers import PreTrainedTokenizerFast

    spec = ARCHS[arch]
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=spec.bos,
        eos_token=spec.eos,
        pad_token=spec.eos,
        model_max_length=model_max_length,
    )
    fast.chat_template = spec.chat_template
    fast.save_pretrained(str(out))
    # The class genai's tokenizer and AutoTokenizer both recognise for a byte-level BPE.
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    qwen = spec.model_type == "qwen2"
    cfg["tokenizer_class"] = "Qwen2Tokenizer" if qwen else "PreTrainedTokenizerFast"
    cfg["chat_template"] = spec.chat_template
    cfg["add_bos_token"] = not qwen
    cfg_path.write_text(json.dumps(cfg, indent=2))


def build_config(arch: str, vocab_size: int, hidden: int, layers: int, heads: int, kv_heads: int,
                 intermediate: int, max_positions: int, bos_id: int, eos_id: int):
    from transformers import AutoConfig

    spec = ARCHS[arch]
    return AutoConfig.for_model(
        spec.model_type,
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        torch_dtype="float32",
        **spec.extra_config,
    )


def build_tiny_model(
    out: str | Path,
    arch: str = "qwen2",
    *,
    vocab_size: int = 512,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    max_positions: int = 2048,
    corpus: Iterable[str] | None = None,
    seed: int = 0,
    tokenizer=None,
    model=None,
) -> Path:
    """Build a small random-weight HF causal LM folder with tokenizer and chat template.

    Args:
        out: folder to write (created).
        arch: a key of ``ARCHS`` ("qwen2" or "llama").
        tokenizer: a trained ``tokenizers.Tokenizer`` to reuse; trained from ``corpus`` if None.
        model: an already-built (for example trained) transformers model to save instead.

    Example:
        >>> build_tiny_model("/tmp/tiny-qwen")  # doctest: +SKIP
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    spec = ARCHS[arch]
    tok = tokenizer or train_tokenizer(corpus or DEFAULT_CORPUS * 4, vocab_size, arch)
    save_tokenizer(tok, out, arch, model_max_length=max_positions)
    bos_id, eos_id = tok.token_to_id(spec.bos), tok.token_to_id(spec.eos)
    if model is None:
        torch.manual_seed(seed)
        config = build_config(arch, vocab_size, hidden, layers, heads, kv_heads, intermediate,
                              max_positions, bos_id, eos_id)
        model = AutoModelForCausalLM.from_config(config)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a one-shard save needs no "Writing model shards" bar in the demo's output
    model.save_pretrained(str(out), safe_serialization=True)
    GenerationConfig(bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=eos_id).save_pretrained(str(out))
    return out


def build_tiny_architecture(out: str | Path, case: str, *, vocab_size: int = 1024, seed: int = 0,
                            tokenizer=None) -> Path:
    """Build a small random-weight HF folder of one ``architectures.TINY_SHAPES`` case (ChatML tokenizer).

    The model's vocabulary is ``vocab_size`` whatever the trained tokenizer reaches (a BPE trained on the small
    corpus stops short of 150k tokens), so a realistic embedding and lm_head size can be compared by token ids.

    Args:
        out: folder to write (created).
        case: a key of ``architectures.TINY_SHAPES``, e.g. "gemma3" or "phi4-mini".
        vocab_size: rows of the embedding and lm_head.
        tokenizer: a trained ``tokenizers.Tokenizer`` to reuse; trained on ``DEFAULT_CORPUS`` if None.

    Example:
        >>> build_tiny_architecture("/tmp/tiny-gemma3", "gemma3")  # doctest: +SKIP
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from mlflow_slmops.convert.architectures import TINY_BASE, TINY_SHAPES

    shape = TINY_SHAPES[case]
    spec = ARCHS["qwen2"]
    tok = tokenizer or train_tokenizer(DEFAULT_CORPUS * 4, min(vocab_size, TOKENIZER_VOCAB_CAP), "qwen2")
    bos_id, eos_id = tok.token_to_id(spec.bos), tok.token_to_id(spec.eos)
    config = AutoConfig.for_model(shape.model_type, **{
        **TINY_BASE, "vocab_size": vocab_size, "bos_token_id": bos_id, "eos_token_id": eos_id,
        "pad_token_id": eos_id, **shape.config})
    config.architectures = [shape.architecture]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    out = build_tiny_model(out, "qwen2", tokenizer=tok, model=model)
    saved = json.loads((out / "config.json").read_text())
    if saved["architectures"] != [shape.architecture]:
        # save_pretrained writes transformers' class name (PhimoeForCausalLM); the checkpoints on the Hub, and
        # so the builder, name it otherwise (PhiMoEForCausalLM).
        saved["architectures"] = [shape.architecture]
        (out / "config.json").write_text(json.dumps(saved, indent=2))
    return out
