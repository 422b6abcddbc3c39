"""File writes that never leave half a file behind, and links that fall back to copies: one of each.

Used by the conversion cache, the Foundry Local cache, the sweep's spool and the measuring workers.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable

# A hardlink fails with these where a copy still works: another file system, no links allowed, too many links.
LINK_FALLBACK_ERRNOS = {errno.EXDEV, errno.EPERM, errno.EACCES, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP}
# linux/fs.h: FICLONE, a copy-on-write clone of a whole file (btrfs, XFS).
_FICLONE = 0x40049409


def write_json_atomic(path: str | Path, data: Any, default: Callable[[Any], Any] | None = None) -> None:
    """Write JSON fully (flushed and fsynced) under a unique temporary name beside ``path``, then rename it into
    place: a reader sees the old file or the new one, never part of one, and a failed write leaves nothing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, ensure_ascii=False, default=default)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write bytes under a unique temporary name beside ``path``, fsynced, then rename them into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def link_or_copy(src: Path, dst: Path) -> str:
    """Hardlink src to dst; else a copy-on-write clone; else a copy. Returns "hardlink", "reflink" or "copy".

    An existing dst is removed first, so nothing is ever written through a file that is linked elsewhere.
    """
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.is_symlink() or dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
        return "hardlink"
    except OSError as exc:
        if exc.errno not in LINK_FALLBACK_ERRNOS:
            raise
    if _reflink(src, dst):
        return "reflink"
    shutil.copy2(src, dst)
    return "copy"


def _reflink(src: Path, dst: Path) -> bool:
    """Copy-on-write clone via the FICLONE ioctl; False where unsupported."""
    import fcntl

    try:
        with open(src, "rb") as fin, open(dst, "wb") as fout:
            fcntl.ioctl(fout.fileno(), _FICLONE, fin.fileno())
        return True
    except OSError:
        dst.unlink(missing_ok=True)
        return False
