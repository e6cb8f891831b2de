"""Resumable sweeps: every combination of datasets x models x weights x shots (or percentages) x lrs x seeds.

One process expands the whole grid, checks which run folders already hold a finished
results.json (without importing torch or loading a model), then prints the pending commands
(--dry_run), runs them here (sequentially, or one worker per GPU with --gpus) or writes a
SLURM array script (--slurm). ``bash launch_run.sh`` is a thin wrapper around this module.

Pretrained and random-init weights in one sweep: ``--weights "pretrained random"`` (the
default is ``pretrained``, the model's usual weights). Random-init runs get a model label
ending in ``-random``, so the report shows both side by side and pairs them by seed.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import os
import queue
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from common.errors import UserError
from utils.config import RESULTS_FILE, RunConfig, is_finished, run_dir

REPO_ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINTS = {1: "main.py", 2: "main_lora.py", 3: "main_lora.py"}
DEFAULT_SHOTS = "1 2 4 8 16"
DEFAULT_SEEDS = "1 2 3"
DEFAULT_PERCENTAGES = "1 10 50 100"
PRETRAINED_TOKENS = ("pretrained", "default")
PARAM_LETTERS = ("q", "k", "v", "o", "pw")
# Grid axes belong to the sweep's own options; repeating them in --extra would desynchronise
# the run folder the sweep checks from the one the entry point writes.
SWEEP_OWNED = ("dataset", "model_name", "seed", "shots", "lr", "percentage", "output_dir", "root_path",
               "level", "weights", "n_iters")


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

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.message


def build_parser() -> argparse.ArgumentParser:
    """The sweep's command line."""
    p = _Parser(prog="launch_run.sh", allow_abbrev=False,
                description="Run every combination of a grid of experiments, skipping finished ones.")
    p.add_argument("--experiment", type=int, required=True, choices=(1, 2, 3),
                   help="1 = linear head (main.py), 2 = LoRA few-shot, 3 = LoRA on a percentage")
    p.add_argument("--datasets", required=True, help='space-separated dataset names, e.g. "sipakmed mlcc"')
    p.add_argument("--models", required=True, help='space-separated model keys, e.g. "clip uni"')
    p.add_argument("--shots", default=None, help=f'experiments 1 and 2 (default "{DEFAULT_SHOTS}"; -1 = all)')
    p.add_argument("--percentages", default=None, help=f'experiment 3 (default "{DEFAULT_PERCENTAGES}")')
    p.add_argument("--seeds", default=DEFAULT_SEEDS)
    p.add_argument("--lrs", default=None, help=f"learning rates (default {RunConfig.lr})")
    p.add_argument("--weights", default="pretrained",
                   help='space-separated: "pretrained" (usual weights), "random", or a local file per entry')
    p.add_argument("--level", default=None, help="HiCervix label level(s), applied to hicervix only")
    p.add_argument("--root_path", default=None)
    p.add_argument("--output_dir", default=RunConfig.output_dir)
    p.add_argument("--n_iters", type=int, default=None)
    p.add_argument("--extra", default="", help='flags passed to every run, e.g. "--params pw --r 4"')
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry_run", action="store_true", help="print the pending commands and exit")
    mode.add_argument("--slurm", action="store_true", help="write (and submit if sbatch exists) an array job")
    mode.add_argument("--gpus", default=None, help='one local worker per listed GPU, e.g. "0 1"')
    p.add_argument("--sbatch", default="", help='#SBATCH options, e.g. "--partition=gpu --time=4:00:00"')
    p.add_argument("--max_parallel", type=int, default=None, help="SLURM: at most this many tasks at once")
    return p


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


