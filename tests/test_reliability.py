"""User mistakes end in one clear line; interrupted runs resume exactly; identical runs agree."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, make_folder_dataset, run_entry, write_cell

SIPAKMED = ("Dyskeratotic", "Koilocytotic", "Metaplastic", "Parabasal", "Superficial-Intermediate")
TINY = ["--model_name", "tiny_clip", "--device", "cpu", "--num_workers", "0", "--batch_size", "8"]


def run(script, *args):
    return run_entry(script, *args)


def assert_user_error(p, out: Path, *needles: str) -> None:
    """Exit 2, one line on stderr that contains each needle, no traceback, nothing written."""
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr
    lines = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, p.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert not out.exists() or not any(out.rglob("*")), list(out.rglob("*"))


@pytest.fixture(scope="module")
def broken_roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("broken")
    empty = make_folder_dataset(base / "empty_test", {"train": 3, "val": 2})
    (empty / "test").mkdir()
    stranger = base / "stranger"
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        for k, name in enumerate(SIPAKMED):
            write_cell(stranger / "sipakmed" / "images" / split / f"{name}_{k}.bmp", (40 * k, 90, 120), rng)
    write_cell(stranger / "sipakmed" / "images" / "train" / "red_0.bmp", (200, 50, 40), rng)
    undecodable = make_folder_dataset(base / "undecodable", {"train": 3, "val": 2, "test": 2})
    (undecodable / "train" / "red_99.png").write_bytes(b"not an image at all")
    return {"empty": empty, "stranger": stranger, "undecodable": undecodable}


LORA_MISTAKES = {
    "missing root": (["--dataset", "folder", "--root_path", "/nonexistent/place"], ["/nonexistent/place"]),
    "unknown dataset": (["--dataset", "imagenet"], ["imagenet", "sipakmed"]),
    "unknown model": (["--model_name", "resnet9000"], ["resnet9000", "clip"]),
    "rank below 1": (["--r", "0"], ["rank r", ">= 1"]),
    "flag of another method": (["--k", "3"], ["--k", "--method lora", "knn"]),
    "unknown params": (["--params", "q", "x"], ["x"]),
    "weights missing": (["--weights", "/no/such/weights.pt"], ["/no/such/weights.pt"]),
    "percentage out of range": (["--shots", "0", "--pourcentage", "150"], ["150"]),
    "shots 0 without percentage": (["--shots", "0"], ["--pourcentage"]),
    "unknown flag": (["--learning_rate", "1"], ["--learning_rate"]),
}


@pytest.mark.parametrize("case", sorted(LORA_MISTAKES))
def test_lora_user_mistakes(case, folder_root, tmp_path):
    args, needles = LORA_MISTAKES[case]
    if "--dataset" not in args:
        args = ["--dataset", "folder", "--root_path", str(folder_root), *args]
    out = tmp_path / "out"
    p = run("main_lora.py", *TINY, *args, "--output_dir", str(out))
    assert_user_error(p, out, *needles)


def test_num_classes_disagreeing_with_data(folder_root, tmp_path):
    out = tmp_path / "out"
    p = run("main.py", "--root_path", str(folder_root), "--dataset", "folder", "--num_classes", "5",
            "--output_dir", str(out), *TINY)
    assert_user_error(p, out, "--num_classes 5", "3 classes")


def test_textual_on_a_model_without_text_tower(folder_root, tmp_path):
    out = tmp_path / "out"
    p = run("main.py", "--root_path", str(folder_root), "--dataset", "folder", "--textual", "True",
            "--output_dir", str(out), *TINY[2:], "--model_name", "tiny_vit")
    assert_user_error(p, out, "tiny_vit", "text")


def test_empty_split(broken_roots, tmp_path):
    out = tmp_path / "out"
    p = run("main.py", "--root_path", str(broken_roots["empty"]), "--dataset", "folder",
            "--output_dir", str(out), *TINY)
    assert_user_error(p, out, "test")


def test_file_whose_class_is_not_in_the_dataset(broken_roots, tmp_path):
    out = tmp_path / "out"
    p = run("main.py", "--root_path", str(broken_roots["stranger"]), "--dataset", "sipakmed",
            "--output_dir", str(out), *TINY)
    assert_user_error(p, out, "red_0.bmp")


def test_undecodable_image_is_named(broken_roots, tmp_path):
    out = tmp_path / "out"
    p = run("main_lora.py", "--root_path", str(broken_roots["undecodable"]), "--dataset", "folder",
            "--shots", "-1", "--output_dir", str(out), *TINY)
    assert_user_error(p, out, "red_99.png")


def _resume_args(root, out):
    return ["--root_path", str(root), "--dataset", "folder", "--shots", "4", "--n_iters", "40",
            "--checkpoint_every", "5", "--output_dir", str(out), *TINY]


def test_kill_and_resume_matches_an_uninterrupted_run(folder_root, tmp_path):
    straight = run("main_lora.py", *_resume_args(folder_root, tmp_path / "a"))
    assert straight.returncode == 0, straight.stderr
    expected = json.loads(next((tmp_path / "a").rglob("results.json")).read_text())

    out = tmp_path / "b"
    proc = subprocess.Popen([sys.executable, str(REPO / "main_lora.py"), *_resume_args(folder_root, out)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(out.rglob("checkpoint.pt")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "rerun the same command to resume" in stderr
    assert not list(out.rglob("results.json"))
    import torch

    saved = torch.load(next(out.rglob("checkpoint.pt")), map_location="cpu", weights_only=False)
    step = saved["step"]  # 12 train images in batches of 8 and 4 (the last partial batch is kept)
    assert saved["seconds"] > 0 and saved["images"] == (step // 2) * 12 + (step % 2) * 8

    resumed = run("main_lora.py", *_resume_args(folder_root, out))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming lora from step" in resumed.stderr
    got = json.loads(next(out.rglob("results.json")).read_text())
    assert got["timing"]["resumed_from_step"] > 0
    assert got["metrics"] == expected["metrics"]
    # timing covers both attempts: the interrupted one's seconds and every step's images
    assert got["timing"]["train_seconds"] > saved["seconds"]
    images = got["timing"]["images_per_second"] * got["timing"]["train_seconds"]
    assert images == pytest.approx(expected["timing"]["images_per_second"] * expected["timing"]["train_seconds"],
                                   rel=0.01)
    assert not list(out.rglob("checkpoint.pt"))


def test_non_finite_loss_stops_the_run(folder_root, tmp_path):
    out = tmp_path / "out"
    p = run("main.py", "--root_path", str(folder_root), "--dataset", "folder", "--lr", "1e30",
            "--n_iters", "20", "--output_dir", str(out), *TINY)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "at step" in p.stderr and "--precision fp32" in p.stderr
    assert not list(out.rglob("results.json"))


def test_identical_runs_give_identical_splits_and_metrics(folder_root, tmp_path):
    results = []
    for name in ("a", "b"):
        p = run("main_lora.py", "--root_path", str(folder_root), "--dataset", "folder", "--shots", "2",
                "--n_iters", "3", "--output_dir", str(tmp_path / name), *TINY)
        assert p.returncode == 0, p.stderr
        results.append(json.loads(next((tmp_path / name).rglob("results.json")).read_text()))
    a, b = results
    assert a["split_sha256"] == b["split_sha256"]
    assert a["metrics"] == b["metrics"]


def test_a_different_seed_changes_the_split(folder_root):
    sys.path.insert(0, str(REPO))
    from datasets import load_split

    a = load_split(str(folder_root), "folder", shots=2, seed=1)
    b = load_split(str(folder_root), "folder", shots=2, seed=2)
    assert a.sha256 != b.sha256



def test_every_bad_image_is_listed_before_the_model_is_built(tmp_path):
    root = make_folder_dataset(tmp_path / "data", {"train": 3, "val": 2, "test": 2})
    (root / "train" / "red_97.png").write_bytes(b"broken")
    (root / "test" / "blue_98.png").write_bytes(b"")
    out = tmp_path / "out"
    # clip's weights are not here: the images are checked first, so the error is about them
    p = run("main.py", "--root_path", str(root), "--dataset", "folder", "--model_name", "clip",
            "--output_dir", str(out), "--device", "cpu")
    assert_user_error(p, out, "2 image(s)", "red_97.png", "blue_98.png")


def test_checked_images_are_remembered(tmp_path, monkeypatch):
    import datasets
    from engine import images

    root = make_folder_dataset(tmp_path / "data", {"train": 2})
    paths = sorted(str(p) for p in root.rglob("*.png"))
    cache = tmp_path / "decodable.json"
    images.check_decodable(paths, cache)
    calls = []
    monkeypatch.setattr(datasets, "load_image", lambda p: calls.append(p))
    images.check_decodable(paths, cache)
    assert calls == []
    Path(paths[0]).write_bytes(Path(paths[1]).read_bytes() + b"\0")  # changed file: checked again
    images.check_decodable(paths, cache)
    assert calls == [paths[0]]


def test_thin_classes_are_named_in_a_warning_and_in_results(tmp_path):
    root = make_folder_dataset(tmp_path / "data", {"train": 3, "val": 2, "test": 2})
    for extra in ("train", "val"):
        write_cell(root / extra / "rare_0.png", (10, 10, 10), np.random.default_rng(0))
    out = tmp_path / "out"
    p = run("main.py", "--root_path", str(root), "--dataset", "folder", "--shots", "-1", "--n_iters", "1",
            "--output_dir", str(out), *TINY)
    assert p.returncode == 0, p.stderr
    assert "warning: class 'rare' has 1 train image(s)" in p.stderr and "absent from test" in p.stderr
    r = json.loads(next(out.rglob("results.json")).read_text())
    assert len(r["warnings"]) == 2
    assert "rare" not in r["metrics"]["test"]["balanced_accuracy_over"]
