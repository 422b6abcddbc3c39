"""The recipe: which Olive passes build a variant, as a table keyed by the quantization algorithm, and the
Olive workflow config (also written beside each variant as ``olive_config.json``, which replays the build)."""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Callable

from mlflow_slmops import calibration as calibration_module
from mlflow_slmops import errors
from mlflow_slmops.calibration import Calibration
from mlflow_slmops.convert import architectures
from mlflow_slmops.genai import modeldir
from mlflow_slmops.variants import VariantSpec

# Bump when the recipe below changes what a spec builds, so old cache entries stop matching.
# 2: architectures.BUILDER_FIXES (Phi, Phi-3 LongRoPE, Nemotron, Gemma 2 and 3, OLMo, SmolLM3, GPT-OSS).
RECIPE_VERSION = 2
# The graph output onnxruntime-genai looks up; RTN and HQQ rename it to logits_Q4 / logits_Q8.
LOGITS = "logits"
# Olive's engine verbosity: 3 = errors only.
OLIVE_LOG_LEVEL = 3
TOOL_PACKAGES = ("olive-ai", "onnxruntime-genai", "onnxruntime")
# Where `olive run --config olive_config.json` writes, relative to the folder it is run from.
REPRODUCE_OUTPUT_DIR = "olive-output"


def tool_versions() -> dict[str, str]:
    found = {}
    for pkg in TOOL_PACKAGES:
        try:
            found[pkg] = version(pkg)
        except PackageNotFoundError:
            found[pkg] = "missing"
    return found


_EXTERNAL = {"save_as_external_data": True}


@dataclass(frozen=True)
class AlgoRecipe:
    """How one weight-only quantization algorithm turns the fp32 export into a variant."""

    quantize: Callable[[VariantSpec, int], dict]  # (spec, bits) -> the Olive quantization pass
    renames_logits: bool = False  # the pass renames the logits output to logits_Q<bits>: put the name back
    leaves_unused_weights: bool = False  # the pass leaves the replaced fp32 weights in the graph: drop them


ALGO_RECIPES: dict[str, AlgoRecipe] = {
    "rtn": AlgoRecipe(
        lambda spec, bits: {"type": "OnnxBlockWiseRtnQuantization", "bits": bits, "block_size": spec.block_size,
                            "is_symmetric": spec.is_symmetric, "accuracy_level": spec.accuracy_level, **_EXTERNAL},
        renames_logits=True),
    "k_quant": AlgoRecipe(
        lambda spec, bits: {"type": "OnnxKQuantQuantization", "bits": bits, "block_size": spec.block_size,
                            "accuracy_level": spec.accuracy_level, **_EXTERNAL}),
    # Olive 0.13's HQQ pass is 4-bit only and leaves the replaced fp32 weights in the graph (the model ends up
    # larger than fp32).
    "hqq": AlgoRecipe(
        # axis 1: blocks of consecutive K, the layout fixes.hqq_matmulnbits_layout writes (a distinct config
        # also keeps Olive's own run cache from handing back a run of the unfixed pass).
        lambda spec, bits: {"type": "OnnxHqqQuantization", "block_size": spec.block_size, "axis": 1,
                            "accuracy_level": spec.accuracy_level, **_EXTERNAL},
        renames_logits=True, leaves_unused_weights=True),
}


def olive_passes(spec: VariantSpec, data_config: dict | None = None) -> dict:
    """The Olive passes that build one variant, in order.

    fp32 and fp16 come straight from the ModelBuilder pass. int8 and int4 start from the same fp32
    ModelBuilder export (shared through Olive's cache) and quantize it with the Olive ONNX pass of their
    algorithm (``ALGO_RECIPES``). RTN and HQQ rename the lm_head output from ``logits`` to ``logits_Q<bits>``;
    onnxruntime-genai looks the output up by name, so a GraphSurgeries/RenameOutputs pass puts the name back.
    GPTQ, int8 embeddings and mixed precision quantize the PyTorch model first (``pytorch_passes``);
    ``data_config`` is the calibration data of a GPTQ variant.
    """
    if spec.pytorch_recipe:
        return pytorch_passes(spec, data_config)
    builder = {"type": "ModelBuilder", "precision": "fp16" if spec.precision == "fp16" else "fp32",
               **spec.builder_options}
    passes: dict = {"builder": builder}
    if spec.precision not in ("int8", "int4"):
        return passes
    bits = 8 if spec.precision == "int8" else 4
    recipe = ALGO_RECIPES[spec.algo]
    passes["quantize"] = recipe.quantize(spec, bits)
    if recipe.renames_logits:
        passes["keep_logits_name"] = {
            "type": "GraphSurgeries",
            "surgeries": [{"surgeon": "RenameOutputs", "old_names": [f"{LOGITS}_Q{bits}"], "new_names": [LOGITS]}],
            # Renaming adds no initializers; skipping the dedup saves hashing every weight again.
            "remove_duplicate_initializers": False,
            **_EXTERNAL,
        }
    if recipe.leaves_unused_weights:
        # onnxscript's optimizer drops unused initializers. Logits are unchanged.
        passes["drop_unused_weights"] = {"type": "OnnxPeepholeOptimizer", "onnxscript_optimize": True,
                                         "onnxoptimizer_optimize": False, "fuse_reshape_operations": False,
                                         **_EXTERNAL}
    return passes


