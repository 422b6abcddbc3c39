"""Pre-flight checks against the runtime Foundry Local ships, before anything is written or registered.

foundry-local-sdk 2.2.1 runs models with onnxruntime-genai-core 0.18 (module ``onnxruntime_genai_core``, a bare
``libonnxruntime-genai.so``), while the builder and the pyfunc use onnxruntime-genai 0.14.1. A folder that one
accepts the other may refuse, so the genai_config.json a deployment would write is parsed by 0.18's own
``OgaCreateConfig`` (which rejects keys it does not know: ``JSON Error: model: Unknown value "..."``). The other
checks: the requested ``max_length`` fits the context, every execution provider named in the config exists in
the onnxruntime Foundry Local loads, and the folder has a chat template (``prompt_template.for_model``).

Example:
    >>> check_genai_config({"model": {...}, "search": {...}}, "model folder int4")   # doctest: +SKIP
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import json
import tempfile
from pathlib import Path

from mlflow_slmops.genai import modeldir
from mlflow_slmops.errors import SlmopsError

GENAI_CORE = "onnxruntime_genai_core"
GENAI_CORE_LIB = "libonnxruntime-genai.so"
# genai_config.json provider names -> onnxruntime's execution provider names.
PROVIDERS = {"cuda": "CUDAExecutionProvider", "dml": "DmlExecutionProvider", "qnn": "QNNExecutionProvider",
             "openvino": "OpenVINOExecutionProvider", "webgpu": "WebGpuExecutionProvider",
             "nvtensorrtrtx": "NvTensorRTRTXExecutionProvider", "vitisai": "VitisAIExecutionProvider",
             "rocm": "ROCMExecutionProvider", "migraphx": "MIGraphXExecutionProvider", "cpu": "CPUExecutionProvider"}


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    return Path(spec.origin).parent if spec is not None and spec.origin else None


@functools.lru_cache(maxsize=1)
def _genai_core():
    """onnxruntime-genai-core's C library, with the onnxruntime it needs loaded first (as Foundry Local does)."""
    core, ort = _package_dir(GENAI_CORE), _package_dir("onnxruntime")
    if core is None or ort is None or not (core / "bin" / GENAI_CORE_LIB).is_file():
        return None
    ort_lib = next(iter(sorted((ort / "capi").glob("libonnxruntime.so*"))), None)
    if ort_lib is None:
        return None
    ctypes.CDLL(str(ort_lib), mode=ctypes.RTLD_GLOBAL)
    lib = ctypes.CDLL(str(core / "bin" / GENAI_CORE_LIB))
    lib.OgaCreateConfig.restype = ctypes.c_void_p
    lib.OgaCreateConfig.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p)]
    lib.OgaResultGetError.restype = ctypes.c_char_p
    lib.OgaResultGetError.argtypes = [ctypes.c_void_p]
    lib.OgaDestroyResult.argtypes = [ctypes.c_void_p]
    lib.OgaDestroyConfig.argtypes = [ctypes.c_void_p]
    return lib


def genai_core_error(config: dict) -> str | None:
    """What onnxruntime-genai-core 0.18 says when parsing this genai_config.json; None when it accepts it."""
    lib = _genai_core()
    if lib is None:
        return None  # no Foundry Local runtime installed here: runtime.py reports that when it starts
    with tempfile.TemporaryDirectory(prefix="slmops-preflight-") as tmp:
        (Path(tmp) / modeldir.GENAI_CONFIG).write_text(json.dumps(config), encoding="utf-8")
        out = ctypes.c_void_p()
        result = lib.OgaCreateConfig(tmp.encode(), ctypes.byref(out))
        if result:
            message = (lib.OgaResultGetError(result) or b"").decode("utf-8", "replace")
            lib.OgaDestroyResult(result)
            return message.split("JSON Error: ", 1)[-1].strip()
        lib.OgaDestroyConfig(out)
    return None


def check_genai_config(config: dict, where: str) -> None:
    """Refuse a genai_config.json that Foundry Local's runtime would not load."""
    error = genai_core_error(config)
    if error:
        raise SlmopsError(f"Foundry Local's runtime (onnxruntime-genai-core 0.18) rejects the genai_config.json of "
                          f"{where}: {error}", "remove or rename that key in genai_config.json and log the model again")


def check_max_length(config: dict, where: str) -> None:
    """Refuse a search.max_length above the model's context length."""
    context = config.get("model", {}).get("context_length")
    wanted = config.get("search", {}).get("max_length")
    if isinstance(context, int) and isinstance(wanted, int) and wanted > context:
        raise SlmopsError(f"max_length {wanted} of {where} exceeds its context length {context}",
                          f"pass -C max_length={context} or less")


def configured_providers(config: dict) -> list[str]:
    """The execution providers genai_config.json asks for (decoder session options), in its own spelling."""
    options = config.get("model", {}).get("decoder", {}).get("session_options", {}).get("provider_options") or []
    return [name for entry in options if isinstance(entry, dict) for name in entry]


def check_providers(config: dict, where: str) -> None:
    """Refuse an execution provider that the onnxruntime Foundry Local loads does not have on this machine."""
    wanted = configured_providers(config)
    if not wanted:
        return
    import onnxruntime

    available = set(onnxruntime.get_available_providers())
    for name in wanted:
        if PROVIDERS.get(name.lower(), name) not in available:
            raise SlmopsError(
                f"{where} runs on the {name} execution provider, which this machine's onnxruntime lacks "
                f"(available: {', '.join(sorted(available))})",
                "deploy a variant built for an available provider (cpu), or install that provider")


def run(config: dict, where: str) -> None:
    """Every pre-flight check of the genai_config.json a deployment would write."""
    check_max_length(config, where)
    check_providers(config, where)
    check_genai_config(config, where)
