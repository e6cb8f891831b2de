"""The report's numbers against hand-computed statistics on synthetic results.json files."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from engine.config import RunConfig, run_dir
from engine.context import method_settings_of
from evaluation import stats
from utils.report import ReportError, build_report

REPO = Path(__file__).resolve().parents[1]
T_975_DF2 = 4.302652729749464  # Student t, 97.5% quantile, 2 degrees of freedom (from tables)
T_975_DF4 = 2.7764451051977987  # 4 degrees of freedom


def write_run(out: Path, seed: int, test: float, val: float = 0.5, schema: int = 1, env: dict | None = None,
              **settings) -> Path:
    """A finished run's results.json where the entry points would put it; test metrics derive from `test`."""
    experiment = settings.pop("experiment", 2)
    method = settings.pop("method", "linear" if experiment == 1 else "lora")
    config = RunConfig(output_dir=str(out), seed=seed, method=method, experiment=experiment, **settings)
    config.method_settings = method_settings_of(config)
    folder = run_dir(config)
    folder.mkdir(parents=True)

    def block(bacc: float) -> dict:
        return {"accuracy": bacc + 0.05, "balanced_accuracy": bacc, "macro_f1": bacc - 0.05, "auroc": 0.9,
                "ece": 0.1, "per_class_recall": {"neg": bacc, "pos": bacc},
                "confusion_matrix": [[3, 1], [0, 4]], "n": 8}

    data = {"schema_version": schema, "experiment": config.experiment, "dataset": config.dataset,
            "model_name": config.model_name, "seed": seed, "shots": config.shots,
            "percentage": config.percentage, "level": config.level, "lr": config.lr,
            "config": config.to_dict(),
            "classes": ["neg", "pos"], "n_train": 4, "n_val": 4, "n_test": 8,
            "split_sha256": f"split-{config.dataset}-{config.shots}-{seed}",
            "metrics": {"val": block(val), "test": block(test)}, "method": config.method}
    if env is not None:
        data["env"] = env
    (folder / "results.json").write_text(json.dumps(data))
    return folder


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def report_cli(*args: str) -> subprocess.CompletedProcess:
    """`python -m utils.report ARGS` in a process of its own (the module entry itself)."""
    return subprocess.run([sys.executable, "-m", "utils.report", *args], check=False, cwd=REPO,
                          capture_output=True,
                          text=True, timeout=120)


def report_main(capsys, *args: str) -> subprocess.CompletedProcess:
    """utils.report.main(ARGS) in this process, with its exit status and output like report_cli's."""
    from utils.report import main

    status = main(list(args))
    out = capsys.readouterr()
    return subprocess.CompletedProcess(["utils.report", *args], status, out.out, out.err)


def test_summary_matches_hand_computed_mean_std_and_t_interval(tmp_path):
    for seed, bacc in zip((1, 2, 3), (0.6, 0.7, 0.8), strict=True):
        write_run(tmp_path, seed, bacc)
    build_report(tmp_path, plots=False)
    rows = read_csv(tmp_path / "report" / "summary.csv")
    assert len(rows) == 1
    row = rows[0]
    assert (row["n_seeds"], row["seeds"], row["model"], row["method"]) == ("3", "1;2;3", "tiny_clip",
                                                                           "lora-qv-r2-all-vision")
    half = T_975_DF2 * 0.1 / math.sqrt(3)
    assert float(row["test_balanced_accuracy_mean"]) == pytest.approx(0.7)
    assert float(row["test_balanced_accuracy_std"]) == pytest.approx(0.1)
    assert float(row["test_balanced_accuracy_ci_low"]) == pytest.approx(0.7 - half)
    assert float(row["test_balanced_accuracy_ci_high"]) == pytest.approx(0.7 + half)
    assert float(row["test_accuracy_mean"]) == pytest.approx(0.75)
    values = [float(v) for v in row["test_balanced_accuracy_values"].split(";")]
    assert values == pytest.approx([0.6, 0.7, 0.8])
    md = (tmp_path / "report" / "report.md").read_text()
    assert f"70.0 ± {100 * half:.1f}" in md  # 70.0 ± 24.8


