"""Data parallelism: N gloo processes on the CPU compute what one process computes.

The process-level tests spawn two processes with torchrun's environment variables set, so
they go through the same code path as ``torchrun --nproc_per_node 2``.
"""

import csv
import json
import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch import nn

from engine import distributed as dist
from engine.trainer import Trainer, TrainingInterrupted, TrainSettings, batch_indices, sample_seeds
from tests.conftest import make_folder_dataset, run_entry

# --dropout_rate 0: LoRA dropout draws from torch's global RNG per process, so its masks differ
# between one process and two; everything else is drawn per sample and must agree.
ENTRY_ARGS = ["--model_name", "tiny_clip", "--device", "cpu", "--num_workers", "0", "--batch_size", "5",
              "--shots", "4", "--n_iters", "2", "--warmup_steps", "2", "--dropout_rate", "0", "--lr", "0.01",
              "--checkpoint_every", "4"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)


def _spawn(fn, *args, world: int = 2) -> None:
    mp.spawn(fn, args=(world, _free_port(), *args), nprocs=world, join=True)


# -- slices and seeds ------------------------------------------------------------------------------
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_each_sample_of_a_global_batch_is_in_exactly_one_contiguous_slice(world):
    for size in range(1, 10):
        batch = list(range(100, 100 + size))
        shards = [dist.shard_batch(batch, r, world) for r in range(world)]
        assert sum((s.indices for s in shards if s.count), []) == batch
        assert sum(s.weight for s in shards) == pytest.approx(1.0)
        for s in shards:
            assert s.total == size and len(s.indices) == max(s.count, 1)
            assert s.count == 0 or s.indices == batch[s.first : s.first + s.count]


def test_augmentation_seeds_depend_on_the_position_in_the_global_batch_only():
    whole = sample_seeds(3, 7, 0, 5)
    assert sample_seeds(3, 7, 0, 2) + sample_seeds(3, 7, 2, 3) == whole
    assert len(set(whole)) == 5 and whole != sample_seeds(3, 8, 0, 5)


def test_eval_batches_are_shared_round_robin_and_gathered_in_order():
    assert dist.my_batches(5) == [0, 1, 2, 3, 4]  # one process takes every batch
    assert dist.gather_batches(["a", "b"], 2) == ["a", "b"]


# -- the training loop in two processes ----------------------------------------------------------------
X = torch.randn(15, 6, generator=torch.Generator().manual_seed(0))
Y = (X[:, 0] > 0).long()


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 2))


def _settings(total: int = 9) -> TrainSettings:
    return TrainSettings(lr=0.05, weight_decay=1e-2, warmup_steps=2, total_steps=total, min_lr=1e-6, seed=1,
                         device=torch.device("cpu"), precision="fp32", checkpoint_every=0)


def _feature_batches(kill_at: int | None = None):
    """Global batches of 7, 7 and 1 samples (the last one leaves rank 1 a stand-in)."""
    def gen(start):
        for step, idx in enumerate(batch_indices(len(Y), 7, 1, start), start=start):
            if kill_at is not None and step == kill_at and dist.rank() == dist.world_size() - 1:
                os.kill(os.getpid(), signal.SIGTERM)  # one rank only: the ranks must still stop together
            ids = torch.as_tensor(idx)
            yield X[ids], Y[ids]
    return gen


def _augment(x, seeds):
    return x + 0.1 * torch.stack([torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(s)) for s in seeds])


def _train_in_group(rank: int, out: Path) -> None:
    """The loop alone: a straight run, and one interrupted by a SIGTERM to rank 1 only."""
    model = _model()
    stats = Trainer(model, _settings(), None, "fp").fit(_feature_batches(), _augment)
    interrupted = _model()
    try:
        Trainer(interrupted, _settings(), out / "ckpt", "fp").fit(_feature_batches(kill_at=4), _augment)
        step = None
    except TrainingInterrupted as exc:
        step = exc.step
    if rank == 0:
        torch.save({"state": model.state_dict(), "images": stats.images, "stopped_at": step}, out / "ddp.pt")


