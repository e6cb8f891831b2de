"""Resumable sweeps: every combination of methods x datasets x models x weights x shots (or percentages)
x lrs x seeds (x cross-validation folds with --folds K).

One process expands the whole grid, builds each run's argument list and checks it with the
same parser the entry points use (so the run folder the sweep expects is the one the run
writes), skips runs whose folder already holds a finished results.json, then prints the
pending commands (--dry_run), runs them here (sequentially, or one worker per GPU with
--gpus) or writes a SLURM array script (--slurm). ``bash launch_run.sh`` is a thin wrapper.

``--experiment N`` applies the paper's preset N to every run; ``--methods "linear knn lora"``
runs several methods on the same splits, each from the entry point its method belongs to,
and ``--extra`` flags reach only the methods that take them. ``--estimate`` prints the cost of
the pending runs instead of running them (see utils/estimate.py).

Each run's output goes to ``<run folder>.log``: one line per progress update (carriage returns
end lines), appended to across reruns with a line saying where a rerun starts.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import queue
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from common.errors import UserError
from engine.config import RunConfig, run_dir
from engine.guard import lock_owner
from engine.results import RESULTS_FILE, is_finished

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SHOTS = "1 2 4 8 16"
DEFAULT_SEEDS = "1 2 3"
DEFAULT_PERCENTAGES = "1 10 50 100"
PRETRAINED_TOKENS = ("pretrained", "default")
# Grid axes belong to the sweep's own options; repeating them in --extra would desynchronise
# the run folder the sweep checks from the one the entry point writes.
SWEEP_OWNED = ("method", "preset", "dataset", "model_name", "seed", "shots", "lr", "percentage", "output_dir",
               "root_path", "level", "weights", "n_iters")


class SweepError(UserError):
    """A mistake in the sweep's options."""


class _Parser(argparse.ArgumentParser):
    """Argument parser whose errors are one-line UserErrors instead of usage dumps."""

    def error(self, message: str) -> typing.NoReturn:
        raise SweepError(f"{message} (see bash launch_run.sh --help)")


@dataclass
class Job:
    """One combination of the grid: its settings and the entry-point arguments that reproduce them."""

    config: RunConfig
    args: list[str]  # entry script first, no interpreter

    @property
    def folder(self) -> Path:
        return run_dir(self.config)

    @property
    def log(self) -> Path:
        # Beside the run folder, so the entry point still creates (and owns) the folder itself.
        return self.folder.with_name(self.folder.name + ".log")

    @property
    def label(self) -> str:
        return str(self.folder.relative_to(self.config.output_dir))

    def command(self, python: str = "python") -> list[str]:
        """The full command line with the given interpreter."""
        return [python, *self.args]


@dataclass
class Outcome:
    """What happened to one launched job."""

    job: Job
    returncode: int
    seconds: float
    message: str = ""
    last_error: str | None = None  # its last 'error:' line (else its last line) in this attempt's log

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.message


def build_parser() -> argparse.ArgumentParser:
    """The sweep's command line."""
    p = _Parser(prog="launch_run.sh", allow_abbrev=False,
                description="Run every combination of a grid of experiments, skipping finished ones.")
    p.add_argument("--experiment", type=int, default=None, choices=(1, 2, 3),
                   help="apply the paper's preset for experiment 1 (linear head), 2 (LoRA few-shot) or 3 "
                        "(LoRA on a percentage) to every run")
    p.add_argument("--methods", default=None,
                   help='space-separated methods, e.g. "linear knn lora" (default: the preset\'s, else lora)')
    p.add_argument("--datasets", required=True, help='space-separated dataset names, e.g. "sipakmed mlcc"')
    p.add_argument("--models", required=True, help='space-separated model keys, e.g. "clip uni"')
    p.add_argument("--shots", default=None, help=f'few-shot K values (default "{DEFAULT_SHOTS}"; -1 = all)')
    p.add_argument("--percentages", default=None,
                   help=f'percentages of each class, run with --shots 0 (experiment 3 default "{DEFAULT_PERCENTAGES}")')
    p.add_argument("--seeds", default=DEFAULT_SEEDS)
    p.add_argument("--folds", type=int, default=None,
                   help="folder and csv data: run every fold 0..K-1 of K-fold cross-validation (--cv K --fold i) "
                        "of every combination")
    p.add_argument("--lrs", default=None, help="learning rates of the methods that train (default: the preset's, else "
                   "each method's own: CLIP-LoRA's 2e-4 for most)")
    p.add_argument("--weights", default="pretrained",
                   help='space-separated: "pretrained" (usual weights), "random", or a local file per entry')
    p.add_argument("--level", default=None, help="HiCervix label level(s), applied to hicervix only")
    p.add_argument("--root_path", default=None)
    p.add_argument("--output_dir", default=RunConfig.output_dir)
    p.add_argument("--n_iters", type=int, default=None,
                   help="the step budget of the methods that count it as the paper's LoRA does (warmup + n_iters x K "
                        "steps few-shot); when no method of the sweep does, of those counting epochs; the other "
                        "methods keep their own (default: the preset's, else RunConfig's 500)")
    p.add_argument("--extra", default="", help='flags for the runs whose method takes them, e.g. "--r 4 --k 10"')
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry_run", action="store_true", help="print the pending commands and exit")
    mode.add_argument("--slurm", action="store_true", help="write (and submit if sbatch exists) an array job")
    mode.add_argument("--gpus", default=None, help='one local worker per listed GPU, e.g. "0 1"')
    p.add_argument("--worker", type=_truth, default=True,
                   help="local sweeps: one long-lived process per GPU (or on the CPU) makes run after run, paying "
                        "start-up, model building, image checks and decoding once (default True); False starts "
                        "one process per run")
    p.add_argument("--no_worker", dest="worker", action="store_false", help="the same as --worker False")
    p.add_argument("--pack", type=_positive, default=1,
                   help="with the worker: up to N runs that share a frozen backbone (engine.packing.pack_key: "
                        "other seeds, learning rates, shots or folds) train together in one step (default 1: "
                        "each run alone)")
    p.add_argument("--sbatch", default="", help='#SBATCH options, e.g. "--partition=gpu --time=4:00:00"')
    p.add_argument("--max_parallel", type=int, default=None, help="SLURM: at most this many tasks at once")
    p.add_argument("--nodes", type=_positive, default=1,
                   help="SLURM: nodes per run; with --gpus_per_node, each run is one torchrun per node")
    p.add_argument("--gpus_per_node", type=_positive, default=1, help="SLURM: GPUs (processes) per node and run")
    p.add_argument("--estimate", action="store_true",
                   help="print the runs, training steps, images and an estimated wall time, then exit without "
                        "running anything (times one training step per model, method and batch size here)")
    p.add_argument("--step_seconds", type=float, default=None,
                   help="with --estimate: seconds of one training step on images, instead of timing one")
    return p