def test_stats_functions_on_known_values():
    assert stats.std([1.0]) != stats.std([1.0])  # NaN for one value
    assert stats.std([2.0, 4.0, 6.0]) == pytest.approx(2.0)
    low, high = stats.t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    half = T_975_DF4 * math.sqrt(2.5) / math.sqrt(5)
    assert (low, high) == pytest.approx((3 - half, 3 + half))
    assert stats.summarize([0.5, None, 0.7]).n == 2  # a missing metric is left out, not counted as zero


def test_lr_is_selected_on_validation_never_on_test(tmp_path):
    for seed in (1, 2):
        write_run(tmp_path, seed, test=0.50 + 0.01 * seed, val=0.90, lr=1e-3)  # best on val, worse on test
        write_run(tmp_path, seed, test=0.90 + 0.01 * seed, val=0.60, lr=1e-4)  # best on test only
    build_report(tmp_path, plots=False)
    assert len(read_csv(tmp_path / "report" / "summary.csv")) == 2
    (chosen,) = read_csv(tmp_path / "report" / "summary_lr_selected.csv")
    assert float(chosen["lr"]) == pytest.approx(1e-3)
    assert float(chosen["test_balanced_accuracy_mean"]) == pytest.approx(0.515)
    assert chosen["lr_candidates"] == "0.0001;0.001"


def test_paired_bootstrap_has_the_known_sign():
    a, b = [0.70, 0.72, 0.75, 0.71, 0.73], [0.60, 0.65, 0.62, 0.64, 0.61]
    up = stats.paired_bootstrap(a, b, n_resamples=10_000, seed=0)
    down = stats.paired_bootstrap(b, a, n_resamples=10_000, seed=0)
    assert up.mean == pytest.approx(0.098) and up.n == 5
    assert 0.07 <= up.boot_low < up.mean < up.boot_high <= 0.13  # every difference lies in [0.07, 0.13]
    assert down.boot_high < 0 and down.mean == pytest.approx(-0.098)
    assert stats.paired_bootstrap(a, b, seed=0) == up  # seeded: reproducible


def test_paired_csv_compares_lora_with_linear_and_pretrained_with_random(tmp_path):
    gains = [0.08, 0.12, 0.10, 0.09, 0.11]
    for seed, gain in zip(range(1, 6), gains, strict=True):
        base = 0.5 + 0.02 * seed
        write_run(tmp_path, seed, base, experiment=1, shots=4)
        write_run(tmp_path, seed, base + gain, experiment=2, shots=4)
        write_run(tmp_path, seed, base - 0.2, experiment=1, shots=4, weights="random")
    build_report(tmp_path, n_resamples=2000, plots=False)
    rows = read_csv(tmp_path / "report" / "paired.csv")
    lora = next(r for r in rows if r["comparison"] == "lora - linear" and "random" not in r["b"])
    assert lora["a"].startswith("tiny_clip lora") and lora["b"] == "tiny_clip linear"
    assert int(lora["n_seeds"]) == 5 and lora["seeds"] == "1;2;3;4;5"
    assert float(lora["mean_diff"]) == pytest.approx(0.10)
    # the headline is the paired t-interval: 0.10 +- t(0.975, 4) * sd / sqrt(5)
    half = T_975_DF4 * stats.std([g - 0.10 for g in gains]) / math.sqrt(5)
    assert float(lora["t_low"]) == pytest.approx(0.10 - half)
    assert float(lora["t_high"]) == pytest.approx(0.10 + half)
    weights = next(r for r in rows if r["comparison"] == "pretrained - random")
    assert (weights["a"], weights["b"]) == ("tiny_clip linear", "tiny_clip-random linear")
    assert float(weights["mean_diff"]) == pytest.approx(0.2)
    # LoRA (pretrained) vs linear (random) differs in two factors at once: not compared.
    assert len(rows) == 2


