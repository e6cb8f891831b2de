"""A sweep's long-lived worker: one process per device that makes run after run in-process.

    python -m utils.worker        (reads one JSON object per line on stdin: {"args": [...], "log": "..."})

``args`` is a run's command line without the interpreter (the entry script, then its flags, as the sweep
builds it); it is parsed with the entry points' own parser (``utils.cli.parse_config``) and run by
``engine.run.run`` with the worker's ``engine.session.Session``, so start-up, model building, image checks
and decoding are paid once per worker instead of once per run, and the run's results are those it gets in a
process of its own. Everything the run prints (its data-loader processes included) goes to its ``log`` as a
run in its own process logs it (one line per progress update), followed by a ``# worker:`` status line;
then the worker answers one JSON line on stdout, ``{"code": exit status, "seconds": ...}``, and reads the
next run.

A failing run is recorded (its ``error:`` line or traceback in its log, its exit status in the answer) and the
worker goes on. SIGINT or SIGTERM stop the worker after the current run: during training the run saves its
checkpoint first (as in a process of its own), elsewhere it stops at once; the answer then carries
128 + the signal, and the worker exits.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TextIO

from common.errors import UserError
from engine.session import Session
from utils.sweep import copy_lines

# Seconds to wait for a run's output to reach its log after the run ends (a process the run started and
# left running may hold the pipe open; its later output still reaches the log).
DRAIN_SECONDS = 10.0


class Stopped(BaseException):
    """SIGINT or SIGTERM reached the worker outside a training loop (which checkpoints and stops by itself).

    Not an Exception, so that no handler of a run's own failures takes it for one."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _stop(signum: int, frame) -> None:
    raise Stopped(signum)


def run_args(args: list[str], session: Session) -> int:
    """Parse and make one run as its entry point would, in this process; its exit status.

    User mistakes print ``error: ...`` and give 2, an interrupted training gives 128 + the signal (as
    ``utils.cli.run_cli``); any other failure prints its traceback and gives 1.
    """
    from engine.run import run
    from utils.cli import parse_config, run_cli

    entry, *flags = args
    if not any(flag == "--method" or flag.startswith("--method=") for flag in flags):
        print("error: a worker's run names its --method (the sweep always gives it)", file=sys.stderr)
        return 2
    try:
        return run_cli(lambda: run(parse_config(flags, prog=entry), session))
    except Stopped:
        raise
    except Exception:  # a bug or a broken input: this run fails, the worker goes on
        traceback.print_exc()
        return 1


@contextlib.contextmanager
def output_to(log: Path) -> Iterator[None]:
    """Send this process's stdout and stderr (file descriptors 1 and 2, so child processes' too) to `log`,
    carriage returns ending lines, for the duration of the block."""
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    read_end, write_end = os.pipe()

    def copy() -> None:
        with os.fdopen(read_end, "rb") as source, open(log, "ab") as target:
            copy_lines(source, target)

    copier = threading.Thread(target=copy, name="run log", daemon=True)
    copier.start()
    saved = os.dup(1), os.dup(2)
    os.dup2(write_end, 1)
    os.dup2(write_end, 2)
    os.close(write_end)
    # Python's own streams too, wherever sys.stdout and sys.stderr pointed (an embedding host may replace them)
    streams = [open(fd, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False)
               for fd in (1, 2)]
    try:
        with contextlib.redirect_stdout(streams[0]), contextlib.redirect_stderr(streams[1]):
            yield
    finally:
        for stream in streams:
            stream.close()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        copier.join(DRAIN_SECONDS)


def _append(log: Path, line: str) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as handle:
        handle.write(line + "\n")


def run_logged(args: list[str], log: Path, session: Session, number: int) -> int:
    """One run with its output in `log`, opened and closed by a '# worker' line; its exit status."""
    _append(log, f"# in the sweep's worker (pid {os.getpid()}, its run {number})")
    start = time.perf_counter()
    code = 130
    try:
        with output_to(log):
            try:
                code = run_args(args, session)
            except Stopped as stop:
                code = 128 + stop.signum
                print("interrupted", file=sys.stderr)
                raise
    finally:
        _append(log, f"# worker: exit {code} after {time.perf_counter() - start:.1f} s")
        gc.collect()  # the run's model copy and data, before the next run builds its own
    return code


def _fatal(code: int) -> bool:
    """Whether the worker must end after a run that exited with `code`: interrupted, or a GPU left unusable
    (a CUDA error poisons the process; the sweep starts a fresh worker for the next run)."""
    if code >= 128:
        return True
    import torch

    if code == 1 and torch.cuda.is_available():
        try:
            torch.cuda.synchronize()
        except RuntimeError:
            return True
    return False


def serve(requests: Iterable[str], answers: TextIO, session: Session | None = None) -> int:
    """Make each requested run in turn and answer each with one JSON line; the worker's exit status."""
    session = session or Session()
    number = 0
    try:
        for line in requests:
            if not line.strip():
                continue
            request = json.loads(line)
            number += 1
            start = time.perf_counter()
            try:
                code = run_logged(list(request["args"]), Path(request["log"]), session, number)
            except Stopped as stop:
                code = 128 + stop.signum
            try:
                answers.write(json.dumps({"code": code, "seconds": round(time.perf_counter() - start, 3)}) + "\n")
                answers.flush()
            except BrokenPipeError:  # the sweep is gone: the run is logged and its folder written; stop here
                return code or 1
            if _fatal(code):
                return code
    except Stopped as stop:  # between runs
        return 128 + stop.signum
    return 0


def main() -> int:
    """Serve the requests on stdin; answers on stdout, whatever else this process prints on stderr."""
    answers = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)  # stray output between runs must not mix with the answers
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _stop)
    try:
        return serve(sys.stdin, answers)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
