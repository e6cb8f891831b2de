"""The device check: one script, a few minutes on one GPU, every speed figure the sweeps depend on.

It prints, with labels, and writes to --out as JSON:
  1. step      LoRA training step img/s through the engine's Trainer (frozen ViT, LoRA q v r 2, dropout 0.25, a
               linear head, AdamW, augmentation on the device), eager and compiled (and with CUDA graphs,
               torch.compile mode reduce-overhead), at batch 32, 64 and 256, with model FLOP utilisation: FLOPs
               of one forward + backward counted by torch.utils.flop_counter.FlopCounterMode, against the card's
               peak dense bf16 TFLOPs (a table keyed on the device name; --peak_tflops overrides it)
  2. run       one main_lora.py run end to end on a folder of generated JPEGs (640 x 480): its training img/s
               against the step figure at the same batch, and where the rest of its wall time went
  3. sweep     a paper-shaped sweep (25 classes x 16 shots, seeds x learning rates) through utils.sweep (the
               launch_run.sh entry): runs per hour, per-run overhead inside the sweep (wall time per run minus
               its training time), and runs per hour projected at the paper's 850 steps; with and without
               packing when the sweep has --pack
  4. estimate  --estimate's wall time for that sweep against the measured one
  5. memory    peak GPU memory of this process (the step figures) and of the runs (results.json)

Only models that need no download are used (--weights random): a timm ViT-B/16 by default; open_clip is not
needed. On the CPU, --quick checks the script itself in seconds (a tiny model, a few steps, no compilation).

    python benchmarks/gpu_check.py --out gpu_check.json
    python benchmarks/gpu_check.py --quick --device cpu --out /tmp/quick.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TQDM_DISABLE", "1")  # labelled figures only, no progress bars

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch import nn  # noqa: E402

# Peak dense bf16 tensor TFLOPs (no sparsity) by device name; the first key found in the name wins, so more
# specific names come first. From the vendors' data sheets.
PEAK_BF16_TFLOPS: dict[str, float] = {
    "H200": 989.4, "GH200": 989.4, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.4, "H800": 989.4,
    "B200": 2250.0, "A100": 312.0, "A800": 312.0, "L40S": 362.1, "L40": 181.0, "L4": 121.0, "A10G": 70.0,
    "A10": 125.0, "RTX 4090": 165.2, "RTX 6000 Ada": 364.2, "A6000": 154.8, "V100": 125.0, "T4": 65.0,
}


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    """The card's peak dense bf16 TFLOPs: --peak_tflops, else PEAK_BF16_TFLOPS by device name, else None."""
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def say(text: str) -> None:
    print(text, flush=True)


# -- 1. the training step ----------------------------------------------------------------------------------
def lora_classifier(model: str, classes: int, device: torch.device):
    """(classifier, spec): the registry's model with random weights, LoRA q v r 2 dropout 0.25, a linear head."""
    from lora import apply_lora
    from methods.heads import ImageClassifier
    from models import load_model

    spec = load_model(model, weights="random")
    spec.model.requires_grad_(False)
    torch.manual_seed(0)
    apply_lora(spec.model, params=("q", "v"), r=2, alpha=1.0, dropout_rate=0.25)
    classifier = ImageClassifier(spec, nn.Linear(spec.feature_dim, classes))
    classifier.head.requires_grad_(True)
    return classifier.to(device), spec


def flops_per_image(classifier: nn.Module, spec, batch: int, device: torch.device, precision: str) -> float:
    """FLOPs of one forward + backward per image (torch.utils.flop_counter; the optimizer's are negligible)."""
    from torch.utils.flop_counter import FlopCounterMode

    from engine.trainer import autocast

    x = torch.randn(batch, 3, spec.input_size, spec.input_size, device=device)
    counter = FlopCounterMode(display=False)
    with counter, autocast(device, precision):
        classifier(x).float().sum().backward()
    classifier.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch


