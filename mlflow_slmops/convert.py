"""Convert a Hugging Face model folder into ONNX Runtime GenAI variants, one Olive workflow per variant.

Every variant is an Olive workflow run in this process (``olive.workflows.run``). All workflows share one
Olive cache, so the fp32 ``ModelBuilder`` export is made once and every quantized variant starts from it.
Each workflow runs under ``olive_speedups.speedups()``: faster code for slow spots of Olive, same output bytes;
and under ``architectures.builder_fixes()``, which closes the builder gaps ``docs/architectures.md`` lists.
On top of Olive's cache sits a content-addressed cache of finished, validated variant folders keyed by
the input model's content, the variant spec and the tool versions: re-running a sweep re-converts nothing.

Layout of the cache folder (``~/.cache/mlflow-slmops`` or ``$SLMOPS_CACHE_DIR``)::

    olive/                 Olive's own cache_dir, shared by every workflow
    variants/<key>/        complete, validated genai folders (appear by an atomic rename only)
    tmp/<key>-<pid>-<rnd>/ builds in flight; one whose process is gone is debris, removed by the next build
    logs/<variant>-<key>.log   what Olive and the builder printed for the last build of that key
    locks/<key>.lock       held from a variant's build until its entry is stored, so each entry is built once
    input-hashes.json      per-file sha256 memo keyed by path, size, mtime and inode
    convert.lock           held while Olive runs, so concurrent sweeps never share a half-built Olive run

``convert_variants`` overlaps the two halves of the work on two cores: while Olive builds the next variant,
a second thread validates the last one (load and generate, in a subprocess) and publishes it.

Output folders are built beside their final place and renamed into it, so a failure, Ctrl-C or a full
disk never leaves a partial variant folder.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import glob
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Callable, Iterator

from mlflow_slmops import architectures, errors, modeldir, olive_speedups
from mlflow_slmops._files import link_or_copy, write_json_atomic
from mlflow_slmops.variants import VariantSpec

logger = logging.getLogger(__name__)

CACHE_ENV = "SLMOPS_CACHE_DIR"
# An output folder is assembled as ".<variant>.partial-<pid>-<random>" beside its place, then renamed in.
PARTIAL_TAG = ".partial-"
DEFAULT_CACHE_DIR = Path("~/.cache/mlflow-slmops")
OLIVE_CONFIG_FILE = "olive_config.json"
# Default output: DEFAULT_OUTPUT_ROOT/<model folder name>-<first OUTPUT_KEY_CHARS of the model's content hash>/
DEFAULT_OUTPUT_ROOT = ".slmops/variants"
OUTPUT_KEY_CHARS = 8
ENTRY_MANIFEST = "slmops_entry.json"
# Bump when the recipe below changes what a spec builds, so old cache entries stop matching.
# 2: architectures.BUILDER_FIXES (Phi, Phi-3 LongRoPE, Nemotron, Gemma 2 and 3, OLMo, SmolLM3, GPT-OSS).
RECIPE_VERSION = 2
# Files Olive writes into a workflow's output_dir that are not part of the model.
OLIVE_CLUTTER = ("footprint.json", "output_footprint.json", "input_model_footprint.json", "run_history.txt",
                 "model_config.json")
# The graph output onnxruntime-genai looks up; RTN and HQQ rename it to logits_Q4 / logits_Q8.
LOGITS = "logits"
# Olive's engine verbosity: 3 = errors only.
OLIVE_LOG_LEVEL = 3
OLIVE_TELEMETRY_ENV = "OLIVE_DISABLE_TELEMETRY"
# Tokens the post-build check generates.
VALIDATE_NEW_TOKENS = 4
VALIDATE_TIMEOUT_S = 900
TOOL_PACKAGES = ("olive-ai", "onnxruntime-genai", "onnxruntime")
# Where `olive run --config olive_config.json` writes, relative to the folder it is run from.
REPRODUCE_OUTPUT_DIR = "olive-output"
# 16 MiB: each chunk re-takes the GIL once, and Olive is being imported on another thread meanwhile.
_HASH_CHUNK = 1 << 24
PUBLISHED_FILE_MODE = 0o644
# A build folder in tmp/ is named "<key prefix>-<pid>-<random>", so debris cleanup can spare live builds.
WORK_PID_SEP = "-"
# How often a validation wait checks whether the conversion was interrupted.
CANCEL_POLL_S = 0.2
STATUS_OK = "ok"
STATUS_FAILED = "failed"
# Stages reported to the progress bar, in order.
STAGES = ("hash input", "olive", "validate", "publish")
UNSUPPORTED_HINT = "convert a decoder-only causal LM the onnxruntime-genai 0.14 builder supports"

# Run inside a fresh interpreter: a model that crashes onnxruntime-genai must not take the sweep down.
_VALIDATE_SCRIPT = r"""
import json, sys
import onnxruntime_genai as og
path, n_new = sys.argv[1], int(sys.argv[2])
model = og.Model(path)
tokenizer = og.Tokenizer(model)
prompt = tokenizer.encode("Hello")
params = og.GeneratorParams(model)
params.set_search_options(max_length=len(prompt) + n_new, min_length=len(prompt) + n_new)
gen = og.Generator(model, params)
gen.append_tokens(prompt)
new = []
while not gen.is_done():
    gen.generate_next_token()
    new.append(int(gen.get_next_tokens()[0]))
