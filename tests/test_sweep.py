"""The sweep launcher: grid expansion, resumability, failures, logs, GPU workers, SLURM scripts, dry runs.

Most tests call ``sweep.main`` in-process; a few run ``bash launch_run.sh`` for real (the wrapper,
exit codes, no traceback, one real run end to end).
"""

from __future__ import annotations

import csv
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from engine.config import RunConfig, run_dir
from utils import sweep
from utils.cli import parse_config

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch_run.sh"


def launch(*args: str, env: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    """bash launch_run.sh ARGS, from a folder other than the repository."""
    return subprocess.run(["bash", str(LAUNCH), *args], check=False, capture_output=True, text=True,
                          timeout=timeout, env=env, cwd="/")


def sweep_main(capsys, *args: str) -> SimpleNamespace:
    """sweep.main(ARGS) in-process, as launch() would run it: exit code, stdout and stderr."""
    capsys.readouterr()
    code = sweep.main(list(args))
    captured = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=captured.out, stderr=captured.err)


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
    """Experiment 2, demo data, tiny_clip, 2 shots x 2 seeds, one process per run (execute())."""
    return ["--experiment", "2", "--datasets", "demo", "--models", "tiny_clip", "--shots", "1 2",
            "--seeds", "1 2", "--output_dir", str(out), "--worker", "false", *more]


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