def _truth(text: str) -> bool:
    """A True/False option value, spelled as the entry points' flags take it."""
    from utils.cli import _bool

    return _bool(text)


def _words(text: str | None, option: str) -> list[str]:
    """Split a space-separated option value, refusing an empty one."""
    words = (text or "").replace(",", " ").split()
    if not words:
        raise SweepError(f"{option} is empty; give at least one value")
    return words


def _numbers(text: str, option: str, kind: type) -> list[tuple[str, float | int]]:
    """Parse a list of numbers, keeping each one's text for the command line."""
    out = []
    for word in _words(text, option):
        try:
            out.append((word, kind(word)))
        except ValueError:
            raise SweepError(f"{option}: {word!r} is not a valid {kind.__name__}") from None
    return out


def split_flags(extra: str) -> list[list[str]]:
    """--extra as groups of one flag and its values ("--params q v --r 4" -> [[--params, q, v], [--r, 4]])."""
    try:
        tokens = shlex.split(extra)
    except ValueError as exc:
        raise SweepError(f"--extra: cannot split {extra!r} ({exc})") from None
    groups: list[list[str]] = []
    for token in tokens:
        if token.startswith("--"):
            groups.append([token])
        elif not groups:
            raise SweepError(f"--extra must start with a flag, got {token!r}")
        else:
            groups[-1].append(token)
    for group in groups:
        name = group[0][2:].split("=", 1)[0]
        if name in SWEEP_OWNED or name == "pourcentage":
            raise SweepError(f"--extra sets --{name}, which is a sweep option; give it to the sweep directly")
    return groups


def flags_for(method: str, groups: list[list[str]]) -> list[str]:
    """The --extra flags that apply to `method`: run flags of every method, and this method's own."""
    from utils.cli import method_flags

    owners = method_flags()
    out: list[str] = []
    for group in groups:
        name = group[0][2:].split("=", 1)[0]
        if name not in owners or method in owners[name]:
            out += group
    return out


def _weights_list(text: str) -> list[str | None]:
    """--weights entries, None standing for the model's usual (pretrained) weights."""
    out: list[str | None] = []
    for word in _words(text, "--weights"):
        if word.lower() in PRETRAINED_TOKENS:
            out.append(None)
        elif word == "random":
            out.append("random")
        else:
            out.append(str(Path(word).expanduser().resolve()))
    return out


def _preset_value(args: argparse.Namespace, name: str):
    """A setting of the sweep's preset (--experiment N), None without one."""
    from utils.presets import PRESETS

    return PRESETS[f"exp{args.experiment}"].get(name) if args.experiment else None


