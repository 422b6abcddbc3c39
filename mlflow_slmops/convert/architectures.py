"""The one home for per-architecture knowledge: what the onnxruntime-genai 0.14.1 builder gets wrong, and what
the conversion does about it.

Every decoder architecture the builder lists was built as a small random-weight model, exported to fp32 and
compared with the Hugging Face PyTorch model on the same tokens (``tests/test_architectures.py``,
``benchmarks/bench_architectures.py``, ``docs/architectures.md``). What that found sits in three tables:

- ``BUILDER_FIXES``: builder gaps the conversion closes. Each one wraps one method of one builder class, only
  while our Olive workflow runs (``builder_fixes()``), and each fixed architecture then matches PyTorch. Most are
  transformers 5 moving a setting the builder reads (``partial_rotary_factor``, ``rope_local_base_freq``) into
  ``rope_parameters``; the others are builder bugs, two of them already fixed on onnxruntime-genai's main branch.
- ``BUILDER_GAPS``: what is left. ``REFUSE``: the architecture cannot convert here, so ``check_convertible``
  stops the conversion before any work. ``FLAG``: it converts, but its logits differ from PyTorch; it is not
  refused, the sweep's export guard measures and flags it, and ``check_convertible`` returns a warning.
- ``TINY_SHAPES`` and ``UNTESTED``: the small model of each architecture the matrix builds (with the ratios
  kept realistic where the builder or its kernels depend on them), and why the others are not built.

Stock ``olive run --config olive_config.json`` runs none of the fixes: for a fixed architecture it rebuilds the
builder's own, unfixed export. The fixes' names are written into the ModelBuilder pass's ``extra_options``
(``slmops_builder_fixes``, which the builder ignores), so that file says which were applied and Olive's cache
never hands back an export built without them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator

from mlflow_slmops import errors

REFUSE = "refuse"
FLAG = "flag"
# The ModelBuilder extra option that names the fixes a variant was built with (the builder ignores it).
FIXES_OPTION = "slmops_builder_fixes"
# The builder the fixes wrap methods of, checked against PyTorch (docs/architectures.md); on another, none apply.
VERIFIED_BUILDER_VERSION = "0.14.1"
# A fp32 export matches PyTorch when, over the compared tokens, no logit differs by more than this and the
# top-1 token agrees at least this often. Measured exports that match differ by 1e-6 or less.
MATCH_MAX_ABS_DIFF = 1e-4
MATCH_MIN_TOP1 = 0.99
# OlmoLayerNorm hard-codes its epsilon; OlmoConfig has no field for it.
OLMO_LAYER_NORM_EPS = 1e-5
# The epsilon fields of the configs whose norms the builder reads only as rms_norm_eps.
_EPS_NAMES = ("layer_norm_eps", "norm_eps")
SLIDING = "sliding_attention"
FULL = "full_attention"
DOCS = "docs/architectures.md"
REFUSED_HINT = "convert a text-only causal LM of another architecture (see docs/architectures.md)"


@dataclass(frozen=True)
class Divergence:
    """How far a fp32 export's logits are from PyTorch's over the same tokens."""

    max_abs_diff: float
    mean_kl: float  # nats, KL(PyTorch || export) averaged over positions
    top1: float  # share of positions whose most likely token agrees

    @classmethod
    def between(cls, reference, exported) -> "Divergence":
        """Compare two (positions, vocab) logit arrays: PyTorch's first, the export's second."""
        import numpy as np

        ref, got = np.asarray(reference, np.float64), np.asarray(exported, np.float64)
        log_p, log_q = _log_softmax(ref), _log_softmax(got)
        kl = (np.exp(log_p) * (log_p - log_q)).sum(axis=-1)
        return cls(float(np.abs(ref - got).max()), float(kl.mean()),
                   float((ref.argmax(axis=-1) == got.argmax(axis=-1)).mean()))

    def matches(self) -> bool:
        return self.max_abs_diff <= MATCH_MAX_ABS_DIFF and self.top1 >= MATCH_MIN_TOP1

    def summary(self) -> str:
        return f"max |logit diff| {self.max_abs_diff:.3g}, top-1 agreement {self.top1:.3f}"


def _log_softmax(x):
    import numpy as np

    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _always(_config: dict) -> bool:
    return True


@dataclass(frozen=True)
class BuilderGap:
    """Something the builder gets wrong that the conversion does not fix."""

    architecture: str
    action: str  # REFUSE or FLAG
    reason: str  # one line, naming the upstream gap
    applies: Callable[[dict], bool] = _always  # to this config.json; the architecture alone when left out
    condition: str = ""  # when ``applies`` is narrower than the architecture, in words for the docs
    # FLAG only: measured by benchmarks/bench_architectures.py on its TINY_SHAPES case (docs/architectures.md).
    case: str | None = None
    measured: Divergence | None = None


def _rope_parameters(config: dict) -> dict:
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    return rope if isinstance(rope, dict) else {}


def _scaled_rope(config: dict) -> bool:
    rope = _rope_parameters(config)
    per_layer_type = [p for p in rope.values() if isinstance(p, dict)] or [rope]
    return any(p.get("rope_type", p.get("type", "default")) != "default" for p in per_layer_type)


_TEXT_DECODER_ONLY = ("the builder exports only the text decoder, fed by image embeddings (exclude_embeds), "
                      "which needs the vision and embedding models this tool does not build")

BUILDER_GAPS: tuple[BuilderGap, ...] = (
    BuilderGap("PhiMoEForCausalLM", REFUSE,
               "the onnxruntime-genai 0.14 builder makes PhiMoE only as an int4 model for CUDA (its MoE operator), "
               "whatever variant is asked for"),
    *(BuilderGap(arch, REFUSE, _TEXT_DECODER_ONLY) for arch in (
        "Gemma3ForConditionalGeneration", "Mistral3ForConditionalGeneration", "Phi3VForCausalLM",
        "Phi4MMForCausalLM", "Qwen2_5_VLForConditionalGeneration", "Qwen3VLForConditionalGeneration",
        "Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration", "VideoChatFlashQwenForCausalLM")),
    BuilderGap("OlmoForCausalLM", FLAG,
               "the builder ignores clip_qkv: queries, keys and values are not clamped, so logits differ wherever "
               "the projections pass the bound",
               applies=lambda config: config.get("clip_qkv") is not None, condition="clip_qkv set",
               case="olmo-clip-qkv",
               measured=Divergence(max_abs_diff=0.501, mean_kl=9.1e-04, top1=0.470)),
    BuilderGap("Gemma3ForCausalLM", FLAG,
               "the builder's Gemma 3 rotary caches take one base frequency per layer type; rope scaling "
               "(rope_parameters with a rope_type other than default) is not applied",
               applies=_scaled_rope, condition="rope scaling (the text model of Gemma 3 4B and larger)",
               case="gemma3-linear-rope",
               measured=Divergence(max_abs_diff=0.117, mean_kl=9.5e-05, top1=0.790)),
)


def _gaps(config: dict) -> list[BuilderGap]:
    archs = config.get("architectures")
    arch = archs[0] if isinstance(archs, list) and archs else None
    return [g for g in BUILDER_GAPS if g.architecture == arch and g.applies(config)]


def check_convertible(config: dict) -> str | None:
    """Refuse, before any work, a config.json whose architecture cannot convert here; warn of a known divergence.

    Args:
        config: the model folder's config.json, as a dict.

    Returns:
        None, or one line to show the user: the export will convert but its logits will differ from PyTorch
        (the sweep's export guard measures by how much).

    Raises:
        SlmopsError: naming the architecture and the builder gap that stops it.

    Example:
        >>> check_convertible({"architectures": ["Qwen2ForCausalLM"]}) is None
        True
    """
    gaps = _gaps(config)
    for gap in gaps:
        if gap.action == REFUSE:
            raise errors.SlmopsError(f"{gap.architecture} cannot be converted here: {gap.reason}", REFUSED_HINT)
    flagged = [g for g in gaps if g.action == FLAG]
    if not flagged:
        return None
    return (f"{flagged[0].architecture} converts, but its logits will differ from the Hugging Face model: "
            + "; ".join(g.reason for g in flagged) + f" (see {DOCS})")


# ---------------------------------------------------------------- fixes


@dataclass(frozen=True)
class BuilderFix:
    """A builder gap the conversion closes, by wrapping one method of one builder class during the build."""

    name: str
    architectures: tuple[str, ...]
    builder_class: str  # as onnxruntime_genai.models.builder names it
    method: str
    wrap: Callable[[Callable], Callable]  # the original method -> its replacement
    gap: str  # what the builder does wrong, one line
    upstream: str  # where onnxruntime-genai stands on it
    applies: Callable[[dict], bool] = _always  # to this config.json, beyond its architecture


def _add_legacy_config_names(config) -> None:
    """Give a transformers 5 config the attribute names the 0.14 builder reads (transformers 4's)."""
    rope = getattr(config, "rope_parameters", None) or {}
    if FULL in rope or SLIDING in rope:  # one rope setting per layer type (Gemma 3)
        if not hasattr(config, "rope_theta") and "rope_theta" in (rope.get(FULL) or {}):
            config.rope_theta = rope[FULL]["rope_theta"]
        if not hasattr(config, "rope_local_base_freq") and "rope_theta" in (rope.get(SLIDING) or {}):
            config.rope_local_base_freq = rope[SLIDING]["rope_theta"]
    else:
        if not hasattr(config, "partial_rotary_factor") and "partial_rotary_factor" in rope:
            config.partial_rotary_factor = rope["partial_rotary_factor"]
        if "rope_type" in rope and "type" not in rope:  # the builder's Phi-3 LongRoPE reads rope_scaling["type"]
            rope["type"] = rope["rope_type"]
    if not hasattr(config, "rms_norm_eps"):
        eps = next((getattr(config, n) for n in _EPS_NAMES if getattr(config, n, None) is not None), None)
        if eps is not None:
            config.rms_norm_eps = eps


def _legacy_config_names(init: Callable) -> Callable:
    def __init__(self, config, *args, **kwargs):
        _add_legacy_config_names(config)
        init(self, config, *args, **kwargs)
    return __init__


def _local_layers_from_layer_types(init: Callable) -> Callable:
    def __init__(self, config, *args, **kwargs):
        types = list(getattr(config, "layer_types", None) or [])
        if types:  # an instance attribute: it takes the place of Gemma2Model.is_local and Gemma3Model.is_local
            self.is_local = lambda layer_id: types[layer_id] == SLIDING
        init(self, config, *args, **kwargs)
    return __init__


def _olmo_layer_norm(init: Callable) -> Callable:
    def __init__(self, config, *args, **kwargs):
        init(self, config, *args, **kwargs)
        self.layernorm_attrs["simple"] = False  # OLMo v1 subtracts the mean: LayerNorm, not RMSNorm
        self.layernorm_attrs["epsilon"] = OLMO_LAYER_NORM_EPS
    return __init__


def _smollm3_nope_layers(make_attention: Callable) -> Callable:
    def wrapped(self, layer_id, attention, root_input, **kwargs):
        saved = self.attention_attrs["rope"]
        self.attention_attrs["rope"] = bool(self.no_rope_layers[layer_id])
        try:
            return make_attention(self, layer_id, attention, root_input, **kwargs)
        finally:
            self.attention_attrs["rope"] = saved
    return wrapped


def _gptoss_inverse_frequencies(_original: Callable) -> Callable:
    def make_rotary_embedding_caches_from_scratch(self):
        import torch

        exponents = torch.arange(0, self.head_size, 2, dtype=torch.float) / self.head_size
        inv_freq = self.make_inv_freq_rescaled(1.0 / self.rope_attrs["theta"] ** exponents)
        t = torch.arange(self.rope_attrs["cache_length"], dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)
        return freqs.cos() * self.rope_attrs["mscale"], freqs.sin() * self.rope_attrs["mscale"]
    return make_rotary_embedding_caches_from_scratch


BUILDER_FIXES: tuple[BuilderFix, ...] = (
    BuilderFix("phi-partial-rotary", ("PhiForCausalLM",), "PhiModel", "__init__", _legacy_config_names,
               "transformers 5 keeps partial_rotary_factor in rope_parameters, so the builder rotates every "
               "dimension of each head (phi-2 rotates 32 of 80); it also reads layer_norm_eps only as rms_norm_eps",
               "not fixed in 0.14 (transformers PR #42255 moved it)"),
    BuilderFix("phi3-longrope-type", ("Phi3ForCausalLM",), "Phi3MiniLongRoPEModel", "__init__",
               _legacy_config_names,
               "a LongRoPE config saved by transformers 5 names its scaling rope_parameters.rope_type, and the "
               "builder stops at KeyError: 'type' (it reads rope_scaling['type'])",
               "onnxruntime-genai PR #2311 (after 0.14) reads rope_parameters",
               applies=lambda config: "short_factor" in _rope_parameters(config)),
    BuilderFix("nemotron-partial-rotary", ("NemotronForCausalLM",), "NemotronModel", "__init__",
               _legacy_config_names,
               "as for Phi: partial_rotary_factor is in rope_parameters, and norm_eps is read only as rms_norm_eps",
               "not fixed in 0.14 (transformers PR #42255 moved it)"),
    BuilderFix("gemma3-rope-per-layer-type", ("Gemma3ForCausalLM",), "Gemma3Model", "__init__",
               _legacy_config_names,
               "transformers 5 keeps Gemma 3's two rope bases in rope_parameters per layer type, and the builder "
               "stops at 'Gemma3TextConfig' object has no attribute 'rope_local_base_freq'",
               "not fixed in 0.14"),
    BuilderFix("gemma2-local-layers", ("Gemma2ForCausalLM", "Gemma3ForCausalLM"), "Gemma2Model", "__init__",
               _local_layers_from_layer_types,
               "the builder makes the odd Gemma 2 layers sliding-window, transformers the even ones (layer_types): "
               "prompts longer than the window (4096) attend wrong",
               "not fixed in 0.14"),
    BuilderFix("olmo-layernorm", ("OlmoForCausalLM",), "OLMoModel", "__init__", _olmo_layer_norm,
               "the builder normalises OLMo v1 with RMSNorm and eps 1e-6; OLMo's LayerNorm subtracts the mean "
               "(eps 1e-5)",
               "fixed on onnxruntime-genai main (builders/olmo.py), not in 0.14"),
    BuilderFix("smollm3-nope", ("SmolLM3ForCausalLM",), "SmolLM3Model", "make_attention", _smollm3_nope_layers,
               "a SmolLM3 layer without rotary embedding (every fourth) stops the build with KeyError: "
               "'position_ids'",
               "fixed on onnxruntime-genai main (builders/smollm.py), not in 0.14"),
    BuilderFix("gptoss-rope-frequencies", ("GptOssForCausalLM",), "GPTOSSModel",
               "make_rotary_embedding_caches_from_scratch", _gptoss_inverse_frequencies,
               "the builder's GPT-OSS cos/sin caches rotate by theta^(2i/d) where YaRN rotates by its inverse",
               "not fixed in 0.14"),
)


def builder_verified() -> bool:
    """Whether the installed onnxruntime-genai is the builder the fixes were written and checked against."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("onnxruntime-genai") == VERIFIED_BUILDER_VERSION
    except PackageNotFoundError:
        return False


def fixes_for(config: dict) -> list[str]:
    """The names of the fixes the conversion applies to this config.json's architecture, in table order (none on
    a builder other than ``VERIFIED_BUILDER_VERSION``: there the builder runs as it is)."""
    if not builder_verified():
        return []
    archs = config.get("architectures")
    arch = archs[0] if isinstance(archs, list) and archs else None
    return [f.name for f in BUILDER_FIXES if arch in f.architectures and f.applies(config)]


@contextlib.contextmanager
def builder_fixes() -> Iterator[None]:
    """Apply every ``BUILDER_FIXES`` entry to the installed builder for the block; each is undone on exit.

    Olive's ModelBuilder pass runs the builder in this process, so the fixes hold for the workflows run inside.
    A fix whose class or method the installed builder lacks is skipped, and on a builder other than
    ``VERIFIED_BUILDER_VERSION`` none is applied.
    """
    from onnxruntime_genai.models import builder

    with contextlib.ExitStack() as stack:
        if not builder_verified():
            yield
            return
        for fix in BUILDER_FIXES:
            cls = getattr(builder, fix.builder_class, None)
            original = cls.__dict__.get(fix.method) if cls is not None else None
            if original is None:
                continue
            setattr(cls, fix.method, fix.wrap(original))
            stack.callback(setattr, cls, fix.method, original)
        yield


# ---------------------------------------------------------------- the matrix's small models


@dataclass(frozen=True)
class TinyShape:
    """A small random-weight model of one architecture: transformers config kwargs over ``TINY_BASE``."""

    architecture: str
    model_type: str
    config: dict = field(default_factory=dict)
    why: str = ""  # what of the real models the shape keeps, where the builder or its kernels depend on it


TINY_BASE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "max_position_embeddings": 2048}
# Shorter than the compared sequence, so that sliding-window layers attend differently from global ones.
TINY_WINDOW = 32


def _longrope_factors(rotary_dim: int, step: float) -> list[float]:
    return [1.0 + step * i for i in range(rotary_dim // 2)]


TINY_SHAPES: dict[str, TinyShape] = {
    "qwen2": TinyShape("Qwen2ForCausalLM", "qwen2", {"tie_word_embeddings": True}),
    "qwen3": TinyShape("Qwen3ForCausalLM", "qwen3", {"head_dim": 16}),
    "llama": TinyShape("LlamaForCausalLM", "llama", {
        "max_position_embeddings": 4096, "rope_parameters": {
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 1024}},
        "Llama 3.1/3.2 rope scaling (llama3)"),
    "mistral": TinyShape("MistralForCausalLM", "mistral", {"sliding_window": TINY_WINDOW},
                         "sliding window shorter than the compared tokens"),
    "phi3": TinyShape("Phi3ForCausalLM", "phi3", {"original_max_position_embeddings": 2048}, "Phi-3-mini-4k"),
    "phi4-mini": TinyShape("Phi3ForCausalLM", "phi3", {
        "hidden_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1, "tie_word_embeddings": True,
        "max_position_embeddings": 4096, "original_max_position_embeddings": 1024, "partial_rotary_factor": 0.75,
        "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                            "short_factor": _longrope_factors(48, 0.1), "long_factor": _longrope_factors(48, 0.5)}},
        "longrope and partial rotary 0.75 on 64-wide heads: the GQA kernel wants the cos cache width (24) "
        "a multiple of 8, as Phi-4-mini's 128 x 0.75 gives"),
    "gemma": TinyShape("GemmaForCausalLM", "gemma", {"head_dim": 16}),
    "gemma2": TinyShape("Gemma2ForCausalLM", "gemma2", {
        "head_dim": 16, "query_pre_attn_scalar": 16, "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0, "sliding_window": TINY_WINDOW},
        "soft-capping as Gemma 2; sliding window shorter than the compared tokens"),
    "gemma3": TinyShape("Gemma3ForCausalLM", "gemma3_text", {
        "num_hidden_layers": 6, "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": TINY_WINDOW},
        "six layers, five local and one global as in Gemma 3, with their two rope bases"),
    "gemma3-linear-rope": TinyShape("Gemma3ForCausalLM", "gemma3_text", {
        "num_hidden_layers": 6, "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": TINY_WINDOW,
        "rope_parameters": {FULL: {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
                            SLIDING: {"rope_type": "default", "rope_theta": 10000.0}}},
        "linear rope scaling (factor 8) on the global layers, as the text model of Gemma 3 4B and larger"),
    "granite": TinyShape("GraniteForCausalLM", "granite", {
        "embedding_multiplier": 12.0, "residual_multiplier": 0.22, "attention_multiplier": 0.0625,
        "logits_scaling": 8.0}, "Granite's four multipliers"),
    "smollm3": TinyShape("SmolLM3ForCausalLM", "smollm3", {"num_hidden_layers": 4},
                         "four layers: the fourth has no rotary embedding, as every fourth of SmolLM3-3B"),
    "olmo": TinyShape("OlmoForCausalLM", "olmo", {}, "OLMo-1B: no clip_qkv"),
    "olmo-clip-qkv": TinyShape("OlmoForCausalLM", "olmo", {"clip_qkv": 0.05},
                               "clip_qkv (8.0 in OLMo-7B-0424) set below the tiny model's projections, so it clips"),
    "phi": TinyShape("PhiForCausalLM", "phi", {
        "hidden_size": 160, "intermediate_size": 320, "num_attention_heads": 2, "num_key_value_heads": 2,
        "partial_rotary_factor": 0.4},
        "phi-2's 80-wide heads with partial rotary 0.4 (32 dimensions)"),
    "nemotron": TinyShape("NemotronForCausalLM", "nemotron", {
        "hidden_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1, "partial_rotary_factor": 0.5},
        "partial rotary 0.5 on 64-wide heads (cos cache width 16, a multiple of 8, as Nemotron-Mini's 32)"),
    "ernie4_5": TinyShape("Ernie4_5ForCausalLM", "ernie4_5"),
    "hunyuan": TinyShape("HunYuanDenseV1ForCausalLM", "hunyuan_v1_dense", {"head_dim": 16}),
    "lfm2": TinyShape("Lfm2ForCausalLM", "lfm2"),
    "gpt-oss": TinyShape("GptOssForCausalLM", "gpt_oss", {
        "head_dim": 64, "max_position_embeddings": 131072, "num_local_experts": 4, "num_experts_per_tok": 2},
        "YaRN (factor 32 over 4096 positions) on 64-wide heads, and attention sinks, as gpt-oss-20b"),
    "phimoe": TinyShape("PhiMoEForCausalLM", "phimoe", {"num_local_experts": 4, "num_experts_per_tok": 2}),
}

# Builder architectures no small model is built for, and why.
_REMOTE_CODE = "transformers 5 has no such class: building one needs the model's own code (trust_remote_code)"
_MULTIMODAL = "a vision-language model: refused up front (the builder exports its text decoder only)"
UNTESTED: dict[str, str] = {
    "ChatGLMForConditionalGeneration": _REMOTE_CODE,
    "ChatGLMModel": _REMOTE_CODE,
    "InternLM2ForCausalLM": _REMOTE_CODE,
    "Phi3SmallForCausalLM": _REMOTE_CODE,
    **{gap.architecture: _MULTIMODAL for gap in BUILDER_GAPS
       if gap.reason == _TEXT_DECODER_ONLY},
}
