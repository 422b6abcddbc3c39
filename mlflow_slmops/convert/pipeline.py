"""The conversion pipeline: every variant from cache lookup or Olive build to its published output folder.

Every variant is an Olive workflow run in this process (``olive.run``). All workflows share one Olive cache, so
the fp32 ``ModelBuilder`` export is made once and every quantized variant starts from it. On top of Olive's cache
sits a content-addressed cache of finished, validated variant folders (``cache``): re-running a sweep re-converts
nothing.

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
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from mlflow_slmops import calibration as calibration_module
from mlflow_slmops import errors
from mlflow_slmops.calibration import Calibration
from mlflow_slmops.convert import cache, inputs, olive, process, recipe, validate
from mlflow_slmops.genai import modeldir
from mlflow_slmops.variants import VariantSpec

logger = logging.getLogger(__name__)


logger = logging.getLogger(__name__)


STATUS_OK = "ok"


STATUS_FAILED = "failed"


# Stages reported to the progress bar, in order.
STAGES = ("hash input", "olive", "validate", "publish")


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
    calibration: Calibration | None = None  # the calibration text a calibrated (GPTQ) variant was built from

    def to_dict(self) -> dict:
        data = asdict(self)
        data["spec"] = self.spec.to_dict()
        return data


@dataclass
class _Job:
    """One variant on its way from the cache lookup or Olive build to its published output folder."""

    spec: VariantSpec
    model_dir: Path
    final: Path
    dirs: cache.CacheDirs
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
    key_lock: cache.KeyLock | None = None  # held from the build until the entry is stored: each entry built once
    calibration: Calibration | None = None  # the calibration text of a calibrated (GPTQ) variant


def _look_up_or_build(job: _Job) -> None:
    """Find the variant's cache entry, else build it with Olive; a built job holds its key lock on return."""
    dirs = job.dirs
    dirs.make()
    job.stage(STAGES[0])
    job.key = cache.entry_key(inputs.input_model_hash(job.model_dir, dirs.root, on_new_file=olive.import_in_background),
                        job.spec, job.trust_remote_code, job.calibration.sha256 if job.calibration else None)
    if _reuse_entry(job):
        return
    try:
        job.key_lock = cache.acquire_key_lock(dirs, job.key)
        if _reuse_entry(job):  # another sweep may have built it while we waited
            return
        _olive_build(job)
    except BaseException:
        _discard(job)
        raise


def _reuse_entry(job: _Job) -> bool:
    """Whether the variant's cache entry is complete; if so the job takes it as its result."""
    job.manifest = cache.complete_entry(job.dirs.entry(job.key))
    job.cached = job.manifest is not None
    return job.cached


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
                job.stage(f"olive {recipe.pass_chain(spec)}")
                start = time.perf_counter()
                config = recipe.olive_config(job.model_dir, spec, str(built), str(dirs.olive), job.trust_remote_code,
                                             job.calibration)
                job.deferred = olive.run(config, log_path)
                job.build_s = time.perf_counter() - start
                if not any((src / modeldir.GENAI_CONFIG).is_file() for src, _ in job.deferred) and \
                        not (built / modeldir.GENAI_CONFIG).is_file():
                    raise olive.failure_from_log(log_path)  # Olive logged a failed pass and cached it as an empty model
            except BaseException as exc:
                dirs.remove_debris()  # we hold the lock, so every incomplete Olive run is ours
                if olive.SIGINT_SEEN.is_set() and not isinstance(exc, KeyboardInterrupt):
                    raise KeyboardInterrupt from exc  # a Ctrl-C that an extension's import turned into ImportError
                # A full disk stays an OSError, reported as such; anything else Olive raised gets the log's path.
                if isinstance(exc, Exception) and not isinstance(exc, (OSError, errors.SlmopsError)):
                    raise errors.SlmopsError(f"Olive failed: {type(exc).__name__}: {exc}",
                                             f"see the log {log_path}") from exc
                raise
    finally:
        process.release_memory()


