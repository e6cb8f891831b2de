"""Per-run overhead inside a sweep of tiny runs: one process per run against the sweep's long-lived worker.

    python benchmarks/sweep_overhead.py                     # 6 tiny LoRA runs on the demo data, on the CPU
    python benchmarks/sweep_overhead.py --runs 12 --model tiny_clip --device cuda --threads 0

Runs the same sweep (``python -m utils.sweep``, into a fresh temporary folder each time) with ``--worker False``
and with ``--worker True`` and prints, per mode, the sweep's wall time, each run's time as the sweep measured
it, the training time the run recorded (results.json timing.train_seconds) and the difference: the per-run
overhead (start-up, imports, model building, image checks, decoding, evaluation, writing). The worker's first
run pays its start-up once; "after the first" is the steady state a long sweep sees. Tiny models run fastest
on one thread (and several threads on a busy machine wait on each other), so both sweeps run with
OMP_NUM_THREADS=1 unless --threads says otherwise (0: torch's default).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUN_LINE = re.compile(r"^\[(\d+)/\d+\] ok (\S+) \(([\d.]+) s\)$")


def sweep_args(out: Path, runs: int, model: str, device: str) -> list[str]:
    """A grid of `runs` tiny LoRA runs on the demo data: shots 1 and 2, as many seeds as it takes."""
    seeds = " ".join(str(s) for s in range(1, (runs + 1) // 2 + 1))
    return ["--datasets", "demo", "--models", model, "--shots", "1 2" if runs > 1 else "1", "--seeds", seeds,
            "--n_iters", "1", "--output_dir", str(out),
            "--extra", f"--warmup_steps 1 --batch_size 32 --num_workers 0 --device {device}"]


def measure(worker: bool, runs: int, model: str, device: str, threads: int) -> dict:
    """One sweep in a fresh folder; its wall time and, per run, the sweep's time and the training time."""
    with tempfile.TemporaryDirectory(prefix="sweep-overhead-") as tmp:
        out = Path(tmp)
        command = [sys.executable, "-m", "utils.sweep", *sweep_args(out, runs, model, device),
                   "--worker", str(worker)]
        env = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}
        if threads > 0:
            env["OMP_NUM_THREADS"] = str(threads)
        start = time.perf_counter()
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"the sweep failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        per_run = []
        for line in done.stdout.splitlines():
            match = RUN_LINE.match(line.strip())
            if match:
                record = json.loads((out / match.group(2) / "results.json").read_text())
                per_run.append((float(match.group(3)), float(record["timing"]["train_seconds"])))
    return {"wall": wall, "runs": per_run}


def describe(name: str, result: dict) -> tuple[str, float, float]:
    runs = result["runs"]
    seconds = [s for s, _ in runs]
    overhead = [s - t for s, t in runs]
    steady = statistics.mean(overhead[1:]) if len(overhead) > 1 else overhead[0]
    line = (f"{name:<18} {len(runs):>4} {result['wall']:>9.1f} {statistics.mean(seconds):>9.2f} "
            f"{statistics.mean(t for _, t in runs):>9.2f} {statistics.mean(overhead):>10.2f} {steady:>12.2f}")
    return line, statistics.mean(overhead), steady


def main(argv: list[str] | None = None) -> int:
    """Measure both modes and print the table and the two per-run overhead figures."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=6)
    p.add_argument("--model", default="tiny_clip")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the sweeps (0: torch's default)")
    args = p.parse_args(argv)
    results = {name: measure(worker, args.runs, args.model, args.device, args.threads)
               for name, worker in (("process per run", False), ("worker", True))}
    threads = args.threads or "default"
    print(f"{args.runs} tiny runs (demo data, {args.model}, lora, batch 32, {args.device}, {threads} thread(s), "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs); seconds")
    print(f"{'mode':<18} {'runs':>4} {'wall':>9} {'per run':>9} {'training':>9} {'overhead':>10} "
          f"{'after first':>12}")
    figures = {}
    for name, result in results.items():
        line, mean, steady = describe(name, result)
        figures[name] = (mean, steady)
        print(line)
    before, after = figures["process per run"], figures["worker"]
    print(f"per-run overhead: {before[0]:.2f} s with a process per run, {after[0]:.2f} s in the worker "
          f"({after[1]:.2f} s after its first run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