def _run_entries_in_group(rank: int, runs: list) -> None:
    """Entry points in-process, as torchrun would start them; kill_step sends rank 1 a SIGTERM in that step."""
    for script, args, kill_step in runs:
        original = Trainer._one_step
        if kill_step is not None and rank == 1:
            def one_step(self, *a, _kill=kill_step, _step=original, **k):
                if self.step == _kill:
                    os.kill(os.getpid(), signal.SIGTERM)
                return _step(self, *a, **k)
            Trainer._one_step = one_step
        try:
            result = run_entry(script, *args)
        finally:
            Trainer._one_step = original
        assert result.returncode == (143 if kill_step is not None else 0), result.stderr


def _worker(rank, world, port, out: Path, runs: list, cache: str):
    _join(rank, world, port)
    os.environ["CYTOLORA_CACHE"] = cache
    with dist.process_group("cpu"):  # one group for all runs: the entry points keep a group they did not make
        _train_in_group(rank, out)
        _run_entries_in_group(rank, runs)


def _predictions(folder: Path) -> list[dict]:
    with open(folder / "predictions.csv", newline="") as f:
        return list(csv.DictReader(f))


def _the_run(root: Path) -> Path:
    (results,) = root.rglob("results.json")
    return results.parent


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> dict:
    """One spawn of two gloo processes (starting processes is the slow part) that trains the loop alone
    and runs the entry points; the tests below compare what it left with one process."""
    out = tmp_path_factory.mktemp("ddp")
    data = make_folder_dataset(out / "data", {"train": 5, "val": 3, "test": 3})  # 9 test images: odd
    lora = ["--dataset", "folder", "--root_path", str(data), *ENTRY_ARGS]
    linear = ["--dataset", "folder", "--root_path", str(data), "--model_name", "tiny_clip", "--device", "cpu",
              "--num_workers", "0", "--batch_size", "5", "--shots", "4", "--n_iters", "3"]
    runs = [("main_lora.py", [*lora, "--output_dir", str(out / "lora2")], None),
            ("main_lora.py", [*lora, "--output_dir", str(out / "resumed")], 6),  # SIGTERM to rank 1 in step 7
            ("main_lora.py", [*lora, "--output_dir", str(out / "resumed")], None),  # the same command resumes
            ("main.py", [*linear, "--output_dir", str(out / "linear2")], None),
            ("main_lora.py", ["--dataset", "demo_captions", "--shots", "2", "--n_iters", "1", "--warmup_steps", "1",
                              "--batch_size", "4", "--device", "cpu", "--num_workers", "0",
                              "--output_dir", str(out / "captions2")], None)]
    _spawn(_worker, out, runs, str(out / "cache"))
    return {"out": out, "lora": lora, "linear": linear}


def test_two_processes_train_like_one_and_resume_with_one(two_processes):
    out = two_processes["out"]
    ddp = torch.load(out / "ddp.pt")
    single = _model()
    Trainer(single, _settings(), None, "fp").fit(_feature_batches(), _augment)
    for name, value in single.state_dict().items():
        torch.testing.assert_close(ddp["state"][name], value, atol=1e-6, rtol=1e-5)
    assert ddp["images"] == 15 * 9 // 3  # images count every process: 3 epochs of 15
    # both ranks stopped after step 5 (rank 1 alone was signalled); one process resumes the checkpoint
    assert ddp["stopped_at"] == 5
    resumed = _model()
    trainer = Trainer(resumed, _settings(), out / "ckpt", "fp")
    assert trainer.try_resume() == 5
    trainer.fit(_feature_batches(), _augment)
    for name, value in single.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, atol=1e-6, rtol=1e-5)


