"""The sweep's long-lived worker: runs made one after another in one process (engine/session.py,
utils/worker.py) give what each gives in a process of its own, a failing run is recorded and the worker goes
on, an interrupted run saves its checkpoint, and the sweep drives one worker process for all its runs."""

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from engine.config import run_dir
from engine.results import PREDICTIONS_FILE, RESULTS_FILE
from engine.run import run
from engine.session import DecodedImages, Session
from engine.trainer import Trainer
from utils import sweep, worker
from utils.cli import parse_config

TINY = ["--dataset", "folder", "--model_name", "tiny_vit", "--n_iters", "1", "--warmup_steps", "1",
        "--batch_size", "4", "--device", "cpu"]


def flags(root: Path, out: Path, *more: str) -> list[str]:
    return [*TINY, "--root_path", str(root), "--output_dir", str(out), *more]


# run 1 trains the whole backbone in place (full fine-tuning): run 2 must still start from the pristine model
FIRST = ("--method", "full", "--shots", "2", "--seed", "1")
BAD = ("--method", "lora", "--shots", "two")
SECOND = ("--method", "lora", "--shots", "4", "--seed", "2", "--r", "2")


def request(*runs: tuple[list[str], Path], pack: int = 1) -> str:
    """One line of the worker's input: these runs (argument lists of main_lora.py, and logs)."""
    return json.dumps({"runs": [{"args": ["main_lora.py", *args], "log": str(log)} for args, log in runs],
                       "pack": pack}) + "\n"


def folder_of(args: list[str]) -> Path:
    return run_dir(parse_config(args, notify=False))


@pytest.fixture(scope="module")
def worker_pass(folder_root, tmp_path_factory):
    """Three requests served by one worker in this process: a run, a run with a bad flag, another run."""
    out = tmp_path_factory.mktemp("worker")
    requests, logs = [], []
    for more in (FIRST, BAD, SECOND):
        args = flags(folder_root, out, *more)
        log = out / f"run{len(logs)}.log"
        logs.append(log)
        requests.append(request((args, log)))
    answers = out / "answers.jsonl"
    session = Session()
    with open(answers, "w") as handle:
        code = worker.serve(requests, handle, session)
    return {"code": code, "answers": [json.loads(line) for line in answers.read_text().splitlines()],
            "logs": logs, "session": session, "out": out}


def test_a_failing_run_is_recorded_and_the_worker_goes_on(worker_pass):
    assert worker_pass["code"] == 0
    assert [a["codes"] for a in worker_pass["answers"]] == [[0], [2], [0]]
    bad = worker_pass["logs"][1].read_text().splitlines()
    assert any(line.startswith("error: argument --shots") for line in bad), bad
    assert bad[-1].startswith("# worker: exit 2 after ")
    for log in worker_pass["logs"]:
        text = log.read_bytes().decode()
        assert "\r" not in text and text.splitlines()[0].startswith("# in the sweep's worker (pid ")
    assert "results: " in worker_pass["logs"][2].read_text()  # the run's own output reached its log


def test_the_session_builds_the_model_and_decodes_each_image_once(worker_pass, folder_root):
    session = worker_pass["session"]
    assert session.builds == 1
    images = [p for p in folder_root.rglob("*.png")]
    # every image of the split was decoded at most once (train, val and test of both runs)
    assert 0 < session.images.decoded <= len(images)


def test_run_2_in_the_worker_equals_run_2_in_its_own_process(worker_pass, folder_root, tmp_path):
    """Same metrics and the same per-image predictions, to the bit, on CPU in fp32."""
    in_worker = folder_of(flags(folder_root, worker_pass["out"], *SECOND))
    alone_args = flags(folder_root, tmp_path, *SECOND)
    assert run(parse_config(alone_args, notify=False)) == 0
    alone = folder_of(alone_args)
    a, b = (json.loads((f / RESULTS_FILE).read_text()) for f in (in_worker, alone))
    assert a["metrics"] == b["metrics"] and a["metrics"]["test"]["n"] > 0
    assert (in_worker / PREDICTIONS_FILE).read_bytes() == (alone / PREDICTIONS_FILE).read_bytes()


