"""What a conversion starts from: the Hugging Face model folder's checks, its content hash (with a per-file
memo), the conversion cache folder and the default output folder keyed by the model."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Callable

from mlflow_slmops import errors
from mlflow_slmops._files import write_json_atomic
from mlflow_slmops.convert import architectures
from mlflow_slmops.convert.olive import speedups
from mlflow_slmops.genai import modeldir

logger = logging.getLogger(__name__)


CACHE_ENV = "SLMOPS_CACHE_DIR"


DEFAULT_CACHE_DIR = Path("~/.cache/mlflow-slmops")


# Default output: DEFAULT_OUTPUT_ROOT/<model folder name>-<first OUTPUT_KEY_CHARS of the model's content hash>/
DEFAULT_OUTPUT_ROOT = ".slmops/variants"


OUTPUT_KEY_CHARS = 8


# 16 MiB: each chunk re-takes the GIL once, and Olive is being imported on another thread meanwhile.
_HASH_CHUNK = 1 << 24


UNSUPPORTED_HINT = "convert a decoder-only causal LM the onnxruntime-genai 0.14 builder supports"


# config.json files whose known export divergence (architectures.check_convertible) was logged in this process.
_DIVERGENCE_WARNED: set[str] = set()


@functools.cache  # the installed builder does not change in a process; it is asked once per variant
def supported_architectures() -> tuple[str, ...]:
    """Decoder architectures the installed onnxruntime-genai builder converts, read from its own source."""
    import importlib.util
    import re

    spec = importlib.util.find_spec("onnxruntime_genai")
    source = Path(spec.submodule_search_locations[0]) / "models" / "builder.py"
    found = re.findall(r'config\.architectures\[0\] == "(\w+)"', source.read_text(encoding="utf-8"))
    # Whisper is speech-to-text: not a chat model this tool can measure or serve.
    return tuple(sorted({a for a in found if not a.startswith("Whisper")}))


def check_hf_model_dir(model_dir: str | Path, trust_remote_code: bool = False) -> dict:
    """Check a Hugging Face model folder can be converted; return its config.json.

    Args:
        model_dir: the fine-tuned model folder (config.json, weights, tokenizer).
        trust_remote_code: allow a config whose ``auto_map`` points at custom modelling code.

    Raises:
        SlmopsError: naming the folder and what is wrong: missing, no config.json, invalid JSON,
            custom code not allowed, an architecture the builder does not support (listing those it does).

    Example:
        >>> check_hf_model_dir("./my-finetuned-qwen")["architectures"]  # doctest: +SKIP
        ['Qwen2ForCausalLM']
    """
    path = Path(model_dir)
    if not path.exists():
        raise errors.SlmopsError(f"model folder {path} does not exist",
                                 "pass the Hugging Face model folder with --model")
    if not path.is_dir():
        raise errors.SlmopsError(f"model path {path} is a file, expected a Hugging Face model folder",
                                 "pass the folder that holds config.json")
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise errors.SlmopsError(f"{path} has no config.json, so it is not a Hugging Face model folder",
                                 "pass the folder written by save_pretrained (config.json, weights, tokenizer)")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise errors.SlmopsError(f"{cfg_path} is not valid JSON ({exc})", "re-save the model with save_pretrained")
    if not isinstance(config, dict):
        raise errors.SlmopsError(f"{cfg_path} holds a JSON {type(config).__name__}, expected an object",
                                 "re-save the model with save_pretrained")
    _check_remote_code(cfg_path, config, trust_remote_code)
    _check_architecture(cfg_path, config)
    _check_weights_and_tokenizer(path)
    return config


def _check_remote_code(cfg_path: Path, config: dict, trust_remote_code: bool) -> None:
    if config.get("auto_map") and not trust_remote_code:
        modules = ", ".join(sorted({str(v).split(".")[0] for v in config["auto_map"].values()
                                    if isinstance(v, str)})) or "custom modules"
        raise errors.SlmopsError(
            f"{cfg_path} asks for trust_remote_code (auto_map runs {modules} from the model folder), "
            "which is not allowed",
            "review that code, then pass --trust-remote-code to run it",
        )


def _check_architecture(cfg_path: Path, config: dict) -> None:
    supported = supported_architectures()
    archs = config.get("architectures")
    arch = archs[0] if isinstance(archs, list) and archs else None
    if arch not in supported:
        found = f"architecture {arch!r}" if arch else "no architectures entry"
        raise errors.SlmopsError(
            f"{cfg_path} has {found}, which the onnxruntime-genai builder cannot convert; "
            f"supported: {', '.join(supported)}",
            UNSUPPORTED_HINT,
        )
    warning = architectures.check_convertible(config)  # refuses a known builder gap before any work
    if warning and str(cfg_path) not in _DIVERGENCE_WARNED:
        _DIVERGENCE_WARNED.add(str(cfg_path))  # the input is checked again for every variant: warn once
        logger.warning(warning)


def _check_weights_and_tokenizer(path: Path) -> None:
    weights = list(path.glob("*.safetensors")) + list(path.glob("pytorch_model*.bin"))
    if not weights:
        raise errors.SlmopsError(f"{path} has no weights (*.safetensors or pytorch_model*.bin)",
                                 "pass the folder written by save_pretrained, weights included")
    if not modeldir.has_tokenizer(path):
        raise errors.SlmopsError(f"{path} has no tokenizer (expected one of {', '.join(modeldir.TOKENIZER_FILES)})",
                                 "save the tokenizer into the model folder with tokenizer.save_pretrained")


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR).expanduser()


CACHE_DIR_HINT = "pass a writable folder with --cache-dir (or set SLMOPS_CACHE_DIR)"


def check_cache_dir(cache_dir: str | Path | None) -> Path:
    """The conversion cache folder, created if missing and proven writable; SlmopsError naming it otherwise.

    Args:
        cache_dir: the folder; None for ``$SLMOPS_CACHE_DIR`` or ``~/.cache/mlflow-slmops``.

    Example:
        >>> check_cache_dir("/tmp/slmops-cache")  # doctest: +SKIP
        PosixPath('/tmp/slmops-cache')
    """
    root = Path(cache_dir).expanduser().absolute() if cache_dir else default_cache_dir()
    for folder in (root, *root.parents):
        if folder.exists() and not folder.is_dir():
            raise errors.SlmopsError(f"conversion cache path {folder} is a file, expected a folder", CACHE_DIR_HINT)
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=root):  # a read-only folder or mount fails here, not mid-sweep
            pass
    except OSError as exc:
        raise errors.SlmopsError(f"conversion cache {root} is not writable ({exc.strerror or exc})", CACHE_DIR_HINT)
    return root


def _input_files(model_dir: Path) -> list[Path]:
    """Every file of the model folder, hidden folders (.cache, .git) left out, in a stable order."""
    files = []
    for p in sorted(model_dir.rglob("*")):
        rel = p.relative_to(model_dir)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts):
            files.append(p)
    return files


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def input_model_hash(model_dir: str | Path, cache_dir: str | Path | None = None,
                     on_new_file: Callable[[], None] | None = None) -> str:
    """sha256 over the names and contents of a model folder's files.

    Per-file hashes are remembered in ``<cache_dir>/input-hashes.json`` keyed by path, size, mtime and
    inode, so an unchanged 2 GB model is not re-read on every sweep. ``on_new_file`` is called once, before
    the first file that has to be read.
    """
    model_dir = Path(model_dir).resolve()
    memo_path = Path(cache_dir) / "input-hashes.json" if cache_dir else None
    memo = modeldir.read_json_or_empty(memo_path)
    digest = hashlib.sha256()
    changed = False
    for path in _input_files(model_dir):
        st = path.stat()
        file_hash = _remembered_hash(memo, path, st)
        if file_hash is None:
            if not changed and on_new_file is not None:
                on_new_file()
            file_hash = _sha256_file(path)
            memo[str(path)] = [st.st_size, st.st_mtime_ns, st.st_ino, file_hash]
            changed = True
        speedups.remember_sha256(path, st, file_hash)  # Olive's model identifier hashes these files too
        digest.update(str(path.relative_to(model_dir)).encode() + b"\0" + file_hash.encode())
    if memo_path and changed:
        with contextlib.suppress(OSError):  # the memo only saves time
            write_json_atomic(memo_path, memo)
    return digest.hexdigest()


def default_output_dir(model_dir: str | Path, cache_dir: str | Path | None = None) -> str:
    """Where variants go when no output folder is given: keyed by the model folder's name and content, so
    sweeps of two models in one project never collide and a re-sweep of the same model reuses its folders.

    Example:
        >>> default_output_dir("./my-finetuned-model")  # doctest: +SKIP
        '.slmops/variants/my-finetuned-model-3f2a9c01'
    """
    key = input_model_hash(model_dir, check_cache_dir(cache_dir))[:OUTPUT_KEY_CHARS]
    return str(Path(DEFAULT_OUTPUT_ROOT) / f"{Path(model_dir).resolve().name}-{key}")


def _remembered_hash(memo: dict, path: Path, st: os.stat_result) -> str | None:
    known = memo.get(str(path))
    return known[3] if known and known[:3] == [st.st_size, st.st_mtime_ns, st.st_ino] else None