def _data_axis(args: argparse.Namespace) -> list[tuple[str, str | None]]:
    """(shots, percentage) texts: few-shot K values, or percentages run with --shots 0. Without --shots and
    --percentages, the preset's shots (experiment 1: -1, all images; 3: 0, percentages), else the default K."""
    preset_shots = _preset_value(args, "shots")
    if args.percentages is not None or (preset_shots == 0 and args.shots is None):
        if args.shots is not None:
            raise SweepError("--shots and --percentages exclude each other (percentages run with --shots 0)")
        pcts = _numbers(args.percentages or DEFAULT_PERCENTAGES, "--percentages", float)
        for text, value in pcts:
            if not 0 < value <= 100:
                raise SweepError(f"--percentages: {text} is outside (0, 100]")
        return [("0", text) for text, _ in pcts]
    default = DEFAULT_SHOTS if preset_shots is None else str(preset_shots)
    shots = _numbers(args.shots or default, "--shots", int)
    for text, value in shots:
        if value == 0 or value < -1:
            raise SweepError(f"--shots: {text} is not a shot count; give K >= 1 or -1 for all images")
    return [(text, None) for text, _ in shots]


def _methods(args: argparse.Namespace) -> list[str]:
    from methods import get_method
    from utils.presets import PRESETS

    if args.methods is not None:
        names = _words(args.methods, "--methods")
    elif args.experiment is not None:
        names = [PRESETS[f"exp{args.experiment}"]["method"]]
    else:
        names = ["lora"]
    for name in names:
        get_method(name)  # unknown names fail here, listing the valid ones
    return names


def n_iters_flags(methods: list[str], n_iters: int | None) -> dict[str, list[str]]:
    """Each method's share of the sweep's --n_iters: it applies to the methods that count n_iters in one sense,
    the paper's LoRA budget (n_iters x K steps) when a method of the sweep counts so, else epochs; the others
    keep their own budget, and a note says so (a LoRA smoke test must not shorten the heads it is compared to)."""
    from methods import get_method
    from utils.cli import trains_something

    if n_iters is None:
        return {m: [] for m in methods}
    trained = [m for m in methods if trains_something(get_method(m), {})]
    kinds = {m: get_method(m).step_budget for m in trained}
    sense = "shots" if "shots" in kinds.values() else "epochs"
    kept = [m for m in trained if kinds[m] != sense]
    if kept:
        print(f"note: --n_iters {n_iters} applies to {', '.join(m for m in trained if kinds[m] == sense)} "
              f"({'n_iters x K steps' if sense == 'shots' else 'n_iters epochs'}); {', '.join(kept)} keep their own "
              "budget (n_iters epochs, from the preset or the default)", file=sys.stderr)
    return {m: ["--n_iters", str(n_iters)] if kinds.get(m) == sense else [] for m in methods}


def _has_levels(dataset: str) -> bool:
    """Whether --level applies to this dataset (its registry entry has label levels)."""
    from datasets import get_dataset

    try:
        return bool(get_dataset(dataset).levels)
    except UserError:
        return False  # an unknown name fails with its own message when its runs are checked


def _folds(args: argparse.Namespace, groups: list[list[str]]) -> list[list[str]]:
    """The fold axis: the flags of each fold's run, --cv K --fold i for i in 0..K-1; without --folds, one
    run with no such flags (--extra may still pass --cv and --fold to every run)."""
    if args.folds is None:
        return [[]]
    if args.folds < 2:
        raise SweepError(f"--folds must be at least 2 (K-fold cross-validation), got {args.folds}")
    for group in groups:
        name = group[0][2:].split("=", 1)[0]
        if name in ("cv", "fold"):
            raise SweepError(f"--folds {args.folds} sets --cv and --fold of every run; drop --{name} from --extra")
    for dataset in _words(args.datasets, "--datasets"):
        if _is_generic(dataset) is False:
            raise SweepError(f"--folds applies to folder and csv data, which have no fixed validation split; "
                             f"{dataset} has its own")
    return [["--cv", str(args.folds), "--fold", str(i)] for i in range(args.folds)]


def _is_generic(dataset: str) -> bool | None:
    """Whether the dataset is folder or csv data (--cv applies); None for an unknown name."""
    from datasets import get_dataset

    try:
        return bool(get_dataset(dataset).generic)
    except UserError:
        return None  # an unknown name fails with its own message when its runs are checked


def _job(run_args: list[str], method: str) -> Job:
    """Check one run's arguments with the entry points' own parser and locate its folder."""
    from methods import get_method
    from utils.cli import parse_config

    entry = get_method(method).entry_point
    try:
        config = parse_config(run_args, default_method=method, prog=entry, notify=False)
    except UserError as exc:
        raise SweepError(f"a {method} run of this grid is invalid: {exc}") from None
    return Job(config, [entry, *run_args])


