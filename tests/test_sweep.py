"""The sweep launcher: grid expansion, resumability, failures, GPU workers, SLURM scripts, dry runs."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from utils import sweep
from utils.cli import parse_config
from utils.config import RunConfig, run_dir

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch_run.sh"


def launch(*args: str, env: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    """bash launch_run.sh ARGS, from a folder other than the repository."""
    return subprocess.run(["bash", str(LAUNCH), *args], check=False, capture_output=True, text=True,
                          timeout=timeout, env=env, cwd="/")


def record(config: RunConfig) -> dict:
    """The smallest valid results.json of a run."""
    metrics = {"balanced_accuracy": 0.5}
    return {"schema_version": 2, "config": config.to_dict(), "method": config.method,
            "metrics": {"val": metrics, "test": metrics}}


def finish(config: RunConfig) -> Path:
    """Pretend a run finished: a valid results.json in its folder."""
    folder = run_dir(config)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(record(config)))
    return folder


def grid(out: Path, *more: str) -> list[str]:
    """Experiment 2, demo data, tiny_clip, 2 shots x 2 seeds."""
    return ["--experiment", "2", "--datasets", "demo", "--models", "tiny_clip", "--shots", "1 2",
            "--seeds", "1 2", "--output_dir", str(out), *more]


def config(out: Path, shots: int, seed: int, *flags: str) -> RunConfig:
    """The settings of one run of grid(), resolved by the entry points' own parser."""
    return parse_config(["--preset", "exp2", "--dataset", "demo", "--model_name", "tiny_clip", "--shots",
                         str(shots), "--seed", str(seed), "--output_dir", str(out), *flags], "lora")


@pytest.fixture
def fake_execute(monkeypatch):
    """Replace process start-up: record each job, then finish it (or fail it when told to)."""
    calls: list[tuple[sweep.Job, dict]] = []
    behaviour = {"fail": set(), "no_results": set(), "sleep": 0.0}
    lock = threading.Lock()

    def execute(job: sweep.Job, env: dict) -> int:
        with lock:
            calls.append((job, env))
        time.sleep(behaviour["sleep"])
        key = (job.config.shots, job.config.seed)
        if key in behaviour["fail"]:
            return 1
        if key not in behaviour["no_results"]:
            finish(job.config)
        return 0

    monkeypatch.setattr(sweep, "execute", execute)
    return calls, behaviour


def test_dry_run_prints_every_pending_command(tmp_path):
    done = launch(*grid(tmp_path, "--weights", "pretrained random", "--extra", "--params 'v q' --r 4"),
                  "--dry_run")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[0].startswith("# 8 combinations: 8 to run, 0 already finished")
    commands = lines[1:]
    assert len(commands) == 8
    for shots in (1, 2):
        for seed in (1, 2):
            for weights in (None, "random"):
                more = ["--params", "q", "v", "--r", "4"] + (["--weights", "random"] if weights else [])
                folder = run_dir(config(tmp_path, shots, seed, *more))
                line = next(c for c in commands if f"> {folder}.log" in c)
                assert line.startswith("python main_lora.py --method lora --dataset demo --model_name tiny_clip")
                assert f"--seed {seed} --shots {shots} " in line and "--preset exp2" in line
                assert ("--weights random" in line) == (weights == "random")
                assert "--params 'v q' --r 4" in line
    assert any("tiny_clip-random/lora-qv-r4-all-vision" in c for c in commands)
    assert not (tmp_path / "exp2").exists()  # a dry run starts nothing and writes nothing


