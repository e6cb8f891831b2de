"""Atomic file writes: readers see the old file or the whole new one, never a partial one.

Files are created with the user's umask (not the 0600 of ``mkstemp``), so colleagues on a
shared cluster can read results, adapters and cached features.
"""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

from common.errors import UserError

TEMPORARY_SUFFIX = ".tmp"
# ".NAME.XXXXXXXX.tmp": the name mkstemp gives atomic_write's temporary file (8 random letters, digits or _)
_TEMPORARY = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")
# errors that mean the disk (or the user's quota) is full: the user frees space and reruns
_FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFull(UserError):
    """A write failed because the disk or the quota is full."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside `path`, then rename it into place.

    The temporary file is removed when `write` fails, so an interrupted write leaves the old
    file (or nothing) behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX, dir=path.parent)
    except OSError as exc:
        _raise_if_full(exc, path)
        raise
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        _raise_if_full(exc, path)
        raise
    return path


def is_disk_full(exc: BaseException) -> bool:
    """Whether an error is a full disk or quota (torch.save reports one as a RuntimeError with no errno)."""
    if isinstance(exc, OSError):
        return exc.errno in _FULL
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("no space left" in text or "file write failed" in text)


def _raise_if_full(exc: BaseException, path: Path) -> None:
    if is_disk_full(exc):
        raise DiskFull(f"no space left on the disk of {path.parent} while writing {path.name}: free some space "
                       "(or choose another --output_dir) and rerun the same command; a run resumes from its last "
                       "checkpoint") from None


def leftover_temporaries(folder: str | Path) -> list[Path]:
    """The temporary files of atomic writes that were killed before their rename (".NAME.XXXXXXXX.tmp")."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and _TEMPORARY.match(p.name))


def remove_leftover_temporaries(folder: str | Path) -> list[Path]:
    """Delete what leftover_temporaries finds; only while this process owns the folder (its run lock)."""
    removed = leftover_temporaries(folder)
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write UTF-8 text atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json_atomic(path: str | Path, data: object) -> Path:
    """Write JSON atomically; non-ASCII text (class names, paths) stays readable."""
    return write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def file_identity(path: str | None) -> str | None:
    """A local file or folder identified by its resolved paths, sizes and modification times; other text
    (a hub id, 'random', None) as it is."""
    if not path:
        return path
    target = Path(path).expanduser()
    if not target.exists():
        return path
    files = sorted(p for p in target.rglob("*") if p.is_file()) if target.is_dir() else [target]
    return json.dumps([[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files])