def test_two_processes_run_the_entry_points_like_one(two_processes, tmp_path):
    out = two_processes["out"]
    lora1, linear1 = tmp_path / "lora1", tmp_path / "linear1"
    lora2, resumed, linear2, cache = out / "lora2", out / "resumed", out / "linear2", out / "cache"
    assert run_entry("main_lora.py", *two_processes["lora"], "--output_dir", str(lora1)).returncode == 0
    assert run_entry("main.py", *two_processes["linear"], "--output_dir", str(linear1)).returncode == 0

    one, two = _the_run(lora1), _the_run(lora2)
    r1, r2 = (json.loads((f / "results.json").read_text()) for f in (one, two))
    assert (r1["world_size"], r2["world_size"], r2["per_process_batch"]) == (1, 2, 3)
    assert r2["n_test"] == r2["metrics"]["test"]["n"] == 9 and r2["timing"]["train_steps"] == 10
    w1, w2 = load_file(one / "weights.safetensors"), load_file(two / "weights.safetensors")
    assert set(w1) == set(w2)
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], atol=1e-5, rtol=0)
    p1, p2 = _predictions(one), _predictions(two)
    assert [(p["split"], p["path"], p["pred"]) for p in p1] == [(p["split"], p["path"], p["pred"]) for p in p2]
    test_paths = [p["path"] for p in p2 if p["split"] == "test"]
    assert len(test_paths) == len(set(test_paths)) == 9  # every test image exactly once
    for a, b in zip(p1, p2, strict=True):
        for key in a:
            if key.startswith("p_"):
                assert float(a[key]) == pytest.approx(float(b[key]), abs=1e-5)

    # interrupted with 2 processes, resumed with the same command: the metrics of the uninterrupted run
    rr = json.loads((_the_run(resumed) / "results.json").read_text())
    assert rr["timing"]["resumed_from_step"] == 7 and not list(_the_run(resumed).glob("checkpoint*"))
    scalars = {k: v for k, v in r2["metrics"]["test"].items() if isinstance(v, float)}
    assert {k: rr["metrics"]["test"][k] for k in scalars} == pytest.approx(scalars, abs=1e-6)
    assert rr["metrics"]["test"]["confusion_matrix"] == r2["metrics"]["test"]["confusion_matrix"]
    wr = load_file(_the_run(resumed) / "weights.safetensors")
    for name in w2:
        torch.testing.assert_close(wr[name], w2[name], atol=1e-6, rtol=0)

    # image-text pairs: contrastive LoRA trains (each process contrasting its slice) and retrieval is
    # evaluated on every pair once, the embeddings gathered in order
    rc = json.loads((_the_run(out / "captions2") / "results.json").read_text())
    assert rc["world_size"] == 2 and rc["task"] == "captions" and rc["metrics"]["test"]["n"] == 100
    test_rows = [p for p in _predictions(_the_run(out / "captions2")) if p["split"] == "test"]
    assert sorted(int(p["label"]) for p in test_rows) == list(range(100))

    # frozen features extracted in shares and gathered; the cache written once
    l1, l2 = _the_run(linear1), _the_run(linear2)
    assert [p["pred"] for p in _predictions(l1)] == [p["pred"] for p in _predictions(l2)]
    assert len(list((cache / "features").glob("*.safetensors"))) == 3  # train, val, test


# -- SLURM ------------------------------------------------------------------------------------------
def test_multi_node_slurm_script_starts_one_torchrun_per_node_and_checkpoints_on_preemption(tmp_path):
    from utils.sweep import SweepError, build_parser, slurm_script

    grid = ["--datasets", "demo", "--models", "tiny_clip", "--slurm"]
    args = build_parser().parse_args([*grid, "--nodes", "2", "--gpus_per_node", "4"])
    assert (args.nodes, args.gpus_per_node) == (2, 4)
    with pytest.raises(SweepError, match="--nodes"):
        build_parser().parse_args([*grid, "--nodes", "0"])
    text = slurm_script(tmp_path, 3, "exp2", ["--partition=gpu"], nodes=args.nodes, gpus_per_node=args.gpus_per_node)
    script = tmp_path / "sweep.sbatch"
    script.write_text(text)
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --requeue", "#SBATCH --signal=B:USR1@"):
        assert line in text
    assert "--gres=gpu:1" not in text
    assert "srun " in text and "--nnodes 2 --nproc_per_node 4 --rdzv_backend c10d --rdzv_endpoint" in text
    assert "scontrol requeue" in text
