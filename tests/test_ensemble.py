"""Ensembles in the report: averaged per-image probabilities on small synthetic runs with hand-checkable numbers,
the paired comparison with the best member, and the refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tasks import get_task
from tests.test_report import patch_results, read_csv, write_run
from utils.report import ReportError, build_report, main

# Four test images, labels 0 1 1 0. Member A gets images 0 and 1 right (P(pos) 0.2, 0.9, 0.4, 0.55); member B
# gets 0, 2 and 3 right (0.4, 0.45, 0.9, 0.3). Their mean, 0.3 0.675 0.65 0.425, gets all four right.
LABELS = [0, 1, 1, 0]
P_POS = {"A": [0.2, 0.9, 0.4, 0.55], "B": [0.4, 0.45, 0.9, 0.3]}
BALANCED = {"A": 0.5, "B": 0.75, "ensemble": 1.0}  # mean recall of the two classes
ACCURACY = {"A": 0.5, "B": 0.75, "ensemble": 1.0}


def write_predictions(folder: Path, p_pos, labels=LABELS, paths=None, val=True) -> None:
    """predictions.csv as engine.results.write_predictions writes it (val rows too, which ensembles ignore)."""
    paths = paths or [f"test/img{i}.png" for i in range(len(labels))]
    lines = ["split,path,label,pred,p_neg,p_pos"]
    if val:
        lines.append("val,val/v0.png,1,0,0.9,0.1")
    lines += [f"test,{path},{y},{int(p >= 0.5)},{1 - p:.9g},{p:.9g}"
              for path, y, p in zip(paths, labels, p_pos, strict=True)]
    (folder / "predictions.csv").write_text("\n".join(lines) + "\n")


def test_an_ensemble_over_seeds_averages_probabilities_and_beats_its_best_seed(tmp_path):
    for seed, member, val in ((1, "A", 0.6), (2, "B", 0.8)):  # B is the best seed on validation
        folder = write_run(tmp_path, seed, BALANCED[member], val=val, shots=4)
        write_predictions(folder, P_POS[member])
    build_report(tmp_path, plots=False, n_resamples=500, ensemble="seeds")
    rows = {r["entry"]: r for r in read_csv(tmp_path / "report" / "ensembles.csv")}
    assert set(rows) == {"ensemble", "seed 1", "seed 2"}
    for entry, member in (("ensemble", "ensemble"), ("seed 1", "A"), ("seed 2", "B")):
        assert float(rows[entry]["test_balanced_accuracy_mean"]) == pytest.approx(BALANCED[member])
        assert float(rows[entry]["test_accuracy_mean"]) == pytest.approx(ACCURACY[member])
    ens = rows["ensemble"]
    assert ens["best_member"] == "seed 2" and rows["seed 2"]["role"] == "best member"
    assert float(ens["diff_vs_best"]) == pytest.approx(0.25)
    assert -1 <= float(ens["boot_low"]) <= 0.25 <= float(ens["boot_high"]) <= 1 and ens["n_cases"] == "4"
    assert ens["interval_resamples"] == "test images only (one ensemble of these seeds)"
    md = (tmp_path / "report" / "report.md").read_text()
    assert "## Ensembles over seeds" in md and "test images only" in md and "for these trained seeds" in md
    assert "| ensemble |  | 75.0 ± " not in md and "| seed 2 (best on val) | 80.0 |" in md
    assert "Ensemble − best member (seed 2): +25.0 points of test balanced accuracy" in md


def test_an_ensemble_over_methods_per_seed_with_the_two_level_interval(tmp_path):
    """Per seed, linear and lora on the same split; 200 images where each errs on its own half."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200).tolist()
    for seed in (1, 2, 3):
        for method, wrong_half, val in (("linear", 0, 0.7), ("lora", 1, 0.6)):
            folder = write_run(tmp_path, seed, 0.5, val=val, method=method, shots=4)
            # right and confident (0.9 on the true class) outside its half; wrong but unsure (0.4) on 30% of it
            p_true = [0.4 if (i % 2 == wrong_half and rng.random() < 0.3) else 0.9 for i in range(200)]
            write_predictions(folder, [p if y == 1 else 1 - p for y, p in zip(labels, p_true, strict=True)], labels)
    build_report(tmp_path, plots=False, n_resamples=1000, ensemble="methods")
    rows = {r["entry"]: r for r in read_csv(tmp_path / "report" / "ensembles.csv")}
    ens = rows["ensemble"]
    assert ens["replicates"] == "1;2;3" and ens["best_member"] == "tiny_clip linear"  # best on validation
    # where one member is wrong at 0.4 the other is right at 0.9: the mean is right on every image
    assert float(ens["test_accuracy_mean"]) == pytest.approx(1.0)
    gain = 1.0 - float(rows["tiny_clip linear"]["test_balanced_accuracy_mean"])
    assert float(ens["diff_vs_best"]) == pytest.approx(gain) and 0.1 < gain < 0.2
    assert 0 < float(ens["boot_low"]) < gain < float(ens["boot_high"])
    assert ens["interval_resamples"] == "seeds, then test images"


def test_an_ensemble_over_models_on_the_same_split(tmp_path):
    for seed in (1, 2):
        for weights, member in ((None, "A"), ("random", "B")):
            folder = write_run(tmp_path, seed, 0.5, shots=4, weights=weights, val=0.5 if member == "A" else 0.6)
            write_predictions(folder, P_POS[member])
    build_report(tmp_path, plots=False, n_resamples=200, ensemble="models")
    rows = {r["entry"]: r for r in read_csv(tmp_path / "report" / "ensembles.csv")}
    assert float(rows["ensemble"]["test_balanced_accuracy_mean"]) == pytest.approx(1.0)
    assert rows["ensemble"]["best_member"].startswith("tiny_clip-random")
    assert float(rows["ensemble"]["diff_vs_best"]) == pytest.approx(0.25)


