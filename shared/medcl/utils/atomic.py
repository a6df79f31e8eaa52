"""Atomic file writes, and a full disk reported as one message instead of a truncated file and a traceback."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

from medcl.errors import MedclError

__all__ = ["DiskFullError", "atomic_write", "atomic_write_json", "disk_full_error"]

_FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(MedclError):
    """A write failed because the disk (or quota) is full; the message names the folder and the space needed."""


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def disk_full_error(path: str, needed: int | None = None) -> DiskFullError:
    """The message for a write of ``path`` that ran out of space (``needed``: bytes the file needs, if known)."""
    folder = os.path.dirname(os.path.abspath(path)) or "."
    free = shutil.disk_usage(folder).free if os.path.isdir(folder) else 0
    need = f"at least {_mib(needed)}" if needed else "more space"
    return DiskFullError(
        f"{folder}: the disk is full while writing {os.path.basename(path)} ({_mib(free)} free; it needs {need}). "
        "The previous file is intact. Free space there (or give the run another --bundle_root), then run again "
        "(training: add --resume true to go on from the last finished epoch).",
    )


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], suffix: str = ".tmp") -> None:
    """Write ``path`` through a temporary file in the same folder, synced and renamed into place: a kill or a full
    disk leaves the previous file intact and no temporary file.

    Args:
        path: the file to (re)write.
        write: writes the complete contents to the temporary path it is given.
        suffix: the temporary file's ending (e.g. ``".nii.gz"`` for writers that pick the format by name).

    Raises:
        DiskFullError: the disk or quota filled up; nothing is left behind and the previous file is untouched.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=suffix, dir=folder)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if e.errno in _FULL and not isinstance(e, DiskFullError):
            written = os.path.getsize(tmp) if os.path.exists(tmp) else 0
            raise disk_full_error(path, max(written, _size(path)) or None) from e
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_json(path: str | os.PathLike, data: Any, indent: int | None = 2) -> None:
    """:func:`atomic_write` of ``data`` as JSON (values JSON cannot hold written with ``str``)."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=indent, default=str)

    atomic_write(path, write)


def _size(path: str) -> int:
    return os.path.getsize(path) if os.path.isfile(path) else 0
