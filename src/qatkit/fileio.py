"""Atomic file writes: a crash or a kill leaves the old file or the new one under the final name, never a mix."""
from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from qatkit.errors import ConfigError


# Why a write can fail that is the destination's, not the program's: no permission, a read-only or full disk.
_UNWRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the same folder to write to; on success it is fsynced and renamed over
    `path` and the folder fsynced; on failure it is removed. A destination that cannot be written (no permission,
    a read-only or full disk) raises ConfigError naming it, as does a path that names no file (a folder, a path
    under a file)."""
    if not isinstance(path, (str, os.PathLike)) or not str(path) or str(path).endswith(("/", os.sep)):
        raise ConfigError(f"destination {path!r} names no file; allowed: a file path. Fix: pass a file name, e.g. "
                          "model.safetensors")
    path = Path(path)
    blocked = path if path.is_dir() else file_above(path)
    if blocked is not None:
        why = "is a folder" if blocked == path else f"is under the file {str(blocked)!r}"
        raise ConfigError(f"{str(path)!r} {why}; allowed: a file path in a folder. Fix: write to another path")
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; model files are meant to be shared
        os.replace(tmp, path)
    except OSError as e:
        if e.errno not in _UNWRITABLE:
            raise
        raise ConfigError(f"{str(path)!r} cannot be written ({e.strerror}); allowed: a path in a writable folder "
                          "with free space. Fix: write elsewhere (--out), or free space") from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    _fsync_dir(path.parent)


def file_above(path: Path) -> Path | None:
    """The existing file (not folder) among path's parents, which no path under it can be created beneath."""
    return next((p for p in path.parents if p.exists() and not p.is_dir()), None)


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable (POSIX); folders cannot be opened for fsync on Windows."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