def time_steps(classifier: nn.Module, spec, batch: int, device: torch.device, precision: str, warmup: int,
               steps: int, compile_mode: str | None) -> dict:
    """img/s of `steps` engine training steps after `warmup` (compilation happens there), on device-resident
    uint8 images augmented as a run augments them; seconds of the warm-up (compilation included)."""
    from engine.batches import augmenter, resident_batches
    from engine.trainer import Trainer, TrainSettings

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (max(batch, 2 * batch), 3, spec.input_size, spec.input_size), generator=g,
                           dtype=torch.uint8).to(device)
    labels = (torch.arange(len(images)) % classifier.head.out_features).to(device)
    batches = resident_batches(images, labels, batch, seed=1, drop_last=True)
    mean, std = torch.tensor(spec.mean, device=device), torch.tensor(spec.std, device=device)
    settings = TrainSettings(lr=1e-4, weight_decay=1e-2, warmup_steps=10, total_steps=warmup, min_lr=1e-6, seed=1,
                             device=device, precision=precision, checkpoint_every=0, log_every=50,
                             compile=compile_mode is not None, compile_mode=compile_mode or "default",
                             full_batch=batch)
    trainer = Trainer(classifier, settings, None, "gpu-check")
    t0 = time.perf_counter()
    trainer.fit(batches, augmenter(mean, std, device), desc="warm-up")
    warm = time.perf_counter() - t0
    trainer.s.total_steps = warmup + steps
    _sync(device)
    t0 = time.perf_counter()
    trainer.fit(batches, augmenter(mean, std, device), desc="timed")
    seconds = time.perf_counter() - t0
    return {"img_per_s": steps * batch / seconds, "step_ms": 1000 * seconds / steps, "warmup_seconds": warm}