def test_dry_run_experiment_1_and_3(tmp_path):
    done = launch("--experiment", "3", "--datasets", "hicervix", "--level", "level_3",
                  "--models", "tiny_clip", "--percentages", "10 50", "--seeds", "1", "--lrs", "1e-3",
                  "--output_dir", str(tmp_path), "--dry_run")
    assert done.returncode == 0, done.stderr
    commands = done.stdout.strip().splitlines()[1:]
    assert [("--shots 0 " in c and "--lr 1e-3" in c, "--pourcentage" in c, "--level level_3" in c)
            for c in commands] == [(True, True, True)] * 2
    assert "hicervix-level_3/tiny_clip/lora-qkvo-r16-all-vision/pct10/lr0.001/seed1-" in commands[0]
    done = launch("--experiment", "1", "--datasets", "demo", "--models", "tiny_clip", "--shots", "-1",
                  "--seeds", "1", "--extra", "--textual True", "--output_dir", str(tmp_path), "--dry_run")
    (command,) = done.stdout.strip().splitlines()[1:]
    assert command.startswith("python main.py ")
    assert "/exp1/demo/tiny_clip/linear-textual/shotsall/" in command


def test_finished_runs_are_skipped_without_starting_a_process(tmp_path, fake_execute, capsys):
    calls, _ = fake_execute
    finish(config(tmp_path, 1, 2))
    finish(config(tmp_path, 2, 1))
    assert sweep.main(grid(tmp_path)) == 0
    assert sorted((job.config.shots, job.config.seed) for job, _ in calls) == [(1, 1), (2, 2)]
    assert "ran 2, skipped 2 (already finished), failed 0" in capsys.readouterr().out
    calls.clear()
    start = time.perf_counter()
    assert sweep.main(grid(tmp_path)) == 0  # a finished sweep: nothing starts
    assert calls == [] and time.perf_counter() - start < 2
    assert "4 combinations: 0 to run, 4 already finished" in capsys.readouterr().out


def test_extra_settings_change_the_run_folder_that_is_checked(tmp_path, fake_execute):
    calls, _ = fake_execute
    for shots in (1, 2):
        for seed in (1, 2):
            finish(config(tmp_path, shots, seed, "--params", "v", "pw", "--r", "4", "--n_iters", "3"))
    # letters in any order or form name the same setting, stored in canonical order (q k v o pw)
    assert sweep.main(grid(tmp_path, "--n_iters", "3", "--extra", "--params pw,V --r 4")) == 0
    assert calls == []
    assert sweep.main(grid(tmp_path, "--n_iters", "3", "--extra", "--params v pw --r 8")) == 0
    assert len(calls) == 4 and all(job.config.method_settings["r"] == 8 for job, _ in calls)


def test_a_failed_run_does_not_stop_the_others(tmp_path, fake_execute, capsys):
    calls, behaviour = fake_execute
    behaviour["fail"] = {(1, 2)}
    behaviour["no_results"] = {(2, 1)}
    assert sweep.main(grid(tmp_path)) == 1
    assert len(calls) == 4
    out = capsys.readouterr().out
    assert "ran 4, skipped 0 (already finished), failed 2" in out
    failed = run_dir(config(tmp_path, 1, 2))
    assert f"FAILED {failed} (exit 1); log: {failed}.log" in out
    assert "exited 0 but left no results.json" in out


def test_gpu_workers_share_one_queue(tmp_path, fake_execute):
    calls, behaviour = fake_execute
    behaviour["sleep"] = 0.3  # long enough for both workers to pick up jobs
    assert sweep.main(grid(tmp_path, "--gpus", "0 1")) == 0
    assert len(calls) == 4 and len({job.folder for job, _ in calls}) == 4
    assert {env["CUDA_VISIBLE_DEVICES"] for _, env in calls} == {"0", "1"}


