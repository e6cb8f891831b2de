"""predict and export for every registered method on every kind of task it handles (generated from the two
registries, so a new method or task is covered without editing this file): each works, or refuses in one line."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import main
import main_lora
from methods import get_method, methods
from tasks import get_task, task_names
from tests.conftest import make_folder_dataset, make_multilabel_dataset, write_cell
from utils import export, predict
from utils.cli import open_run

TINY = ["--model_name", "tiny_clip", "--device", "cpu", "--num_workers", "0", "--batch_size", "8",
        "--n_iters", "1", "--warmup_steps", "1", "--lr", "1e-2"]
PAIRS = [(m.name, t) for t in task_names() for m in methods() if t in m.tasks]


def _multilabel(root: Path) -> Path:
    return make_multilabel_dataset(root, per_split=(("train", 8), ("val", 8), ("test", 4)))


def _captions(root: Path) -> Path:
    rng = np.random.default_rng(0)
    colours = {"red": (200, 30, 30), "blue": (30, 30, 200)}
    for split, n in (("train", 4), ("val", 2), ("test", 2)):
        rows = ["path,caption,label"]
        for i in range(n):
            name = ("red", "blue")[i % 2]
            write_cell(root / split / f"{i}.png", colours[name], rng)
            rows.append(f"{split}/{i}.png,a {name} cell number {split} {i},{name}")
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, tuple[Path, list[str]]]:
    """Per kind of task, a tiny dataset and the arguments that read it."""
    base = tmp_path_factory.mktemp("pairs")
    folder = make_folder_dataset(base / "single", per_split={"train": 2, "val": 1, "test": 2})
    return {"single_label": (folder, ["--dataset", "folder", "--shots", "-1"]),
            "multilabel": (_multilabel(base / "multi"), ["--dataset", "csv", "--shots", "-1"]),
            "captions": (_captions(base / "captions"), ["--dataset", "csv", "--shots", "-1"])}


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_every_task_is_covered_by_some_method():
    assert {t for _, t in PAIRS} == set(task_names())


@pytest.mark.parametrize(("method", "task"), PAIRS)
def test_predict_and_export_work_or_refuse_in_one_line(method, task, roots, tmp_path, capsys):
    if task not in roots:
        pytest.fail(f"no fixture for the task {task}: add one to roots()")
    root, data_args = roots[task]
    entry = main_lora if get_method(method).entry_point == "main_lora.py" else main
    code = entry.main(["--method", method, "--root_path", str(root), *data_args, *TINY,
                       "--output_dir", str(tmp_path / "runs")])
    assert code == 0
    folder = next((tmp_path / "runs").rglob("results.json")).parent
    record = json.loads((folder / "results.json").read_text())
    assert record["task"] == task
    info = get_task(task)
    classes = record["classes"]

    # predict: the test images again, through the task's activation and prediction rule
    out = tmp_path / "new.csv"
    code = predict.main(["--run", str(folder), "--images", str(root / "test"), "--out", str(out)])
    err = capsys.readouterr().err
    if code != 0:
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    else:
        rows = _rows(out)
        assert len(rows) == len(list((root / "test").glob("*.png")))
        probs = torch.tensor([[float(r[f"p_{c}"]) for c in classes] for r in rows])
        assert ((probs >= 0) & (probs <= 1)).all()
        if info.activation == "softmax":
            assert torch.allclose(probs.sum(1), torch.ones(len(rows)), atol=1e-5)
            assert all(r["pred"] == classes[int(p.argmax())] for r, p in zip(rows, probs, strict=True))
        else:  # sigmoid: the labels at or above the run's validation thresholds
            thresholds = record["thresholds"] or [0.5] * len(classes)
            for r, p in zip(rows, probs.tolist(), strict=True):
                expected = [c for c, v, t in zip(classes, p, thresholds, strict=True) if v >= t]
                assert r["pred"].split(";") if r["pred"] else [] == expected
        if task != "captions":  # the run's own test predictions, through predict's path (same images, same model)
            theirs = {Path(r["path"]).name: r for r in _rows(folder / "predictions.csv") if r["split"] == "test"}
            for r in rows:
                for c in classes:
                    assert float(r[f"p_{c}"]) == pytest.approx(float(theirs[Path(r["path"]).name][f"p_{c}"]),
                                                               abs=1e-5)

    # export: a self-contained module whose outputs equal the run's, with what its outputs mean
    target = tmp_path / "exported"
    code = export.main(["--run", str(folder), "--out", str(target)])
    err = capsys.readouterr().err
    if code != 0:
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
        assert not (target / export.INFO_FILE).exists()
        return
    module, model_info = export.load_exported(target)
    assert model_info["task"] == task and model_info["activation"] == info.activation
    ctx, plan = open_run(folder, ["--device", "cpu"])
    x = torch.rand(2, 3, ctx.spec.input_size, ctx.spec.input_size)
    with torch.no_grad():
        reference = plan.model(ctx.spec.encode_image(x).float()) if plan.inputs == "features" else plan.model(x)
        assert torch.allclose(module(x), reference, atol=1e-4)