def parse_params(tokens: Sequence[str]) -> tuple[str, ...]:
    """LoRA letters from "q v", "qkv", "q,v" or "pw" forms, in the canonical order the entry points store."""
    found: set[str] = set()
    for token in re.split(r"[\s,;+]+", " ".join(tokens).strip().lower()):
        i = 0
        while i < len(token):
            letter = "pw" if token.startswith("pw", i) else token[i]
            if letter not in PARAM_LETTERS:
                raise SweepError(f"--extra --params: unknown projection {letter!r}; use {PARAM_LETTERS}")
            found.add(letter)
            i += len(letter)
    if not found:
        raise SweepError(f"--extra --params is empty; use letters of {PARAM_LETTERS}")
    # Canonical order, like lora.parse_params: "v q" and "q v" are one setting and one run folder.
    return tuple(letter for letter in PARAM_LETTERS if letter in found)


def _to_bool(text: str) -> bool:
    """True/False in the forms the entry points accept."""
    low = str(text).strip().lower()
    if low in ("true", "1", "yes", "y"):
        return True
    if low in ("false", "0", "no", "n"):
        return False
    raise ValueError(text)


def _field_converter(hint: object) -> Callable[[str], object]:
    """A converter for one RunConfig field, from its type hint."""
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    base = typing.get_origin(args[0]) or args[0]
    return {bool: _to_bool, int: int, float: float}.get(base, str)


def parse_extra(extra: str) -> tuple[dict, list[str]]:
    """Split --extra into RunConfig overrides (so run folders are right) and the tokens passed through."""
    try:
        tokens = shlex.split(extra)
    except ValueError as exc:
        raise SweepError(f"--extra: cannot split {extra!r} ({exc})") from None
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    hints = typing.get_type_hints(RunConfig)
    fields = [f.name for f in dataclasses.fields(RunConfig) if f.name not in ("extra", "experiment")]
    for name in fields:
        if name == "params":
            parser.add_argument("--params", nargs="+")
        elif hints[name] is bool:
            parser.add_argument(f"--{name}", nargs="?", const="True")
        else:
            parser.add_argument(f"--{name}")
    parser.add_argument("--pourcentage", dest="percentage_alias")
    known, _ = parser.parse_known_args(tokens)
    given = {k: v for k, v in vars(known).items() if v is not None}
    if "percentage_alias" in given:
        given["percentage"] = given.pop("percentage_alias")
    owned = sorted(set(given) & set(SWEEP_OWNED))
    if owned:
        raise SweepError(f"--extra sets --{owned[0]}, which is a sweep option; give it to the sweep directly")
    overrides: dict = {}
    for name, value in given.items():
        if name == "params":
            overrides[name] = parse_params(value)
            continue
        try:
            overrides[name] = _field_converter(hints[name])(value)
        except ValueError:
            raise SweepError(f"--extra: --{name} got {value!r}, which is not a valid value") from None
    return overrides, tokens


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


def _data_axis(args: argparse.Namespace) -> list[tuple[int, tuple[str, float] | None]]:
    """(shots, percentage) pairs: shots for experiments 1 and 2, percentages (shots 0) for experiment 3."""
    if args.experiment == 3:
        if args.shots is not None:
            raise SweepError("--shots does not apply to experiment 3 (it uses --shots 0); give --percentages")
        pcts = _numbers(args.percentages or DEFAULT_PERCENTAGES, "--percentages", float)
        for text, value in pcts:
            if not 0 < value <= 100:
                raise SweepError(f"--percentages: {text} is outside (0, 100]")
        return [(0, pct) for pct in pcts]
    if args.percentages is not None:
        raise SweepError("--percentages applies to experiment 3 only; use --shots for experiments 1 and 2")
    shots = _numbers(args.shots or DEFAULT_SHOTS, "--shots", int)
    for text, value in shots:
        if value == 0 or value < -1:
            raise SweepError(f"--shots: {text} is not a shot count; give K >= 1 or -1 for all images")
    return [(int(value), None) for _, value in shots]