def test_real_processes_log_stdout_and_stderr(tmp_path, monkeypatch):
    """execute() for real, with a stand-in entry point that finishes even seeds and fails odd ones."""
    fake_repo = tmp_path / "repo"
    fake_repo.mkdir()
    (fake_repo / "main_lora.py").write_text(textwrap.dedent("""
        import json, sys
        from utils.cli import parse_config
        from utils.config import run_dir
        c = parse_config(sys.argv[1:], "lora")
        print("hello from stdout")
        if c.seed % 2:
            sys.exit("odd seed: failing on purpose")
        run_dir(c).mkdir(parents=True)
        metrics = {"balanced_accuracy": 0.5}
        (run_dir(c) / "results.json").write_text(json.dumps({"schema_version": 2, "config": c.to_dict(),
            "method": c.method, "metrics": {"val": metrics, "test": metrics}}))
    """))
    monkeypatch.setattr(sweep, "REPO_ROOT", fake_repo)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    out = tmp_path / "out"
    assert sweep.main(grid(out)) == 1
    odd = run_dir(config(out, 2, 1))
    log = Path(f"{odd}.log").read_text()
    assert "hello from stdout" in log and "odd seed: failing on purpose" in log
    assert not odd.exists() and (run_dir(config(out, 2, 2)) / "results.json").is_file()
    assert sweep.main(grid(out, "--seeds", "2")) == 0


def _path_without_sbatch(tmp_path: Path) -> str:
    """A PATH with the interpreter's folder and the basic tools, and no sbatch."""
    keep = tmp_path / "bin"
    keep.mkdir()
    for tool in ("python", "bash", "sed", "dirname"):
        found = shutil.which(tool)
        if found:
            (keep / tool).symlink_to(found)
    (keep / "python").unlink(missing_ok=True)
    (keep / "python").symlink_to(sys.executable)
    return str(keep)


def test_slurm_script_without_sbatch(tmp_path):
    out = tmp_path / "out"
    finish(config(out, 1, 1))
    env = {**os.environ, "PATH": _path_without_sbatch(tmp_path)}
    done = launch(*grid(out), "--slurm", "--sbatch", "--partition=gpu --time=01:00:00", env=env)
    assert done.returncode == 0, done.stderr
    (folder,) = (out / "sweeps").iterdir()
    script = (folder / "sweep.sbatch").read_text()
    assert f"sbatch not found; submit later with: sbatch {folder / 'sweep.sbatch'}" in done.stdout
    assert "#SBATCH --array=0-2\n" in script  # 3 pending of 4
    assert f"#SBATCH --output={folder}/logs/task_%a.log" in script
    assert "#SBATCH --partition=gpu\n#SBATCH --time=01:00:00\n" in script and "#SBATCH --gres=gpu:1" in script
    assert 'line=$((SLURM_ARRAY_TASK_ID + 1))' in script and f"cd {REPO}" in script
    commands = (folder / "commands.txt").read_text().splitlines()
    folders = (folder / "run_dirs.txt").read_text().splitlines()
    expected = [run_dir(config(out, s, k)) for s, k in ((1, 2), (2, 1), (2, 2))]
    assert folders == [str(f) for f in expected]
    for command, (shots, seed) in zip(commands, ((1, 2), (2, 1), (2, 2)), strict=True):
        assert "main_lora.py" in command and f"--seed {seed} --shots {shots} " in command
    assert (folder / "logs").is_dir()


def test_slurm_submits_when_sbatch_exists(tmp_path):
    bin_dir = Path(_path_without_sbatch(tmp_path))
    record = tmp_path / "sbatch_args"
    (bin_dir / "sbatch").write_text(f'#!/bin/bash\necho "$@" > {record}\necho "Submitted batch job 42"\n')
    (bin_dir / "sbatch").chmod(0o755)
    out = tmp_path / "out"
    done = launch(*grid(out), "--slurm", "--max_parallel", "2", env={**os.environ, "PATH": str(bin_dir)})
    assert done.returncode == 0, done.stderr
    assert "Submitted batch job 42" in done.stdout
    (script,) = (out / "sweeps").glob("*/sweep.sbatch")
    assert record.read_text().strip() == str(script)
    assert "#SBATCH --array=0-3%2" in script.read_text()