def test_a_multilabel_ensemble_averages_sigmoids_and_reports_mean_auroc(tmp_path):
    """Two labels, four images. Label x: A ranks the positives 0,1 above 2,3 except one swap, B has the other swap;
    their mean ranks perfectly (AUROC 1). Label y is ranked right by both."""
    task = get_task("multilabel")
    targets = [(1, 0), (1, 1), (0, 1), (0, 0)]
    probs = {"A": [(0.9, 0.1), (0.3, 0.8), (0.4, 0.9), (0.1, 0.2)],  # x: 0.3 < 0.4 -> AUROC 3/4
             "B": [(0.35, 0.2), (0.9, 0.7), (0.1, 0.6), (0.4, 0.1)]}  # x: 0.35 < 0.4 -> AUROC 3/4
    for seed, member in ((1, "A"), (2, "B")):
        folder = write_run(tmp_path, seed, 0.5, shots=4)
        block = {"macro_auroc": 0.875, "mAP": 0.9, "macro_f1": 0.5, "exact_match": 0.25, "n": 4}
        patch_results(folder, task=task.name, headline=task.headline, classes=["x", "y"],
                      metrics={"val": block, "test": block})
        lines = ["split,path,label,pred,p_x,p_y"] + [
            f"test,img{i}.png,{t[0]};{t[1]},,{p[0]},{p[1]}" for i, (t, p) in enumerate(zip(targets, probs[member],
                                                                                            strict=True))]
        (folder / "predictions.csv").write_text("\n".join(lines) + "\n")
    build_report(tmp_path, plots=False, n_resamples=100, ensemble="seeds")
    rows = {r["entry"]: r for r in read_csv(tmp_path / "report" / "ensembles.csv")}
    # mean x: 0.625, 0.6, 0.25, 0.25 -> perfect; y by both: perfect. Members: (3/4 + 1) / 2
    assert float(rows["ensemble"]["test_macro_auroc_mean"]) == pytest.approx(1.0)
    assert float(rows["seed 1"]["test_macro_auroc_mean"]) == pytest.approx(0.875)
    assert float(rows["seed 2"]["test_macro_auroc_mean"]) == pytest.approx(0.875)
    assert float(rows["ensemble"]["diff_vs_best"]) == pytest.approx(0.125)
    assert rows["ensemble"]["interval_resamples"] == f"no per-image bootstrap for {task.headline}"


@pytest.mark.parametrize("case", ["paths", "labels", "split", "no_predictions", "captions"])
def test_runs_on_other_test_images_are_refused_with_a_one_line_reason(tmp_path, case, capsys):
    kind = "methods" if case == "split" else "seeds"
    first = write_run(tmp_path, 1, 0.5, shots=4, method="linear")
    second = write_run(tmp_path, 2 if kind == "seeds" else 1, 0.5, shots=4,
                       method="linear" if kind == "seeds" else "lora")
    write_predictions(first, P_POS["A"])
    write_predictions(second, P_POS["B"], labels=[1, 1, 1, 0] if case == "labels" else LABELS,
                      paths=[f"test/other{i}.png" for i in range(4)] if case == "paths" else None)
    if case == "split":
        patch_results(second, split_sha256="another-split")
    if case == "no_predictions":
        (second / "predictions.csv").unlink()
    if case == "captions":
        task = get_task("captions")
        for folder in (first, second):
            block = {task.headline: 0.5, "n": 4}
            patch_results(folder, task=task.name, headline=task.headline, metrics={"val": block, "test": block})
    alone = case in ("split", "captions")
    if not alone:
        # a second setting whose seeds can be ensembled: the refused one is a warning, not an error
        for seed in (1, 2):
            write_predictions(write_run(tmp_path, seed, 0.5, shots=8), P_POS["AB"[seed - 1]])
    expected = {"paths": "were tested on different images (4 and 4 test rows, 8 paths differ)",
                "labels": "give different labels to the same test images",
                "split": "were run on different splits (split hash split-demo-4-1 and another-split)",
                "no_predictions": "has no predictions.csv",
                "captions": "have no class probabilities to average"}[case]
    if alone:  # the only set: nothing to report, a one-line error
        assert main([str(tmp_path), "--no_plots", "--ensemble", kind]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: --ensemble") and expected in err[0]
        assert not (tmp_path / "report").exists()  # no partial report
        return
    assert main([str(tmp_path), "--no_plots", "--ensemble", kind, "--n_resamples", "100"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: not ensembled")]
    assert len(warnings) == 1 and expected in warnings[0] and "K=4" in warnings[0]
    md = (tmp_path / "report" / "report.md").read_text()
    assert "Not ensembled:" in md and expected in md
    (row,) = [r for r in read_csv(tmp_path / "report" / "ensembles.csv") if r["role"] == "ensemble"]
    assert row["data"] == "K=8"


def test_nothing_to_ensemble_is_a_one_line_error(tmp_path):
    write_predictions(write_run(tmp_path, 1, 0.5, shots=4), P_POS["A"])
    with pytest.raises(ReportError, match="nothing to ensemble"):
        build_report(tmp_path, plots=False, ensemble="seeds")
