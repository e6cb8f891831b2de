"""Before a run trains: its output folder is writable and has room, one process owns it, and what a killed
write left behind is cleared.

The lock is a file in the run folder holding the owner's pid, host and start time, locked with flock
for as long as the owner runs: the kernel releases it when the owner dies (even by SIGKILL), so a lock
file whose flock is free is stale and the next run of that folder takes it over. On a file system
without flock the pid and host decide: a lock of this host whose pid is gone is stale.
"""

from __future__ import annotations

import datetime as dt
import errno
import fcntl
import json
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from common.errors import UserError
from common.io import remove_leftover_temporaries

LOCK_FILE = ".lock"
# room kept free beyond the estimate (results, predictions, logs)
SLACK_BYTES = 16 * 1024**2
# errors of flock on a file system that does not support it: then the pid and host decide
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class OutputFolderError(UserError):
    """The output folder cannot take this run's files."""


class RunFolderBusy(UserError):
    """Another process owns the run folder."""


def _existing_ancestor(folder: Path) -> Path:
    """The deepest part of `folder` that exists (the folder itself when it does)."""
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            return candidate
    return Path(folder.anchor or ".")


def check_output_folder(folder: str | Path, need_bytes: int = 0) -> Path:
    """Create `folder` if needed and prove that a file can be written in it and that about `need_bytes`
    (plus a margin) fit on its disk; OutputFolderError saying what to do otherwise."""
    folder = Path(folder)
    base = _existing_ancestor(folder)
    if not base.is_dir():
        raise OutputFolderError(f"cannot create the run folder {folder}: {base} is a file, not a folder; "
                                "choose another --output_dir")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise OutputFolderError(f"cannot write in {folder} ({exc.strerror or type(exc).__name__}): choose a "
                                "writable --output_dir or fix its permissions") from None
    free = shutil.disk_usage(folder).free
    if need_bytes and free < need_bytes + SLACK_BYTES:
        raise OutputFolderError(f"{folder} has {_size(free)} free and this run writes about "
                                f"{_size(need_bytes + SLACK_BYTES)} (checkpoints and weights): free some space or "
                                "choose another --output_dir")
    return folder


def checkpoint_bytes(trainable_numel: int, bytes_per_value: int = 4) -> int:
    """Disk a run's files may need at once: a checkpoint (trainable values and AdamW's two moments), its
    next version written beside it before the rename, and the saved weights."""
    return trainable_numel * bytes_per_value * (3 * 2 + 1)


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


