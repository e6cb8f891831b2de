"""Files the tool reads cannot run code; a run is never lost to its output folder or doubled by a second process."""

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from common.errors import UserError
from common.io import DiskFull, atomic_write, leftover_temporaries, write_json_atomic
from engine.guard import (
    LOCK_FILE,
    OutputFolderError,
    RunFolderBusy,
    RunLock,
    check_output_folder,
    claim_run_folder,
    lock_owner,
)
from engine.trainer import Trainer, TrainSettings
from tests.conftest import REPO, feature_batches


class Payload:
    """What a hostile file carries: unpickling it writes `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def plant(path: Path, marker: Path) -> None:
    """A pickle that runs code when loaded, in torch.save's format, at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"fingerprint": "x", "payload": Payload(marker)}, path)


def _trainer(run_dir: Path | None, fingerprint: str = "f", steps: int = 6) -> Trainer:
    torch.manual_seed(0)
    module = nn.Linear(8, 2)
    settings = TrainSettings(lr=1e-2, weight_decay=0.0, warmup_steps=0, total_steps=steps, min_lr=1e-6, seed=0,
                             device=torch.device("cpu"), precision="fp32", checkpoint_every=2)
    return Trainer(module, settings, run_dir, fingerprint)


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text and text
    return text


# -- checkpoints ------------------------------------------------------------------------------
def test_a_crafted_checkpoint_never_runs_and_is_refused_in_one_line(tmp_path):
    marker = tmp_path / "marker"
    plant(tmp_path / "run" / "checkpoint.pt", marker)
    with pytest.raises(UserError) as caught:
        _trainer(tmp_path / "run").try_resume()
    assert not marker.exists()
    assert "--overwrite" in _one_line(caught.value)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_a_truncated_or_corrupt_checkpoint_is_one_line_saying_what_to_do(tmp_path, damage):
    x = torch.randn(16, 8)
    trainer = _trainer(tmp_path)
    trainer.fit(feature_batches(x, (x[:, 0] > 0).long()), lambda b, s: b)
    path = trainer.save_checkpoint()
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x00" * 100, "empty": b""}[damage])
    with pytest.raises(UserError) as caught:
        _trainer(tmp_path).try_resume()
    assert "--overwrite" in _one_line(caught.value)


def test_a_checkpoint_holds_plain_values_and_resumes_its_random_state(tmp_path):
    import random

    import numpy as np

    trainer = _trainer(tmp_path)
    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    path = trainer.save_checkpoint()
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    torch.load(path, weights_only=True)  # loads with nothing but tensors and plain values
    random.seed(0)
    np.random.seed(0)
    _trainer(tmp_path).try_resume()
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


def test_a_full_disk_during_a_checkpoint_is_one_line(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path)

    def full(obj, f, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(DiskFull) as caught:
        trainer.save_checkpoint()
    assert "free some space" in _one_line(caught.value)
    assert leftover_temporaries(tmp_path) == []


def test_a_full_disk_in_any_atomic_write_is_one_line(tmp_path):
    def full(tmp):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFull):
        atomic_write(tmp_path / "results.json", full)


# -- the output folder ------------------------------------------------------------------------
def test_an_output_folder_below_a_file_is_refused_before_training(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputFolderError) as caught:
        check_output_folder(tmp_path / "file" / "runs" / "x")
    assert "--output_dir" in _one_line(caught.value)


def test_an_output_folder_without_room_for_the_checkpoints_is_refused(tmp_path):
    with pytest.raises(OutputFolderError) as caught:
        check_output_folder(tmp_path / "run", need_bytes=1 << 62)
    assert "free" in _one_line(caught.value)
    assert check_output_folder(tmp_path / "run", need_bytes=1024).is_dir()


def test_leftover_temporaries_of_a_killed_write_are_removed_by_the_next_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    left = [run / ".checkpoint.pt.a1b2_c3d.tmp", run / ".results.json.zzzzzzzz.tmp"]
    for path in left:
        path.write_bytes(b"partial")
    kept = [run / ".lockless", run / "notes.tmp", run / ".x.short.tmp", run / "weights.safetensors"]
    for path in kept:
        path.write_bytes(b"")
    lock = claim_run_folder(run)
    lock.release()
    assert not any(p.exists() for p in left)
    assert all(p.exists() for p in kept)