def _entry_args(config: RunConfig, lr_text: str, pct_text: str | None, n_iters: int | None,
                extra_tokens: list[str]) -> list[str]:
    """The entry-point arguments for one combination."""
    args = [ENTRY_POINTS[config.experiment], "--dataset", config.dataset, "--model_name", config.model_name,
            "--seed", str(config.seed), "--shots", str(config.shots), "--lr", lr_text,
            "--output_dir", config.output_dir]
    if config.root_path:
        args += ["--root_path", config.root_path]
    if pct_text is not None:
        args += ["--pourcentage", pct_text]
    if config.level:
        args += ["--level", config.level]
    if config.weights:
        args += ["--weights", config.weights]
    if n_iters is not None:
        args += ["--n_iters", str(n_iters)]
    return args + extra_tokens


def expand(args: argparse.Namespace) -> list[Job]:
    """Every combination of the grid, in a stable order (seeds innermost)."""
    overrides, extra_tokens = parse_extra(args.extra)
    output_dir = str(Path(args.output_dir).expanduser().resolve())
    root_path = ""
    if args.root_path:
        root = Path(args.root_path).expanduser().resolve()
        if not root.is_dir():
            raise SweepError(f"--root_path {args.root_path} is not a folder; give the folder of the datasets")
        root_path = str(root)
    lrs = _numbers(args.lrs, "--lrs", float) if args.lrs is not None else [(repr(RunConfig.lr), RunConfig.lr)]
    seeds = _numbers(args.seeds, "--seeds", int)
    levels: list[str | None] = _words(args.level, "--level") if args.level else [None]
    if args.n_iters is not None and args.n_iters < 1:
        raise SweepError(f"--n_iters must be at least 1, got {args.n_iters}")
    base = {**overrides, "experiment": args.experiment, "output_dir": output_dir, "root_path": root_path}
    if args.experiment == 1:
        base["params"] = ()  # the linear head has no LoRA letters (as main.py records it)
    if args.n_iters is not None:
        base["n_iters"] = args.n_iters
    jobs: list[Job] = []
    for dataset in _words(args.datasets, "--datasets"):
        for level in levels if dataset == "hicervix" else [None]:
            for model in _words(args.models, "--models"):
                for weights in _weights_list(args.weights):
                    for shots, pct in _data_axis(args):
                        for lr_text, lr in lrs:
                            for _, seed in seeds:
                                config = RunConfig(**base, dataset=dataset, level=level, model_name=model,
                                                   weights=weights, shots=shots, lr=float(lr), seed=int(seed),
                                                   percentage=None if pct is None else float(pct[1]))
                                entry = _entry_args(config, lr_text, None if pct is None else pct[0],
                                                    args.n_iters, extra_tokens)
                                jobs.append(Job(config, entry))
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