@dataclass(frozen=True)
class LockOwner:
    """Who holds (or held) a run folder's lock."""

    pid: int
    host: str
    started: str = ""

    @classmethod
    def read(cls, path: Path) -> LockOwner | None:
        """The owner a lock file names; None when it is empty, unreadable or not ours."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(int(data["pid"]), str(data["host"]), str(data.get("started", "")))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    @classmethod
    def me(cls) -> LockOwner:
        return cls(os.getpid(), socket.gethostname(), dt.datetime.now().isoformat(timespec="seconds"))

    def alive_here(self) -> bool:
        """Whether this owner is a live process of this host (another host's process cannot be checked)."""
        if self.host != socket.gethostname():
            return True
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True  # someone else's live process
        return True

    def text(self) -> str:
        since = f", started {self.started}" if self.started else ""
        return f"process {self.pid} on {self.host}{since}"


class RunLock:
    """Ownership of one run folder by this process (``with RunLock(folder): ...``)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.fd: int | None = None
        self.took_over: LockOwner | None = None  # the stale owner this lock replaced
        self.created: list[Path] = []  # folders the lock made, deepest first: removed again if left empty

    def acquire(self) -> RunLock:
        """Take the folder; RunFolderBusy naming the owner when a live process holds it."""
        self.created = self.created or _missing_folders(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
            except BlockingIOError:
                os.close(fd)
                raise self._busy(LockOwner.read(self.path)) from None
            except OSError as exc:
                if exc.errno not in _NO_FLOCK:
                    os.close(fd)
                    raise
                locked = False
            if not self._same_file(fd):  # the owner released (deleted) it between our open and flock
                os.close(fd)
                continue
            previous = LockOwner.read(self.path)
            if previous is not None and previous.pid != os.getpid() and not locked and previous.alive_here():
                os.close(fd)
                raise self._busy(previous)
            self.took_over = previous if previous is not None and previous.pid != os.getpid() else None
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(LockOwner.me().__dict__) + "\n").encode(), 0)
            self.fd = fd
            return self

    def _same_file(self, fd: int) -> bool:
        try:
            return os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            return False

    def _busy(self, owner: LockOwner | None) -> RunFolderBusy:
        who = owner.text() if owner else "another process"
        return RunFolderBusy(f"{self.folder} is being run by {who}: wait for it to finish (or stop it) and rerun; "
                             f"if no such process runs any more, delete {self.path}")

    def release(self) -> None:
        """Give the folder up: the lock file is removed, then unlocked."""
        if self.fd is None:
            return
        try:
            if self._same_file(self.fd):
                self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)
            self.fd = None
        for folder in self.created:  # a run that stopped before writing anything leaves no empty folders
            try:
                folder.rmdir()
            except OSError:
                break  # not empty (or not ours any more): keep it and the folders above it

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def lock_owner(folder: str | Path) -> LockOwner | None:
    """The live owner of a run folder, or None when nobody holds it (for a sweep deciding what to start)."""
    path = Path(folder) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return LockOwner.read(path) or LockOwner(-1, "unknown host")
    except OSError:
        owner = LockOwner.read(path)  # no flock here: the pid and host decide
        return owner if owner is not None and owner.alive_here() else None
    finally:
        os.close(fd)
    return None


def _missing_folders(folder: Path) -> list[Path]:
    """The folders of `folder`'s path that do not exist yet, deepest first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def claim_run_folder(folder: str | Path, need_bytes: int = 0) -> RunLock:
    """Check the folder (writable, room for `need_bytes`), lock it for this process, and remove the temporary
    files of earlier writes that were killed; the caller releases the returned lock when the run ends."""
    created = _missing_folders(Path(folder))
    check_output_folder(folder, need_bytes)
    lock = RunLock(folder)
    lock.created = created
    lock.acquire()
    if lock.took_over is not None:
        print(f"note: {lock.took_over.text()} had stopped without releasing {lock.path}; taking the folder over",
              file=sys.stderr)
    removed = remove_leftover_temporaries(folder)
    if removed:
        print(f"note: removed {len(removed)} temporary file(s) left by an interrupted write in {folder}",
              file=sys.stderr)
    return lock


# -- the hooks of the run pipeline (engine/run.py) --------------------------------------------
def _on_main(fn):
    """Call `fn` on rank 0 only; when it fails there, the other ranks raise too instead of waiting for it."""
    from engine import distributed as dist

    result = None
    if dist.is_main():
        try:
            result = fn()
        except BaseException:
            if dist.active():
                dist.all_agree(False)
            raise
    if dist.active() and not dist.all_agree(True):
        raise RuntimeError("rank 0 stopped before training; see its error above")
    return result


@contextmanager
def owning_run_folder(ctx) -> Iterator[bool]:
    """The run holds its folder while it trains (rank 0): writable, locked, leftovers of killed writes removed.
    Yields False when another process finished the run while this one prepared (nothing is left to do)."""
    from engine import distributed as dist
    from engine import results as res

    config = ctx.config
    lock = _on_main(lambda: claim_run_folder(ctx.out))
    try:
        finished = res.is_finished(ctx.out) and not config.overwrite if dist.is_main() else False
        if finished:
            print(f"already finished: {ctx.out / res.RESULTS_FILE} (add --overwrite to run it again)")
        yield dist.all_agree(not finished)
    finally:
        if lock is not None:
            lock.release()


def check_room(ctx, plan) -> None:
    """Before training: the run folder's disk has room for the checkpoints and weights of the plan's stages."""
    params = {id(p): p for stage in plan.stages for p in stage.module.parameters() if p.requires_grad}
    need = checkpoint_bytes(sum(p.numel() for p in params.values()))
    _on_main(lambda: check_output_folder(ctx.out, need))