def test_a_session_model_is_a_fresh_copy_of_the_one_built():
    session = Session()
    first = session.model("tiny_vit", weights="random")
    with torch.no_grad():
        next(first.model.parameters()).add_(1.0)  # what a fine-tuning run does to its copy
    second = session.model("tiny_vit", weights="random")
    assert session.builds == 1 and second.model is not first.model
    fresh = __import__("models").load_model("tiny_vit", weights="random")
    for (name, x), (_, y) in zip(second.model.state_dict().items(), fresh.model.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


def test_decoded_images_follow_the_file_on_disk(folder_root, tmp_path):
    cache = DecodedImages()
    path = tmp_path / "cell.png"
    path.write_bytes((folder_root / "train" / "blue_0.png").read_bytes())
    (first,) = cache.images([(str(path), 0)], 8)
    assert cache.images([(str(path), 1)], 8)[0] is not None and cache.decoded == 1  # kept: not decoded again
    path.write_bytes((folder_root / "train" / "red_0.png").read_bytes())
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    (changed,) = cache.images([(str(path), 0)], 8)
    assert cache.decoded == 2 and not torch.equal(first, changed)
    small = DecodedImages(max_bytes=0)  # past its budget it decodes for the run and keeps nothing
    small.images([(str(path), 0)], 8)
    small.images([(str(path), 0)], 8)
    assert small.decoded == 2 and small.bytes == 0


def test_sigterm_during_training_saves_the_checkpoint_and_ends_the_worker(folder_root, tmp_path, monkeypatch):
    args = flags(folder_root, tmp_path, "--method", "lora", "--shots", "4", "--seed", "3", "--n_iters", "20",
                 "--checkpoint_every", "1000")
    log = tmp_path / "long.log"
    requests = [request((args, log))] * 2
    one_step = Trainer._one_step

    def step_then_stop(self, *a, **kw):  # SIGTERM arrives during the third training step
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return one_step(self, *a, **kw)

    monkeypatch.setattr(Trainer, "_one_step", step_then_stop)
    previous = signal.signal(signal.SIGTERM, worker._stop)  # as the worker's main installs it
    answers = tmp_path / "answers.jsonl"
    try:
        with open(answers, "w") as handle:
            code = worker.serve(requests, handle)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert code == 128 + signal.SIGTERM
    assert [json.loads(line)["codes"] for line in answers.read_text().splitlines()] == [[128 + signal.SIGTERM]]
    assert (folder_of(args) / "checkpoint.pt").is_file() and not (folder_of(args) / RESULTS_FILE).exists()
    text = log.read_text()
    assert "interrupted at step" in text and "rerun the same command to resume" in text
    assert text.count("# in the sweep's worker") == 1  # the second request was not started


def test_the_sweep_runs_every_run_in_one_worker_process(folder_root, tmp_path, capsys):
    """launch_run.sh's default: one `python -m utils.worker` makes all the runs of a CPU sweep."""
    out = tmp_path / "out"
    args = ["--datasets", "folder", "--root_path", str(folder_root), "--models", "tiny_vit", "--shots", "2",
            "--seeds", "1 2", "--n_iters", "1", "--extra", "--warmup_steps 1 --batch_size 4 --device cpu",
            "--output_dir", str(out)]
    assert sweep.main(args) == 0, capsys.readouterr()
    printed = capsys.readouterr().out
    assert "ran 2, skipped 0 (already finished), failed 0" in printed
    logs = sorted(out.rglob("*.log"))
    assert len(logs) == 2
    pids = set()
    for log in logs:
        lines = log.read_text().splitlines()
        assert lines[0].startswith("# ") and "main_lora.py --method lora" in lines[0]
        assert lines[-1].startswith("# worker: exit 0 after ")
        pids |= {line.split("pid ")[1].split(",")[0] for line in lines if line.startswith("# in the sweep's worker")}
        assert (log.with_suffix("") / RESULTS_FILE).is_file() or Path(str(log)[:-4], RESULTS_FILE).is_file()
    assert len(pids) == 1


def test_a_packed_request_trains_its_runs_together_and_logs_each(folder_root, tmp_path):
    runs = [(flags(folder_root, tmp_path, "--method", "lora", "--shots", "2", "--seed", str(seed), "--r", "2"),
             tmp_path / f"seed{seed}.log") for seed in (1, 2)]
    answers = tmp_path / "answers.jsonl"
    with open(answers, "w") as handle:
        assert worker.serve([request(*runs, pack=2)], handle) == 0
    assert json.loads(answers.read_text())["codes"] == [0, 0]
    for args, log in runs:
        record = json.loads((folder_of(args) / RESULTS_FILE).read_text())
        assert record["packed"]["runs"] == 2
        lines = log.read_text().splitlines()
        assert "packed with 1 other run(s)" in lines[0] and lines[-1].startswith("# worker: exit 0 after ")
        assert sum(line.startswith("results: ") for line in lines) == 2  # the pack's output, in each log


def test_the_sweep_packs_runs_that_share_a_backbone_only_in_its_worker(tmp_path, capsys):
    grid = ["--methods", "lora knn", "--datasets", "demo", "--models", "tiny_clip", "--shots", "1 2", "--seeds",
            "1 2 3", "--output_dir", str(tmp_path)]
    jobs = sweep.expand(sweep.build_parser().parse_args(grid))
    groups = sweep.pack_groups(jobs, 4)
    assert [len(g) for g in groups] == [4, 2] + [1] * 6  # 6 lora runs in packs of at most 4; knn trains nothing
    assert [i for g in groups for i, _ in g] == list(range(1, 13))
    assert {job.config.method for _, job in groups[0] + groups[1]} == {"lora"}
    assert [len(g) for g in sweep.pack_groups(jobs, 1)] == [1] * 12
    for mode in (["--worker", "false"], ["--slurm"]):
        assert sweep.main([*grid, "--pack", "2", *mode]) == 2
        assert "--pack trains runs together" in capsys.readouterr().err