def expand(args: argparse.Namespace) -> list[Job]:
    """Every combination of the grid, in a stable order (seeds, then folds, innermost)."""
    from methods import get_method
    from utils.cli import trains_something

    groups = split_flags(args.extra)
    folds = _folds(args, groups)
    output_dir = str(Path(args.output_dir).expanduser().resolve())
    root: list[str] = []
    if args.root_path:
        path = Path(args.root_path).expanduser().resolve()
        if not path.is_dir():
            raise SweepError(f"--root_path {args.root_path} is not a folder; give the folder of the datasets")
        root = ["--root_path", str(path)]
    lrs = [t for t, _ in _numbers(args.lrs, "--lrs", float)] if args.lrs is not None else [None]
    seeds = [t for t, _ in _numbers(args.seeds, "--seeds", int)]
    levels: list[str | None] = _words(args.level, "--level") if args.level else [None]
    if args.n_iters is not None and args.n_iters < 1:
        raise SweepError(f"--n_iters must be at least 1, got {args.n_iters}")
    common = ["--output_dir", output_dir, *root]
    common += ["--preset", f"exp{args.experiment}"] if args.experiment else []
    methods = _methods(args)
    budgets = n_iters_flags(methods, args.n_iters)
    trains = {m: trains_something(get_method(m), {}) for m in methods}
    jobs: list[Job] = []
    for method in methods:
        extra = flags_for(method, groups) + budgets[method]
        for dataset in _words(args.datasets, "--datasets"):
            for level in levels if _has_levels(dataset) else [None]:
                for model in _words(args.models, "--models"):
                    for weights in _weights_list(args.weights):
                        for shots, pct in _data_axis(args):
                            for lr in lrs if trains[method] else [None]:  # no lr where nothing trains
                                for seed in seeds:
                                    for fold in folds:
                                        run_args = ["--method", method, "--dataset", dataset, "--model_name",
                                                    model, "--seed", seed, "--shots", shots, *fold, *common]
                                        run_args += ["--pourcentage", pct] if pct is not None else []
                                        run_args += ["--lr", lr] if lr is not None else []
                                        run_args += ["--level", level] if level else []
                                        run_args += ["--weights", weights] if weights else []
                                        jobs.append(_job(run_args + extra, method))
    _refuse_collisions(jobs)
    return jobs


def _refuse_collisions(jobs: list[Job]) -> None:
    """Two combinations sharing a run folder would overwrite or skip each other."""
    seen: dict[Path, Job] = {}
    for job in jobs:
        if job.folder in seen:
            raise SweepError(f"two combinations share the run folder {job.folder} (repeated value, or two "
                             "--weights files of one model?); run them as sweeps with separate --output_dir")
        seen[job.folder] = job


# Progress bars redraw in place with carriage returns; in a log each redraw becomes a line, so
# children redraw at most this often (seconds) unless the user chose otherwise.
LOG_PROGRESS_INTERVAL = "10"
_LINE_END = re.compile(rb"(\r\n|\r|\n)")


class LogLines:
    """A child's output as log lines: every carriage return (a progress bar's redraw) ends a line.

    The log then holds no '\r', and ``tail``, ``less`` and ``grep`` show one line per update.
    Redraws that only blank the line (a closing progress bar) are dropped.
    """

    def __init__(self, handle: typing.BinaryIO):
        self.handle = handle
        self._pending = b""
        self._after_cr = False

    def feed(self, data: bytes) -> None:
        if self._after_cr and data.startswith(b"\n"):
            data = data[1:]  # the '\n' of a '\r\n' split across two reads
        self._after_cr = data.endswith(b"\r")
        parts = _LINE_END.split(self._pending + data)
        self._pending = parts.pop()
        for text, end in zip(parts[::2], parts[1::2], strict=True):
            if end == b"\r" and not text.strip():
                continue
            self.handle.write(text + b"\n")
        self.handle.flush()

    def close(self) -> None:
        if self._pending.strip():
            self.handle.write(self._pending + b"\n")
        self._pending = b""
        self.handle.flush()


def copy_lines(source: typing.BinaryIO, target: typing.BinaryIO) -> None:
    """Copy a stream into a log as LogLines until the stream ends."""
    lines = LogLines(target)
    try:
        while chunk := os.read(source.fileno(), 65536):
            lines.feed(chunk)
    finally:
        lines.close()


# The process between a run and its log: it outlives the sweep (a run whose sweep is stopped or killed
# still logs to the end) and ignores the terminal's Ctrl-C (the run gets it, saves its checkpoint and
# says so through it).
_LOG_WRITER = ("import sys; sys.path.insert(0, {root!r}); from utils.sweep import copy_lines; "
               "copy_lines(sys.stdin.buffer, sys.stdout.buffer)")


def _attempt_header(job: Job, command: list[str]) -> str:
    """The lines that open one attempt of a run in its log; a rerun says that it resumes."""
    lines = []
    if job.log.is_file() and job.log.stat().st_size > 0:
        stamp = dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        how = ("from its checkpoint" if any(job.folder.glob("checkpoint*.pt"))
               else "from the start (no checkpoint was saved)")
        lines.append(f"# ---- resumed {stamp}, {how}; earlier attempts above ----")
    lines += [f"# {shlex.join(command)}", f"# cwd: {REPO_ROOT}"]
    return "".join(f"{line}\n" for line in lines)