# -- one owner per run folder -----------------------------------------------------------------
HOLD = ("import sys, time; sys.path.insert(0, {repo!r}); from engine.guard import RunLock; "
        "lock = RunLock({folder!r}).acquire(); print('held', flush=True); time.sleep(60)")


def _holder(folder: Path) -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", HOLD.format(repo=str(REPO), folder=str(folder))],
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    return child


def test_a_second_owner_is_told_who_holds_the_folder_and_a_killed_owner_is_taken_over(tmp_path):
    folder = tmp_path / "run"
    child = _holder(folder)
    try:
        with pytest.raises(RunFolderBusy) as caught:
            RunLock(folder).acquire()
        assert f"process {child.pid} on {socket.gethostname()}" in _one_line(caught.value)
        assert lock_owner(folder).pid == child.pid
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert (folder / LOCK_FILE).exists()  # a SIGKILLed owner leaves its file behind
    assert lock_owner(folder) is None
    lock = RunLock(folder).acquire()
    assert lock.took_over is not None and lock.took_over.pid == child.pid
    assert json.loads((folder / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (folder / LOCK_FILE).exists()


def test_a_stale_lock_file_of_a_gone_process_is_taken_over(tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    folder = tmp_path / "run"
    write_json_atomic(folder / LOCK_FILE, {"pid": int(gone.stdout), "host": socket.gethostname(), "started": "x"})
    with RunLock(folder) as lock:
        assert lock.took_over.pid == int(gone.stdout)


def test_two_identical_commands_one_runs_the_other_exits_non_zero(folder_root, tmp_path):
    """End to end: a run holding its folder makes an identical command exit 2 naming the holder."""
    from engine.config import run_dir
    from tests.conftest import run_entry
    from utils.cli import parse_config

    args = ["--root_path", str(folder_root), "--dataset", "folder", "--shots", "2", "--n_iters", "1",
            "--model_name", "tiny_clip", "--device", "cpu", "--num_workers", "0", "--output_dir", str(tmp_path)]
    folder = run_dir(parse_config(args, "linear"))
    child = _holder(folder)
    try:
        second = run_entry("main.py", *args)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert second.returncode == 2, second.stderr
    assert f"process {child.pid}" in second.stderr and "Traceback" not in second.stderr
    assert not (folder / "results.json").exists()
    again = run_entry("main.py", *args)  # the folder is free again (its lock stale): the same command runs
    assert again.returncode == 0, again.stderr
    assert (folder / "results.json").is_file() and not (folder / LOCK_FILE).exists()


# -- the image-check cache --------------------------------------------------------------------
def _cells(tmp_path: Path, n: int = 3) -> list[str]:
    from tests.conftest import make_folder_dataset

    root = make_folder_dataset(tmp_path / "data", {"train": n})
    return sorted(str(p) for p in root.rglob("*.png"))


def test_an_image_corrupted_in_place_with_its_size_and_time_kept_is_checked_again(tmp_path):
    from datasets import DatasetError
    from engine.images import check_decodable

    paths = _cells(tmp_path)
    cache = tmp_path / "cache" / "decodable.json"
    check_decodable(paths, cache)
    stat = os.stat(paths[0])
    with open(paths[0], "r+b") as handle:  # same size, same modification time, broken content
        handle.write(b"\0" * 64)
    os.utime(paths[0], ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(DatasetError, match=Path(paths[0]).name):
        check_decodable(paths, cache)
    text = cache.read_text()
    assert str(tmp_path) not in text  # content hashes, no paths


def test_the_image_check_cache_is_pruned_and_follows_the_umask(tmp_path):
    from engine import images

    paths = _cells(tmp_path)
    cache = tmp_path / "cache" / "decodable.json"
    today = int(time.time() // 86400)
    old = {"0" * 32: today - images.PRUNE_DAYS - 1, "1" * 32: today - 1}
    write_json_atomic(cache, {"version": images.CACHE_VERSION, "decodable": old})
    previous = os.umask(0o022)
    try:
        cache.unlink()
        cache.parent.rmdir()
        write_json_atomic(cache, {"version": images.CACHE_VERSION, "decodable": old})
        images.check_decodable(paths, cache)
    finally:
        os.umask(previous)
    kept = json.loads(cache.read_text())["decodable"]
    assert "0" * 32 not in kept and "1" * 32 in kept
    assert {images.content_digest(p) for p in paths} <= set(kept)
    assert oct(cache.stat().st_mode & 0o777) == oct(0o644)
    assert oct(cache.parent.stat().st_mode & 0o777) == oct(0o755)


def test_a_pickle_in_the_image_check_cache_runs_nothing_and_the_images_are_checked(tmp_path, monkeypatch):
    import datasets
    from engine.images import check_decodable

    paths = _cells(tmp_path)
    cache = tmp_path / "decodable.json"
    marker = tmp_path / "marker"
    plant(cache, marker)
    decoded = []
    real = datasets.load_image
    monkeypatch.setattr(datasets, "load_image", lambda p: decoded.append(p) or real(p))
    check_decodable(paths, cache)
    assert not marker.exists() and decoded == paths


# -- every other file the tool reads, planted with a pickle -------------------------------------
TINY = ["--model_name", "tiny_clip", "--device", "cpu", "--num_workers", "0", "--batch_size", "8", "--shots", "2",
        "--n_iters", "1", "--warmup_steps", "1"]


@pytest.fixture(scope="module")
def finished_runs(folder_root, tmp_path_factory):
    """A finished LoRA run and linear run (its features cached) in a cache of their own: (lora folder, linear
    args, cache folder)."""
    from tests.conftest import run_entry

    base = tmp_path_factory.mktemp("trust")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CYTOLORA_CACHE", str(base / "cache"))
        common = ["--root_path", str(folder_root), "--dataset", "folder", *TINY]
        p = run_entry("main_lora.py", *common, "--output_dir", str(base / "lora"))
        assert p.returncode == 0, p.stderr
        linear = ["--method", "linear", *common]
        p = run_entry("main.py", *linear, "--output_dir", str(base / "linear"))
        assert p.returncode == 0, p.stderr
    (results,) = (base / "lora").rglob("results.json")
    return results.parent, linear, base / "cache"


def _copy_run(folder: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(folder, tmp_path / "run"))


def _assert_one_line_error(p, marker: Path) -> None:
    assert not marker.exists(), "a planted pickle ran"
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert len([line for line in p.stderr.splitlines() if line.startswith("error:")]) == 1, p.stderr


@pytest.mark.parametrize("name", ["results.json", "weights.safetensors"])
def test_a_pickle_in_a_run_file_never_runs_and_eval_only_says_so_in_one_line(finished_runs, tmp_path, name):
    from tests.conftest import run_entry

    run = _copy_run(finished_runs[0], tmp_path)
    marker = tmp_path / "marker"
    plant(run / name, marker)
    p = run_entry("main_lora.py", "--eval_only", "--run", str(run), "--device", "cpu", "--num_workers", "0",
                  "--overwrite")
    _assert_one_line_error(p, marker)
    p = run_entry("main_lora.py", "--from", str(run / "results.json"), "--output_dir", str(tmp_path / "again"))
    assert not marker.exists()
    if name == "results.json":
        _assert_one_line_error(p, marker)


def test_a_pickle_in_an_adapter_or_the_split_manifest_never_runs(finished_runs, tmp_path):
    from lora import load_lora
    from lora.io import LoRAError
    from models import load_model
    from tests.conftest import run_entry

    run = _copy_run(finished_runs[0], tmp_path)
    marker = tmp_path / "marker"
    plant(run / "lora.safetensors", marker)
    with pytest.raises(LoRAError) as caught:
        load_lora(load_model("tiny_clip").model, run / "lora.safetensors")
    _one_line(caught.value)
    plant(run / "split.json", marker)  # a record for people: nothing reads it back
    p = run_entry("main_lora.py", "--eval_only", "--run", str(run), "--device", "cpu", "--num_workers", "0",
                  "--overwrite")
    assert p.returncode == 0, p.stderr
    assert not marker.exists()


def test_a_pickle_in_the_feature_cache_never_runs(finished_runs, tmp_path, monkeypatch):
    from tests.conftest import run_entry

    _, linear, cache = finished_runs
    mine = tmp_path / "cache"
    import shutil

    shutil.copytree(cache, mine)
    monkeypatch.setenv("CYTOLORA_CACHE", str(mine))
    marker = tmp_path / "marker"
    files = sorted((mine / "features").glob("*.safetensors"))
    assert files
    for path in files:
        plant(path, marker)
    p = run_entry("main.py", *linear, "--output_dir", str(tmp_path / "out"))
    assert not marker.exists()
    assert p.returncode == 0, p.stderr  # a cache: computed again and replaced
    from safetensors.torch import load_file

    assert {"features", "labels"} <= set(load_file(files[0]))