def pytorch_passes(spec: VariantSpec, data_config: dict | None) -> dict:
    """The shape of Olive's published CPU int4 recipes (Qwen3-0.6B): quantize the PyTorch model, then export it.

    SelectiveMixedPrecision (optional) marks the layers its rule keeps at 8 bits; Gptq (calibrated) or Rtn
    quantizes the body to int4, those layers to int8; Rtn takes the embeddings and lm_head, at int4 as plain int4
    does or at ``embeds_bits``; ModelBuilder writes the quantized weights as MatMulNBits and
    GatherBlockQuantized; TieWordEmbeddings makes a tied lm_head share the quantized embedding instead of
    holding a second copy (an untied model is left as it is).
    """
    layout = {"group_size": spec.block_size, "sym": spec.is_symmetric}
    passes: dict = {}
    if spec.mixed_precision:
        passes["mixed_precision"] = {"type": "SelectiveMixedPrecision", "algorithm": spec.mixed_precision,
                                     "bits": 4, "high_bits": 8}
    if spec.calibrated:
        if data_config is None:
            raise errors.SlmopsError(f"variant {spec.name!r} is calibrated (algo {spec.algo}) but has no "
                                     "calibration data", "pass --calibration FILE")
        passes["gptq"] = {"type": "Gptq", "bits": 4, **layout, "data_config": data_config}
    else:
        passes["rtn"] = {"type": "Rtn", "bits": 4, **layout}
    # Plain int4 (the ONNX RTN pass) quantizes the embeddings and lm_head too: so does every recipe here.
    passes["embeds"] = {"type": "Rtn", "bits": spec.embeds_bits or 4, **layout, "lm_head": True, "embeds": True}
    passes["builder"] = {"type": "ModelBuilder", "precision": "int4", "int4_block_size": spec.block_size,
                         "int4_is_symmetric": spec.is_symmetric, "int4_accuracy_level": spec.accuracy_level,
                         **spec.builder_options}
    passes["tie_embeddings"] = {"type": "GraphSurgeries", "surgeries": [{"surgeon": "TieWordEmbeddings"}],
                                **_EXTERNAL}
    return passes


def olive_config(model_dir: str | Path, spec: VariantSpec, output_dir: str, cache_dir: str | None,
                 trust_remote_code: bool = False, calibration: Calibration | None = None) -> dict:
    """One variant's Olive workflow config; with ``cache_dir=None`` Olive uses ./.olive-cache."""
    input_model: dict = {"type": "HfModel", "model_path": str(Path(model_dir).resolve())}
    if trust_remote_code:
        input_model["load_kwargs"] = {"trust_remote_code": True}
    data_config = (calibration_module.olive_data_config(calibration, model_dir, trust_remote_code)
                   if spec.calibrated and calibration is not None else None)
    passes = olive_passes(spec, data_config)
    fixes = architectures.fixes_for(modeldir.read_json_or_empty(Path(model_dir) / "config.json"))
    if fixes:  # named in the export's own options: this file says so, and Olive's cache keys on it
        builder = passes["builder"]
        builder["extra_options"] = {**builder.get("extra_options", {}), architectures.FIXES_OPTION: ",".join(fixes)}
    config = {
        "input_model": input_model,
        "systems": {"local": {"type": "LocalSystem", "accelerators": [
            {"device": spec.device, "execution_providers": [spec.ort_provider]}]}},
        "passes": passes,
        "host": "local",
        "target": "local",
        "output_dir": output_dir,
        "log_severity_level": OLIVE_LOG_LEVEL,
    }
    if cache_dir is not None:
        config["cache_dir"] = cache_dir
    return config


def reproduction_config(model_dir: str | Path, spec: VariantSpec, trust_remote_code: bool = False,
                        calibration: Calibration | None = None) -> dict:
    """The olive_config.json written beside a variant: run from any folder with ``olive run --config``,
    it writes the same model to ``./olive-output/<variant>`` with Olive's default cache ``./.olive-cache``.
    A calibrated variant's config names its calibration text by its stored path and sha256."""
    return olive_config(model_dir, spec, f"{REPRODUCE_OUTPUT_DIR}/{spec.name}", None, trust_remote_code,
                        calibration if spec.calibrated else None)


def pass_chain(spec: VariantSpec) -> str:
    return " → ".join(p["type"] for p in olive_passes(spec, {}).values())
