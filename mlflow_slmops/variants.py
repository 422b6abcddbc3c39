"""Variant specs: what one quantization variant is, as data a user can write in YAML or JSON.

A variant names a precision (fp32, fp16, int8, int4), the weight-only quantization algorithm and its
block layout, and the execution provider it is built for. ``convert.py`` turns a spec into one Olive
workflow; nothing here imports Olive, so specs load and validate in milliseconds.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mlflow_slmops import errors

PRECISIONS = ("fp32", "fp16", "int8", "int4")
QUANTIZED_PRECISIONS = ("int8", "int4")
ALGOS = ("rtn", "k_quant", "hqq", "gptq")
# Which algorithms can produce which bit width (hqq is 4-bit only in Olive 0.13; gptq is offered for int4).
ALGOS_FOR_PRECISION = {"int8": ("rtn", "k_quant"), "int4": ("rtn", "k_quant", "hqq", "gptq")}
# Algorithms whose weights always carry zero points (asymmetric).
ASYMMETRIC_ONLY_ALGOS = ("k_quant", "hqq")
# Algorithms that run over the PyTorch model on calibration text (Olive's Gptq pass) before the export.
CALIBRATED_ALGOS = ("gptq",)
# embeds_bits: the bit width the embeddings and lm_head keep when the body is int4 (Olive's Rtn pass, 8 bits).
EMBEDS_BITS = (8,)
# mixed_precision: Olive's SelectiveMixedPrecision rule that picks the layers kept at 8 bits. kld_gradient and the
# other measured scores are left out: Olive 0.13 scores them on wikitext from the Hugging Face hub, whatever the
# calibration data (docs/variants.md).
MIXED_PRECISION_RULES = ("k_quant_mixed", "k_quant_last", "k_quant_down")
# MatMulNBits block sizes: a power of two, at least 16 (the builder accepts 16..256).
BLOCK_SIZES = (16, 32, 64, 128, 256)
# MatMulNBits accuracy_level: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 activations.
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
DEFAULT_BLOCK_SIZE = 32
DEFAULT_ACCURACY_LEVEL = 4
# The variants a sweep builds unless told otherwise: the reference, int8, plain int4 and the best int4 recipe per
# byte measured on the demo model (docs/variants.md#the-default-variant-list). MLproject's `variants` defaults
# repeat it (a test holds them equal).
DEFAULT_VARIANTS = "fp32,int8,int4,int4-e8"
EXECUTION_PROVIDERS = ("cpu", "cuda", "dml", "webgpu")
DEVICES = ("cpu", "gpu")
# The device each execution provider runs on.
EP_DEVICE = {"cpu": "cpu", "cuda": "gpu", "dml": "gpu", "webgpu": "gpu"}
# onnxruntime's provider name for each of our short names.
ORT_PROVIDER = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "dml": "DmlExecutionProvider",
    "webgpu": "WebGpuExecutionProvider",
}
# ModelBuilder pass options (Olive 0.13) a variant may set; precision comes from the spec itself.
BUILDER_OPTIONS = (
    "search", "int4_accuracy_level", "int4_block_size", "int4_is_symmetric", "int4_op_types_to_quantize",
    "int4_nodes_to_exclude", "int4_algo_config", "use_qdq", "use_8bits_moe", "use_webgpu_fp32", "use_cuda_bf16",
    "include_hidden_states", "exclude_embeds", "exclude_lm_head", "enable_cuda_graph", "extra_options",
)
SPEC_FIELDS = ("name", "precision", "block_size", "is_symmetric", "algo", "accuracy_level",
               "execution_provider", "device", "builder_options", "embeds_bits", "mixed_precision")
# Fields added after the first release: left out of a spec's key while unset, so older cache entries still match.
OPTIONAL_KEY_FIELDS = ("embeds_bits", "mixed_precision")
# A variant name becomes a folder name and an MLflow run name.
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
_VARIANTS_FILE_HINT = (
    "write a YAML or JSON file with a top-level `variants:` list of objects, each with at least `name` and "
    "`precision` (see docs/variants.md)"
)


def _choices(values) -> str:
    return ", ".join(str(v) for v in values)


def _bad(field_name: str, value: Any, valid, variant: str, extra: str = "") -> errors.SlmopsError:
    return errors.SlmopsError(
        f"variant {variant!r}: invalid {field_name} {value!r}{extra}; valid choices: {_choices(valid)}",
        f"fix {field_name} in the variant definition (docs/variants.md lists every field)",
    )


@functools.lru_cache(maxsize=None)
def _ort_providers() -> tuple[str, ...]:
    try:
        import onnxruntime
    except ImportError:  # pragma: no cover - onnxruntime is a dependency
        return ("CPUExecutionProvider",)
    return tuple(onnxruntime.get_available_providers())


@dataclass(frozen=True)
class VariantSpec:
    """One quantization variant: a precision, its quantization layout and its target.

    Fields left as None get the default for the precision and algorithm (int variants: RTN, block 32,
    accuracy level 4, symmetric for RTN). Invalid values raise SlmopsError listing the valid choices.

    Args:
        name: folder and run name of the variant, e.g. ``int4-b128-asym``.
        precision: fp32, fp16, int8 or int4.
        block_size: weights per quantization block (int8/int4 only): 16, 32, 64, 128 or 256.
        is_symmetric: symmetric (no zero points) or asymmetric weights (int8/int4 only).
        algo: rtn, k_quant or hqq (int8/int4 only; hqq is int4 only).
        accuracy_level: MatMulNBits compute accuracy, 0 (unset) to 4 (int8 activations).
        execution_provider: cpu, cuda, dml or webgpu: what the builder targets.
        device: cpu or gpu; derived from the execution provider when left out.
        builder_options: extra options of Olive's ModelBuilder pass, e.g. ``{"exclude_embeds": true}``.
        embeds_bits: int4 only, rtn or gptq: keep the embeddings and lm_head at this many bits (8), tied
            embeddings staying tied.
        mixed_precision: int4 only, rtn or gptq: an Olive SelectiveMixedPrecision rule (``k_quant_mixed``...)
            choosing the layers kept at 8 bits.

    Example:
        >>> VariantSpec(name="int4-b64", precision="int4", block_size=64).algo
        'rtn'
    """

    name: str
    precision: str
    block_size: int | None = None
    is_symmetric: bool | None = None
    algo: str | None = None
    accuracy_level: int | None = None
    execution_provider: str = "cpu"
    device: str | None = None
    builder_options: dict = field(default_factory=dict)
    embeds_bits: int | None = None
    mixed_precision: str | None = None

    def __post_init__(self) -> None:
        self._check_name()
        if self.precision not in PRECISIONS:
            raise _bad("precision", self.precision, PRECISIONS, self.name)
        self._check_target()
        if self.precision in QUANTIZED_PRECISIONS:
            self._normalize_quantized()
        else:
            self._check_float()
        self._check_builder_options()
        self._check_pytorch_options()

    def _set(self, key: str, value: Any) -> None:
        object.__setattr__(self, key, value)  # normalizing defaults in a frozen dataclass

    def _check_name(self) -> None:
        if not isinstance(self.name, str) or not self.name or not set(self.name) <= _NAME_CHARS \
                or self.name.startswith("."):
            raise errors.SlmopsError(
                f"invalid variant name {self.name!r}: expected letters, digits, '-', '_' or '.', not starting with '.'",
                "rename the variant, e.g. int4-b64",
            )

    def _check_target(self) -> None:
        if self.execution_provider not in EXECUTION_PROVIDERS:
            raise _bad("execution_provider", self.execution_provider, EXECUTION_PROVIDERS, self.name)
        expected = EP_DEVICE[self.execution_provider]
        if self.device is None:
            self._set("device", expected)
        elif self.device not in DEVICES:
            raise _bad("device", self.device, DEVICES, self.name)
        elif self.device != expected:
            raise _bad("device", self.device, (expected,), self.name,
                       f" for execution_provider {self.execution_provider!r}")
        if self.precision == "fp16" and self.execution_provider == "cpu":
            raise errors.SlmopsError(
                f"variant {self.name!r}: fp16 is built for a GPU execution provider; it does not run on the CPU one",
                f"set execution_provider to one of: {_choices(EXECUTION_PROVIDERS[1:])}, or use fp32/int8/int4 for CPU",
            )

    def _normalize_quantized(self) -> None:
        algo = self.algo if self.algo is not None else "rtn"
        valid_algos = ALGOS_FOR_PRECISION[self.precision]
        if algo not in valid_algos:
            raise _bad("algo", algo, valid_algos, self.name, f" for precision {self.precision}")
        self._set("algo", algo)
        block = DEFAULT_BLOCK_SIZE if self.block_size is None else self.block_size
        if isinstance(block, bool) or block not in BLOCK_SIZES:
            raise _bad("block_size", block, BLOCK_SIZES, self.name)
        self._set("block_size", int(block))
        level = DEFAULT_ACCURACY_LEVEL if self.accuracy_level is None else self.accuracy_level
        if isinstance(level, bool) or level not in ACCURACY_LEVELS:
            raise _bad("accuracy_level", level, ACCURACY_LEVELS, self.name)
        self._set("accuracy_level", int(level))
        symmetric = (algo not in ASYMMETRIC_ONLY_ALGOS) if self.is_symmetric is None else self.is_symmetric
        if not isinstance(symmetric, bool):
            raise _bad("is_symmetric", symmetric, (True, False), self.name)
        if symmetric and algo in ASYMMETRIC_ONLY_ALGOS:
            raise _bad("is_symmetric", symmetric, (False,), self.name, f" for algo {algo} (it stores zero points)")
        self._set("is_symmetric", symmetric)

    def _check_float(self) -> None:
        for key in ("block_size", "is_symmetric", "algo", "accuracy_level"):
            if getattr(self, key) is not None:
                raise errors.SlmopsError(
                    f"variant {self.name!r}: {key} applies to int8/int4 variants, not {self.precision}",
                    f"remove {key}, or set precision to int8 or int4",
                )

    def _check_builder_options(self) -> None:
        if not isinstance(self.builder_options, dict):
            raise errors.SlmopsError(f"variant {self.name!r}: builder_options must be a mapping, got "
                                     f"{type(self.builder_options).__name__}", "write builder_options as key: value pairs")
        unknown = sorted(set(self.builder_options) - set(BUILDER_OPTIONS))
        if unknown:
            raise _bad("builder_options key", unknown[0], BUILDER_OPTIONS, self.name)

    def _check_pytorch_options(self) -> None:
        for key, valid in (("embeds_bits", EMBEDS_BITS), ("mixed_precision", MIXED_PRECISION_RULES)):
            value = getattr(self, key)
            if value is None:
                continue
            if self.precision != "int4" or self.algo not in ("rtn", *CALIBRATED_ALGOS):
                raise errors.SlmopsError(
                    f"variant {self.name!r}: {key} applies to int4 variants with algo rtn or gptq, "
                    f"not {self.precision} {self.algo or ''}".rstrip(),
                    f"remove {key}, or set precision: int4 and algo: gptq",
                )
            if isinstance(value, bool) or value not in valid:
                raise _bad(key, value, valid, self.name)

    @property
    def calibrated(self) -> bool:
        """True when the variant is built from calibration text (GPTQ): the sweep's --calibration."""
        return self.algo in CALIBRATED_ALGOS

    @property
    def pytorch_recipe(self) -> bool:
        """True when Olive quantizes the PyTorch model before the export (GPTQ, int8 embeddings, mixed bits)."""
        return self.calibrated or self.embeds_bits is not None or self.mixed_precision is not None

    @property
    def build_only(self) -> bool:
        """True when this machine cannot run the variant's execution provider (e.g. cuda without a GPU)."""
        return self.execution_provider != "cpu" and ORT_PROVIDER[self.execution_provider] not in _ort_providers()

    @property
    def ort_provider(self) -> str:
        return ORT_PROVIDER[self.execution_provider]

    def to_dict(self) -> dict:
        """All fields, defaults filled in: what ``from_dict`` reads back to an equal spec."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "VariantSpec":
        """Build a spec from a mapping (one entry of a variants file); unknown keys list the valid ones.

        Example:
            >>> VariantSpec.from_dict({"name": "int8", "precision": "int8"}).block_size
            32
        """
        if not isinstance(data, dict):
            raise errors.SlmopsError(f"a variant must be a mapping of fields, got {type(data).__name__}: {data!r}",
                                     _VARIANTS_FILE_HINT)
        name = data.get("name", "<unnamed>")
        unknown = sorted(set(data) - set(SPEC_FIELDS))
        if unknown:
            raise _bad("field", unknown[0], SPEC_FIELDS, str(name))
        for required in ("name", "precision"):
            if required not in data:
                raise errors.SlmopsError(f"variant {name!r} has no {required!r}", f"add {required}: to the variant")
        kwargs = dict(data)
        if kwargs.get("builder_options") is None:
            kwargs["builder_options"] = {}
        if kwargs.get("execution_provider") is None:
            kwargs["execution_provider"] = "cpu"
        return cls(**kwargs)


def spec_key(spec: VariantSpec) -> str:
    """A stable sha256 of every field except the name: two specs that build the same model share it.

    Example:
        >>> spec_key(PRESETS["int4"]) == spec_key(VariantSpec("my-int4", "int4"))
        True
    """
    return hashlib.sha256(json.dumps(key_body(spec), sort_keys=True).encode()).hexdigest()


def key_body(spec: VariantSpec) -> dict:
    """Every field but the name, with the later optional fields left out while unset (see OPTIONAL_KEY_FIELDS)."""
    return {k: v for k, v in spec.to_dict().items()
            if k != "name" and not (k in OPTIONAL_KEY_FIELDS and v is None)}


PRESETS: dict[str, VariantSpec] = {
    "fp32": VariantSpec("fp32", "fp32"),
    "int8": VariantSpec("int8", "int8", block_size=32, is_symmetric=True, algo="rtn", accuracy_level=4),
    "int4": VariantSpec("int4", "int4", block_size=32, is_symmetric=True, algo="rtn", accuracy_level=4),
    "int4-b128-asym": VariantSpec("int4-b128-asym", "int4", block_size=128, is_symmetric=False, algo="rtn",
                                  accuracy_level=4),
    "int4-kquant": VariantSpec("int4-kquant", "int4", block_size=32, is_symmetric=False, algo="k_quant",
                               accuracy_level=4),
    "int4-hqq": VariantSpec("int4-hqq", "int4", block_size=32, is_symmetric=False, algo="hqq", accuracy_level=4),
    "fp16-cuda": VariantSpec("fp16-cuda", "fp16", execution_provider="cuda"),
    # Calibrated on the user's text (--calibration): GPTQ over the PyTorch model, then the builder's export.
    "int4-gptq": VariantSpec("int4-gptq", "int4", block_size=32, is_symmetric=False, algo="gptq", accuracy_level=4),
    # The shape of Olive's published Qwen3-0.6B CPU recipe: GPTQ int4 body, embeddings and lm_head at int8.
    "int4-e8": VariantSpec("int4-e8", "int4", block_size=32, is_symmetric=False, algo="gptq", accuracy_level=4,
                           embeds_bits=8),
    # ...and the layers llama.cpp's k_quant_mixed rule picks (first and last eighth, every third) at int8 too.
    "int4-mixed": VariantSpec("int4-mixed", "int4", block_size=32, is_symmetric=False, algo="gptq",
                              accuracy_level=4, embeds_bits=8, mixed_precision="k_quant_mixed"),
}


def load_variants_file(path: str | Path) -> dict[str, VariantSpec]:
    """Read custom variants from YAML or JSON: ``{"variants": [{...}, ...]}`` or a bare list.

    Example:
        >>> load_variants_file("my-variants.yaml")["int4-b64"].block_size  # doctest: +SKIP
        64
    """
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise errors.SlmopsError(f"cannot read variants file {path}: {exc.strerror or exc}",
                                 "pass an existing YAML or JSON file")
    try:
        # YAML is a superset of JSON, so one parser reads both.
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise errors.SlmopsError(f"variants file {path} is not valid YAML or JSON: {' '.join(str(exc).split())}",
                                 _VARIANTS_FILE_HINT)
    entries = data.get("variants") if isinstance(data, dict) else data
    if not isinstance(entries, list) or not entries:
        raise errors.SlmopsError(f"variants file {path} has no list of variants", _VARIANTS_FILE_HINT)
    specs: dict[str, VariantSpec] = {}
    for entry in entries:
        spec = VariantSpec.from_dict(entry)
        if spec.name in specs:
            raise errors.SlmopsError(f"variants file {path} defines {spec.name!r} twice",
                                     "give each variant its own name")
        specs[spec.name] = spec
    return specs


def resolve_variants(names: str | list[str], variants_file: str | None = None) -> list[VariantSpec]:
    """Turn a comma list of preset and custom names into specs, in the order given.

    Args:
        names: "fp32,int4" or ["fp32", "int4"]; names come from PRESETS or the variants file
            (a file entry with a preset's name overrides the preset).
        variants_file: a YAML or JSON file of custom variants; None or "" for presets only.

    Example:
        >>> [s.name for s in resolve_variants("fp32, int4")]
        ['fp32', 'int4']
    """
    wanted = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n and n.strip()]
    custom = load_variants_file(variants_file) if variants_file else {}
    if not wanted:
        raise errors.SlmopsError("no variants requested", f"pass a comma list of presets ({_choices(PRESETS)}) "
                                 "or names from --variants-file")
    known = {**PRESETS, **custom}
    specs: list[VariantSpec] = []
    for name in wanted:
        if name not in known:
            custom_part = f"; in {variants_file}: {_choices(custom)}" if custom else ""
            raise errors.SlmopsError(
                f"unknown variant {name!r}; presets: {_choices(PRESETS)}{custom_part}",
                "pick presets from this list, or define the variant in a file passed with --variants-file",
            )
        if name not in {s.name for s in specs}:
            specs.append(known[name])
    return specs
