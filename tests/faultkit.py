"""Tools for the reliability tests: snapshots that prove nothing changed, real read-only and full disks,
a warm conversion cache, and waiting on a subprocess without timing anything.

Read-only and full disks are real mounts (root in the container): a read-only bind mount, because
chmod does not stop root, and a tiny tmpfs. Each test checks with a real write that the mount does what
it should before relying on it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from devkit.testing import TEST_CACHE_DIRNAME

WAIT_S = 600  # a generous deadline for a subprocess to reach a point: never a timing assertion
POLL_S = 0.2


def paths_snapshot(root: Path) -> dict[str, tuple] | None:
    """Every file (size, mtime) and folder under root, or None if root does not exist."""
    root = Path(root)
    if not root.exists():
        return None
    if root.is_file():
        st = root.stat()
        return {".": (st.st_size, st.st_mtime_ns)}
    snap: dict[str, tuple] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            snap[rel] = ("->", os.readlink(p))
        elif p.is_dir():
            snap[rel + "/"] = ()
        else:
            st = p.stat()
            snap[rel] = (st.st_size, st.st_mtime_ns)
    return snap


def store_fingerprint(tracking_uri: str) -> dict:
    """What a user sees in a tracking store: runs with their status, params, metrics, tags; registry versions."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    exps = client.search_experiments()
    runs = client.search_runs([e.experiment_id for e in exps], max_results=1000) if exps else []
    models = {m.name: sorted((v.version, v.current_stage, tuple(sorted(v.aliases)))
                             for v in client.search_model_versions(f"name = '{m.name}'"))
              for m in client.search_registered_models()}
    return {
        "experiments": sorted(e.name for e in exps),
        "runs": sorted((r.info.run_id, r.info.status, json.dumps(r.data.params, sort_keys=True),
                        json.dumps(r.data.metrics, sort_keys=True), json.dumps(r.data.tags, sort_keys=True))
                       for r in runs),
        "models": models,
    }


def _mount(args: list[str]) -> None:
    done = subprocess.run(["mount", *args], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"mount {' '.join(args)} failed ({done.stderr.strip()}): needs root")


@contextlib.contextmanager
def read_only_folder(path: Path) -> Iterator[Path]:
    """Make an existing folder read-only for everyone, root included: a read-only bind mount over itself."""
    _mount(["--bind", str(path), str(path)])
    try:
        _mount(["-o", "remount,bind,ro", str(path)])
        probe = path / ".write-probe"
        try:
            probe.write_text("x")
        except OSError as exc:
            assert exc.errno == errno.EROFS
        else:
            probe.unlink()
            pytest.fail(f"{path} is still writable after a read-only remount")
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


@contextlib.contextmanager
def tiny_disk(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of the given size (for example "128k") at path: a disk that fills up."""
    path.mkdir(parents=True, exist_ok=True)
    _mount(["-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)])
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def copy_warm_cache(models_root: Path, dst: Path, drop: tuple[str, ...] = ()) -> Path:
    """A private copy of the session's conversion cache (Olive's exports included), without the
    variant entries named in drop, so a conversion of those runs Olive (from its cache) and validates."""
    from mlflow_slmops.convert import ENTRY_MANIFEST

    shutil.copytree(models_root / TEST_CACHE_DIRNAME, dst, symlinks=True)
    for entry in (dst / "variants").iterdir():
        spec = json.loads((entry / ENTRY_MANIFEST).read_text())["spec"]
        if _preset_of(spec) in drop:
            shutil.rmtree(entry)
    for stale in (dst / "tmp").iterdir() if (dst / "tmp").is_dir() else ():
        shutil.rmtree(stale)
    return dst


def _preset_of(spec: dict) -> str | None:
    from mlflow_slmops.variants import PRESETS, VariantSpec

    body = VariantSpec.from_dict(spec).to_dict()
    for name, preset in PRESETS.items():
        if {k: v for k, v in preset.to_dict().items() if k != "name"} == {k: v for k, v in body.items() if k != "name"}:
            return name
    return None


def wait_for(predicate: Callable[[], bool], proc: subprocess.Popen | None = None, what: str = "condition") -> None:
    """Poll until predicate() holds; fail if proc exits first or the generous deadline passes."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.returncode} before {what}")
        time.sleep(POLL_S)
    raise AssertionError(f"timed out waiting for {what}")
