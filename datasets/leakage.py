"""Train/val/test leakage: one file in two splits is refused, identical content in two splits is warned about.

A file is the same however its path is spelled (``./images/x.png``, ``images/x.png``, ``images//x.png``,
a symbolic or hard link): paths are compared after resolving them and by device and inode. Different
files with identical bytes are found cheaply: only files of one size that occur in two splits are read,
first their first 4 KiB, then in full where those agree.
"""

from __future__ import annotations

import hashlib
import os

from datasets.errors import DatasetError
from datasets.layouts import SPLITS

PREFIX_BYTES = 4096


def check_leakage(paths: dict[str, list[str]]) -> list[str]:
    """DatasetError when one file is listed in two splits; returns warnings for identical content in two."""
    owner: dict[object, tuple[str, str]] = {}
    by_size: dict[int, list[tuple[str, str]]] = {}
    for split in SPLITS:
        for path in dict.fromkeys(paths.get(split, ())):  # a path drawn twice in one split (--compat seed) is fine
            keys: list[object] = [os.path.realpath(path)]
            try:
                st = os.stat(path)
            except OSError:
                st = None  # a missing file fails later with its own message
            if st is not None:
                if st.st_ino:
                    keys.append((st.st_dev, st.st_ino))
                by_size.setdefault(st.st_size, []).append((split, path))
            for key in keys:
                seen = owner.setdefault(key, (split, path))
                if seen[0] != split:
                    raise DatasetError(
                        f"{path} ({split}) and {seen[1]} ({seen[0]}) are the same file: an image may sit in one "
                        "split only; fix the dataset's listing"
                    )
    return _same_content(by_size)


def _digest(path: str, limit: int | None) -> str | None:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            if limit is not None:
                h.update(f.read(limit))
            else:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    except OSError:
        return None
    return h.hexdigest()


def _collisions(files: list[tuple[str, str]], limit: int | None) -> list[list[tuple[str, str]]]:
    """Groups of files from at least two splits whose (prefix) digests agree."""
    groups: dict[str, list[tuple[str, str]]] = {}
    for split, path in files:
        digest = _digest(path, limit)
        if digest is not None:
            groups.setdefault(digest, []).append((split, path))
    return [g for g in groups.values() if len({s for s, _ in g}) > 1]


def _same_content(by_size: dict[int, list[tuple[str, str]]]) -> list[str]:
    notes = []
    for size, files in sorted(by_size.items()):
        if len({s for s, _ in files}) < 2:
            continue
        for candidates in _collisions(files, PREFIX_BYTES):
            for group in (_collisions(candidates, None) if size > PREFIX_BYTES else [candidates]):
                first = group[0]
                others = [f for f in group if f[0] != first[0]]
                notes.append(
                    f"{first[1]} ({first[0]}) has the same content as {others[0][1]} ({others[0][0]})"
                    + (f" and {len(others) - 1} other(s)" if len(others) > 1 else "")
                    + ": the same image in two splits leaks; keep one copy"
                )
    return notes
