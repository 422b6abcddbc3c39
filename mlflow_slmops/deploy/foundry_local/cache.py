"""The Foundry Local model cache on disk: layout, atomic writes, the per-name lock, provenance, hardlinks.

Layout (what Foundry Local's scanner and the v1 ``foundry`` CLI read)::

    <cache>/<publisher>/<name>-<version>/      the model ID <name>:<version>, ':' written as '-'
        genai_config.json                       a fresh file: the model's, with our search defaults
        model.onnx, model.onnx.data, ...        hardlinked (or reflinked) from the artifact store; else copied
        tokenizer.json, chat_template.jinja ... copied
        slmops_provenance.json                  what was deployed from where; marks the folder as ours
        inference_model.json                    {"Name": "<name>:<version>", "PromptTemplate": {...}}: written last

Safety, modelled on Foundry's own downloads: a folder is built under a temporary name beside its final place
(same filesystem) with an empty ``download.tmp`` inside, which makes Foundry's scanner skip it;
``inference_model.json`` is written last; then the folder is renamed into place (or atomically exchanged with
the old one on Linux) and the marker removed. A kill at any point leaves the old folder untouched and no
half-written folder visible. A ``filelock`` per name makes concurrent writers of one name fail fast.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import subprocess
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from mlflow_slmops._files import link_or_copy, write_json_atomic
from mlflow_slmops.errors import SlmopsError
from mlflow_slmops.genai import modeldir

INFERENCE_MODEL_FILE = "inference_model.json"
PROVENANCE_FILE = "slmops_provenance.json"
DOWNLOAD_MARKER = "download.tmp"  # Foundry's own "incomplete" marker; its scanner skips such folders
TOOL = "mlflow-slmops"
PROVENANCE_SCHEMA = 1
STAGING_TAG = ".slmops-tmp-"
TRASH_TAG = ".slmops-trash-"
LOCK_SUFFIX = ".slmops.lock"
# mkdir-and-lock attempts, for the moment another deploy removes an empty publisher folder between the two.
LOCK_ATTEMPTS = 3
MAX_NAME_LEN = 200
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")
DEFAULT_CACHE = Path("~/.foundry/cache/models")
FOUNDRY_CLI_TIMEOUT_S = 30
# Test hook (documented in docs/deploy.md): pause after the weights are placed, before the commit.
PAUSE_ENV = "SLMOPS_TEST_PAUSE_BEFORE_COMMIT"
PAUSE_POLL_S = 0.1
PAUSE_MAX_S = 600
# Linux renameat2 flag: swap two paths in one atomic step.
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def validate_name(name: str, what: str = "deployment name") -> str:
    """Refuse anything that could escape the cache or that Foundry model IDs do not allow."""
    if not isinstance(name, str) or not name:
        raise SlmopsError(f"the {what} is empty", f"pass a {what} such as qwen-support")
    shown = name.replace("\x00", "\\0")
    if len(name) > MAX_NAME_LEN:
        raise SlmopsError(f"the {what} has {len(name)} characters, at most {MAX_NAME_LEN} are allowed", "use a shorter name")
    if "/" in name or "\\" in name or ".." in name or "\x00" in name or os.path.isabs(name):
        raise SlmopsError(
            f"the {what} {shown!r} contains a path separator, '..' or NUL",
            "use only letters, digits, '.', '_' and '-', starting with a letter or digit",
        )
    if not NAME_RE.match(name):
        raise SlmopsError(
            f"the {what} {shown!r} has characters Foundry model IDs do not allow",
            "use only letters, digits, '.', '_' and '-', starting with a letter or digit",
        )
    return name


def folder_name(model_id: str) -> str:
    """Foundry writes ':' of a model ID as '-' in folder names (qwen:3 -> qwen-3)."""
    return model_id.replace(":", "-")


def foundry_cli_cache_dir() -> Path | None:
    """The v1 `foundry` CLI's cache folder (`foundry cache location`), if the CLI is on the PATH."""
    exe = shutil.which("foundry")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "cache", "location"], capture_output=True, text=True, timeout=FOUNDRY_CLI_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return None
    # It prints "💾 Cache directory path: <path>".
    match = re.search(r"Cache directory path:\s*(.+)", out.stdout)
    return Path(match.group(1).strip()) if match else None


def default_cache_dir() -> Path:
    return foundry_cli_cache_dir() or DEFAULT_CACHE.expanduser()


def cache_dir_from_target(target_uri: str) -> Path:
    """``foundry-local`` -> the default cache; ``foundry-local:/abs/path`` -> that folder."""
    from urllib.parse import urlparse

    parsed = urlparse(target_uri)
    if not parsed.scheme:
        return check_cache_dir(default_cache_dir())
    if parsed.netloc or not parsed.path.startswith("/"):
        raise SlmopsError(
            f"target {target_uri!r} does not name an absolute cache folder",
            "use -t foundry-local for the default cache or -t foundry-local:/absolute/path",
        )
    return check_cache_dir(Path(parsed.path))


def check_cache_dir(path: Path) -> Path:
    if path.exists() and not path.is_dir():
        raise SlmopsError(f"the Foundry cache path {path} is a file, expected a folder", "point -t foundry-local:/path at a folder")
    return path


