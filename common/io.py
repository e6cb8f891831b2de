"""Atomic file writes: readers see the old file or the whole new one, never a partial one.

Files are created with the user's umask (not the 0600 of ``mkstemp``), so colleagues on a
shared cluster can read results, adapters and cached features.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


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
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


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