def execute(job: Job, env: dict[str, str]) -> int:
    """Run one job to completion, its stdout and stderr going to its log file; return the exit code."""
    job.log.parent.mkdir(parents=True, exist_ok=True)
    command = job.command(sys.executable)
    with open(job.log, "w") as log:
        log.write(f"# {shlex.join(command)}\n# cwd: {REPO_ROOT}\n")
        log.flush()
        done = subprocess.run(command, check=False, cwd=REPO_ROOT, env=env, stdout=log,
                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return done.returncode


def _run_one(job: Job, gpu: str | None) -> Outcome:
    """Run a job and check that it left a finished results.json where the sweep expects it."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    start = time.perf_counter()
    try:
        code = execute(job, env)
    except OSError as exc:
        return Outcome(job, 1, time.perf_counter() - start, f"could not start: {exc}")
    outcome = Outcome(job, code, time.perf_counter() - start)
    if code == 0 and not is_finished(job.folder):
        outcome.message = (f"exited 0 but left no {RESULTS_FILE} in {job.folder}; the entry point and the "
                           "sweep disagree on the run folder")
    return outcome


def run_local(jobs: list[Job], gpus: list[str] | None = None) -> list[Outcome]:
    """Run jobs here: sequentially, or one worker thread per GPU pulling from a shared queue."""
    todo: queue.Queue[tuple[int, Job]] = queue.Queue()
    for i, job in enumerate(jobs, 1):
        todo.put((i, job))
    outcomes: list[Outcome] = []
    lock = threading.Lock()

    def worker(gpu: str | None) -> None:
        while True:
            try:
                i, job = todo.get_nowait()
            except queue.Empty:
                return
            where = f" on GPU {gpu}" if gpu is not None else ""
            with lock:
                print(f"[{i}/{len(jobs)}] start {job.label}{where}", flush=True)
            outcome = _run_one(job, gpu)
            with lock:
                outcomes.append(outcome)
                took = f"{outcome.seconds:.1f} s"
                status = f"ok {job.label} ({took})" if outcome.ok else (
                    f"FAILED {job.label} (exit {outcome.returncode}, {took}), log: {job.log}")
                print(f"[{i}/{len(jobs)}] {status}", flush=True)

    if not gpus:
        worker(None)
        return outcomes
    threads = [threading.Thread(target=worker, args=(gpu,), daemon=True) for gpu in gpus]
    for thread in threads:
        thread.start()
    for thread in threads:
        while thread.is_alive():  # short joins keep Ctrl-C responsive
            thread.join(timeout=0.5)
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


def slurm_script(folder: Path, n_tasks: int, experiment: int, options: Sequence[str],
                 max_parallel: int | None = None) -> str:
    """The sbatch array script: task i runs line i+1 of commands.txt unless its run already finished."""
    array = f"0-{n_tasks - 1}" + (f"%{max_parallel}" if max_parallel else "")
    lines = ["#!/bin/bash", f"#SBATCH --job-name=cytolora-exp{experiment}", f"#SBATCH --array={array}",
             f"#SBATCH --output={folder}/logs/task_%a.log"]
    if not any(o.startswith(("--gres", "--gpus", "-G")) for o in options):
        lines.append("#SBATCH --gres=gpu:1")
    lines += [f"#SBATCH {o}" for o in options]
    lines += [
        "set -euo pipefail",
        f"cd {shlex.quote(str(REPO_ROOT))}",
        "line=$((SLURM_ARRAY_TASK_ID + 1))",
        f'run_dir=$(sed -n "${{line}}p" {shlex.quote(str(folder / "run_dirs.txt"))})',
        f'command=$(sed -n "${{line}}p" {shlex.quote(str(folder / "commands.txt"))})',
        f'if [ -f "$run_dir/{RESULTS_FILE}" ]; then echo "already finished: $run_dir"; exit 0; fi',
        'echo "task $SLURM_ARRAY_TASK_ID on $(hostname): $command"',
        'eval "$command"',
        "",
    ]
    return "\n".join(lines)


def write_slurm(jobs: list[Job], args: argparse.Namespace) -> tuple[Path, int]:
    """Write sweep.sbatch, commands.txt and run_dirs.txt; submit if sbatch exists. Returns (script, code)."""
    folder = _sweep_folder(jobs[0].config.output_dir)
    (folder / "commands.txt").write_text("".join(shlex.join(j.command(sys.executable)) + "\n" for j in jobs))
    (folder / "run_dirs.txt").write_text("".join(f"{j.folder}\n" for j in jobs))
    script = folder / "sweep.sbatch"
    options = args.sbatch.split()
    script.write_text(slurm_script(folder, len(jobs), args.experiment, options, args.max_parallel))
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
    return "\n".join(lines)


def run(argv: Sequence[str] | None = None) -> int:
    """Expand, skip finished runs, then dry-run, submit or run; returns the exit code."""
    args = build_parser().parse_args(argv)
    gpus = _words(args.gpus, "--gpus") if args.gpus is not None else None
    jobs = expand(args)
    pending = [j for j in jobs if not is_finished(j.folder)]
    skipped = len(jobs) - len(pending)
    head = f"# {len(jobs)} combinations: {len(pending)} to run, {skipped} already finished (skipped)"
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
    outcomes = run_local(pending, gpus)
    print(_summary(len(jobs), skipped, outcomes))
    return 1 if any(not o.ok for o in outcomes) else 0


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