def check_steps(a, device: torch.device, precision: str, out: dict) -> None:
    modes = {"eager": None} if a.quick or device.type != "cuda" else {
        "eager": None, "compiled": "default", "cuda graphs": "reduce-overhead"}
    if a.quick and a.compile_quick:
        modes["compiled"] = "default"
    peak = peak_tflops(device, a.peak_tflops)
    base, spec = lora_classifier(a.model, 25, device)
    out["step"] = {"model": a.model, "precision": precision, "peak_bf16_tflops": peak, "rows": []}
    say(f"\n1. LoRA training step ({a.model}, random weights, LoRA q v r 2 dropout 0.25, {precision}; "
        f"peak {peak or '?'} TFLOPs bf16 dense)")
    for batch in a.batches:
        flops = flops_per_image(base, spec, batch, device, precision)
        for name, mode in modes.items():
            if device.type == "cuda":
                torch.cuda.empty_cache()
            classifier = copy.deepcopy(base)
            try:
                row = time_steps(classifier, spec, batch, device, precision, a.warmup, a.steps, mode)
            except Exception as exc:  # noqa: BLE001 -- a mode that fails here is reported, the others still run
                row = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]}
            row.update(batch=batch, mode=name, gflops_per_image=flops / 1e9)
            if "img_per_s" in row and peak:
                row["mfu"] = row["img_per_s"] * flops / (peak * 1e12)
            out["step"]["rows"].append(row)
            if "error" in row:
                say(f"   batch {batch:4d} {name:12s} failed: {row['error']}")
                continue
            mfu = f"   MFU {100 * row['mfu']:5.1f}%" if "mfu" in row else ""
            say(f"   batch {batch:4d} {name:12s} {row['img_per_s']:9,.0f} img/s  {row['step_ms']:8.1f} ms/step  "
                f"{flops / 1e9:6.1f} GFLOP/img{mfu}  (warm-up {row['warmup_seconds']:.1f} s)")
            del classifier
    if device.type == "cuda":
        out["step"]["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30


def step_figure(out: dict, batch: int) -> float | None:
    """The eager step img/s at `batch` (the end-to-end run trains eagerly)."""
    rows = [r for r in out.get("step", {}).get("rows", []) if r["batch"] == batch and r["mode"] == "eager"]
    return rows[0].get("img_per_s") if rows else None


# -- 2. one run end to end -------------------------------------------------------------------------------
def write_jpeg_folder(root: Path, classes: int, per_split: dict[str, int], size: tuple[int, int]) -> Path:
    """`<root>/<split>/<class>_<n>.jpg`: noisy images of one colour per class (the folder dataset's layout)."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        colour = rng.integers(30, 220, 3)
        for split, n in per_split.items():
            (root / split).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = np.clip(colour + rng.normal(0, 30, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / f"class{c:02d}_{i}.jpg", quality=90)
    return root


def _results(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.rglob("results.json"))]


def _run(command: list[str], env: dict) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    return time.perf_counter() - t0, done


def _failed(done: subprocess.CompletedProcess) -> str | None:
    if done.returncode == 0:
        return None
    lines = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()]
    return f"exit {done.returncode}: {lines[-1] if lines else ''}"[:300]


def check_run(a, data: Path, work: Path, env: dict, out: dict) -> None:
    steps = a.run_n_iters * a.shots + a.warmup_steps
    say(f"\n2. One main_lora.py run end to end ({a.classes} classes x {a.shots} shots of generated "
        f"{a.jpeg[0]}x{a.jpeg[1]} JPEGs, batch {a.batch}, {steps} steps, eager)")
    command = [sys.executable, "main_lora.py", "--dataset", "folder", "--root_path", str(data), "--model_name",
               a.model, "--weights", "random", "--shots", str(a.shots), "--n_iters", str(a.run_n_iters),
               "--warmup_steps", str(a.warmup_steps), "--batch_size", str(a.batch), "--device", a.device,
               "--output_dir", str(work / "run")]
    seconds, done = _run(command, env)
    problem = _failed(done)
    if problem:
        out["run"] = {"error": problem}
        say(f"   failed: {problem}")
        return
    (r,) = _results(work / "run")
    train = r["timing"]["train_seconds"]
    rate = r["timing"]["images_per_second"]
    reference = step_figure(out, a.batch)
    out["run"] = {"wall_seconds": seconds, "train_seconds": train, "train_img_per_s": rate,
                  "step_img_per_s": reference, "share_of_step": rate / reference if reference else None,
                  "other_seconds": seconds - train, "peak_gpu_memory_bytes": r.get("peak_gpu_memory_bytes")}
    share = f" = {100 * rate / reference:.0f}% of the step figure ({reference:,.0f} img/s)" if reference else ""
    say(f"   training {rate:,.0f} img/s{share}")
    say(f"   wall {seconds:.1f} s: training {train:.1f} s, the rest (start-up, image checks, decoding, model, "
        f"evaluation, writing) {seconds - train:.1f} s")


# -- 3 and 4. a paper-shaped sweep, and its estimate ------------------------------------------------------
def sweep_has(option: str) -> bool:
    """Whether utils.sweep takes `option` (e.g. --pack) in this version of the code."""
    from utils import sweep

    return any(option in action.option_strings for action in sweep.build_parser()._actions)


def sweep_argv(a, data: Path, output: Path) -> list[str]:
    return ["--methods", "lora", "--datasets", "folder", "--root_path", str(data), "--models", a.model,
            "--weights", "random", "--shots", str(a.shots), "--seeds", " ".join(map(str, range(1, a.seeds + 1))),
            "--lrs", " ".join(a.lrs), "--n_iters", str(a.sweep_n_iters), "--output_dir", str(output),
            "--extra", f"--batch_size {a.batch} --warmup_steps {a.warmup_steps} --device {a.device}"]


def estimate_seconds(argv: list[str]) -> float | None:
    """--estimate's wall time of the sweep (computed in this process, as launch_run.sh --estimate does)."""
    from utils import estimate as est
    from utils import sweep

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        result = est.estimate(sweep.expand(sweep.build_parser().parse_args(argv)))
    if len(result.timed_runs()) != result.pending:
        return None
    return sum(result.seconds().values())


def check_sweep(a, data: Path, work: Path, env: dict, out: dict) -> None:
    runs = a.seeds * len(a.lrs)
    steps = a.warmup_steps + a.sweep_n_iters * a.shots
    say(f"\n3. Sweep: {runs} runs ({a.seeds} seeds x {len(a.lrs)} learning rates) of {a.classes} classes x "
        f"{a.shots} shots, {steps} steps each at batch {a.batch}, through utils.sweep (launch_run.sh)")
    variants = {"default": []}
    if sweep_has("--pack"):
        variants = {"packed": [], "not packed (--pack 1)": ["--pack", "1"]}
    else:
        say("   packing: utils.sweep has no --pack option in this version; measured without it")
    out["sweep"] = {"runs": runs, "steps_per_run": steps, "variants": {}}
    estimate = None
    for name, extra in variants.items():
        output = work / f"sweep-{len(out['sweep']['variants'])}"
        argv = [*sweep_argv(a, data, output), *extra]
        if estimate is None:
            t0 = time.perf_counter()
            estimate = estimate_seconds(argv)
            out["sweep"]["estimate_compute_seconds"] = time.perf_counter() - t0
        seconds, done = _run([sys.executable, "-m", "utils.sweep", *argv], env)
        problem = _failed(done)
        results = _results(output)
        if problem or len(results) != runs:
            out["sweep"]["variants"][name] = {"error": problem or f"{len(results)} of {runs} runs finished"}
            say(f"   {name}: failed: {out['sweep']['variants'][name]['error']}")
            continue
        train = [r["timing"]["train_seconds"] for r in results]
        rate = sum(r["timing"]["images_per_second"] for r in results) / runs
        overhead = seconds / runs - sum(train) / runs
        paper_train = 850 * a.batch / rate if rate else float("nan")  # the paper's 850 steps at this rate
        row = {"wall_seconds": seconds, "runs_per_hour": 3600 * runs / seconds, "train_seconds_per_run":
               sum(train) / runs, "overhead_seconds_per_run": overhead, "train_img_per_s": rate,
               "paper_runs_per_hour": 3600 / (overhead + paper_train),
               "packed": [r.get("packed") for r in results],
               "peak_gpu_memory_bytes": max((r.get("peak_gpu_memory_bytes") or 0) for r in results) or None}
        out["sweep"]["variants"][name] = row
        say(f"   {name}: {seconds:.1f} s for {runs} runs = {row['runs_per_hour']:,.0f} runs/hour; per run "
            f"{row['train_seconds_per_run']:.1f} s training ({rate:,.0f} img/s) + {overhead:.1f} s overhead; "
            f"at the paper's 850 steps: {row['paper_runs_per_hour']:,.0f} runs/hour")
    measured = [v["wall_seconds"] for v in out["sweep"]["variants"].values() if "wall_seconds" in v]
    say("\n4. --estimate against the measured sweep")
    if estimate is None or not measured:
        out["estimate"] = {"error": "the estimate could not time every run" if estimate is None else "no sweep ran"}
        say(f"   {out['estimate']['error']}")
        return
    first = measured[0]
    out["estimate"] = {"estimate_seconds": estimate, "measured_seconds": first, "ratio": estimate / first}
    say(f"   estimate {estimate:.1f} s, measured {first:.1f} s ({100 * (estimate / first - 1):+.0f}%; computing the "
        f"estimate took {out['sweep']['estimate_compute_seconds']:.1f} s)")


# -- the whole check ------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu_check.json", help="where to write the figures as JSON")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="timm:vit_base_patch16_224", help="a registry model key built with random "
                   "weights (no download): timm:<architecture>, vit_google, uni, ...")
    p.add_argument("--peak_tflops", type=float, default=None, help="the card's peak dense bf16 TFLOPs (default: "
                   "from the device name)")
    p.add_argument("--quick", action="store_true", help="a tiny model and a few steps: checks the script on a CPU")
    p.add_argument("--compile_quick", action="store_true", help="with --quick: time the compiled step too")
    p.add_argument("--parts", default="step,run,sweep", help="comma-separated parts to run: step, run, sweep "
                   "(sweep includes the estimate)")
    a = p.parse_args(argv)
    if a.quick:  # a tiny model, 3 classes x 2 shots, a handful of steps
        a.model = a.model if "--model" in (argv or sys.argv) else "tiny_clip"
        a.batches, a.warmup, a.steps = [2, 4], 1, 2
        a.classes, a.shots, a.batch, a.jpeg = 3, 2, 4, (64, 48)
        a.run_n_iters, a.sweep_n_iters, a.warmup_steps, a.seeds, a.lrs = 1, 1, 1, 1, ["1e-3", "2e-3"]
    else:  # the paper's experiment 2 shape: 25 classes x 16 shots, batch 32 (steps cut to fit the time)
        a.batches, a.warmup, a.steps = [32, 64, 256], 3, 20
        a.classes, a.shots, a.batch, a.jpeg = 25, 16, 32, (640, 480)
        a.run_n_iters, a.sweep_n_iters, a.warmup_steps, a.seeds, a.lrs = 10, 3, 10, 2, ["1e-4", "2e-4"]
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    device = torch.device(a.device)
    precision = "bf16" if device.type == "cuda" else "fp32"
    parts = set(a.parts.split(","))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                            check=False).stdout.strip()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    out: dict = {"commit": commit, "device": name, "torch": torch.__version__, "quick": a.quick}
    say(f"gpu_check at {commit or '?'} on {name}, torch {torch.__version__}{' (--quick)' if a.quick else ''}")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        env = {**os.environ, "CYTOLORA_CACHE": str(work / "cache"), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
               "TQDM_DISABLE": "1", "PYTHONPATH": str(REPO)}
        if "step" in parts:
            check_steps(a, device, precision, out)
        if parts & {"run", "sweep"}:
            data = write_jpeg_folder(work / "jpegs", a.classes, {"train": a.shots, "val": 4, "test": 8}, a.jpeg)
            if "run" in parts:
                check_run(a, data, work, env, out)
            if "sweep" in parts:
                check_sweep(a, data, work, env, out)
    if device.type == "cuda":
        out["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        say(f"\n5. Peak GPU memory: {out['peak_gpu_memory_gib']:.2f} GiB in this process (step figures); runs: "
            + ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in _run_peaks(out).items()))
    out["seconds"] = time.perf_counter() - t0
    Path(a.out).write_text(json.dumps(out, indent=2, default=str))
    say(f"\ndone in {out['seconds']:.0f} s; figures in {a.out}")
    return 0


def _run_peaks(out: dict) -> dict[str, float]:
    peaks = {"run": out.get("run", {}).get("peak_gpu_memory_bytes")}
    for name, v in out.get("sweep", {}).get("variants", {}).items():
        peaks[f"sweep {name}"] = v.get("peak_gpu_memory_bytes")
    return {k: v for k, v in peaks.items() if v}


if __name__ == "__main__":
    raise SystemExit(main())
