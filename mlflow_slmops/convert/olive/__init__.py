"""The Olive adapter: the only module that imports Olive (``speedups`` beside it patches Olive's internals).

It imports Olive on a thread while the input is hashed, runs one workflow with its output captured into a log,
defers Olive's last output copy to the caller, keeps Olive's telemetry quiet and recovers a failed pass's cause
from the log."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import threading
from pathlib import Path
from typing import Iterator

from mlflow_slmops import errors
from mlflow_slmops._files import link_or_copy
from mlflow_slmops.convert import architectures
from mlflow_slmops.convert.olive import fixes, speedups

OLIVE_TELEMETRY_ENV = "OLIVE_DISABLE_TELEMETRY"


# The thread importing Olive while the input model is hashed (see import_in_background).
_olive_import: threading.Thread | None = None


# Set by a Ctrl-C during a conversion (see sigint_noted).
SIGINT_SEEN = threading.Event()


def import_in_background() -> None:
    """Import Olive (5 to 6 s of one core) on a thread while this one hashes the input model (the hashing
    releases the GIL). Started only for an input file not hashed before, so a build is all but certain and
    a cached sweep never imports Olive; ``run``, and every conversion before it returns, wait for it,
    so no other code imports Olive's modules while it does."""
    global _olive_import
    if _olive_import is None and "olive.workflows" not in sys.modules:
        _olive_import = threading.Thread(target=_import_olive, name="slmops-import-olive", daemon=True)
        _olive_import.start()


def _import_olive() -> None:
    with contextlib.suppress(Exception):  # the import in run raises it again, where it is reported
        quiet_telemetry()
        import olive.workflows  # noqa: F401


@contextlib.contextmanager
def sigint_noted() -> Iterator[None]:
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
        SIGINT_SEEN.set()
        previous(signum, frame)

    signal.signal(signal.SIGINT, note_and_raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        SIGINT_SEEN.clear()


def wait_for_import() -> None:
    global _olive_import
    if _olive_import is not None:
        _olive_import.join()
        _olive_import = None


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


def run(config: dict, log_path: Path) -> list[tuple[Path, Path]]:
    """Run one Olive workflow; returns the (source, destination) folder copies of its output it left to us."""
    wait_for_import()  # never two threads importing Olive's modules at once
    quiet_telemetry()
    from olive.workflows import run as olive_run

    deferred: list[tuple[Path, Path]] = []
    # The capture first: the builder fixes import onnxruntime-genai's builder, which imports onnxruntime's
    # quantizer, which calls logging.basicConfig(level=INFO); the capture puts the root logger back as found.
    with _captured_output(log_path), speedups.speedups(), fixes.olive_fixes(), architectures.builder_fixes(), \
            _deferred_output_copy(deferred):
        olive_run(config)
    return deferred


@contextlib.contextmanager
def _deferred_output_copy(deferred: list[tuple[Path, Path]]) -> Iterator[None]:
    """Olive's last step copies the output model from its cache into output_dir: 2.4 GB for a 0.5B fp32
    model, several seconds. Record those folder copies instead, so the caller makes them on its validating
    thread while Olive already builds the next variant from the cached export (see ``finish_copies``).
    """
    import olive.resource_path as resource_path
    from olive.cache import OliveCache

    def record_copy(src_dir, dst_dir, **_kwargs):
        Path(dst_dir).mkdir(parents=True, exist_ok=True)
        deferred.append((Path(src_dir), Path(dst_dir)))

    def save_model(self, *args, **kwargs):  # only the final save's folder copies are deferred
        with speedups.patched(resource_path, "copy_dir", record_copy):
            return original_save(self, *args, **kwargs)

    with speedups.patched(OliveCache, "save_model", save_model) as original_save:
        yield


def finish_copies(deferred: list[tuple[Path, Path]], link: bool) -> None:
    """Make the output copies Olive left to us, as hardlinks when ``link``.

    Only a model no later Olive pass reads may be linked: onnx and onnx_ir refuse external data with more
    than one link. The fp32 (or fp16) export is what every quantized variant's workflow starts from, so it is
    copied; a quantized variant's final model is read by no pass of any recipe, so it is linked (no bytes
    written: 0.3 to 0.7 GB per variant of a 0.5B model).
    """
    copy = (lambda src, dst: link_or_copy(Path(src), Path(dst))) if link else shutil.copy2
    for src, dst in deferred:
        shutil.copytree(src, dst, dirs_exist_ok=True, copy_function=copy)


def quiet_telemetry() -> None:
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


def failure_from_log(log_path: Path) -> Exception:
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
