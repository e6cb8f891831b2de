"""The three experiments end to end through main.py and main_lora.py on tiny fixtures."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, run_entry

TINY = ["--model_name", "tiny_clip", "--device", "cpu", "--num_workers", "0", "--batch_size", "8"]
METRIC_KEYS = {"accuracy", "balanced_accuracy", "macro_f1", "auroc", "ece", "per_class_recall", "confusion_matrix"}


def run(script: str, *args: str):
    return run_entry(script, *args)


def results_in(folder: Path, name: str = "results.json") -> list[Path]:
    return sorted(folder.rglob(name))


def only_result(folder: Path) -> dict:
    found = results_in(folder)
    assert len(found) == 1, found
    return json.loads(found[0].read_text())


def check_schema(r: dict, experiment: int) -> None:
    for key in ("experiment", "dataset", "model_name", "seed", "shots", "percentage", "level", "config",
                "n_train", "n_val", "n_test", "split_sha256", "trainable_params", "total_params", "metrics",
                "timing", "env"):
        assert key in r, key
    assert r["experiment"] == experiment
    assert set(r["config"]) >= {"lr", "n_iters", "batch_size", "method", "method_settings"}
    assert r["method_settings"] == r["config"]["method_settings"]
    for part in ("val", "test"):
        m = r["metrics"][part]
        assert METRIC_KEYS <= set(m)
        for k in ("accuracy", "balanced_accuracy", "macro_f1", "ece"):
            assert 0.0 <= m[k] <= 1.0
        assert sum(map(sum, m["confusion_matrix"])) == m["n"]
    assert r["metrics"]["test"]["n"] == r["n_test"]
    assert r["timing"]["train_seconds"] > 0 and r["timing"]["images_per_second"] > 0
    assert {"torch", "timm", "open_clip_torch", "device", "precision", "git_commit"} <= set(r["env"])
    assert 0 < r["trainable_params"] < r["total_params"]
    assert len(r["split_sha256"]) == 64


@pytest.fixture(scope="module")
def lora_run(folder_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora_out")
    p = run("main_lora.py", "--root_path", str(folder_root), "--dataset", "folder", "--shots", "4",
            "--n_iters", "2", "--params", "q v", "--output_dir", str(out), *TINY)
    assert p.returncode == 0, p.stderr
    return out, p


def test_experiment_1_linear_head(folder_root, tmp_path):
    p = run("main.py", "--root_path", str(folder_root), "--dataset", "folder", "--shots", "4",
            "--n_iters", "5", "--output_dir", str(tmp_path), *TINY)
    assert p.returncode == 0, p.stderr
    r = only_result(tmp_path)
    check_schema(r, 1)
    assert r["method"] == "linear" and r["n_train"] == 12 and r["n_val"] == 9 and r["n_test"] == 12
    # the head alone trains: feature_dim x classes weights + biases
    assert r["trainable_params"] == (r["model"]["feature_dim"] + 1) * 3
    assert (results_in(tmp_path)[0].parent / "weights.safetensors").is_file()


def test_experiment_1_textual_head_starts_from_text_embeddings(folder_root, tmp_path):
    p = run("main.py", "--root_path", str(folder_root), "--dataset", "folder", "--shots", "2",
            "--n_iters", "1", "--textual", "True", "--output_dir", str(tmp_path), *TINY)
    assert p.returncode == 0, p.stderr
    r = only_result(tmp_path)
    assert r["method_settings"]["textual"] is True
    assert "linear-textual" in str(results_in(tmp_path)[0])


def test_experiment_2_lora_few_shot(lora_run):
    out, _ = lora_run
    r = only_result(out)
    check_schema(r, 2)
    assert r["method"] == "lora" and r["method_settings"]["params"] == ["q", "v"]
    folder = results_in(out)[0].parent
    assert (folder / "lora.safetensors").is_file() and (folder / "weights.safetensors").is_file()
    assert not (folder / "checkpoint.pt").exists()
    # paper's budget: 50 warmup steps + n_iters x shots
    assert r["timing"]["train_steps"] == 50 + 2 * 4


def test_eval_only_reload_gives_the_same_metrics(lora_run, folder_root):
    out, _ = lora_run
    folder = results_in(out)[0].parent
    p = run("main_lora.py", "--root_path", str(folder_root), "--dataset", "folder", "--shots", "4",
            "--n_iters", "2", "--params", "q", "v", "--output_dir", str(out), "--eval_only",
            "--run", str(folder), *TINY)
    assert p.returncode == 0, p.stderr
    trained = json.loads((folder / "results.json").read_text())["metrics"]
    reloaded = json.loads((folder / "eval_results.json").read_text())["metrics"]
    for part in ("val", "test"):
        assert reloaded[part]["confusion_matrix"] == trained[part]["confusion_matrix"]
        assert reloaded[part]["balanced_accuracy"] == pytest.approx(trained[part]["balanced_accuracy"])
        assert reloaded[part]["ece"] == pytest.approx(trained[part]["ece"], abs=1e-6)


def test_eval_only_with_other_lora_settings_is_refused(lora_run, folder_root):
    out, _ = lora_run
    folder = results_in(out)[0].parent
    p = run("main_lora.py", "--root_path", str(folder_root), "--dataset", "folder", "--shots", "4",
            "--params", "q", "v", "--r", "4", "--output_dir", str(out), "--eval_only", "--lora_path", str(folder),
            "--overwrite", *TINY)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "r" in p.stderr.splitlines()[-1]


def test_finished_run_is_never_overwritten(lora_run, folder_root):
    out, _ = lora_run
    path = results_in(out)[0]
    before = path.read_bytes()
    args = ["--root_path", str(folder_root), "--dataset", "folder", "--shots", "4", "--n_iters", "2",
            "--params", "qv", "--output_dir", str(out), *TINY]
    p = run("main_lora.py", *args)
    assert p.returncode == 0 and "already finished" in p.stdout
    assert path.read_bytes() == before
    p = run("main_lora.py", *args, "--overwrite")
    assert p.returncode == 0, p.stderr
    assert path.read_bytes() != before
    assert len(results_in(out)) == 1


def test_experiment_3_percentage_on_hicervix_layout(hicervix_root, tmp_path):
    p = run("main_lora.py", "--root_path", str(hicervix_root), "--dataset", "hicervix", "--shots", "0",
            "--pourcentage", "50", "--level", "level_2", "--n_iters", "2", "--params", "q", "k", "v", "o",
            "--r", "4", "--output_dir", str(tmp_path), *TINY)
    assert p.returncode == 0, p.stderr
    r = only_result(tmp_path)
    check_schema(r, 3)
    assert r["percentage"] == 50 and r["level"] == "level_2"
    # level_2 as the original code: no fallback, so the NILM cells (no level-2 label) are left out
    assert r["classes"] == ["ASC-H", "ASC-US", "HSIL"]
    assert r["n_train"] == 3 * 4 and r["n_test"] == 3 * 4
    # n_iters epochs of n_train // batch_size steps after the warmup
    assert r["timing"]["train_steps"] == 50 + 2 * 2  # ceil(12 / 8): the last partial batch is kept


@pytest.mark.parametrize("form", [["q v"], ["q", "v"], ["qv"]])
def test_params_forms_all_apply_lora(form):
    from utils.cli import parse_config

    config = parse_config(["--params", *form], "lora")
    assert config.method_settings["params"] == ["q", "v"]


def test_no_argument_demo_learns_and_says_it_is_synthetic(tmp_path):
    p = subprocess.run([sys.executable, str(REPO / "main_lora.py")], capture_output=True, text=True,
                       timeout=600, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "SYNTHETIC DEMO" in p.stdout and "not a medical result" in p.stdout
    r = only_result(tmp_path / "results" / "demo")
    assert r["dataset"] == "demo" and r["model_name"] == "tiny_clip" and r["synthetic_demo"] is True
    assert r["metrics"]["test"]["balanced_accuracy"] >= 0.7


def test_wandb_without_a_login_runs_offline_and_never_asks(folder_root, tmp_path):
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env["HOME"] = str(tmp_path / "home")
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, str(REPO / "main.py"), "--root_path", str(folder_root), "--dataset",
                        "folder", "--shots", "2", "--n_iters", "2", "--wandb", "--output_dir", str(out), *TINY],
                       capture_output=True, text=True, timeout=300, cwd=REPO, env=env, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr
    assert "offline" in p.stderr
    run_folder = results_in(out)[0].parent
    assert list((run_folder / "wandb").glob("offline-run-*")), list(run_folder.rglob("*"))
    # the end of the run: confusion matrix and per-class recall as wandb tables
    assert list(run_folder.rglob("confusion_matrix*.table.json")) and list(run_folder.rglob("per_class_recall*.json"))


def test_paper_percentage_zero_means_unused_in_few_shot_mode():
    from utils.cli import parse_config

    config = parse_config(["--shots", "16", "--pourcentage", "0"], "lora")
    assert config.percentage is None and config.experiment == 2


def test_hicervix_level_3_reports_upper_levels_and_mistake_distance(hicervix_root, tmp_path):
    p = run("main.py", "--root_path", str(hicervix_root), "--dataset", "hicervix", "--shots", "2",
            "--n_iters", "1", "--output_dir", str(tmp_path), *TINY)
    assert p.returncode == 0, p.stderr
    r = only_result(tmp_path)
    assert r["level"] == "level_3" and r["config"]["level_fallback"] == "original"
    h = r["metrics"]["test"]["hierarchy"]
    # every level-3 class of the fixture sits under ASC: level 1 is always right
    assert h["accuracy_level_1"] == 1.0
    assert h["accuracy_level_3"] == pytest.approx(r["metrics"]["test"]["accuracy"])
    assert h["accuracy_level_2"] >= h["accuracy_level_3"]


def test_label_map_merges_classes_and_is_recorded(folder_root, tmp_path):
    p = run("main.py", "--root_path", str(folder_root), "--dataset", "folder", "--shots", "2", "--n_iters", "1",
            "--label_map", "warm=red,green-ish", "--output_dir", str(tmp_path), *TINY)
    assert p.returncode == 0, p.stderr
    r = only_result(tmp_path)
    assert r["classes"] == ["warm", "blue"] and r["config"]["label_map"] == "warm=red,green-ish"


def test_level_outside_hicervix_is_ignored_with_a_recorded_warning_and_its_other_options_are_errors(
        folder_root, tmp_path):
    # the paper's README passes --level {level} for every dataset: the command runs, and says so
    p = run("main.py", "--root_path", str(folder_root), "--dataset", "folder", "--level", "level_2", "--shots", "2",
            "--n_iters", "1", "--output_dir", str(tmp_path / "level"), *TINY)
    assert p.returncode == 0, p.stderr
    assert "--level level_2 ignored" in p.stderr
    r = only_result(tmp_path / "level")
    assert r["level"] is None and any("--level level_2 ignored" in w for w in r["warnings"])
    assert "level_2" not in str(results_in(tmp_path / "level")[0])
    for flag in (["--level_fallback", "parent"], ["--protocol", "official"]):
        p = run("main.py", "--root_path", str(folder_root), "--dataset", "folder", *flag,
                "--output_dir", str(tmp_path), *TINY)
        assert p.returncode == 2 and "hicervix" in p.stderr, p.stderr


@pytest.mark.parametrize("flags", [[], ["--device", "cpu"], ["--num_workers", "0", "--seed", "2"],
                                   ["--dataset", "demo"]])
@pytest.mark.parametrize("entry", ["lora", "linear"])
def test_the_demo_keeps_its_small_settings_whatever_other_flags_are_given(flags, entry):
    from utils.cli import parse_config

    config = parse_config(flags, entry)
    plain = parse_config([], entry)
    assert config.dataset == "demo" and config.demo and config.model_name == "tiny_clip"
    assert (config.n_iters, config.lr, config.shots, config.batch_size, config.output_dir) == (
        plain.n_iters, plain.lr, plain.shots, plain.batch_size, plain.output_dir)
    assert config.n_iters == (25 if entry == "lora" else 100)
    # a flag the user gives still wins
    assert parse_config([*flags, "--n_iters", "3", "--output_dir", "x"], entry).n_iters == 3


def test_eval_only_and_rerun_read_the_saved_settings(lora_run, folder_root, tmp_path):
    out, _ = lora_run
    folder = results_in(out)[0].parent
    # only what may change: no model, method or LoRA flags
    p = run("main_lora.py", "--eval_only", "--run", str(folder), "--device", "cpu", "--num_workers", "0",
            "--overwrite")
    assert p.returncode == 0, p.stderr
    again = json.loads((folder / "eval_results.json").read_text())
    trained = json.loads((folder / "results.json").read_text())
    assert again["metrics"]["test"]["confusion_matrix"] == trained["metrics"]["test"]["confusion_matrix"]
    # main.py evaluates a saved LoRA run too: the method comes from the run
    p = run("main.py", "--eval_only", "--run", str(folder), "--overwrite")
    assert p.returncode == 0, p.stderr
    # --from repeats the recorded configuration; another output folder gives the same run folder below it
    p = run("main_lora.py", "--from", str(folder / "results.json"), "--output_dir", str(tmp_path))
    assert p.returncode == 0, p.stderr
    rerun = only_result(tmp_path)
    assert rerun["config"]["method_settings"] == trained["config"]["method_settings"]
    assert rerun["metrics"] == trained["metrics"]
    assert results_in(tmp_path)[0].parent.relative_to(tmp_path) == folder.relative_to(out)
