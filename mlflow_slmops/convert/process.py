"""Process-wide tuning a conversion may do, and its undoing.

glibc's heap policy and the collector's freeze are changed only inside a conversion and only in a process that is
ours (``own_this_process``: the slmops CLI); the environment Olive writes to is given back as found otherwise."""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import threading
from typing import Callable, Iterator

# Set while a sweep runs: release_memory freezes what survives its collection (see gc_walks_only_new_objects).
_FREEZE_SURVIVORS = threading.Event()


# Set by the slmops CLI, which owns its process (own_this_process): only then does a conversion change
# process-wide state for speed (glibc's heap policy) or leave Olive's writes in the environment.
_PROCESS_OWNED = threading.Event()


# Set while a conversion runs: freed memory stays with the process (see heap_reused_between_variants).
_HEAP_REUSED = threading.Event()


def environment_as_found(convert_fn: Callable) -> Callable:
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


def own_this_process() -> None:
    """Let conversions tune process-wide state for speed: for a program that owns its process (the slmops CLI).

    Then glibc keeps freed memory for the next variant during a conversion (see ``heap_reused_between_variants``)
    and what Olive writes into the environment stays. A host application that imports the library and does not
    call this keeps its heap settings and its environment exactly as they were.
    """
    _PROCESS_OWNED.set()


def release_memory() -> None:
    """Free what the last variant left in reference cycles, so variants never add up in one process.

    A conversion frees gigabytes of weight arrays, some held in reference cycles. Inside
    ``gc_walks_only_new_objects`` the survivors are then frozen. Inside ``heap_reused_between_variants`` the
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
def heap_reused_between_variants() -> Iterator[None]:
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
def gc_walks_only_new_objects() -> Iterator[None]:
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