print(json.dumps({"new_tokens": new}))
"""

# Set while a sweep runs: release_memory freezes what survives its collection (see _gc_walks_only_new_objects).
_FREEZE_SURVIVORS = threading.Event()
# Set by the slmops CLI, which owns its process (own_this_process): only then does a conversion change
# process-wide state for speed (glibc's heap policy) or leave Olive's writes in the environment.
_PROCESS_OWNED = threading.Event()
# Set while a conversion runs: freed memory stays with the process (see _heap_reused_between_variants).
_HEAP_REUSED = threading.Event()
# The thread importing Olive while the input model is hashed (see _import_olive_in_background).
_olive_import: threading.Thread | None = None
# Set by a Ctrl-C during a conversion (see _sigint_noted).
_SIGINT_SEEN = threading.Event()
# config.json files whose known export divergence (architectures.check_convertible) was logged in this process.
_DIVERGENCE_WARNED: set[str] = set()


@dataclass
class ConversionResult:
    """What converting one variant gave: a validated folder, or the error that stopped it."""

    spec: VariantSpec
    status: str
    output_dir: str | None
    error: str | None
    convert_s: float
    size_bytes: int | None
    weights_sha256: str | None
    olive_config_path: str | None
    cached: bool
    build_only: bool
    build_s: float | None = None  # how long the Olive build of this variant took, now or when it was cached

    def to_dict(self) -> dict:
        data = asdict(self)
        data["spec"] = self.spec.to_dict()
        return data


# ---------------------------------------------------------------- input checks

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


# ---------------------------------------------------------------- cache keys

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


def tool_versions() -> dict[str, str]:
    found = {}
    for pkg in TOOL_PACKAGES:
        try:
            found[pkg] = version(pkg)
        except PackageNotFoundError:
            found[pkg] = "missing"
    return found


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
        olive_speedups.remember_sha256(path, st, file_hash)  # Olive's model identifier hashes these files too
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


def _import_olive_in_background() -> None:
    """Import Olive (5 to 6 s of one core) on a thread while this one hashes the input model (the hashing
    releases the GIL). Started only for an input file not hashed before, so a build is all but certain and
    a cached sweep never imports Olive; ``_run_olive``, and every conversion before it returns, wait for it,
    so no other code imports Olive's modules while it does."""
    global _olive_import
    if _olive_import is None and "olive.workflows" not in sys.modules:
        _olive_import = threading.Thread(target=_import_olive, name="slmops-import-olive", daemon=True)
        _olive_import.start()


def _import_olive() -> None:
    with contextlib.suppress(Exception):  # the import in _run_olive raises it again, where it is reported
        _quiet_olive_telemetry()
        import olive.workflows  # noqa: F401