def test_runs_with_different_settings_or_schema_are_not_averaged(tmp_path):
    for seed in (1, 2):
        write_run(tmp_path / "a", seed, 0.6, n_iters=100)
        write_run(tmp_path / "b", seed, 0.9, n_iters=200)
        write_run(tmp_path / "c", seed, 0.3, n_iters=100, schema=2)
    # A runtime-only difference (device) must not split a setting: seeds 1 and 2 of one setting.
    write_run(tmp_path / "d", 1, 0.4, n_iters=300, device="cpu")
    write_run(tmp_path / "e", 2, 0.5, n_iters=300, device="cuda")
    # ... but "auto" precision that resolved differently (recorded in env) does.
    for seed in (1, 2):
        write_run(tmp_path / "f", seed, 0.2, n_iters=400, env={"precision": "fp32"})
        write_run(tmp_path / "g", seed, 0.1, n_iters=400, env={"precision": "bf16"})
    build_report(tmp_path, plots=False)
    rows = read_csv(tmp_path / "report" / "summary.csv")
    got = sorted((r["n_iters"], r["schema_version"], r["n_seeds"], float(r["test_balanced_accuracy_mean"]))
                 for r in rows)
    assert got == [("100", "1", "2", pytest.approx(0.6)), ("100", "2", "2", pytest.approx(0.3)),
                   ("200", "1", "2", pytest.approx(0.9)), ("300", "1", "2", pytest.approx(0.45)),
                   ("400", "1", "2", pytest.approx(0.1)), ("400", "1", "2", pytest.approx(0.2))]


def test_same_setting_and_seed_twice_is_an_error_naming_both(tmp_path):
    first = write_run(tmp_path / "a", 1, 0.6)
    second = write_run(tmp_path / "b", 1, 0.7)
    with pytest.raises(ReportError) as info:
        build_report(tmp_path, plots=False)
    assert str(first) in str(info.value) and str(second) in str(info.value)


@pytest.mark.parametrize("case", ["missing", "empty", "no_results", "bad_json"])
def test_unusable_folders_exit_2_with_one_line(tmp_path, case, capsys):
    folder = tmp_path / "runs"
    if case != "missing":
        folder.mkdir()
    if case == "no_results":
        (folder / "notes.txt").write_text("nothing here")
    if case == "bad_json":
        write_run(folder, 1, 0.6)
        bad = write_run(folder, 2, 0.7) / "results.json"
        bad.write_text('{"schema_version": 1, "config": {')
    # the module entry in a process of its own once; the other cases in this process
    done = report_cli(str(folder)) if case == "bad_json" else report_main(capsys, str(folder))
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert str(folder) in lines[0]
    if case == "bad_json":
        assert str(bad) in lines[0]


def test_skip_invalid_warns_and_uses_the_rest(tmp_path, capsys):
    write_run(tmp_path, 1, 0.6)
    bad = write_run(tmp_path, 2, 0.7) / "results.json"
    bad.write_text(json.dumps({"schema_version": 1, "config": {"seed": 2}, "metrics": {}}))
    done = report_main(capsys, str(tmp_path), "--skip_invalid", "--no_plots")
    assert done.returncode == 0, done.stderr
    assert f"warning: skipping {bad}" in done.stderr
    (row,) = read_csv(tmp_path / "report" / "summary.csv")
    assert row["seeds"] == "1"


def test_checkpoint_folders_are_ignored(tmp_path):
    folder = write_run(tmp_path, 1, 0.6)
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "results.json").write_text("partial")
    build_report(tmp_path, plots=False)
    assert len(read_csv(tmp_path / "report" / "summary.csv")) == 1