@dataclass
class Provenance:
    """What a deployed folder holds and where it came from. Its presence marks the folder as ours."""

    deployment_name: str
    model_id: str
    publisher: str
    source_uri: str
    registered_model_name: str | None = None
    registered_model_version: str | None = None
    run_id: str | None = None
    logged_model_id: str | None = None
    weights_sha256: str | None = None
    deployed_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="microseconds"))
    config: dict = field(default_factory=dict)
    link_mode: str = "copy"
    slmops_version: str = ""
    tool: str = TOOL
    schema: int = PROVENANCE_SCHEMA

    @property
    def version(self) -> int:
        return int(self.model_id.rsplit(":", 1)[1])

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def read(cls, folder: Path) -> "Provenance | None":
        """The provenance of a folder, or None when the folder is not ours (or the file is unreadable)."""
        try:
            data = json.loads((folder / PROVENANCE_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or data.get("tool") != TOOL:
            return None
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        try:
            return cls(**known)
        except TypeError:
            return None


@dataclass(frozen=True)
class Entry:
    """One of our deployed folders."""

    path: Path
    provenance: Provenance

    @property
    def name(self) -> str:
        return self.provenance.deployment_name

    @property
    def model_id(self) -> str:
        return self.provenance.model_id


def is_complete(folder: Path) -> bool:
    """What Foundry's scanner requires: genai_config.json and an inference_model.json with a string Name."""
    try:
        data = json.loads((folder / INFERENCE_MODEL_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and isinstance(data.get("Name"), str) and (folder / modeldir.GENAI_CONFIG).is_file()


def visible_to_scanner(folder: Path) -> bool:
    return is_complete(folder) and not (folder / DOWNLOAD_MARKER).exists()


class FoundryCache:
    """One Foundry Local model cache folder."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def publisher_dir(self, publisher: str) -> Path:
        return self.root / publisher

    def model_dir(self, publisher: str, model_id: str) -> Path:
        return self.publisher_dir(publisher) / folder_name(model_id)

    def entries(self, name: str | None = None) -> list[Entry]:
        """Our complete deployed folders (optionally of one name), newest first."""
        found = []
        for pub in self._publishers():
            for folder in sorted(p for p in pub.iterdir() if p.is_dir() and not p.is_symlink()):
                if STAGING_TAG in folder.name or TRASH_TAG in folder.name:
                    continue
                prov = Provenance.read(folder)
                if prov is None or (name is not None and prov.deployment_name != name):
                    continue
                if is_complete(folder) and folder.name == folder_name(prov.model_id):
                    found.append(Entry(folder, prov))
        return sorted(found, key=lambda e: e.provenance.deployed_at, reverse=True)

    def find(self, name: str) -> Entry | None:
        entries = self.entries(name)
        return entries[0] if entries else None

    @contextmanager
    def lock(self, publisher: str, name: str) -> Iterator[None]:
        """Hold the cross-process lock of one deployment name, or fail at once if another process holds it.

        The lock file is removed while still held, and a publisher folder this call created is removed again if
        it is left empty, so a failed deploy leaves nothing behind. filelock 4 checks after each flock that the
        locked file is still linked, so unlinking before release cannot let two holders in.
        """
        import filelock

        pub = self.publisher_dir(publisher)
        created = not pub.exists()
        lock = filelock.FileLock(str(pub / f"{name}{LOCK_SUFFIX}"), timeout=0)
        for attempt in range(LOCK_ATTEMPTS):
            pub.mkdir(parents=True, exist_ok=True)
            try:
                lock.acquire()
                break
            except filelock.Timeout:
                raise SlmopsError(
                    f"deployment {name} is being written by another process (lock {lock.lock_file})",
                    "wait for the other deploy to finish, then retry",
                )
            except FileNotFoundError:  # another deploy removed the empty publisher folder just now: make it again
                if attempt == LOCK_ATTEMPTS - 1:
                    raise
        try:
            yield
        finally:
            Path(lock.lock_file).unlink(missing_ok=True)
            lock.release()
            if created:
                with contextlib.suppress(OSError):
                    pub.rmdir()  # only succeeds while empty

    def stage(self, publisher: str, model_id: str) -> Path:
        """A new, empty staging folder beside the final one, already marked incomplete."""
        final = self.model_dir(publisher, model_id)
        staging = final.with_name(f"{final.name}{STAGING_TAG}{uuid.uuid4().hex[:8]}")
        staging.mkdir(parents=True)
        (staging / DOWNLOAD_MARKER).touch()
        return staging

    def _publishers(self) -> list[Path]:
        return sorted(p for p in self.root.iterdir() if p.is_dir() and not p.is_symlink()) if self.root.is_dir() else []

    def leftovers(self, name: str) -> list[Path]:
        """Staging and trash folders a killed deploy of this name left behind (in any publisher folder)."""
        pattern = re.compile(rf"{re.escape(name)}-\d+({re.escape(STAGING_TAG)}|{re.escape(TRASH_TAG)})[0-9a-f]+\Z")
        return [p for pub in self._publishers() for p in pub.iterdir() if p.is_dir() and pattern.match(p.name)]

    def clear_leftovers(self, name: str) -> None:
        """Delete what a killed deploy left. Only a trash folder that is the sole complete copy is put back."""
        for folder in self.leftovers(name):
            prov = Provenance.read(folder)
            final = folder.with_name(folder.name.split(TRASH_TAG)[0])
            if (TRASH_TAG in folder.name and prov and prov.deployment_name == name and is_complete(folder)
                    and final.name == folder_name(prov.model_id) and not final.exists() and self.find(name) is None):
                os.rename(folder, final)  # the no-atomic-swap fallback was killed between its two renames
                (final / DOWNLOAD_MARKER).unlink(missing_ok=True)
            else:
                shutil.rmtree(folder, ignore_errors=True)

    def finish_interrupted_commits(self, name: str) -> None:
        """A folder renamed into place but still marked (a kill right after the commit) is complete: unmark it."""
        for folder in (f for pub in self._publishers() for f in pub.iterdir() if f.is_dir()):
            prov = Provenance.read(folder)
            if prov and prov.deployment_name == name and folder.name == folder_name(prov.model_id) and is_complete(folder):
                (folder / DOWNLOAD_MARKER).unlink(missing_ok=True)


def discard(folder: Path) -> None:
    """Remove a model folder so that no scanner ever sees it half-deleted: mark, rename away, delete."""
    if not folder.exists():
        return
    if TRASH_TAG not in folder.name:
        (folder / DOWNLOAD_MARKER).touch()
        trash = folder.with_name(f"{folder.name.split(STAGING_TAG)[0]}{TRASH_TAG}{uuid.uuid4().hex[:8]}")
        os.rename(folder, trash)
        folder = trash
    shutil.rmtree(folder, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE). False if the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def commit(staging: Path, final: Path) -> None:
    """Put a complete staging folder in place of final (absent or an older complete folder), atomically."""
    if final.exists():
        if not _exchange(staging, final):
            # No atomic swap here: move the old one away first (briefly no folder), then the new one in.
            (final / DOWNLOAD_MARKER).touch()
            os.rename(final, final.with_name(f"{final.name}{TRASH_TAG}{uuid.uuid4().hex[:8]}"))
            os.rename(staging, final)
        else:
            (staging / DOWNLOAD_MARKER).touch()  # staging now holds the old folder: hide it first
        (final / DOWNLOAD_MARKER).unlink()
        discard(staging)
    else:
        os.rename(staging, final)
        (final / DOWNLOAD_MARKER).unlink()
    _fsync_dir(final.parent)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@dataclass(frozen=True)
class FolderContents:
    """Everything that goes into one deployed model folder."""

    source_dir: Path
    weight_files: tuple[str, ...]
    genai_config: dict
    chat_template: str | None
    provenance: Provenance
    inference_model: dict


def build(staging: Path, contents: FolderContents) -> str:
    """Fill a staging folder; inference_model.json is written last. Returns how the weights were placed."""
    modes = set()
    skip = {modeldir.GENAI_CONFIG, INFERENCE_MODEL_FILE, PROVENANCE_FILE, DOWNLOAD_MARKER}
    if contents.chat_template is not None:
        skip.add(modeldir.CHAT_TEMPLATE_FILE)  # written below: the deployment may switch reasoning off in it
    for src in sorted(contents.source_dir.rglob("*")):
        rel = src.relative_to(contents.source_dir)
        dst = staging / rel
        if src.is_dir():
            dst.mkdir(exist_ok=True)
        elif rel.as_posix() in contents.weight_files:
            modes.add(link_or_copy(src, dst))
        elif rel.as_posix() not in skip:
            shutil.copyfile(src, dst)  # small files are copied, so editing one never touches the artifact store
    # A fresh file (never a hardlink into the artifact store): it carries this deployment's search defaults.
    write_json_atomic(staging / modeldir.GENAI_CONFIG, contents.genai_config)
    if contents.chat_template is not None:
        (staging / modeldir.CHAT_TEMPLATE_FILE).write_text(contents.chat_template, encoding="utf-8")
    link_mode = "copy" if "copy" in modes else "reflink" if "reflink" in modes else "hardlink" if modes else "copy"
    contents.provenance.link_mode = link_mode
    write_json_atomic(staging / PROVENANCE_FILE, contents.provenance.to_dict())
    _test_pause()
    write_json_atomic(staging / INFERENCE_MODEL_FILE, contents.inference_model)
    return link_mode


def _test_pause() -> None:
    """Test hook: with SLMOPS_TEST_PAUSE_BEFORE_COMMIT=<file>, wait until that file exists (or =<seconds>)."""
    import sys

    value = os.environ.get(PAUSE_ENV)
    if not value:
        return
    print(f"slmops: paused before commit ({PAUSE_ENV})", file=sys.stderr, flush=True)
    try:
        time.sleep(float(value))
        return
    except ValueError:
        pass
    deadline = time.monotonic() + PAUSE_MAX_S
    while not Path(value).exists() and time.monotonic() < deadline:
        time.sleep(PAUSE_POLL_S)
