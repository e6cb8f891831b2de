"""A sweep's long-lived worker: one process per device that makes run after run in-process.

    python -m utils.worker        (reads one request per line on stdin: {"runs": [{"args": [...], "log": "..."}]})

``args`` is a run's command line without the interpreter (the entry script, then its flags, as the sweep
builds it); it is parsed with the entry points' own parser (``utils.cli.parse_config``) and run by
``engine.run.run`` with the worker's ``engine.session.Session``, so start-up, model building, image checks
and decoding are paid once per worker instead of once per run, and the run's results are those it gets in a
process of its own. Everything the run prints (its data-loader processes included) goes to its ``log`` as a
run in its own process logs it (one line per progress update), followed by a ``# worker:`` status line;
then the worker answers one JSON line on stdout, ``{"codes": [exit status], "seconds": ...}``, and reads the
next request. A request of several runs (the sweep's ``--pack N``) trains them packed
(``engine.packing.run_packed``), their common output in each of their logs.

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

from common.errors import UserError, exit_status
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


def run_args(arg_lists: list[list[str]], session: Session, pack: int = 1) -> list[int]:
    """Parse and make runs as their entry points would, in this process; their exit statuses. One run is made
    by ``engine.run.run`` with the session; several train packed (``engine.packing.run_packed``, at most
    `pack` per step, reading the session's decoded images).

    User mistakes print ``error: ...`` and give 2, an interrupted training gives 128 + the signal (as
    ``utils.cli.run_cli``); any other failure prints its traceback and gives 1.
    """
    from utils.cli import run_cli

    codes = [2] * len(arg_lists)
    configs = {n: config for n, args in enumerate(arg_lists) if (config := _parsed(args)) is not None}
    try:
        if len(arg_lists) == 1 and configs:
            from engine.run import run

            codes[0] = run_cli(lambda: run(configs[0], session))
        elif configs:
            from engine.packing import run_packed

            packed: list[int] = []
            with session.serving():
                code = run_cli(lambda: packed.extend(run_packed(list(configs.values()), max_pack=pack)) or 0)
            for n, done in zip(configs, packed or [code] * len(configs), strict=True):
                codes[n] = done
    except Stopped:
        raise
    except Exception:  # a bug or a broken input: these runs fail, the worker goes on
        traceback.print_exc()
        for n in configs:
            codes[n] = 1
    return codes


def _parsed(args: list[str]):
    """The run's RunConfig from its entry script and flags, or None after printing its ``error:`` line."""
    from utils.cli import parse_config

    entry, *flags = args
    if not any(flag == "--method" or flag.startswith("--method=") for flag in flags):
        print("error: a worker's run names its --method (the sweep always gives it)", file=sys.stderr)
        return None
    parsed = []
    exit_status(lambda: parsed.append(parse_config(flags, prog=entry)) or 0)  # a mistake: its error line
    return parsed[0] if parsed else None


class _Copies:
    """A binary stream that writes to several files (the logs of a pack's runs)."""

    def __init__(self, handles: list):
        self.handles = handles

    def write(self, data: bytes) -> None:
        for handle in self.handles:
            handle.write(data)

    def flush(self) -> None:
        for handle in self.handles:
            handle.flush()


@contextlib.contextmanager
def output_to(logs: list[Path]) -> Iterator[None]:
    """Send this process's stdout and stderr (file descriptors 1 and 2, so child processes' too) to every log
    of `logs`, carriage returns ending lines, for the duration of the block."""
    for log in logs:
        log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    read_end, write_end = os.pipe()

    def copy() -> None:
        with os.fdopen(read_end, "rb") as source, contextlib.ExitStack() as files:
            copy_lines(source, _Copies([files.enter_context(open(log, "ab")) for log in logs]))

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


def run_logged(runs: list[dict], session: Session, number: int, pack: int = 1) -> list[int]:
    """Runs (one, or several trained packed) with their output in each run's log, opened and closed by a
    '# worker' line; their exit statuses."""
    logs = [Path(r["log"]) for r in runs]
    together = f", packed with {len(runs) - 1} other run(s) whose logs show the same lines" if len(runs) > 1 else ""
    for log in logs:
        _append(log, f"# in the sweep's worker (pid {os.getpid()}, its request {number}{together})")
    start = time.perf_counter()
    codes = [130] * len(runs)
    try:
        with output_to(logs):
            try:
                codes = run_args([list(r["args"]) for r in runs], session, pack)
            except Stopped as stop:
                codes = [128 + stop.signum] * len(runs)
                print("interrupted", file=sys.stderr)
                raise
    finally:
        for log, code in zip(logs, codes, strict=True):
            _append(log, f"# worker: exit {code} after {time.perf_counter() - start:.1f} s")
        gc.collect()  # the runs' model copies and data, before the next run builds its own
    return codes


def _fatal(codes: list[int]) -> bool:
    """Whether the worker must end after runs that exited with `codes`: interrupted, or a GPU left unusable
    (a CUDA error poisons the process; the sweep starts a fresh worker for the next run)."""
    if any(code >= 128 for code in codes):
        return True
    import torch

    if 1 in codes and torch.cuda.is_available():
        try:
            torch.cuda.synchronize()
        except RuntimeError:
            return True
    return False


def serve(requests: Iterable[str], answers: TextIO, session: Session | None = None) -> int:
    """Make each request's runs in turn and answer each request with one JSON line; the worker's exit status.

    A request is ``{"runs": [{"args": [...], "log": "..."}, ...], "pack": N}`` (several runs: trained packed, at
    most N per step); its answer ``{"codes": [exit status per run], "seconds": ...}``.
    """
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
                codes = run_logged(list(request["runs"]), session, number, int(request.get("pack", 1)))
            except Stopped as stop:
                codes = [128 + stop.signum] * len(request["runs"])
            try:
                answers.write(json.dumps({"codes": codes, "seconds": round(time.perf_counter() - start, 3)}) + "\n")
                answers.flush()
            except BrokenPipeError:  # the sweep is gone: the runs are logged and their folders written; stop here
                return max(codes) or 1
            if _fatal(codes):
                return max(codes)
    except Stopped as stop:  # between requests
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