def test_plots_and_markdown_tables(tmp_path):
    for seed in (1, 2):
        for shots in (1, 2):
            write_run(tmp_path, seed, 0.5 + 0.05 * shots + 0.01 * seed, experiment=1, shots=shots)
            last = write_run(tmp_path, seed, 0.6 + 0.05 * shots + 0.01 * seed, experiment=2, shots=shots)
        for pct in (10.0, 50.0):
            write_run(tmp_path, seed, 0.7 + pct / 1000, experiment=3, shots=0, percentage=pct)
    out = tmp_path / "rep"
    files = build_report(tmp_path, out=out, confusion=last, n_resamples=500)
    names = {f.name for f in files}
    assert {"balanced_accuracy_vs_shots_demo.png", "balanced_accuracy_vs_percentage_demo.png",
            "methods_demo.png", "report.md"} <= names
    confusion = [f for f in files if f.name.startswith("confusion_") and "_sum_" not in f.name]
    assert len(confusion) == 1
    sums = sorted(f.name for f in files if f.name.startswith("confusion_sum_"))
    assert sums == ["confusion_sum_demo_10.png", "confusion_sum_demo_50.png", "confusion_sum_demo_K_1.png",
                    "confusion_sum_demo_K_2.png"]
    for png in (f for f in files if f.suffix == ".png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert "| Model | Method | K=1 | K=2 | 10% | 50% |" in md
    assert "| tiny_clip | linear | 56.5 ± 6.4 | 61.5 ± 6.4 |  |  |" in md  # mean of 0.56, 0.57 ± 12.706 * 0.005
    assert "lora - linear" in md
    assert "(chance level of the headline metric: 50.0)" in md  # two classes
    assert "## Recall of each class (test, %, mean over seeds)" in md and "| neg | pos |" in md


def test_confusion_of_a_missing_run_is_a_user_error(tmp_path, capsys):
    write_run(tmp_path, 1, 0.6)
    done = report_main(capsys, str(tmp_path), "--confusion", str(tmp_path / "nowhere"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "nowhere" in done.stderr


def test_every_method_is_compared_with_the_chosen_baseline_and_tabled_side_by_side(tmp_path):
    for seed in (1, 2, 3):
        write_run(tmp_path, seed, 0.50 + 0.01 * seed, method="linear", shots=4)
        write_run(tmp_path, seed, 0.60 + 0.01 * seed, method="lora", shots=4)
        write_run(tmp_path, seed, 0.55 + 0.02 * seed, method="knn", shots=4)
    for i, path in enumerate(sorted(tmp_path.rglob("results.json"))):
        data = json.loads(path.read_text())
        data.update(calibration={"temperature": 1.5}, test_before={"ece": 0.2}, test_after={"ece": 0.1},
                    test_reliability={"edges": [0, 0.5, 1], "count": [2, 6 + i % 2],
                                      "confidence": [0.4, 0.8], "accuracy": [0.5, 0.75]})
        path.write_text(json.dumps(data))
    build_report(tmp_path, n_resamples=200)
    rows = read_csv(tmp_path / "report" / "paired.csv")
    assert sorted(r["comparison"] for r in rows) == ["knn - linear", "lora - linear"]
    assert (tmp_path / "report" / "reliability_demo_K_4.png").is_file()
    knn = next(r for r in rows if r["comparison"] == "knn - linear")
    assert float(knn["mean_diff"]) == pytest.approx(0.07)
    md = (tmp_path / "report" / "report.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| | "))
    assert header.count("tiny_clip") == 3 and "knn-k20" in header and "lora-qv" in header
    assert (tmp_path / "report" / "methods_demo.png").is_file()
    assert "| demo | K=4 | tiny_clip knn-k20 | 20.0 | 10.0 | 1.5 | 3/3 |" in md
    build_report(tmp_path, out=tmp_path / "other", n_resamples=200, plots=False, baseline="knn")
    rows = read_csv(tmp_path / "other" / "paired.csv")
    assert sorted(r["comparison"] for r in rows) == ["linear - knn", "lora - knn"]


def test_case_level_interval_from_predictions(tmp_path):
    """With predictions.csv, paired.csv adds the two-level bootstrap over seeds and the same test images."""
    rng = __import__("numpy").random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    for seed in (1, 2, 3):
        for method, flip in (("linear", 0.3), ("lora", 0.2)):
            folder = write_run(tmp_path, seed, 0.6, method=method, shots=4)
            wrong = rng.random(200) < flip
            preds = [int(y) ^ int(w) for y, w in zip(labels, wrong, strict=True)]
            lines = ["split,path,label,pred,p_neg,p_pos"] + [
                f"test,img{i}.png,{y},{p},0.5,0.5" for i, (y, p) in enumerate(zip(labels, preds, strict=True))]
            (folder / "predictions.csv").write_text("\n".join(lines) + "\n")
    build_report(tmp_path, n_resamples=2000, plots=False)
    (row,) = read_csv(tmp_path / "report" / "paired.csv")
    assert row["comparison"] == "lora - linear" and row["n_cases"] == "200" and row["n_seeds"] == "3"
    low, high = float(row["boot_low"]), float(row["boot_high"])
    assert low < 0.1 < high and high - low < 0.25  # the true gap is 0.1: about 10 points of balanced accuracy
    md = (tmp_path / "report" / "report.md").read_text()
    assert "seeds + images 95% CI" in md


def test_folds_are_replicates_like_seeds(tmp_path):
    for seed in (1, 2):
        for fold in (0, 1, 2):
            write_run(tmp_path, seed, 0.5 + 0.01 * fold + 0.1 * seed, method="linear", shots=4, cv=3, fold=fold)
    build_report(tmp_path, plots=False)
    (row,) = read_csv(tmp_path / "report" / "summary.csv")
    assert row["n_seeds"] == "6" and row["seeds"] == "1/fold0;1/fold1;1/fold2;2/fold0;2/fold1;2/fold2"
    assert float(row["test_balanced_accuracy_mean"]) == pytest.approx(0.66)


def patch_results(folder: Path, **fields) -> dict:
    """Update a written results.json with `fields` (top-level keys) and return it."""
    path = folder / "results.json"
    data = json.loads(path.read_text())
    data.update(fields)
    path.write_text(json.dumps(data))
    return data


def test_the_report_asks_each_run_its_task(tmp_path, monkeypatch):
    """Headline, its name, the metric columns and the chance level all come from the task named in results.json."""
    from tasks import Task, registry

    kappa = Task(name="ordinal_for_test", description="a test task", headline="qwk", headline_name="weighted kappa",
                 summary=(), report_metrics=("qwk", "mae"), evaluate=lambda *a, **k: None, chance=lambda n: 1 / (2 * n))
    monkeypatch.setitem(registry._TASKS, kappa.name, kappa)
    for seed, qwk in ((1, 0.4), (2, 0.6)):
        folder = write_run(tmp_path, seed, 0.5, shots=4)
        patch_results(folder, task=kappa.name, headline="qwk",
                      metrics={"val": {"qwk": 0.5, "mae": 1.0}, "test": {"qwk": qwk, "mae": 0.5 + seed}})
    build_report(tmp_path, plots=False)
    (row,) = read_csv(tmp_path / "report" / "summary.csv")
    assert float(row["test_qwk_mean"]) == pytest.approx(0.5) and float(row["test_mae_mean"]) == pytest.approx(2.0)
    assert not any(k.startswith("test_accuracy") or k.startswith("test_balanced") for k in row)
    md = (tmp_path / "report" / "report.md").read_text()
    assert "(chance level of the headline metric: 25.0)" in md  # 1 / (2 x 2 classes), in percent
    assert "| Arm | Data | qwk | mae | lr | seeds |" in md
    assert "test weighted kappa (%)" in md and "## Accuracy" not in md


def test_a_run_of_an_unknown_task_is_a_one_line_error_naming_it(tmp_path):
    folder = write_run(tmp_path, 1, 0.6)
    patch_results(folder, task="no_such_task")
    with pytest.raises(ReportError, match="no_such_task") as info:
        build_report(tmp_path, plots=False)
    assert str(folder / "results.json") in str(info.value) and "\n" not in str(info.value)


def test_no_task_is_named_in_the_report_code():
    """The report asks the task: no task's name or headline key is written in utils/report/."""
    from tasks import tasks

    literals = {f'"{t.name}"' for t in tasks()} | {f'"{t.headline}"' for t in tasks()}
    for path in sorted((REPO / "utils" / "report").glob("*.py")):
        text = path.read_text(encoding="utf-8")
        assert not [lit for lit in literals if lit in text], path


def _cut_budget_runs(out: Path) -> None:
    """linear heads whose budget a sweep's --n_iters cut short, and knn and two lora settings beside them."""
    for seed in (1, 2, 3):
        folder = write_run(out, seed, 0.40 + 0.01 * seed, method="linear", shots=4, n_iters=2)
        patch_results(folder, budget={"kind": "epochs", "n_iters": 2, "from": "flag", "steps": 13, "intended": False})
        write_run(out, seed, 0.50 + 0.02 * seed, method="knn", shots=4)  # no budget key: taken as intended
        for n_iters, gain in ((100, 0.0), (200, 0.05)):
            folder = write_run(out, seed, 0.60 + gain + 0.01 * seed, method="lora", shots=4, n_iters=n_iters)
            patch_results(folder, budget={"kind": "shots", "n_iters": n_iters, "from": "flag", "steps": 400,
                                          "intended": False})


def test_a_difference_between_methods_with_a_cut_budget_is_refused_and_says_why(tmp_path):
    _cut_budget_runs(tmp_path)
    build_report(tmp_path, n_resamples=200, plots=False)
    rows = read_csv(tmp_path / "report" / "paired.csv")
    assert sorted(r["comparison"] for r in rows) == ["knn - linear", "lora - linear", "lora - linear", "settings"]
    (knn,) = [r for r in rows if r["comparison"] == "knn - linear"]
    assert knn["mean_diff"] == knn["t_low"] == knn["boot_low"] == ""  # not computed
    assert knn["budget"] == ("not compared: tiny_clip linear [n_iters=2] trained n_iters 2 (epochs) from flag, "
                             "13 steps, not its method's intended budget")
    assert float(knn["a_mean"]) == pytest.approx(0.54)  # the arms' own means are still facts
    for row in (r for r in rows if r["comparison"] == "lora - linear"):
        assert row["mean_diff"] == "" and row["budget"].startswith("not compared")
    # two settings of one method: the budget means the same on both sides, so the difference is computed, marked
    (same,) = [r for r in rows if r["comparison"] == "settings"]
    assert "n_iters=100" in same["a"] and "n_iters=200" in same["b"]
    assert float(same["mean_diff"]) == pytest.approx(-0.05) and same["budget"].startswith("marked: ")
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| not compared (budget, note 1) |" in md and "⚠ (budget, note" in md
    assert "1. knn - linear (tiny_clip knn-k20" in md and "): not compared: tiny_clip linear [n_iters=2] trained" in md
    summary = {r["method"].split("-")[0]: r["budget"] for r in read_csv(tmp_path / "report" / "summary.csv")}
    assert summary["linear"] == "not intended in 3 of 3 runs" and summary["knn"] == "intended"


def test_compare_cut_budgets_prints_the_difference_marked(tmp_path):
    _cut_budget_runs(tmp_path)
    from utils.report import main

    assert main([str(tmp_path), "--no_plots", "--n_resamples", "200", "--compare_cut_budgets"]) == 0
    knn = next(r for r in read_csv(tmp_path / "report" / "paired.csv") if r["comparison"] == "knn - linear")
    assert float(knn["mean_diff"]) == pytest.approx(0.12) and knn["budget"].startswith("marked: tiny_clip linear")
    md = (tmp_path / "report" / "report.md").read_text()
    assert "+12.0 ⚠ (budget, note" in md and "not compared (" not in md


def test_runs_on_their_intended_budgets_are_compared_as_usual(tmp_path):
    for seed in (1, 2):
        folder = write_run(tmp_path, seed, 0.5 + 0.01 * seed, method="linear", shots=4)
        patch_results(folder, budget={"kind": "epochs", "n_iters": 200, "from": "preset", "steps": 900,
                                      "intended": True})
        write_run(tmp_path, seed, 0.6 + 0.01 * seed, method="lora", shots=4)
    build_report(tmp_path, n_resamples=200, plots=False)
    (row,) = read_csv(tmp_path / "report" / "paired.csv")
    assert row["budget"] == "intended" and float(row["mean_diff"]) == pytest.approx(0.1)
    assert "Budgets:" not in (tmp_path / "report" / "report.md").read_text()