class Running:
    """The runs this sweep has started and not seen end: each in its own process group (a signal meant for the
    sweep reaches them through it, never twice), so that stopping the sweep stops them, each after its
    checkpoint."""

    def __init__(self):
        self._lock = threading.Lock()
        self._children: set[subprocess.Popen] = set()
        self.stopped_by: int | None = None  # the signal that stopped the sweep: no run starts after it

    def add(self, child: subprocess.Popen) -> None:
        with self._lock:
            self._children.add(child)
        if self.stopped_by is not None:  # it started as the signal arrived
            self._send(child, self.stopped_by)

    def discard(self, child: subprocess.Popen) -> None:
        with self._lock:
            self._children.discard(child)

    def stop(self, signum: int) -> None:
        """Pass `signum` on to every run (SIGINT and SIGTERM: checkpoint, then exit; SIGKILL: at once)."""
        self.stopped_by = self.stopped_by or signum
        with self._lock:
            children = list(self._children)
        for child in children:
            self._send(child, signum)

    @staticmethod
    def _send(child: subprocess.Popen, signum: int) -> None:
        try:
            os.killpg(child.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass


RUNNING = Running()


def execute(job: Job, env: dict[str, str]) -> int:
    """Run one job to completion, its stdout and stderr appended to its log file; return the exit code.

    The run is a process group of its own; on Ctrl-C or SIGTERM the sweep passes the signal on and the run
    saves its checkpoint before it exits; a second Ctrl-C stops it at once.
    """
    job.log.parent.mkdir(parents=True, exist_ok=True)
    command = job.command(sys.executable)
    with open(job.log, "ab") as log:
        log.write(_attempt_header(job, command).encode())
        log.flush()
        writer = subprocess.Popen([sys.executable, "-c", _LOG_WRITER.format(root=str(Path(__file__).parents[1]))],
                                  stdin=subprocess.PIPE, stdout=log, stderr=log, start_new_session=True)
    try:
        child = subprocess.Popen(command, cwd=REPO_ROOT, env={"TQDM_MININTERVAL": LOG_PROGRESS_INTERVAL, **env},
                                 stdout=writer.stdin, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 start_new_session=True)
    finally:
        writer.stdin.close()  # the run holds the only write end: the writer stops when the run ends
    RUNNING.add(child)
    try:
        try:
            return child.wait()
        except KeyboardInterrupt:
            RUNNING.stop(signal.SIGINT)
            try:
                child.wait()
            except KeyboardInterrupt:
                RUNNING.stop(signal.SIGKILL)
            raise
    finally:
        RUNNING.discard(child)
        if child.poll() is not None:
            writer.wait()


class WorkerProcess:
    """One long-lived ``python -m utils.worker`` (one per GPU, or one on the CPU) that makes this sweep's runs
    one after another in-process (utils/worker.py); started on first use, and again after it ends (a crash,
    a GPU error). Its own process group, in RUNNING: a signal to the sweep reaches it as it reaches a run."""

    def __init__(self, env: dict[str, str]):
        self.env = {"TQDM_MININTERVAL": LOG_PROGRESS_INTERVAL, **env}
        self.process: subprocess.Popen | None = None

    def execute(self, jobs: list[Job], pack: int = 1) -> list[int]:
        """Make runs in the worker (several: packed, at most `pack` per step), each logged where execute() logs
        it; their exit statuses."""
        for job in jobs:
            job.log.parent.mkdir(parents=True, exist_ok=True)
            with open(job.log, "ab") as log:
                log.write(_attempt_header(job, job.command(sys.executable)).encode())
        process = self._started()
        request = {"runs": [{"args": job.args, "log": str(job.log)} for job in jobs], "pack": pack}
        try:
            try:
                process.stdin.write(json.dumps(request) + "\n")
                process.stdin.flush()
                answer = process.stdout.readline()
            except KeyboardInterrupt:
                RUNNING.stop(signal.SIGINT)
                try:
                    process.wait()
                except KeyboardInterrupt:
                    RUNNING.stop(signal.SIGKILL)
                raise
        except BrokenPipeError:
            answer = ""
        if answer:
            return [int(code) for code in json.loads(answer)["codes"]]
        code = self._ended()
        for job in jobs:
            with open(job.log, "a", encoding="utf-8") as log:
                log.write(f"# the sweep's worker ended (status {code}) during this run\n")
        return [code or 1] * len(jobs)

    def _started(self) -> subprocess.Popen:
        if self.process is None or self.process.poll() is not None:
            if self.process is not None:
                self._ended()
            self.process = subprocess.Popen([sys.executable, "-m", "utils.worker"], cwd=REPO_ROOT, env=self.env,
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                            start_new_session=True)
            RUNNING.add(self.process)
        return self.process

    def _ended(self) -> int:
        code = self.process.wait()
        RUNNING.discard(self.process)
        self.process = None
        return code

    def close(self) -> None:
        """Let the worker finish: no more runs (end of its input), then wait for it."""
        if self.process is not None:
            with contextlib.suppress(BrokenPipeError):
                self.process.stdin.close()
            self._ended()


@contextlib.contextmanager
def _stop_on_sigterm():
    """SIGTERM to the sweep: pass it on to the running runs (they checkpoint and exit) and start no other."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: RUNNING.stop(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def last_error_line(log: Path, start: int = 0) -> str | None:
    """What a failed run said last, from byte `start` of its log: its last 'error:' line, else its last
    non-empty line (the sweep's own '# ' lines aside); None when it said nothing."""
    try:
        with open(log, "rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            handle.seek(max(start, size - 1_000_000))  # the end of a long log is enough
            text = handle.read().decode(errors="replace")
    except OSError:
        return None
    said = [line.strip() for line in text.replace("\r", "\n").splitlines()]
    said = [line for line in said if line and not line.startswith("# ")]
    errors = [line for line in said if line.startswith("error:")]
    return (errors or said or [None])[-1]


def _run_env(gpu: str | None) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    return env


def _run_jobs(jobs: list[Job], gpu: str | None, worker: WorkerProcess | None = None, pack: int = 1) -> list[Outcome]:
    """Run jobs (in `worker`, packed when there are several; else each in a process of its own) and check that
    each left a finished results.json where the sweep expects it."""
    start = time.perf_counter()
    outcomes: list[Outcome | None] = [None] * len(jobs)
    for n, job in enumerate(jobs):
        owner = lock_owner(job.folder)
        if owner is not None:  # e.g. the run of an earlier sweep that was killed: it still runs and logs
            outcomes[n] = Outcome(job, 0, 0.0, f"not started: {owner.text()} is running it; rerun the sweep when "
                                               "it ends")
    ready = [n for n, outcome in enumerate(outcomes) if outcome is None]
    offsets = {n: jobs[n].log.stat().st_size if jobs[n].log.is_file() else 0 for n in ready}
    try:
        if worker is not None and ready:
            codes = worker.execute([jobs[n] for n in ready], pack)
        else:
            codes = [execute(jobs[n], _run_env(gpu)) for n in ready]
    except OSError as exc:
        for n in ready:
            outcomes[n] = Outcome(jobs[n], 1, time.perf_counter() - start, f"could not start: {exc}")
        return outcomes
    for n, code in zip(ready, codes, strict=True):
        job = jobs[n]
        outcome = outcomes[n] = Outcome(job, code, time.perf_counter() - start)
        if code == 0 and not is_finished(job.folder):
            outcome.message = (f"exited 0 but left no {RESULTS_FILE} in {job.folder}; the entry point and the "
                               "sweep disagree on the run folder")
        if not outcome.ok:
            outcome.last_error = last_error_line(job.log, offsets[n])
    return outcomes


def pack_groups(jobs: list[Job], pack: int) -> list[list[tuple[int, Job]]]:
    """The numbered jobs in order, those that can train packed (equal ``engine.packing.pack_key``) gathered in
    groups of at most `pack`; the others (and all of them with `pack` 1) one per group."""
    numbered = list(enumerate(jobs, 1))
    if pack < 2:
        return [[item] for item in numbered]
    from engine.packing import pack_key

    groups: list[list[tuple[int, Job]]] = []
    filling: dict[str, list[tuple[int, Job]]] = {}
    for item in numbered:
        key = pack_key(item[1].config)
        group = filling.get(key) if key is not None else None
        if group is None or len(group) >= pack:
            group = []
            groups.append(group)
            if key is not None:
                filling[key] = group
        group.append(item)
    return groups


def run_local(jobs: list[Job], gpus: list[str] | None = None, in_worker: bool = False,
              pack: int = 1) -> list[Outcome]:
    """Run jobs here: sequentially, or one worker thread per GPU pulling from a shared queue; `in_worker`: each
    thread's runs in one long-lived worker process (WorkerProcess), `pack` > 1 up to that many at once where
    they can train packed, else one process per run."""
    todo: queue.Queue[list[tuple[int, Job]]] = queue.Queue()
    for group in pack_groups(jobs, pack if in_worker else 1):
        todo.put(group)
    outcomes: list[Outcome] = []
    lock = threading.Lock()

    def worker(gpu: str | None) -> None:
        process = WorkerProcess(_run_env(gpu)) if in_worker else None
        try:
            take(gpu, process)
        finally:
            if process is not None:
                process.close()

    def take(gpu: str | None, process: WorkerProcess | None) -> None:
        while RUNNING.stopped_by is None:
            try:
                group = todo.get_nowait()
            except queue.Empty:
                return
            where = f" on GPU {gpu}" if gpu is not None else ""
            packed = f" (packed, {len(group)} runs)" if len(group) > 1 else ""
            with lock:
                for i, job in group:
                    print(f"[{i}/{len(jobs)}] start {job.label}{where}{packed}", flush=True)
            done = _run_jobs([job for _, job in group], gpu, process, pack)
            with lock:
                for (i, job), outcome in zip(group, done, strict=True):
                    outcomes.append(outcome)
                    took = f"{outcome.seconds:.1f} s"
                    status = f"ok {job.label} ({took})" if outcome.ok else (
                        f"FAILED {job.label} (exit {outcome.returncode}, {took}), log: {job.log}")
                    print(f"[{i}/{len(jobs)}] {status}", flush=True)

    with _stop_on_sigterm():
        if not gpus:
            worker(None)
            return outcomes
        threads = [threading.Thread(target=worker, args=(gpu,), daemon=True) for gpu in gpus]
        for thread in threads:
            thread.start()
        try:
            for thread in threads:
                while thread.is_alive():  # short joins keep Ctrl-C and SIGTERM responsive
                    thread.join(timeout=0.5)
        except KeyboardInterrupt:
            RUNNING.stop(signal.SIGINT)
            try:
                for thread in threads:
                    while thread.is_alive():
                        thread.join(timeout=0.5)
            except KeyboardInterrupt:
                RUNNING.stop(signal.SIGKILL)
            raise
    return outcomes


def _sweep_folder(output_dir: str) -> Path:
    """A fresh <output_dir>/sweeps/<timestamp> folder."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(output_dir) / "sweeps"
    folder, n = base / stamp, 1
    while folder.exists():
        n += 1
        folder = base / f"{stamp}-{n}"
    (folder / "logs").mkdir(parents=True)
    return folder


def _positive(text: str) -> int:
    """An integer of at least 1 (--nodes, --gpus_per_node)."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


# Seconds before the time limit at which SLURM asks a multi-GPU run to checkpoint and requeue itself.
SLURM_SIGNAL_SECONDS = 180


def slurm_script(folder: Path, n_tasks: int, name: str, options: Sequence[str],
                 max_parallel: int | None = None, nodes: int = 1, gpus_per_node: int = 1) -> str:
    """The sbatch array script: task i runs line i+1 of commands.txt unless its run already finished.

    With several nodes or GPUs per run, each task is one data-parallel run: one torchrun per node
    (srun), rendezvous on the first node; near the time limit it checkpoints, and requeues itself.
    """
    array = f"0-{n_tasks - 1}" + (f"%{max_parallel}" if max_parallel else "")
    lines = ["#!/bin/bash", f"#SBATCH --job-name=cytolora-{name}", f"#SBATCH --array={array}",
             f"#SBATCH --output={folder}/logs/task_%a.log"]
    parallel = nodes > 1 or gpus_per_node > 1
    if parallel:
        lines += [f"#SBATCH --nodes={nodes}", "#SBATCH --ntasks-per-node=1",
                  f"#SBATCH --signal=B:USR1@{SLURM_SIGNAL_SECONDS}", "#SBATCH --requeue"]
    if not any(o.startswith(("--gres", "--gpus", "-G")) for o in options):
        lines.append(f"#SBATCH --gpus-per-node={gpus_per_node}" if parallel else "#SBATCH --gres=gpu:1")
    lines += [f"#SBATCH {o}" for o in options]
    lines += [
        "set -euo pipefail",
        f"cd {shlex.quote(str(REPO_ROOT))}",
        "line=$((SLURM_ARRAY_TASK_ID + 1))",
        f'run_dir=$(sed -n "${{line}}p" {shlex.quote(str(folder / "run_dirs.txt"))})',
        f'command=$(sed -n "${{line}}p" {shlex.quote(str(folder / "commands.txt"))})',
        f'if [ -f "$run_dir/{RESULTS_FILE}" ]; then echo "already finished: $run_dir"; exit 0; fi',
        'echo "task $SLURM_ARRAY_TASK_ID on $(hostname): $command"',
    ]
    lines += _torchrun_lines(nodes, gpus_per_node) if parallel else ['eval "$command"']
    return "\n".join([*lines, ""])


def _torchrun_lines(nodes: int, gpus_per_node: int) -> list[str]:
    """Run the task's command as one torchrun per node; on SLURM's warning signal, pass SIGTERM on (every
    rank stops after the same step, rank 0 saves a checkpoint) and requeue, so the rerun resumes."""
    torchrun = Path(sys.executable).with_name("torchrun")
    launcher = shlex.quote(str(torchrun)) if torchrun.exists() else "torchrun"
    return [
        'eval "set -- $command"; shift  # the entry script and its flags, without the interpreter',
        'head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "port=$((29500 + SLURM_JOB_ID % 1000))",
        "requeue=0",
        'trap \'requeue=1; echo "time limit near: checkpointing, then requeueing"; kill -TERM "$pid"\' USR1',
        f"srun --ntasks-per-node=1 --kill-on-bad-exit=1 {launcher} --nnodes {nodes} --nproc_per_node "
        f'{gpus_per_node} --rdzv_backend c10d --rdzv_endpoint "$head:$port" --rdzv_id "$SLURM_JOB_ID" "$@" &',
        "pid=$!",
        "status=0",
        'wait "$pid" || status=$?',
        'if [ "$requeue" = 1 ]; then wait "$pid" || true; scontrol requeue "$SLURM_JOB_ID"; exit 0; fi',
        'exit "$status"',
    ]


def write_slurm(jobs: list[Job], args: argparse.Namespace) -> tuple[Path, int]:
    """Write sweep.sbatch, commands.txt and run_dirs.txt; submit if sbatch exists. Returns (script, code)."""
    folder = _sweep_folder(jobs[0].config.output_dir)
    (folder / "commands.txt").write_text("".join(shlex.join(j.command(sys.executable)) + "\n" for j in jobs))
    (folder / "run_dirs.txt").write_text("".join(f"{j.folder}\n" for j in jobs))
    script = folder / "sweep.sbatch"
    options = args.sbatch.split()
    script.write_text(slurm_script(folder, len(jobs), f"exp{args.experiment}" if args.experiment else "sweep", options,
                                    args.max_parallel, args.nodes, args.gpus_per_node))
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        print(f"sbatch not found; submit later with: sbatch {script}")
        return script, 0
    done = subprocess.run([sbatch, str(script)], check=False, capture_output=True, text=True)
    print((done.stdout or done.stderr).strip())
    if done.returncode != 0:
        raise SweepError(f"sbatch {script} failed with exit code {done.returncode}: {done.stderr.strip()}")
    return script, 0


def _summary(total: int, skipped: int, outcomes: list[Outcome]) -> str:
    """The end-of-sweep lines: counts, then each failed run with its log."""
    failed = [o for o in outcomes if not o.ok]
    lines = [(f"sweep: {total} combinations, ran {len(outcomes)}, skipped {skipped} (already finished), "
              f"failed {len(failed)}")]
    for o in failed:
        why = o.message or f"exit {o.returncode}"
        lines.append(f"  FAILED {o.job.folder} ({why}); log: {o.job.log}")
        if o.last_error:
            lines.append(f"    {o.last_error}")
    return "\n".join(lines)


def run(argv: Sequence[str] | None = None) -> int:
    """Expand, skip finished runs, then dry-run, submit or run; returns the exit code."""
    from utils.cli import refuse_control_characters

    argv = list(sys.argv[1:] if argv is None else argv)
    refuse_control_characters(argv, "bash launch_run.sh")  # a newline would split the SLURM script's lines
    args = build_parser().parse_args(argv)
    gpus = _words(args.gpus, "--gpus") if args.gpus is not None else None
    _check_estimate_options(args)
    _check_pack_options(args)
    jobs = expand(args)
    for message in dict.fromkeys(w for job in jobs for w in job.config.warnings):  # each once, not once per run
        print(f"note: {message}", file=sys.stderr)
    pending = [j for j in jobs if not is_finished(j.folder)]
    skipped = len(jobs) - len(pending)
    head = f"# {len(jobs)} combinations: {len(pending)} to run, {skipped} already finished (skipped)"
    if args.estimate:
        from utils.estimate import estimate

        print(estimate(pending, step_seconds=args.step_seconds, workers=len(gpus) if gpus else 1,
                       finished=skipped).text())
        return 0
    if args.dry_run:
        print(f"{head}; run from {REPO_ROOT}")
        for job in pending:
            print(f"{shlex.join(job.command())} > {shlex.quote(str(job.log))} 2>&1")
        return 0
    print(head, flush=True)
    if not pending:
        return 0
    if args.slurm:
        script, code = write_slurm(pending, args)
        print(f"array of {len(pending)} tasks: {script}")
        return code
    outcomes = run_local(pending, gpus, in_worker=args.worker, pack=args.pack)
    print(_summary(len(jobs), skipped, outcomes))
    if RUNNING.stopped_by is not None:
        print(f"stopped by signal {RUNNING.stopped_by}: rerun the same command to resume", file=sys.stderr)
        return 128 + RUNNING.stopped_by
    return 1 if any(not o.ok for o in outcomes) else 0


def _check_pack_options(args: argparse.Namespace) -> None:
    if args.pack > 1 and args.slurm:
        raise SweepError("--pack trains runs together in a local sweep's worker; SLURM tasks run alone: drop --pack")
    if args.pack > 1 and not args.worker:
        raise SweepError("--pack trains runs together in the sweep's worker: drop --worker False (or --pack)")


def _check_estimate_options(args: argparse.Namespace) -> None:
    if args.step_seconds is not None and not args.estimate:
        raise SweepError("--step_seconds goes with --estimate")
    if args.step_seconds is not None and not args.step_seconds > 0:
        raise SweepError(f"--step_seconds must be positive, got {args.step_seconds:g}")
    if args.estimate and (args.dry_run or args.slurm):
        raise SweepError("--estimate prints the cost and runs nothing: drop --dry_run and --slurm")


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: user mistakes become one 'error:' line and exit code 2."""
    try:
        return run(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
