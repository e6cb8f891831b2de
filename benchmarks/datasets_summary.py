"""Time `python -m datasets summary` on a full-size fake HiCervix (40,229 images).

The tree has the real layout (``{train,val,test}.csv`` with image_name, class_name,
level_1..3, and ``{train,val,test}/*.jpg``); the jpg files are empty, since listing never
decodes an image. Goal: the 16-shot level_3 summary in under 10 s on 2 cores.

    python benchmarks/datasets_summary.py [--images 40229] [--repeats 3]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SPLIT_SHARES = {"train": 0.70, "val": 0.15, "test": 0.15}


def hierarchy() -> list[tuple[str, str, str]]:
    """29 fake leaves: (level_1, level_2, level_3), '' where a branch stops early."""
    leaves = []
    for a in range(5):
        for b in range(3):
            leaves.append((f"L1_{a}", f"L2_{a}_{b}", ""))  # a level_2 leaf: level_3 falls back to it
            leaves.append((f"L1_{a}", f"L2_{a}_{b}", f"L3_{a}_{b}"))
    return leaves[:28] + [("L1_5", "", "")]  # one level_1-only class: left out at level_3


def build(root: Path, n_images: int, seed: int = 0) -> None:
    """Write the CSVs and the empty image files."""
    rng = random.Random(seed)
    leaves = hierarchy()
    weights = [rng.uniform(0.2, 3.0) for _ in leaves]  # imbalanced, as the real data
    start = 0
    splits = list(SPLIT_SHARES)
    for i, split in enumerate(splits):
        count = n_images - start if i == len(splits) - 1 else round(n_images * SPLIT_SHARES[split])
        (root / split).mkdir(parents=True)
        with open(root / f"{split}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["image_name", "class_name", "level_1", "level_2", "level_3"])
            for k in rng.choices(range(len(leaves)), weights=weights, k=count):
                name = f"img_{start:06d}.jpg"
                start += 1
                l1, l2, l3 = leaves[k]
                writer.writerow([name, l3 or l2 or l1, l1, l2, l3])
                (root / split / name).touch()


def time_summary(root: Path, repeats: int) -> tuple[list[float], dict]:
    """Wall-clock seconds of the CLI (interpreter start included), and its output."""
    cmd = [sys.executable, "-m", "datasets", "summary", "--root_path", str(root), "--dataset", "hicervix"]
    cmd += ["--shots", "16", "--seed", "1", "--level", "level_3"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    times, out = [], {}
    for _ in range(repeats):
        t0 = time.perf_counter()
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=True)
        times.append(time.perf_counter() - t0)
        out = json.loads(done.stdout)
    return times, out


def main() -> None:
    """Build the fake tree in a temporary folder, time the summary, print a JSON report."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=40229)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fake-hicervix-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        build(root, args.images)
        build_s = time.perf_counter() - t0
        times, out = time_summary(root, args.repeats)
    report = {
        "images": args.images,
        "build_seconds": round(build_s, 2),
        "summary_seconds": [round(t, 3) for t in times],
        "best_seconds": round(min(times), 3),
        "goal_seconds": 10,
        "classes": len(out["classes"]),
        "left_out": out["left_out"],
        "n_train": sum(out["counts"]["train"].values()),
        "n_test": sum(out["counts"]["test"].values()),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