@contextlib.contextmanager
def _sigint_noted() -> Iterator[None]:
    """Note each Ctrl-C as it arrives, then let the handler in place raise KeyboardInterrupt as ever.

    pybind11 turns a KeyboardInterrupt raised while an extension module initializes (Olive's passes import
    onnxruntime-genai's mid-run) into ``ImportError: initialization failed``: without the note, the interrupt
    would become a failed variant, and the next variant's import would fail on the half-registered module.
    Only the main thread can set signal handlers; elsewhere this does nothing.
    """
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or not callable(previous):
        yield
        return

    def note_and_raise(signum, frame):
        _SIGINT_SEEN.set()
        previous(signum, frame)

    signal.signal(signal.SIGINT, note_and_raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _SIGINT_SEEN.clear()


def _wait_for_olive_import() -> None:
    global _olive_import
    if _olive_import is not None:
        _olive_import.join()
        _olive_import = None


def entry_key(input_hash: str, spec: VariantSpec, trust_remote_code: bool = False) -> str:
    """The cache key of one variant: input content, spec (its name aside), tool versions, recipe."""
    spec_body = {k: v for k, v in spec.to_dict().items() if k != "name"}
    body = {"input": input_hash, "spec": spec_body, "versions": tool_versions(), "recipe": RECIPE_VERSION,
            "trust_remote_code": trust_remote_code}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------- Olive configs

def olive_passes(spec: VariantSpec) -> dict:
    """The Olive passes that build one variant, in order.

    fp32 and fp16 come straight from the ModelBuilder pass. int8 and int4 start from the same fp32
    ModelBuilder export (shared through Olive's cache) and quantize it with an Olive ONNX pass. RTN and
    HQQ rename the lm_head output from ``logits`` to ``logits_Q<bits>``; onnxruntime-genai looks the
    output up by name, so a GraphSurgeries/RenameOutputs pass puts the name back.
    """
    builder = {"type": "ModelBuilder", "precision": "fp16" if spec.precision == "fp16" else "fp32",
               **spec.builder_options}
    passes: dict = {"builder": builder}
    if spec.precision not in ("int8", "int4"):
        return passes
    bits = 8 if spec.precision == "int8" else 4
    external = {"save_as_external_data": True}
    if spec.algo == "rtn":
        passes["quantize"] = {"type": "OnnxBlockWiseRtnQuantization", "bits": bits, "block_size": spec.block_size,
                              "is_symmetric": spec.is_symmetric, "accuracy_level": spec.accuracy_level, **external}
    elif spec.algo == "k_quant":
        passes["quantize"] = {"type": "OnnxKQuantQuantization", "bits": bits, "block_size": spec.block_size,
                              "accuracy_level": spec.accuracy_level, **external}
    else:  # hqq, 4-bit only
        passes["quantize"] = {"type": "OnnxHqqQuantization", "block_size": spec.block_size,
                              "accuracy_level": spec.accuracy_level, **external}
    if spec.algo in ("rtn", "hqq"):
        passes["keep_logits_name"] = {
            "type": "GraphSurgeries",
            "surgeries": [{"surgeon": "RenameOutputs", "old_names": [f"{LOGITS}_Q{bits}"], "new_names": [LOGITS]}],
            # Renaming adds no initializers; skipping the dedup saves hashing every weight again.
            "remove_duplicate_initializers": False,
            **external,
        }
    if spec.algo == "hqq":
        # Olive 0.13's HQQ pass leaves the replaced fp32 weights in the graph (the model ends up larger
        # than fp32); onnxscript's optimizer drops unused initializers. Logits are unchanged.
        passes["drop_unused_weights"] = {"type": "OnnxPeepholeOptimizer", "onnxscript_optimize": True,
                                         "onnxoptimizer_optimize": False, "fuse_reshape_operations": False,
                                         **external}
    return passes


def olive_config(model_dir: str | Path, spec: VariantSpec, output_dir: str, cache_dir: str | None,
                 trust_remote_code: bool = False) -> dict:
    """One variant's Olive workflow config; with ``cache_dir=None`` Olive uses ./.olive-cache."""
    input_model: dict = {"type": "HfModel", "model_path": str(Path(model_dir).resolve())}
    if trust_remote_code:
        input_model["load_kwargs"] = {"trust_remote_code": True}
    passes = olive_passes(spec)
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


def reproduction_config(model_dir: str | Path, spec: VariantSpec, trust_remote_code: bool = False) -> dict:
    """The olive_config.json written beside a variant: run from any folder with ``olive run --config``,
    it writes the same model to ``./olive-output/<variant>`` with Olive's default cache ``./.olive-cache``."""
    return olive_config(model_dir, spec, f"{REPRODUCE_OUTPUT_DIR}/{spec.name}", None, trust_remote_code)


# ---------------------------------------------------------------- conversion

def _pass_chain(spec: VariantSpec) -> str:
    return " → ".join(p["type"] for p in olive_passes(spec).values())


@contextlib.contextmanager
def _captured_output(log_path: Path) -> Iterator[None]:
    """Send what Olive and the builder print (stdout, stderr, Olive's log handlers) to a log file."""
    import logging as _logging

    log_path.parent.mkdir(parents=True, exist_ok=True)
    olive_handlers = [h for h in _logging.getLogger("olive").handlers
                      if isinstance(h, _logging.StreamHandler) and not isinstance(h, _logging.FileHandler)]
    real_stderr = sys.stderr
    root = _logging.getLogger()
    root_handlers, root_level = list(root.handlers), root.level
    with open(log_path, "w", encoding="utf-8") as log:
        old_streams = [h.setStream(log) for h in olive_handlers]
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                yield
        finally:
            for handler, stream in zip(olive_handlers, old_streams):
                handler.setStream(stream)
            # onnxruntime's quantizer module calls logging.basicConfig(level=INFO) on import: undo it.
            root.handlers[:] = root_handlers
            root.setLevel(root_level)
            # Libraries imported during the run bound new log handlers to the log file: unbind them.
            for lg in [_logging.getLogger(), *_logging.Logger.manager.loggerDict.values()]:
                for handler in getattr(lg, "handlers", []):
                    if isinstance(handler, _logging.StreamHandler) and handler.stream is log:
                        handler.setStream(real_stderr)


def _run_olive(config: dict, log_path: Path) -> list[tuple[Path, Path]]:
    """Run one Olive workflow; returns the (source, destination) folder copies of its output it left to us."""
    _wait_for_olive_import()  # never two threads importing Olive's modules at once
    _quiet_olive_telemetry()
    from olive.workflows import run as olive_run

    deferred: list[tuple[Path, Path]] = []
    with olive_speedups.speedups(), architectures.builder_fixes(), _deferred_output_copy(deferred), \
            _captured_output(log_path):
        olive_run(config)
    return deferred


@contextlib.contextmanager
def _deferred_output_copy(deferred: list[tuple[Path, Path]]) -> Iterator[None]:
    """Olive's last step copies the output model from its cache into output_dir: 2.4 GB for a 0.5B fp32
    model, several seconds. Record those folder copies instead, so the caller makes them on its validating
    thread while Olive already builds the next variant from the cached export (see ``_finish_copies``).
    """
    import olive.resource_path as resource_path
    from olive.cache import OliveCache

    def record_copy(src_dir, dst_dir, **_kwargs):
        Path(dst_dir).mkdir(parents=True, exist_ok=True)
        deferred.append((Path(src_dir), Path(dst_dir)))

    def save_model(self, *args, **kwargs):  # only the final save's folder copies are deferred
        with olive_speedups.patched(resource_path, "copy_dir", record_copy):
            return original_save(self, *args, **kwargs)

    with olive_speedups.patched(OliveCache, "save_model", save_model) as original_save:
        yield


def _finish_copies(deferred: list[tuple[Path, Path]], link: bool) -> None:
    """Make the output copies Olive left to us, as hardlinks when ``link``.

    Only a model no later Olive pass reads may be linked: onnx and onnx_ir refuse external data with more
    than one link. The fp32 (or fp16) export is what every quantized variant's workflow starts from, so it is
    copied; a quantized variant's final model is read by no pass of any recipe, so it is linked (no bytes
    written: 0.3 to 0.7 GB per variant of a 0.5B model).
    """
    copy = (lambda src, dst: link_or_copy(Path(src), Path(dst))) if link else shutil.copy2
    for src, dst in deferred:
        shutil.copytree(src, dst, dirs_exist_ok=True, copy_function=copy)


def _environment_as_found(convert_fn: Callable) -> Callable:
    """A conversion gives os.environ back exactly as found, unless the process is ours (``own_this_process``):
    Olive writes to it as it imports and runs (OLIVE_DISABLE_TELEMETRY, OLIVE_CACHE_DIR and others)."""

    @functools.wraps(convert_fn)
    def wrapper(*args, **kwargs):
        saved = dict(os.environ)
        try:
            return convert_fn(*args, **kwargs)
        finally:
            if not _PROCESS_OWNED.is_set() and dict(os.environ) != saved:
                for key in set(os.environ) - set(saved):
                    del os.environ[key]
                os.environ.update(saved)

    return wrapper


def _quiet_olive_telemetry() -> None:
    """Keep Olive's telemetry off unless the user turned it on (OLIVE_DISABLE_TELEMETRY=0).

    Olive 0.13 sends a heartbeat before it reads OLIVE_DISABLE_TELEMETRY; offline, the exporter then
    retries and the interpreter waits ~15 s at exit to flush it. Olive skips the heartbeat in CI, so its
    telemetry singleton is created once with CI set, and the environment restored.
    """
    if os.environ.get(OLIVE_TELEMETRY_ENV, "1") != "1":
        return
    os.environ[OLIVE_TELEMETRY_ENV] = "1"
    try:
        from olive.telemetry.telemetry import Telemetry
    except ImportError:  # another Olive layout: the env var alone must do
        return
    if Telemetry._instance is not None:
        return
    saved = os.environ.get("CI")
    os.environ["CI"] = "1"
    try:
        Telemetry()
    finally:
        if saved is None:
            os.environ.pop("CI", None)
        else:
            os.environ["CI"] = saved


def _olive_failure(log_path: Path) -> Exception:
    """Olive logs a failed pass and returns no model: recover the cause from its log."""
    import re

    text = log_path.read_text(encoding="utf-8", errors="replace") if log_path.is_file() else ""
    causes = re.findall(r"^(\w+(?:Error|Exception)): (.+)$", text, flags=re.M)
    if not causes:
        return errors.SlmopsError(f"Olive wrote no model for this variant (log: {log_path})",
                                  "check the execution provider and precision are a valid pair")
    kind, detail = causes[-1]
    errno_match = re.match(r"\[Errno (\d+)\] (.*)", detail)
    if kind == "OSError" and errno_match:  # a full disk or quota: report it as the OSError it was
        return OSError(int(errno_match.group(1)), errno_match.group(2).strip())
    return errors.SlmopsError(f"Olive failed: {kind}: {detail.strip()}", f"see the log {log_path}")


def _clean_genai_dir(folder: Path) -> None:
    for name in OLIVE_CLUTTER:
        (folder / name).unlink(missing_ok=True)
    for path in folder.rglob("*"):
        if path.is_file():
            # Some Olive passes write 0600 temp files; a model folder is meant to be shared and served.
            path.chmod(PUBLISHED_FILE_MODE)


def _graph_outputs(folder: Path) -> list[str]:
    import onnx

    cfg = modeldir.read_genai_config(folder)
    model = onnx.load(str(folder / cfg["model"]["decoder"]["filename"]), load_external_data=False)
    return [o.name for o in model.graph.output]


def validate_genai_dir(folder: str | Path, spec: VariantSpec,
                       cancel: threading.Event | None = None) -> tuple[dict, str]:
    """Check a built variant: a complete genai folder with a ``logits`` output that loads and generates.

    Returns the validation record and the weights' sha256. The load-and-generate check runs in a subprocess;
    the weights are hashed here meanwhile, on the other core. Build-only variants (their execution provider
    is not on this machine) get the folder checks only. Raises SlmopsError with what failed, and
    ``Cancelled`` (the subprocess killed) once ``cancel`` is set.
    """
    folder = Path(folder)
    modeldir.check_genai_dir(folder)
    outputs = _graph_outputs(folder)
    if LOGITS not in outputs:
        raise errors.SlmopsError(f"{folder}: the model has no {LOGITS!r} output "
                                 f"(outputs: {', '.join(outputs[:3])}...), so onnxruntime-genai cannot load it",
                                 "rename the output back to logits")
    if spec.build_only:
        return ({"loaded": False, "reason": f"{spec.execution_provider} is not available on this machine"},
                modeldir.weights_hash(folder))
    proc = subprocess.Popen([sys.executable, "-c", _VALIDATE_SCRIPT, str(folder), str(VALIDATE_NEW_TOKENS)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        weights_sha256 = modeldir.weights_hash(folder)
        out, err = _communicate(proc, cancel)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        last = (err.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        raise errors.SlmopsError(f"{folder} does not load or generate with onnxruntime-genai: {last}",
                                 "check the variant's Olive passes")
    new_tokens = json.loads(out.strip().splitlines()[-1])["new_tokens"]
    if not new_tokens:
        raise errors.SlmopsError(f"{folder} loads but generated no tokens", "check the variant's Olive passes")
    return {"loaded": True, "new_tokens": len(new_tokens)}, weights_sha256


class Cancelled(BaseException):
    """The conversion this work belonged to was interrupted (Ctrl-C): stop, clean up, publish nothing."""


def _raise_if_cancelled(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled()


def _communicate(proc: subprocess.Popen, cancel: threading.Event | None) -> tuple[str, str]:
    """proc.communicate(), given up (and raised as Cancelled) as soon as cancel is set."""
    deadline = time.monotonic() + VALIDATE_TIMEOUT_S
    while True:
        _raise_if_cancelled(cancel)
        try:
            return proc.communicate(timeout=CANCEL_POLL_S if cancel is not None else VALIDATE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            if time.monotonic() > deadline:
                raise


class _CacheDirs:
    """Paths inside the conversion cache folder."""

    def __init__(self, root: Path):
        self.root = root
        self.olive = root / "olive"
        self.entries = root / "variants"
        self.tmp = root / "tmp"
        self.logs = root / "logs"
        self.locks = root / "locks"
        self.lock = root / "convert.lock"

    def entry(self, key: str) -> Path:
        return self.entries / key

    def make(self) -> None:
        for d in (self.olive, self.entries, self.tmp, self.logs, self.locks):
            d.mkdir(parents=True, exist_ok=True)

    def work_dir(self, key: str) -> Path:
        """A new folder in tmp/ for one build; its name carries this process's PID (see remove_debris)."""
        return Path(tempfile.mkdtemp(prefix=f"{key[:16]}{WORK_PID_SEP}{os.getpid()}{WORK_PID_SEP}", dir=self.tmp))

    def remove_debris(self) -> None:
        """Under the Olive lock: drop what killed runs left half-written.

        A build folder in tmp/ whose process still runs is being validated (outside the lock): keep it.
        """
        for stale in self.tmp.iterdir() if self.tmp.is_dir() else ():
            pid = stale.name.split(WORK_PID_SEP)[1] if stale.name.count(WORK_PID_SEP) >= 2 else ""
            if not (pid.isdigit() and _process_alive(int(pid))):
                shutil.rmtree(stale, ignore_errors=True)
        runs = self.olive / "default_workflow" / "runs"
        for run in runs.iterdir() if runs.is_dir() else ():
            # Olive writes run.json only after a pass finished: a run folder without it is incomplete.
            # A failed pass is cached as model.json == {} and never retried: drop it so a full disk or
            # an interrupted build is retried on the next sweep.
            finished = (run / "run.json").is_file() and modeldir.read_json_or_empty(run / "model.json") != {}
            if run.is_dir() and not finished:
                shutil.rmtree(run, ignore_errors=True)


def complete_entry(entry: Path) -> dict | None:
    """The manifest of a finished cache entry, or None if there is none."""
    manifest = modeldir.read_json_or_empty(entry / ENTRY_MANIFEST)
    return manifest or None


@dataclass
class _Job:
    """One variant on its way from the cache lookup or Olive build to its published output folder."""

    spec: VariantSpec
    model_dir: Path
    final: Path
    dirs: _CacheDirs
    trust_remote_code: bool
    link: bool
    stage: Callable[[str], None]
    start: float  # perf_counter when the variant's conversion began
    key: str = ""
    manifest: dict | None = None  # the cache entry's manifest, once there is one
    cached: bool = False
    work: Path | None = None  # tmp/ folder of a build not yet validated
    deferred: list = field(default_factory=list)  # Olive's output copies into work/model, still to make
    build_s: float | None = None
    key_lock: _KeyLock | None = None  # held from the build until the entry is stored: each entry built once


def _look_up_or_build(job: _Job) -> None:
    """Find the variant's cache entry, else build it with Olive; a built job holds its key lock on return."""
    dirs = job.dirs
    dirs.make()
    job.stage(STAGES[0])
    job.key = entry_key(input_model_hash(job.model_dir, dirs.root, on_new_file=_import_olive_in_background),
                        job.spec, job.trust_remote_code)
    if _reuse_entry(job):
        return
    try:
        job.key_lock = _acquire_key_lock(dirs, job.key)
        if _reuse_entry(job):  # another sweep may have built it while we waited
            return
        _olive_build(job)
    except BaseException:
        _discard(job)
        raise


# One in-process lock per key file: filelock refuses (as a deadlock) a second FileLock on a path this thread
# holds, and two variants of one sweep may share a key (same spec under two names).
_LOCAL_KEY_LOCKS: dict[str, threading.Lock] = {}
_LOCAL_KEY_LOCKS_GUARD = threading.Lock()


class _KeyLock:
    """The cross-process lock of one cache key. Taken on one thread, released on another (the validating one);
    the lock file is removed while still held, so a failed or finished build leaves none."""

    def __init__(self, path: Path):
        from filelock import FileLock

        with _LOCAL_KEY_LOCKS_GUARD:
            self.local = _LOCAL_KEY_LOCKS.setdefault(str(path), threading.Lock())
        self.file_lock = FileLock(str(path), thread_local=False)

    def acquire(self) -> None:
        self.local.acquire()  # another thread of this process builds this key: wait until it stored the entry
        try:
            self.file_lock.acquire()
        except BaseException:
            self.local.release()
            raise

    def release(self) -> None:
        try:
            Path(self.file_lock.lock_file).unlink(missing_ok=True)
            self.file_lock.release()
        finally:
            self.local.release()


def _reuse_entry(job: _Job) -> bool:
    """Whether the variant's cache entry is complete; if so the job takes it as its result."""
    job.manifest = complete_entry(job.dirs.entry(job.key))
    job.cached = job.manifest is not None
    return job.cached


def _acquire_key_lock(dirs: _CacheDirs, key: str) -> _KeyLock:
    lock = _KeyLock(dirs.locks / f"{key}.lock")
    lock.acquire()
    return lock


def _olive_build(job: _Job) -> None:
    """Run the variant's Olive workflow into job.work/model, under the Olive lock (one Olive run at a time)."""
    from filelock import FileLock

    dirs, spec = job.dirs, job.spec
    job.work = dirs.work_dir(job.key)
    built = job.work / "model"
    log_path = dirs.logs / f"{spec.name}-{job.key[:12]}.log"
    try:
        with FileLock(str(dirs.lock)):
            dirs.remove_debris()
            try:
                job.stage(f"olive {_pass_chain(spec)}")
                start = time.perf_counter()
                config = olive_config(job.model_dir, spec, str(built), str(dirs.olive), job.trust_remote_code)
                job.deferred = _run_olive(config, log_path)
                job.build_s = time.perf_counter() - start
                if not any((src / modeldir.GENAI_CONFIG).is_file() for src, _ in job.deferred) and \
                        not (built / modeldir.GENAI_CONFIG).is_file():
                    raise _olive_failure(log_path)  # Olive logged a failed pass and cached it as an empty model
            except BaseException as exc:
                dirs.remove_debris()  # we hold the lock, so every incomplete Olive run is ours
                if _SIGINT_SEEN.is_set() and not isinstance(exc, KeyboardInterrupt):
                    raise KeyboardInterrupt from exc  # a Ctrl-C that an extension's import turned into ImportError
                # A full disk stays an OSError, reported as such; anything else Olive raised gets the log's path.
                if isinstance(exc, Exception) and not isinstance(exc, (OSError, errors.SlmopsError)):
                    raise errors.SlmopsError(f"Olive failed: {type(exc).__name__}: {exc}",
                                             f"see the log {log_path}") from exc
                raise
    finally:
        release_memory()


def _store_entry(job: _Job, cancel: threading.Event | None) -> dict:
    """Make Olive's deferred output copies, validate the variant and store it as cache entry <key> by one rename."""
    built = job.work / "model"
    job.stage("validate")
    _finish_copies(job.deferred, link=len(olive_passes(job.spec)) > 1)  # more than the builder: a final model
    _clean_genai_dir(built)
    validation, weights_sha256 = validate_genai_dir(built, job.spec, cancel)
    manifest = {"key": job.key, "spec": job.spec.to_dict(), "build_s": job.build_s, "validation": validation,
                "weights_sha256": weights_sha256, "versions": tool_versions(), "input_model": str(job.model_dir)}
    (built / ENTRY_MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    os.rename(built, job.dirs.entry(job.key))
    return manifest


def _discard(job: _Job) -> None:
    """Drop the job's build folder and release its key lock (the lock file is removed while still held)."""
    if job.work is not None:
        shutil.rmtree(job.work, ignore_errors=True)
        job.work = None
    if job.key_lock is not None:
        job.key_lock.release()
        job.key_lock = None


def _finish(job: _Job, cancel: threading.Event | None = None) -> ConversionResult:
    """Validate and store a fresh build, then publish the output folder; a failure becomes a failed result."""
    created: list[Path] = []
    final = job.final
    try:
        _raise_if_cancelled(cancel)
        if job.manifest is None:
            job.manifest = _store_entry(job, cancel)
        _raise_if_cancelled(cancel)
        job.stage(STAGES[3])
        created = _make_parents(final.parent)
        olive_cfg = reproduction_config(job.model_dir, job.spec, job.trust_remote_code)
        if final.exists():
            if not _same_model(job.dirs.entry(job.key), final, job.manifest["weights_sha256"]) or \
                    modeldir.read_json_or_empty(final / OLIVE_CONFIG_FILE) != olive_cfg:
                raise errors.SlmopsError(f"{final} already exists and holds something else",
                                         "pass another --output folder, or move that folder away")
        else:
            _publish(job.dirs.entry(job.key), final, olive_cfg, job.link)
    except Exception as exc:
        _remove_if_empty(created)
        return _failed(job.spec, _error_text(exc), job.start)
    except BaseException:
        _remove_if_empty(created)
        raise
    finally:
        _discard(job)
    return ConversionResult(job.spec, STATUS_OK, str(final), None, time.perf_counter() - job.start,
                            modeldir.dir_size_bytes(final), job.manifest["weights_sha256"],
                            str(final / OLIVE_CONFIG_FILE), job.cached, job.spec.build_only,
                            job.manifest.get("build_s"))


def own_this_process() -> None:
    """Let conversions tune process-wide state for speed: for a program that owns its process (the slmops CLI).

    Then glibc keeps freed memory for the next variant during a conversion (see ``_heap_reused_between_variants``)
    and what Olive writes into the environment stays. A host application that imports the library and does not
    call this keeps its heap settings and its environment exactly as they were.
    """
    _PROCESS_OWNED.set()


def release_memory() -> None:
    """Free what the last variant left in reference cycles, so variants never add up in one process.

    A conversion frees gigabytes of weight arrays, some held in reference cycles. Inside
    ``_gc_walks_only_new_objects`` the survivors are then frozen. Inside ``_heap_reused_between_variants`` the
    freed heap stays with the process for the next variant; outside it, glibc is asked to give it back.
    """
    gc.collect()
    if _FREEZE_SURVIVORS.is_set():
        gc.freeze()
    libc = _glibc()
    if libc is not None and not _HEAP_REUSED.is_set():
        libc.malloc_trim(0)


@functools.cache
def _glibc():
    """glibc through ctypes (looked up once), or None elsewhere (musl, macOS, Windows): there the heap is left
    to the platform."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


# glibc's mallopt parameters (malloc.h) and their defaults.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_GLIBC_DEFAULTS = ((_M_TRIM_THRESHOLD, 128 * 1024), (_M_MMAP_MAX, 65536))
# What a user sets to tune glibc's heap; any of these and the heap is left as they set it.
_MALLOC_ENV = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")


@contextlib.contextmanager
def _heap_reused_between_variants() -> Iterator[None]:
    """Within a conversion, memory freed by one model is reused by the next instead of going back to the OS.

    Every pass loads a model, fills gigabytes of fresh arrays and frees them. glibc serves blocks over 32 MB
    with mmap and unmaps them on free, and trims the heap top, so the next pass faults every page in again.
    That costs 0.2 s per GiB on bare metal and up to 3 s per GiB on a VM whose host takes freed guest memory
    back (the measured machine in docs/benchmarks.md). Inside, glibc takes every block from the heap and never
    trims it: the process keeps its high-water mark, which one variant sets, since variants never live
    together. On the way out the defaults come back and the heap is trimmed.

    Only in a process that is ours (``own_this_process``): glibc cannot report its settings, so the defaults it
    restores could undo a host application's own mallopt calls. Nested calls, non-glibc platforms and a user who
    tuned glibc's heap (GLIBC_TUNABLES, MALLOC_*_) are left alone too.
    """
    libc = _glibc()
    tuned = "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "") or any(v in os.environ for v in _MALLOC_ENV)
    if libc is None or tuned or _HEAP_REUSED.is_set() or not _PROCESS_OWNED.is_set():
        yield
        return
    _HEAP_REUSED.set()
    try:
        libc.mallopt(_M_MMAP_MAX, 0)
        libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
        yield
    finally:
        for param, value in _GLIBC_DEFAULTS:
            libc.mallopt(param, value)
        _HEAP_REUSED.clear()
        libc.malloc_trim(0)


@contextlib.contextmanager
def _gc_walks_only_new_objects() -> Iterator[None]:
    """Within a sweep, each collection in release_memory walks only what the last variant allocated.

    With Olive, torch and transformers imported, a full collection walks half a million objects (0.25 to 0.5 s
    on the critical path, once per variant). What survives one is frozen (``gc.freeze``) so the next skips it;
    everything is unfrozen at the end. A host application that froze objects itself is left alone.
    """
    if gc.get_freeze_count() or _FREEZE_SURVIVORS.is_set():
        yield
        return
    _FREEZE_SURVIVORS.set()
    try:
        yield
    finally:
        _FREEZE_SURVIVORS.clear()
        gc.unfreeze()


def _entry_files(entry: Path) -> list[Path]:
    return [p for p in sorted(entry.rglob("*")) if p.is_file() and p.name != ENTRY_MANIFEST]


def _same_model(entry: Path, existing: Path, weights_sha256: str) -> bool:
    """Whether an existing output folder already holds exactly this cache entry."""
    files = _entry_files(entry)
    names = {str(p.relative_to(entry)) for p in files} | {OLIVE_CONFIG_FILE}
    have = {str(p.relative_to(existing)) for p in existing.rglob("*") if p.is_file()}
    if names != have:
        return False
    if all(os.path.samefile(p, existing / p.relative_to(entry)) for p in files):
        return True  # hardlinks of the entry itself
    try:
        return modeldir.weights_hash(existing) == weights_sha256
    except errors.SlmopsError:
        return False


def _publish(entry: Path, final: Path, olive_cfg: dict, link: bool) -> None:
    """Build the output folder beside its final place, then rename it in: all of it or nothing."""
    _remove_dead_partials(final)
    tmp = final.parent / f".{final.name}{PARTIAL_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        for src in _entry_files(entry):
            if link:
                link_or_copy(src, tmp / src.relative_to(entry))
            else:
                shutil.copy2(src, tmp / src.relative_to(entry))
        (tmp / OLIVE_CONFIG_FILE).write_text(json.dumps(olive_cfg, indent=2) + "\n", encoding="utf-8")
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _remove_dead_partials(final: Path) -> None:
    """Remove partial folders of this output that a killed process (SIGKILL: no cleanup ran) left behind.

    The partial folder's name carries the writer's PID; one whose writer still runs is another publish at work.
    """
    for partial in final.parent.glob(f".{glob.escape(final.name)}{PARTIAL_TAG}*"):
        pid = partial.name[len(f".{final.name}{PARTIAL_TAG}"):].split("-", 1)[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(partial, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, but another user's
    return True


def _make_parents(path: Path) -> list[Path]:
    """mkdir -p, returning the folders it created (deepest last) so a failure can remove just those."""
    created = []
    for parent in reversed([path, *path.parents]):
        if not parent.exists():
            parent.mkdir()
            created.append(parent)
    return created


def _remove_if_empty(folders: list[Path]) -> None:
    for folder in reversed(folders):
        with contextlib.suppress(OSError):
            folder.rmdir()  # only succeeds on an empty folder: never deletes what anyone wrote


def _check_output_path(final: Path) -> None:
    for parent in [final.parent, *final.parent.parents]:
        if parent.exists() and not parent.is_dir():
            raise errors.SlmopsError(f"output path {parent} is a file, expected a folder", "pass a folder for --output")


def _failed(spec: VariantSpec, error: str, start: float) -> ConversionResult:
    return ConversionResult(spec, STATUS_FAILED, None, error, time.perf_counter() - start, None, None, None,
                            False, spec.build_only)


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, errors.SlmopsError):
        return exc.message
    if isinstance(exc, OSError):
        target = exc.filename2 or exc.filename  # a copy names its source, then the destination that failed
        where = f" ({target})" if target else ""
        return f"{exc.strerror or exc}{where}; check free disk space and permissions"
    return f"{type(exc).__name__}: {exc}"


@_environment_as_found
def convert_variant(model_dir: str | Path, spec: VariantSpec, output_dir: str | Path, *,
                    cache_dir: str | Path | None, trust_remote_code: bool = False,
                    on_stage: Callable[[str], None] | None = None, link: bool = True) -> ConversionResult:
    """Convert one variant of a Hugging Face model into the genai folder ``output_dir``.

    A cached variant is hardlinked from the cache without running Olive. A failure of this variant
    (Olive error, validation, full disk) is returned as ``status="failed"`` with its error, and leaves
    no partial folder; Ctrl-C removes the partial folder and re-raises.

    Args:
        model_dir: the Hugging Face model folder.
        spec: the variant to build.
        output_dir: the variant's own folder, e.g. ``out/int4``; created, or reused if it already holds
            exactly this variant.
        cache_dir: conversion cache folder; None for ``$SLMOPS_CACHE_DIR`` or ``~/.cache/mlflow-slmops``.
        trust_remote_code: allow models whose config asks to run custom code.
        on_stage: called with the name of each stage as it starts (for a progress bar).
        link: hardlink the files from the cache (instant, no extra disk). onnx.load and onnx_ir refuse
            external data with several links, so pass False for real copies if you will read the
            folder with them (onnxruntime and onnxruntime-genai do not mind).

    Raises:
        SlmopsError: only for input every variant shares: the model folder, or an output path that is a file.

    Example:
        >>> r = convert_variant("./my-model", PRESETS["int4"], "./out/int4", cache_dir=None)  # doctest: +SKIP
        >>> r.status, r.output_dir  # doctest: +SKIP
        ('ok', './out/int4')
    """
    stage = on_stage or (lambda _name: None)
    job = _new_job(model_dir, spec, output_dir, cache_dir, trust_remote_code, link, stage)
    try:
        with _sigint_noted(), _heap_reused_between_variants():
            _look_up_or_build(job)
    except Exception as exc:
        _wait_for_olive_import()
        return _failed(spec, _error_text(exc), job.start)
    _wait_for_olive_import()  # started for a new input that turned out cached (Ctrl-C does not wait for it)
    return _finish(job)


def _new_job(model_dir, spec: VariantSpec, output_dir, cache_dir, trust_remote_code: bool, link: bool,
             stage: Callable[[str], None]) -> _Job:
    """Check the input every variant shares (raises SlmopsError) and start the variant's clock."""
    start = time.perf_counter()
    model_dir = Path(model_dir).resolve()
    final = Path(output_dir).absolute()
    check_hf_model_dir(model_dir, trust_remote_code)
    _check_output_path(final)
    dirs = _CacheDirs(Path(cache_dir).expanduser().absolute() if cache_dir else default_cache_dir())
    return _Job(spec, model_dir, final, dirs, trust_remote_code, link, stage, start)


@_environment_as_found
def convert_variants(model_dir: str | Path, specs: list[VariantSpec], output_dir: str | Path, *,
                     cache_dir: str | Path | None = None, trust_remote_code: bool = False,
                     progress: bool = True, link: bool = True) -> list[ConversionResult]:
    """Convert every variant into ``output_dir/<variant name>/``; one failure never stops the others.

    Olive builds one variant at a time in this process; while it builds the next one, a second thread
    validates the last one (its load-and-generate subprocess runs on the other core) and publishes it.

    Args:
        model_dir: the Hugging Face model folder.
        specs: the variants, e.g. ``resolve_variants("fp32,int8,int4")``.
        output_dir: parent folder of the variant folders.
        cache_dir: conversion cache; None for ``$SLMOPS_CACHE_DIR`` or ``~/.cache/mlflow-slmops``.
        trust_remote_code: allow models whose config asks to run custom code.
        progress: draw rich progress bars on stderr.
        link: hardlink from the cache (default) or copy; see ``convert_variant``.

    Raises:
        SlmopsError: for bad shared input (the model folder, an output path that is a file), before any work.

    Example:
        >>> from mlflow_slmops.variants import resolve_variants
        >>> results = convert_variants("./my-model", resolve_variants("fp32,int4"), "./out")  # doctest: +SKIP
        >>> [(r.spec.name, r.status) for r in results]  # doctest: +SKIP
        [('fp32', 'ok'), ('int4', 'ok')]
    """
    from concurrent.futures import ThreadPoolExecutor

    from mlflow_slmops.progress import make_progress

    check_hf_model_dir(model_dir, trust_remote_code)
    check_cache_dir(cache_dir)
    root = Path(output_dir).absolute()
    _check_output_path(root / "x")
    created = _make_parents(root)
    cancel = threading.Event()
    try:
        with make_progress(progress) as bars, ThreadPoolExecutor(1, thread_name_prefix="slmops-validate") as pool, \
                _gc_walks_only_new_objects(), _heap_reused_between_variants(), _sigint_noted():
            reporter = _InOrderReporter(bars, len(specs), progress)
            try:
                for spec in specs:
                    task = bars.add_task(f"{spec.name}: queued", total=len(STAGES))
                    job = _new_job(model_dir, spec, root / spec.name, cache_dir, trust_remote_code, link,
                                   _stage_reporter(bars, task, spec.name))
                    try:
                        _look_up_or_build(job)
                    except Exception as exc:
                        reporter.add(task, _done(_failed(spec, _error_text(exc), job.start)))
                    else:
                        reporter.add(task, pool.submit(_finish, job, cancel))
                    reporter.report(wait=False)
                reporter.report(wait=True)
            except BaseException:
                cancel.set()  # the validating thread kills its subprocess and removes what it had not published
                raise
    finally:
        _remove_if_empty(created)  # a run where nothing was written leaves no empty output folder
    _wait_for_olive_import()  # started for a new input that turned out cached: never left running
    return reporter.results


def _done(result: ConversionResult) -> Future:
    future: Future = Future()
    future.set_result(result)
    return future


class _InOrderReporter:
    """Finishes the variants' bars and log lines in the order the variants were given."""

    def __init__(self, bars, total: int, progress: bool):
        self.bars, self.console = bars, bars.console if progress else None
        self.overall = bars.add_task("variants", total=total)
        self.pending: list[tuple[object, Future]] = []
        self.results: list[ConversionResult] = []

    def add(self, task, future: Future) -> None:
        self.pending.append((task, future))

    def report(self, wait: bool) -> None:
        while self.pending and (wait or self.pending[0][1].done()):
            task, future = self.pending.pop(0)
            result = future.result()
            self.bars.update(task, completed=len(STAGES), description=f"{result.spec.name}: {result.status}")
            self.bars.advance(self.overall)
            _log_result(result, self.console)
            self.results.append(result)


def _stage_reporter(bars, task, name: str) -> Callable[[str], None]:
    def report(stage: str) -> None:
        done = next((i for i, s in enumerate(STAGES) if stage.startswith(s)), 0)
        bars.update(task, completed=done, description=f"{name}: {stage}")
    return report


def _log_result(result: ConversionResult, console) -> None:
    name = result.spec.name
    if result.status == STATUS_OK:
        how = "from cache" if result.cached else f"built in {result.convert_s:.1f} s"
        line = f"{name}: {result.output_dir} ({how}{', build-only' if result.build_only else ''})"
        logger.info(line)
    else:
        line = f"{name}: FAILED: {result.error}"
        logger.warning(line)
    if console is not None:
        console.print(line, markup=False, highlight=False, soft_wrap=True)


def results_table(results: list[ConversionResult]):
    """A rich Table of conversion results: variant, status, size, time, cache, folder or error."""
    from rich.table import Table

    table = Table(title="Conversion results")
    for col in ("variant", "status", "size MB", "seconds", "cached", "build-only", "folder / error"):
        table.add_column(col, overflow="fold")
    for r in results:
        size = f"{r.size_bytes / 2**20:.1f}" if r.size_bytes is not None else "-"
        table.add_row(r.spec.name, r.status, size, f"{r.convert_s:.1f}", "yes" if r.cached else "no",
                      "yes" if r.build_only else "no", r.output_dir or r.error or "")
    return table
