"""The conversion cache's entries and the output folders published from them.

A finished, validated variant is stored as ``variants/<key>/`` by one rename, its key the input model's content,
the spec, the tool versions and the recipe (``entry_key``). A per-key file lock makes each entry built once across
processes. Output folders are assembled beside their final place and renamed in (``publish``), so a failure,
Ctrl-C or a full disk never leaves a partial variant folder."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
import tempfile
import threading
import uuid
from pathlib import Path

from mlflow_slmops import errors
from mlflow_slmops._files import link_or_copy
from mlflow_slmops.convert import recipe
from mlflow_slmops.convert.olive import fixes
from mlflow_slmops.genai import modeldir
from mlflow_slmops.variants import VariantSpec, key_body

# An output folder is assembled as ".<variant>.partial-<pid>-<random>" beside its place, then renamed in.
PARTIAL_TAG = ".partial-"


OLIVE_CONFIG_FILE = "olive_config.json"


ENTRY_MANIFEST = "slmops_entry.json"


# A build folder in tmp/ is named "<key prefix>-<pid>-<random>", so debris cleanup can spare live builds.
WORK_PID_SEP = "-"


def entry_key(input_hash: str, spec: VariantSpec, trust_remote_code: bool = False,
              calibration_sha256: str | None = None) -> str:
    """The cache key of one variant: input content, spec (its name aside), tool versions, recipe, and for a
    calibrated variant the calibration text's sha256."""
    body = {"input": input_hash, "spec": key_body(spec), "versions": recipe.tool_versions(),
            "recipe": recipe.RECIPE_VERSION, "trust_remote_code": trust_remote_code}
    if spec.calibrated:
        body["calibration"] = calibration_sha256
    if applied := fixes.fixes_for(spec):  # only the variants a fix changes get a new key
        body["olive_fixes"] = applied
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


class CacheDirs:
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
            if not (pid.isdigit() and process_alive(int(pid))):
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


# One in-process lock per key file: filelock refuses (as a deadlock) a second FileLock on a path this thread
# holds, and two variants of one sweep may share a key (same spec under two names).
_LOCAL_KEY_LOCKS: dict[str, threading.Lock] = {}


_LOCAL_KEY_LOCKS_GUARD = threading.Lock()


class KeyLock:
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


def acquire_key_lock(dirs: CacheDirs, key: str) -> KeyLock:
    lock = KeyLock(dirs.locks / f"{key}.lock")
    lock.acquire()
    return lock


def _entry_files(entry: Path) -> list[Path]:
    return [p for p in sorted(entry.rglob("*")) if p.is_file() and p.name != ENTRY_MANIFEST]


def same_model(entry: Path, existing: Path, weights_sha256: str) -> bool:
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


def publish(entry: Path, final: Path, olive_cfg: dict, link: bool) -> None:
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
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(partial, ignore_errors=True)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, but another user's
    return True


def make_parents(path: Path) -> list[Path]:
    """mkdir -p, returning the folders it created (deepest last) so a failure can remove just those."""
    created = []
    for parent in reversed([path, *path.parents]):
        if not parent.exists():
            parent.mkdir()
            created.append(parent)
    return created


def remove_if_empty(folders: list[Path]) -> None:
    for folder in reversed(folders):
        with contextlib.suppress(OSError):
            folder.rmdir()  # only succeeds on an empty folder: never deletes what anyone wrote


def check_output_path(final: Path) -> None:
    for parent in [final.parent, *final.parent.parents]:
        if parent.exists() and not parent.is_dir():
            raise errors.SlmopsError(f"output path {parent} is a file, expected a folder", "pass a folder for --output")
