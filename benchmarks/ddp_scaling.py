"""Data-parallel scaling of a LoRA training step: images/s with 1 and N processes, and the efficiency.

Each world size runs the real training loop (engine.trainer.Trainer with DistributedDataParallel,
per-sample seeded augmentation) on synthetic uint8 images of the model's input size, with the
same global batch: N processes each take 1/N of it. Efficiency = (images/s at N) / (N x images/s
at 1), i.e. t1 / (N x tN) for the time t of one global step. gloo on the CPU (one thread per
process), NCCL with one GPU per process when the machine has N GPUs.

    python benchmarks/ddp_scaling.py --nproc 2                          # CPU, tiny_clip
    python benchmarks/ddp_scaling.py --nproc 8 --model clip --batch 256 --weights random   # 8 GPUs
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(args.threads)
    from engine import distributed as dist
    from engine.augment import augment_batch_seeded
    from engine.trainer import Trainer, TrainSettings, batch_indices
    from lora import apply_lora
    from methods.heads import ImageClassifier
    from models import load_model

    device = torch.device("cuda" if args.device == "cuda" else "cpu")
    with dist.process_group(device.type):
        device = dist.device_of_rank(device)
        torch.manual_seed(0)
        spec = load_model(args.model, weights=args.weights)
        spec.model.requires_grad_(False)
        apply_lora(spec.model, params=tuple(args.params), r=args.r, dropout_rate=0.0)
        model = ImageClassifier(spec, torch.nn.Linear(spec.feature_dim, 4)).to(device)
        size = spec.input_size
        images = torch.randint(0, 256, (args.images, 3, size, size), dtype=torch.uint8,
                               generator=torch.Generator().manual_seed(0))
        labels = torch.arange(args.images) % 4
        mean, std = torch.tensor(spec.mean, device=device), torch.tensor(spec.std, device=device)
        precision = "bf16" if device.type == "cuda" else "fp32"
        settings = TrainSettings(lr=1e-4, weight_decay=1e-2, warmup_steps=1, total_steps=args.warmup, min_lr=1e-6,
                                 seed=1, device=device, precision=precision, checkpoint_every=0)
        trainer = Trainer(model, settings, None, "bench")

        def batches(start: int):
            for idx in batch_indices(args.images, args.batch, 1, start):
                shard = dist.shard_batch(idx)
                ids = torch.as_tensor(shard.indices)
                yield images[ids], labels[ids], shard

        def prepare(x, seeds):
            return augment_batch_seeded(x, mean, std, seeds)

        trainer.fit(batches, prepare)  # warm-up steps, not timed
        settings.total_steps = args.warmup + args.steps
        stats = trainer.fit(batches, prepare)
        if dist.is_main():
            Path(out).write_text(json.dumps({"images_per_second": stats.images_per_second,
                                             "seconds_per_step": stats.train_seconds / stats.steps}))


def measure(world: int, args: argparse.Namespace) -> dict:
    """Images/s of the timed steps with `world` processes."""
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result.json")
        mp.spawn(_worker, args=(world, _free_port(), args, out), nprocs=world, join=True)
        return json.loads(Path(out).read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=2, help="processes of the parallel run (GPUs on a GPU machine)")
    p.add_argument("--model", default="tiny_clip")
    p.add_argument("--weights", default=None, help='e.g. "random" for a model whose weights are not here')
    p.add_argument("--params", nargs="+", default=["q", "v"])
    p.add_argument("--r", type=int, default=2)
    p.add_argument("--batch", type=int, default=32, help="global batch, the same at every world size")
    p.add_argument("--images", type=int, default=256, help="synthetic images to draw batches from")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (CPU)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.device == "cuda" and torch.cuda.device_count() < args.nproc:
        p.error(f"--nproc {args.nproc} needs {args.nproc} GPUs; this machine has {torch.cuda.device_count()}")
    os.environ.setdefault("TQDM_DISABLE", "1")
    backend = "nccl" if args.device == "cuda" else f"gloo, {args.threads} thread(s) per process"
    print(f"{args.model} LoRA {''.join(args.params)} r{args.r}, global batch {args.batch}, {args.steps} timed steps "
          f"after {args.warmup}, {args.device} ({backend})")
    one = measure(1, args)
    many = measure(args.nproc, args)
    efficiency = many["images_per_second"] / (args.nproc * one["images_per_second"])
    for n, r in ((1, one), (args.nproc, many)):
        step_ms = 1000 * r["seconds_per_step"]
        print(f"  {n} process(es): {r['images_per_second']:8.1f} images/s  ({step_ms:.1f} ms/step)")
    n = args.nproc
    print(f"  efficiency at {n}: {efficiency:.2f}  (images/s at {n} / ({n} x images/s at 1))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