def _store_entry(job: _Job, cancel: threading.Event | None) -> dict:
    """Make Olive's deferred output copies, validate the variant and store it as cache entry <key> by one rename."""
    built = job.work / "model"
    job.stage("validate")
    olive.finish_copies(job.deferred, link=len(recipe.olive_passes(job.spec, {})) > 1)  # more than the builder: a final model
    validate.clean_genai_dir(built)
    validation, weights_sha256 = validate.validate_genai_dir(built, job.spec, cancel)
    manifest = {"key": job.key, "spec": job.spec.to_dict(), "build_s": job.build_s, "validation": validation,
                "weights_sha256": weights_sha256, "versions": recipe.tool_versions(), "input_model": str(job.model_dir),
                "calibration": job.calibration.to_dict() if job.calibration else None}
    (built / cache.ENTRY_MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
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
        validate.raise_if_cancelled(cancel)
        if job.manifest is None:
            job.manifest = _store_entry(job, cancel)
        validate.raise_if_cancelled(cancel)
        job.stage(STAGES[3])
        created = cache.make_parents(final.parent)
        olive_cfg = recipe.reproduction_config(job.model_dir, job.spec, job.trust_remote_code, job.calibration)
        if final.exists():
            if not cache.same_model(job.dirs.entry(job.key), final, job.manifest["weights_sha256"]) or \
                    modeldir.read_json_or_empty(final / cache.OLIVE_CONFIG_FILE) != olive_cfg:
                raise errors.SlmopsError(f"{final} already exists and holds something else",
                                         "pass another --output folder, or move that folder away")
        else:
            cache.publish(job.dirs.entry(job.key), final, olive_cfg, job.link)
    except Exception as exc:
        cache.remove_if_empty(created)
        return _failed(job.spec, _error_text(exc), job.start)
    except BaseException:
        cache.remove_if_empty(created)
        raise
    finally:
        _discard(job)
    return ConversionResult(job.spec, STATUS_OK, str(final), None, time.perf_counter() - job.start,
                            modeldir.dir_size_bytes(final), job.manifest["weights_sha256"],
                            str(final / cache.OLIVE_CONFIG_FILE), job.cached, job.spec.build_only,
                            job.manifest.get("build_s"), job.calibration)


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


@process.environment_as_found
def convert_variant(model_dir: str | Path, spec: VariantSpec, output_dir: str | Path, *,
                    cache_dir: str | Path | None, trust_remote_code: bool = False,
                    on_stage: Callable[[str], None] | None = None, link: bool = True,
                    calibration: str | Path | Calibration | None = None) -> ConversionResult:
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
        calibration: the calibration text of a calibrated (GPTQ) variant: a text or QA JSONL file, or a
            ``Calibration``; None for the packaged default (``calibration.prepare``).

    Raises:
        SlmopsError: only for input every variant shares: the model folder, or an output path that is a file.

    Example:
        >>> r = convert_variant("./my-model", PRESETS["int4"], "./out/int4", cache_dir=None)  # doctest: +SKIP
        >>> r.status, r.output_dir  # doctest: +SKIP
        ('ok', './out/int4')
    """
    stage = on_stage or (lambda _name: None)
    job = _new_job(model_dir, spec, output_dir, cache_dir, trust_remote_code, link, stage)
    job.calibration = calibration_for([spec], calibration, job.dirs.root)
    try:
        with olive.sigint_noted(), process.heap_reused_between_variants():
            _look_up_or_build(job)
    except Exception as exc:
        olive.wait_for_import()
        return _failed(spec, _error_text(exc), job.start)
    olive.wait_for_import()  # started for a new input that turned out cached (Ctrl-C does not wait for it)
    return _finish(job)


def calibration_for(specs: list[VariantSpec], calibration: str | Path | Calibration | None,
                    cache_root: str | Path | None) -> Calibration | None:
    """The stored calibration text when any of the specs is calibrated (None: the packaged default), else None."""
    if not any(s.calibrated for s in specs):
        return None
    if isinstance(calibration, Calibration):
        return calibration
    root = Path(cache_root) if cache_root else inputs.check_cache_dir(None)
    return calibration_module.prepare(calibration, root)


def _new_job(model_dir, spec: VariantSpec, output_dir, cache_dir, trust_remote_code: bool, link: bool,
             stage: Callable[[str], None]) -> _Job:
    """Check the input every variant shares (raises SlmopsError) and start the variant's clock."""
    start = time.perf_counter()
    model_dir = Path(model_dir).resolve()
    final = Path(output_dir).absolute()
    inputs.check_hf_model_dir(model_dir, trust_remote_code)
    cache.check_output_path(final)
    dirs = cache.CacheDirs(Path(cache_dir).expanduser().absolute() if cache_dir else inputs.default_cache_dir())
    return _Job(spec, model_dir, final, dirs, trust_remote_code, link, stage, start)


@process.environment_as_found
def convert_variants(model_dir: str | Path, specs: list[VariantSpec], output_dir: str | Path, *,
                     cache_dir: str | Path | None = None, trust_remote_code: bool = False,
                     progress: bool = True, link: bool = True,
                     calibration: str | Path | Calibration | None = None) -> list[ConversionResult]:
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
        calibration: the calibration text of the calibrated variants; see ``convert_variant``.

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

    inputs.check_hf_model_dir(model_dir, trust_remote_code)
    cal = calibration_for(specs, calibration, inputs.check_cache_dir(cache_dir))
    root = Path(output_dir).absolute()
    cache.check_output_path(root / "x")
    created = cache.make_parents(root)
    cancel = threading.Event()
    try:
        with make_progress(progress) as bars, ThreadPoolExecutor(1, thread_name_prefix="slmops-validate") as pool, \
                process.gc_walks_only_new_objects(), process.heap_reused_between_variants(), olive.sigint_noted():
            reporter = _InOrderReporter(bars, len(specs), progress)
            try:
                for spec in specs:
                    task = bars.add_task(f"{spec.name}: queued", total=len(STAGES))
                    job = _new_job(model_dir, spec, root / spec.name, cache_dir, trust_remote_code, link,
                                   _stage_reporter(bars, task, spec.name))
                    job.calibration = cal if spec.calibrated else None
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
        cache.remove_if_empty(created)  # a run where nothing was written leaves no empty output folder
    olive.wait_for_import()  # started for a new input that turned out cached: never left running
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