def test_dry_run_prints_every_pending_command(tmp_path, capsys):
    done = sweep_main(capsys, *grid(tmp_path, "--weights", "pretrained random", "--extra", "--params 'v q' --r 4"),
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


def test_dry_run_experiment_1_and_3(tmp_path, capsys):
    done = sweep_main(capsys, "--experiment", "3", "--datasets", "hicervix", "--level", "level_3",
                      "--models", "tiny_clip", "--percentages", "10 50", "--seeds", "1", "--lrs", "1e-3",
                      "--output_dir", str(tmp_path), "--dry_run")
    assert done.returncode == 0, done.stderr
    commands = done.stdout.strip().splitlines()[1:]
    assert [("--shots 0 " in c and "--lr 1e-3" in c, "--pourcentage" in c, "--level level_3" in c)
            for c in commands] == [(True, True, True)] * 2
    assert "hicervix-level_3/tiny_clip/lora-qkvo-r16-all-vision/pct10/lr0.001/seed1-" in commands[0]
    done = sweep_main(capsys, "--experiment", "1", "--datasets", "demo", "--models", "tiny_clip", "--shots", "-1",
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


STAND_IN = """
import json, os, sys
from pathlib import Path
FOLDERS, RECORDS = json.loads({folders!r}), json.loads({records!r})
argv = sys.argv[1:]
key = argv[argv.index("--shots") + 1] + "," + argv[argv.index("--seed") + 1]
folder = Path(FOLDERS[key])
print("hello from stdout", flush=True)
bar = "train lora:   0%|  | 0/2\\rtrain lora:  50%|# | 1/2\\rtrain lora: 100%|##| 2/2\\r" + " " * 30 + "\\r"
sys.stderr.write(bar)
sys.stderr.flush()
if key == "1,1" and not os.environ.get("STAND_IN_FIXED"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "checkpoint.pt").write_text("a checkpoint")
    print("error: odd seed: failing on purpose", file=sys.stderr)
    print("a later line that is not the error", file=sys.stderr)
    sys.exit(2)
if key == "2,1" and not os.environ.get("STAND_IN_FIXED"):
    raise ValueError("boom")
folder.mkdir(parents=True, exist_ok=True)
(folder / "results.json").write_text(json.dumps(RECORDS[key]))
"""


def _stand_in_repo(tmp_path: Path, out: Path) -> Path:
    """A repository whose main_lora.py is plain Python (no torch to import, so it starts in milliseconds):
    it finds its run folder in a table made here, prints, draws a progress bar with carriage returns,
    then finishes, fails with an 'error:' line (shots 1, seed 1, after saving a checkpoint) or crashes
    with a traceback (shots 2, seed 1) until STAND_IN_FIXED is set."""
    folders, records = {}, {}
    for shots in (1, 2):
        for seed in (1, 2):
            c = config(out, shots, seed)
            folders[f"{shots},{seed}"] = str(run_dir(c))
            records[f"{shots},{seed}"] = record(c)
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "main_lora.py").write_text(STAND_IN.format(folders=json.dumps(folders), records=json.dumps(records)))
    return repo


def test_real_processes_log_one_line_per_update_and_resumed_runs_append(tmp_path, monkeypatch, capsys):
    """execute() for real: stdout and stderr in the log, carriage returns as lines, the failures quoted in
    the summary, and a rerun appended to the same log after a line saying it resumed."""
    out = tmp_path / "out"
    monkeypatch.setattr(sweep, "REPO_ROOT", _stand_in_repo(tmp_path, out))
    done = sweep_main(capsys, *grid(out))
    assert done.returncode == 1 and "ran 4, skipped 0 (already finished), failed 2" in done.stdout
    failed, crashed = run_dir(config(out, 1, 1)), run_dir(config(out, 2, 1))
    log = Path(f"{failed}.log").read_bytes().decode()
    assert "\r" not in log
    lines = log.splitlines()
    assert lines[0].startswith("# ") and "main_lora.py --method lora" in lines[0]
    assert "hello from stdout" in lines and "error: odd seed: failing on purpose" in lines
    bar = ["train lora:   0%|  | 0/2", "train lora:  50%|# | 1/2", "train lora: 100%|##| 2/2"]
    assert lines[lines.index(bar[0]):lines.index(bar[0]) + 3] == bar  # one line per update, no blank redraw
    # the summary quotes each failed run: its last 'error:' line, else the last line it printed
    summary = done.stdout[done.stdout.index("sweep: 4 combinations"):].splitlines()
    at = summary.index(f"  FAILED {failed} (exit 2); log: {failed}.log")
    assert summary[at + 1] == "    error: odd seed: failing on purpose"
    at = summary.index(f"  FAILED {crashed} (exit 1); log: {crashed}.log")
    assert summary[at + 1] == "    ValueError: boom"
    assert "Traceback" in Path(f"{crashed}.log").read_text()
    assert (run_dir(config(out, 2, 2)) / "results.json").is_file() and not crashed.exists()

    monkeypatch.setenv("STAND_IN_FIXED", "1")
    again = sweep_main(capsys, *grid(out))
    assert again.returncode == 0 and "4 combinations: 2 to run, 2 already finished" in again.stdout
    log = Path(f"{failed}.log").read_text().splitlines()
    resumed = [i for i, line in enumerate(log) if line.startswith("# ---- resumed ")]
    assert len(resumed) == 1 and "from its checkpoint; earlier attempts above" in log[resumed[0]]
    assert log.index("error: odd seed: failing on purpose") < resumed[0]  # the first attempt is kept
    assert log.count("hello from stdout") == 2
    crashed_log = Path(f"{crashed}.log").read_text()
    assert "from the start (no checkpoint was saved)" in crashed_log and "ValueError: boom" in crashed_log


TRAPS_CTRL_C = """
import signal, sys, time
def save_and_stop(signum, frame):
    print("saving a checkpoint", flush=True)
    time.sleep(0.5)
    print("checkpoint saved", flush=True)
    sys.exit(130)
signal.signal(signal.SIGINT, save_and_stop)
print("started", flush=True)
time.sleep(60)
"""

DRIVER = """
import sys
from pathlib import Path
sys.path.insert(0, {repo!r})
from utils import sweep
sweep.REPO_ROOT = Path({fake!r})
sys.exit(sweep.main({args!r}))
"""


def test_ctrl_c_lets_the_run_save_its_checkpoint_and_log_it(tmp_path):
    """Ctrl-C reaches the sweep and its run: the sweep waits for the run to save its checkpoint, the log
    keeps what the run said, and the sweep exits 130."""
    fake = tmp_path / "repo"
    fake.mkdir()
    (fake / "main_lora.py").write_text(TRAPS_CTRL_C)
    out = tmp_path / "out"
    args = grid(out, "--shots", "1", "--seeds", "1")
    driver = subprocess.Popen([sys.executable, "-c", DRIVER.format(repo=str(REPO), fake=str(fake), args=args)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    log = Path(f"{run_dir(config(out, 1, 1))}.log")
    deadline = time.monotonic() + 60
    while not (log.is_file() and "started" in log.read_text()):
        assert driver.poll() is None and time.monotonic() < deadline, driver.communicate()
        time.sleep(0.05)
    os.killpg(driver.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
    stdout, stderr = driver.communicate(timeout=60)
    assert driver.returncode == 130, stdout + stderr
    assert "interrupted; rerun the same command to resume" in stderr and "Traceback" not in stderr
    lines = log.read_text().splitlines()
    assert lines[-3:] == ["started", "saving a checkpoint", "checkpoint saved"]


def test_log_lines_split_carriage_returns_across_reads(tmp_path):
    path = tmp_path / "log"
    with open(path, "wb") as handle:
        lines = sweep.LogLines(handle)
        # '\r\n' split across reads is one line end; a redraw of blanks (a closed bar) is dropped
        for chunk in (b"a 1\r", b"\nb", b" 2\rb 3\r", b"   \r", b"\n", b"\nlast without newline"):
            lines.feed(chunk)
        lines.close()
    assert path.read_bytes() == b"a 1\nb 2\nb 3\n\nlast without newline\n"


def test_last_error_line_prefers_error_lines(tmp_path):
    log = tmp_path / "run.log"
    log.write_text("# python main.py\nerror: first\nsome output\nerror: second\nmore output\n\n")
    assert sweep.last_error_line(log) == "error: second"
    start = len(log.read_bytes())
    with open(log, "a") as handle:
        handle.write("# ---- resumed\nTraceback (most recent call last):\nKeyError: 'x'\n")
    assert sweep.last_error_line(log, start) == "KeyError: 'x'"  # only the attempt after `start`
    assert sweep.last_error_line(tmp_path / "absent.log") is None


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


def test_slurm_script_without_sbatch(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    finish(config(out, 1, 1))
    monkeypatch.setenv("PATH", _path_without_sbatch(tmp_path))
    done = sweep_main(capsys, *grid(out), "--slurm", "--sbatch", "--partition=gpu --time=01:00:00")
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


def test_slurm_submits_when_sbatch_exists(tmp_path, monkeypatch, capsys):
    bin_dir = Path(_path_without_sbatch(tmp_path))
    record = tmp_path / "sbatch_args"
    (bin_dir / "sbatch").write_text(f'#!/bin/bash\necho "$@" > {record}\necho "Submitted batch job 42"\n')
    (bin_dir / "sbatch").chmod(0o755)
    out = tmp_path / "out"
    monkeypatch.setenv("PATH", str(bin_dir))
    done = sweep_main(capsys, *grid(out), "--slurm", "--max_parallel", "2")
    assert done.returncode == 0, done.stderr
    assert "Submitted batch job 42" in done.stdout
    (script,) = (out / "sweeps").glob("*/sweep.sbatch")
    assert record.read_text().strip() == str(script)
    assert "#SBATCH --array=0-3%2" in script.read_text()


MISTAKES = [
    (["--shots", "0"], "--shots"),
    (["--percentages", "10"], "--percentages"),
    (["--extra", "--seed 3"], "--seed"),
    (["--extra", "--params qz"], "'qz'"),
    (["--methods", "lora nope"], "nope"),
    (["--seeds", "1 1"], "share the run folder"),
    (["--experiment", "4"], "--experiment"),
    (["--root_path", "/no/such/folder"], "/no/such/folder"),
    (["--step_seconds", "2"], "--step_seconds goes with --estimate"),
    (["--estimate", "--step_seconds", "0"], "--step_seconds must be positive"),
    (["--folds", "1"], "--folds must be at least 2"),
    (["--folds", "3", "--extra", "--cv 5"], "drop --cv from --extra"),
    (["--folds", "3", "--extra", "--fold=1 --r 4"], "drop --fold from --extra"),
    (["--folds", "3"], "--folds applies to folder and csv data"),  # demo has its own validation split
    (["--root_path", "data\nset"], "control character"),  # would split the SLURM script's lines
    (["--extra", "--r 4\t--alpha 2"], "control character"),
    (["--extra", "--alpha nan"], "finite"),
]


def _with(base: list[str], args: list[str]) -> list[str]:
    """`base` with each flag of `args` set (replaced where present, added otherwise)."""
    base = list(base)
    i = 0
    while i < len(args):
        flag, value = args[i], (args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith("--") else None)
        if flag in base and value is not None:
            base[base.index(flag) + 1] = value
        else:
            base += [flag] + ([value] if value is not None else [])
        i += 2 if value is not None else 1
    return base


@pytest.mark.parametrize("args, culprit", MISTAKES)
def test_mistakes_exit_2_with_one_line(tmp_path, capsys, args, culprit):
    done = sweep_main(capsys, *_with(grid(tmp_path), args), *([] if "--estimate" in args else ["--dry_run"]))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and culprit in lines[0]


def test_a_mistake_through_bash_exits_2_with_one_line_and_no_traceback(tmp_path):
    done = launch(*_with(grid(tmp_path), ["--extra", "--params qz"]), "--dry_run")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "'qz'" in lines[0]


def test_launch_without_arguments_prints_usage():
    done = launch()
    assert done.returncode == 2 and "usage: bash launch_run.sh" in done.stderr


def test_launch_help_documents_every_mode():
    done = launch("--help")
    assert done.returncode == 0
    for option in ("--dry_run", "--gpus", "--slurm", "--estimate", "--step_seconds", "--folds"):
        assert option in done.stdout


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


@pytest.fixture(scope="module")
def two_class_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("two_classes") / "data"
    _write_fixture(root)
    return root


def _end_to_end_args(root: Path, out: Path, shots: str = "1 2", seeds: str = "1 2") -> list[str]:
    return ["--experiment", "2", "--datasets", "folder", "--root_path", str(root), "--models", "tiny_clip",
            "--shots", shots, "--seeds", seeds, "--n_iters", "2", "--output_dir", str(out),
            "--extra", "--device cpu --batch_size 4 --num_workers 0 --warmup_steps 1"]


def _execute_in_process(job: sweep.Job, env: dict) -> int:
    """execute() with the real entry point called in-process (no interpreter to start), its output logged."""
    from tests.conftest import run_entry

    done = run_entry(job.args[0], *job.args[1:])
    job.log.parent.mkdir(parents=True, exist_ok=True)
    job.log.write_text(done.stdout + done.stderr)
    return done.returncode


def test_end_to_end_sweep_then_rerun_then_report(tmp_path, two_class_root, monkeypatch, capsys):
    """The real entry points write where the sweep looks; a rerun skips them all; the report reads them."""
    from utils.report import main as report_main

    out = tmp_path / "out"
    monkeypatch.setattr(sweep, "execute", _execute_in_process)
    args = [*_end_to_end_args(two_class_root, out), "--worker", "false"]
    done = sweep_main(capsys, *args)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ran 4, skipped 0 (already finished), failed 0" in done.stdout
    assert len(list((out / "exp2").rglob("results.json"))) == 4
    monkeypatch.setattr(sweep, "execute", lambda job, env: pytest.fail(f"{job.label} started again"))
    start = time.perf_counter()
    again = sweep_main(capsys, *args)
    assert again.returncode == 0 and "4 combinations: 0 to run, 4 already finished" in again.stdout
    assert time.perf_counter() - start < 10
    assert report_main([str(out), "--no_plots"]) == 0
    with open(out / "report" / "summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    got = sorted((r["shots"], r["n_seeds"], r["seeds"]) for r in rows)
    assert got == [("1", "2", "1;2"), ("2", "2", "1;2")]


def test_a_real_run_through_bash(tmp_path, two_class_root):
    """bash launch_run.sh from another folder starts the real entry point in its own process; its log,
    progress bars included, holds no carriage return."""
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    done = launch(*_end_to_end_args(two_class_root, out, "1", "1"), env=env, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ran 1, skipped 0 (already finished), failed 0" in done.stdout
    (results,) = (out / "exp2").rglob("results.json")
    log = Path(f"{results.parent}.log").read_bytes()
    assert b"\r" not in log and b"results: " in log and b"train lora" in log


def test_methods_run_on_the_same_grid_each_from_its_entry_point_with_only_its_flags(tmp_path, capsys):
    done = sweep_main(capsys, "--methods", "linear knn lora", "--datasets", "demo", "--models", "tiny_clip",
                      "--shots", "2", "--seeds", "1", "--output_dir", str(tmp_path), "--extra",
                      "--r 4 --k 3 --batch_size 4", "--dry_run")
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


def _fold_grid(root: Path, out: Path, *more: str) -> list[str]:
    """Experiment 2 on folder data, tiny_clip, seed 1, 3-fold cross-validation."""
    return ["--experiment", "2", "--datasets", "folder", "--root_path", str(root), "--models", "tiny_clip",
            "--seeds", "1", "--folds", "3", "--output_dir", str(out), *more]


def test_folds_run_every_fold_of_every_combination(tmp_path, two_class_root, capsys):
    args = sweep.build_parser().parse_args(_fold_grid(two_class_root, tmp_path, "--shots", "1 2"))
    jobs = sweep.expand(args)
    assert len(jobs) == 6 and len({job.folder for job in jobs}) == 6
    for shots in (1, 2):
        mine = [job for job in jobs if job.config.shots == shots]
        assert [(job.config.cv, job.config.fold) for job in mine] == [(3, 0), (3, 1), (3, 2)]
        for i, job in enumerate(mine):
            assert job.args[0] == "main_lora.py" and job.args[job.args.index("--fold") + 1] == str(i)
            parsed = parse_config(job.args[1:], "lora", prog=job.args[0])  # the entry points' own parser
            assert (parsed.cv, parsed.fold) == (3, i) and run_dir(parsed) == job.folder
            assert job.folder.name.startswith(f"seed1-fold{i}of3-")
    done = sweep_main(capsys, *_fold_grid(two_class_root, tmp_path, "--shots", "1 2"), "--dry_run")
    assert done.returncode == 0, done.stderr
    commands = done.stdout.strip().splitlines()[1:]
    assert done.stdout.startswith("# 6 combinations: 6 to run") and len(commands) == 6
    assert sorted(c.split("--fold ")[1].split()[0] for c in commands) == ["0", "0", "1", "1", "2", "2"]
    assert all("--cv 3 " in c for c in commands)


def test_folds_finished_folds_are_skipped(tmp_path, two_class_root, capsys):
    args = _fold_grid(two_class_root, tmp_path, "--shots", "1")
    jobs = sweep.expand(sweep.build_parser().parse_args(args))
    finish(jobs[1].config)
    done = sweep_main(capsys, *args, "--dry_run")
    assert done.stdout.startswith("# 3 combinations: 2 to run, 1 already finished")
    assert "--fold 1 " not in done.stdout


def test_folds_estimate_counts_each_fold_on_its_own_split(tmp_path, two_class_root, capsys, monkeypatch):
    from engine.context import load_data
    from utils import estimate as est

    monkeypatch.setattr(est, "measure", lambda *a, **k: pytest.fail("--step_seconds must time nothing"))
    args = _fold_grid(two_class_root, tmp_path, "--shots", "-1")
    done = sweep_main(capsys, *args, "--estimate", "--step_seconds", "1")
    assert done.returncode == 0, done.stderr
    assert "estimate: 3 runs to run, 0 finished" in done.stdout
    # lora evaluates val and test of each run on images: each fold's own validation part
    splits = [load_data(job.config) for job in sweep.expand(sweep.build_parser().parse_args(args))]
    assert len({tuple(p for p, _ in s.val) for s in splits}) == 3
    evaluated = sum(len(s.val) + len(s.test) for s in splits)
    assert f"forward passes without training: {evaluated:,} images" in done.stdout


def test_folds_reach_the_slurm_array(tmp_path, two_class_root, monkeypatch, capsys):
    out = tmp_path / "out"
    monkeypatch.setenv("PATH", _path_without_sbatch(tmp_path))
    done = sweep_main(capsys, *_fold_grid(two_class_root, out, "--shots", "1"), "--slurm")
    assert done.returncode == 0, done.stderr
    (folder,) = (out / "sweeps").iterdir()
    assert "#SBATCH --array=0-2\n" in (folder / "sweep.sbatch").read_text()
    commands = (folder / "commands.txt").read_text().splitlines()
    folders = (folder / "run_dirs.txt").read_text().splitlines()
    assert [c.split("--cv ")[1].split()[:3] for c in commands] == [["3", "--fold", str(i)] for i in range(3)]
    assert [Path(f).name.split("-")[1] for f in folders] == ["fold0of3", "fold1of3", "fold2of3"]


# -- budgets: a sweep's --n_iters means one thing -------------------------------------------------------------
def _commands(done) -> dict[str, list[list[str]]]:
    out: dict[str, list[list[str]]] = {}
    for line in done.stdout.strip().splitlines()[1:]:
        words = shlex.split(line.split(" > ")[0])
        out.setdefault(words[words.index("--method") + 1], []).append(words[1:])  # the script, then its flags
    return out


def test_n_iters_for_lora_does_not_shorten_the_heads_and_untrained_methods_have_no_lr(tmp_path, capsys):
    done = sweep_main(capsys, "--experiment", "1", "--methods", "simpleshot linear lora", "--datasets", "demo",
                      "--models", "tiny_clip", "--seeds", "1", "--lrs", "1e-3 1e-2", "--n_iters", "2",
                      "--output_dir", str(tmp_path), "--dry_run")
    assert done.returncode == 0, done.stderr
    commands = _commands(done)
    assert all("--n_iters" in c and c[c.index("--n_iters") + 1] == "2" for c in commands["lora"])
    assert all("--n_iters" not in c for c in commands["linear"] + commands["simpleshot"])
    assert "--n_iters 2 applies to lora" in done.stderr and "linear keep" in done.stderr
    # simpleshot trains nothing: one run (no lr axis), no lr in its folder or settings
    (simple,) = commands["simpleshot"]
    assert "--lr" not in simple and "/lr" not in " ".join(simple)
    config = parse_config(simple[1:], "simpleshot", notify=False)
    assert config.lr is None and config.n_iters is None
    assert "/lr" not in str(run_dir(config))
    linear = [parse_config(c[1:], "linear", notify=False) for c in commands["linear"]]
    assert {(c.n_iters, c.n_iters_from) for c in linear} == {(50, "preset")}  # experiment 1's own budget
    lora = parse_config(commands["lora"][0][1:], "lora", notify=False)
    assert (lora.n_iters, lora.n_iters_from) == (2, "flag")  # a cut budget, recorded as such


def test_n_iters_applies_to_feature_heads_when_no_method_counts_shots(tmp_path, capsys):
    done = sweep_main(capsys, "--methods", "linear prototype knn", "--datasets", "demo", "--models", "tiny_clip",
                      "--seeds", "1", "--shots", "2", "--n_iters", "7", "--output_dir", str(tmp_path), "--dry_run")
    commands = _commands(done)
    assert all(c[c.index("--n_iters") + 1] == "7" for m in ("linear", "prototype") for c in commands[m])
    assert all("--n_iters" not in c for c in commands["knn"])


# -- stopping a sweep stops its runs; a run still going is not started twice --------------------------------
def _slow_sweep(root: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "utils.sweep", "--experiment", "2", "--datasets", "folder", "--root_path",
            str(root), "--models", "tiny_clip", "--shots", "4", "--seeds", "1", "--n_iters", "5000",
            "--output_dir", str(out), "--extra", "--device cpu --batch_size 4 --num_workers 0 --checkpoint_every 0"]


def _running_pid(out: Path, timeout: float = 120) -> tuple[int, Path]:
    """The pid in the lock of the run folder the sweep started, once the run holds it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for lock in out.rglob(".lock"):
            try:
                return json.loads(lock.read_text())["pid"], lock.parent
            except (OSError, ValueError, KeyError):
                pass
        time.sleep(0.2)
    raise AssertionError(f"no run started below {out}")


def _gone(pid: int, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.2)
    return False


def test_a_stopped_sweep_stops_its_run_and_a_killed_sweeps_run_is_not_started_again(tmp_path, two_class_root,
                                                                                     capsys):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    first = subprocess.Popen(_slow_sweep(two_class_root, out), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    orphan, folder = _running_pid(out)
    first.send_signal(signal.SIGKILL)  # the sweep dies at once; its run goes on
    first.wait()
    try:
        assert not _gone(orphan, timeout=1)
        again = sweep_main(capsys, *_slow_sweep(two_class_root, out)[3:])
        assert again.returncode == 1
        assert f"not started: process {orphan} on" in again.stdout
    finally:
        os.kill(orphan, signal.SIGTERM)
    assert _gone(orphan)
    second = subprocess.Popen(_slow_sweep(two_class_root, out), cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    run_pid, _ = _running_pid(out)
    while run_pid == orphan:  # the lock file of the stopped run may still be read for a moment
        run_pid, _ = _running_pid(out)
    second.send_signal(signal.SIGTERM)
    stdout, stderr = second.communicate(timeout=120)
    assert second.returncode == 128 + signal.SIGTERM, stderr
    assert _gone(run_pid, timeout=5)  # the run stopped with its sweep
    assert (folder / "checkpoint.pt").is_file()  # after saving its checkpoint
    assert "rerun the same command to resume" in stderr