@pytest.mark.parametrize("args, culprit", [
    (["--shots", "0"], "--shots"),
    (["--percentages", "10"], "--percentages"),
    (["--extra", "--seed 3"], "--seed"),
    (["--extra", "--params qz"], "'qz'"),
    (["--methods", "lora nope"], "nope"),
    (["--seeds", "1 1"], "share the run folder"),
    (["--experiment", "4"], "--experiment"),
    (["--root_path", "/no/such/folder"], "/no/such/folder"),
])
def test_mistakes_exit_2_with_one_line(tmp_path, args, culprit):
    base = grid(tmp_path)
    for flag, value in zip(args[::2], args[1::2], strict=True):
        if flag in base:
            base[base.index(flag) + 1] = value
        else:
            base += [flag, value]
    done = launch(*base, "--dry_run")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and culprit in lines[0]


def test_launch_without_arguments_prints_usage():
    done = launch()
    assert done.returncode == 2 and "usage: bash launch_run.sh" in done.stderr


def _write_fixture(root: Path) -> None:
    """The folder layout <root>/{train,val,test}/<class>_<n>.png: 2 classes, 4 images each, 16x16."""
    from PIL import Image

    for split in ("train", "val", "test"):
        (root / split).mkdir(parents=True)
        for label, (cls, shade) in enumerate((("neg", 40), ("pos", 210))):
            for n in range(4):
                value = shade + 7 * n
                pixels = [(value, (value * 3 + label * 50) % 256, 255 - value)] * (16 * 16)
                image = Image.new("RGB", (16, 16))
                image.putdata(pixels)
                image.save(root / split / f"{cls}_{n}.png")


@pytest.mark.skipif(not (REPO / "main.py").exists(), reason="entry points not present")
def test_end_to_end_sweep_then_rerun_then_report(tmp_path):
    root, out = tmp_path / "data", tmp_path / "out"
    _write_fixture(root)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CYTOLORA_CACHE": str(tmp_path / "cache")}
    args = ["--experiment", "2", "--datasets", "folder", "--root_path", str(root), "--models", "tiny_clip",
            "--shots", "1 2", "--seeds", "1 2", "--n_iters", "2", "--output_dir", str(out),
            "--extra", "--device cpu --batch_size 4 --num_workers 0"]
    done = launch(*args, env=env, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ran 4, skipped 0 (already finished), failed 0" in done.stdout
    assert len(list((out / "exp2").rglob("results.json"))) == 4
    start = time.perf_counter()
    again = launch(*args, env=env)
    assert again.returncode == 0 and "4 combinations: 0 to run, 4 already finished" in again.stdout
    assert time.perf_counter() - start < 10
    report = subprocess.run([sys.executable, "-m", "utils.report", str(out), "--no_plots"], check=False,
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr
    with open(out / "report" / "summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    got = sorted((r["shots"], r["n_seeds"], r["seeds"]) for r in rows)
    assert got == [("1", "2", "1;2"), ("2", "2", "1;2")]


def test_methods_run_on_the_same_grid_each_from_its_entry_point_with_only_its_flags(tmp_path):
    done = launch("--methods", "linear knn lora", "--datasets", "demo", "--models", "tiny_clip", "--shots", "2",
                  "--seeds", "1", "--output_dir", str(tmp_path), "--extra", "--r 4 --k 3 --batch_size 4",
                  "--dry_run")
    assert done.returncode == 0, done.stderr
    commands = done.stdout.strip().splitlines()[1:]
    by_method = {c.split("--method ")[1].split()[0]: c for c in commands}
    assert sorted(by_method) == ["knn", "linear", "lora"]
    assert by_method["linear"].startswith("python main.py") and by_method["knn"].startswith("python main.py")
    assert by_method["lora"].startswith("python main_lora.py")
    assert "--r 4" in by_method["lora"] and "--k" not in by_method["lora"]
    assert "--k 3" in by_method["knn"] and "--r" not in by_method["knn"]
    assert "--r" not in by_method["linear"] and "--k" not in by_method["linear"]
    assert all("--batch_size 4" in c for c in commands)  # a run flag reaches every method
    assert "/knn-k3/" in by_method["knn"] and "/lora-qv-r4-all-vision/" in by_method["lora"]
