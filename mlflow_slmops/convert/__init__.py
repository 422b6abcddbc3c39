"""Convert a Hugging Face model folder into ONNX Runtime GenAI variants, one Olive workflow per variant.

The stage's modules, in the order a variant goes through them:

    inputs.py        the model folder's checks, its content hash, the cache folder, the default output folder
    recipe.py        the Olive passes of each variant (a table keyed by algorithm) and the workflow config
    olive/           the only code that imports Olive: running a workflow (``olive``) and its speed-ups
    architectures.py the builder's known gaps, refused or fixed, per architecture
    validate.py      load-and-generate check of a built folder
    cache.py         the content-addressed cache of finished variants and publishing output folders
    process.py       process-wide tuning during a conversion, and its undoing
    pipeline.py      ``convert_variant`` and ``convert_variants``: lookup or build, validate, publish, progress

This package's names below are the stage's public API; ``from mlflow_slmops import convert`` keeps working as
it did when the stage was one module.
"""

from mlflow_slmops.convert.cache import (
    ENTRY_MANIFEST,
    OLIVE_CONFIG_FILE,
    PARTIAL_TAG,
    complete_entry,
    entry_key,
)
from mlflow_slmops.convert.inputs import (
    CACHE_ENV,
    check_cache_dir,
    check_hf_model_dir,
    default_cache_dir,
    default_output_dir,
    input_model_hash,
    supported_architectures,
)
from mlflow_slmops.convert.pipeline import (
    STAGES,
    STATUS_FAILED,
    STATUS_OK,
    ConversionResult,
    calibration_for,
    convert_variant,
    convert_variants,
    results_table,
)
from mlflow_slmops.convert.process import own_this_process, release_memory
from mlflow_slmops.convert.recipe import (
    RECIPE_VERSION,
    olive_config,
    olive_passes,
    reproduction_config,
    tool_versions,
)
from mlflow_slmops.convert.validate import validate_genai_dir

__all__ = [
    "CACHE_ENV", "ENTRY_MANIFEST", "OLIVE_CONFIG_FILE", "PARTIAL_TAG", "RECIPE_VERSION", "STAGES", "STATUS_FAILED",
    "STATUS_OK", "ConversionResult", "calibration_for", "check_cache_dir", "check_hf_model_dir", "complete_entry", "convert_variant",
    "convert_variants", "default_cache_dir", "default_output_dir", "entry_key", "input_model_hash", "olive_config",
    "olive_passes", "own_this_process", "release_memory", "reproduction_config", "results_table",
    "supported_architectures", "tool_versions", "validate_genai_dir",
]
