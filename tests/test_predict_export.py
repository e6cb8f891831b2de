"""utils.predict (new images through a finished run) and utils.export (a self-contained model) on tiny runs."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import make_folder_dataset
from utils import export, predict

REPO = Path(__file__).resolve().parents[1]
TRAIN_ARGS = ["--dataset", "folder", "--shots", "-1", "--n_iters", "1", "--warmup_steps", "1", "--batch_size", "8",
              "--device", "cpu", "--num_workers", "0", "--model_name", "tiny_clip", "--lr", "1e-2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_folder_dataset(tmp_path_factory.mktemp("predict_data"), per_split={"train": 4, "val": 2, "test": 3})


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory) -> dict[str, Path]:
    """One LoRA run (images) and one linear-head run (features), trained once for this module."""
    import main
    import main_lora

    out = tmp_path_factory.mktemp("predict_runs")
    assert main_lora.main(["--root_path", str(data), "--output_dir", str(out), *TRAIN_ARGS]) == 0
    assert main.main(["--root_path", str(data), "--output_dir", str(out), *TRAIN_ARGS]) == 0
    folders = {p.parent.relative_to(out).parts[3]: p.parent for p in out.rglob("results.json")}
    return {"lora": folders["lora-qv-r2-all-vision"], "linear": folders["linear"]}


def _read(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _cli(module, capsys, *args: str):
    code = module.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---------------------------------------------------------------- predict


@pytest.mark.parametrize("method", ["lora", "linear"])
def test_predictions_on_the_test_images_equal_the_runs_own(runs, data, tmp_path, capsys, method):
    out = tmp_path / "new.csv"
    code, stdout, stderr = _cli(predict, capsys, "--run", runs[method], "--images", data / "test", "--out", out,
                                "--batch_size", "5")
    assert code == 0, stderr
    assert f"predictions: {out}" in stdout
    classes = ["blue", "green-ish", "red"]
    ours = {row["path"]: row for row in _read(out)}
    theirs = {row["path"].removeprefix("test/"): row for row in _read(runs[method] / "predictions.csv")
              if row["split"] == "test"}
    assert list(ours) == sorted(theirs) and len(ours) == 9
    for name, row in ours.items():
        assert row["pred"] == classes[int(theirs[name]["pred"])]
        for c in classes:
            assert float(row[f"p_{c}"]) == pytest.approx(float(theirs[name][f"p_{c}"]), abs=1e-5)


def test_a_csv_of_paths_relative_to_it_gives_the_same_predictions(runs, data, tmp_path, capsys):
    listing = data / "some.csv"
    listing.write_text("path,note\ntest/red_1.png,x\ntest/blue_0.png,y\n")
    by_csv, by_folder = tmp_path / "csv.csv", tmp_path / "folder.csv"
    assert _cli(predict, capsys, "--run", runs["lora"], "--images", listing, "--out", by_csv)[0] == 0
    assert _cli(predict, capsys, "--run", runs["lora"], "--images", data / "test", "--out", by_folder)[0] == 0
    folder_rows = {row["path"]: row for row in _read(by_folder)}
    rows = _read(by_csv)
    assert [row["path"] for row in rows] == ["test/red_1.png", "test/blue_0.png"]
    for row in rows:
        other = folder_rows[row["path"].removeprefix("test/")]
        assert row["pred"] == other["pred"]
        # the two runs batch different images together: probabilities may differ in their last float32 bits
        probs = sorted(k for k in row if k.startswith("p_"))
        assert probs == sorted(k for k in other if k.startswith("p_"))
        assert [float(row[k]) for k in probs] == pytest.approx([float(other[k]) for k in probs], abs=1e-6)


def test_predict_paths_is_the_python_api(runs, data):
    from utils.cli import open_run

    ctx, plan = open_run(runs["linear"], ["--device", "cpu"])
    probs = predict.predict_paths(ctx, plan, [str(data / "test" / "red_0.png"), str(data / "test" / "blue_2.png")])
    assert probs.shape == (2, 3) and torch.allclose(probs.sum(1), torch.ones(2))


def _one_error_line(code: int, stderr: str) -> str:
    """The error line after any progress bar (tqdm redraws with carriage returns, then clears its line)."""
    assert code == 2
    line = stderr.rsplit("\r", 1)[-1]
    assert line.startswith("error: ") and line.count("\n") == 1 and "Traceback" not in stderr, stderr
    return line


def test_predict_user_mistakes_are_one_line(runs, data, tmp_path, capsys):
    run = runs["linear"]
    err = _one_error_line(*_cli(predict, capsys, "--run", tmp_path / "nope", "--images", data / "test")[::2])
    assert "run folder" in err and "not found" in err
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("not an image")
    err = _one_error_line(*_cli(predict, capsys, "--run", run, "--images", empty)[::2])
    assert "no images found" in err
    bad = tmp_path / "bad"
    make_folder_dataset(bad, per_split={"test": 1})
    (bad / "test" / "broken_1.png").write_text("not a png")
    (bad / "deep" / "broken_2.jpg").parent.mkdir()
    (bad / "deep" / "broken_2.jpg").write_bytes(b"\xff\xd8 truncated")
    err = _one_error_line(*_cli(predict, capsys, "--run", run, "--images", bad, "--out", tmp_path / "o.csv")[::2])
    assert "2 image(s) cannot be read" in err and "broken_1.png" in err and "broken_2.jpg" in err
    assert not (tmp_path / "o.csv").exists()
    taken = tmp_path / "taken.csv"
    taken.write_text("keep me")
    err = _one_error_line(*_cli(predict, capsys, "--run", run, "--images", data / "test", "--out", taken)[::2])
    assert "--overwrite" in err and taken.read_text() == "keep me"
    no_column = tmp_path / "list.csv"
    no_column.write_text("file\na.png\n")
    err = _one_error_line(*_cli(predict, capsys, "--run", run, "--images", no_column)[::2])
    assert "no `path` column" in err


def test_predict_command_line_mistake_exits_2_without_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "utils.predict", "--run", str(tmp_path / "missing"), "--images",
                             str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("error: run folder") and result.stderr.count("\n") == 1, result.stderr


# ---------------------------------------------------------------- export


def _reference_logits(run: Path, x: torch.Tensor) -> torch.Tensor:
    from utils.cli import open_run

    ctx, plan = open_run(run, ["--device", "cpu"])
    with torch.no_grad():
        return plan.model(ctx.spec.encode_image(x) if plan.inputs == "features" else x)


@pytest.mark.parametrize("method", ["lora", "linear"])
def test_exported_model_gives_the_runs_logits(runs, tmp_path, capsys, method):
    out = tmp_path / "exported"
    code, _, stderr = _cli(export, capsys, "--run", runs[method], "--out", out)
    assert code == 0, stderr
    module, info = export.load_exported(out)
    x = torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = module(x)
    assert torch.allclose(ours, _reference_logits(runs[method], x), atol=1e-5)
    assert info["classes"] == ["blue", "green-ish", "red"] and info["method"] == method
    assert info["model"]["key"] == "tiny_clip" and info["preprocessing"]["input_size"] == 64
    assert info["lora_merged"] is (method == "lora")
    names = module.state_dict().keys()
    assert not any("lora" in n for n in names) and "head.weight" in names


def test_merging_mattered_for_the_lora_run(runs):
    """The trained adapters are far from zero, so an export that dropped them would fail the logits test."""
    from utils.cli import open_run

    ctx, plan = open_run(runs["lora"], ["--device", "cpu"])
    from lora import lora_disabled

    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with lora_disabled(ctx.spec.model):
            without = plan.model(x)
        assert not torch.allclose(plan.model(x), without, atol=1e-4)


def test_export_refuses_to_overwrite_and_checks_its_folder(runs, tmp_path, capsys):
    out = tmp_path / "exported"
    assert _cli(export, capsys, "--run", runs["linear"], "--out", out)[0] == 0
    err = _one_error_line(*_cli(export, capsys, "--run", runs["linear"], "--out", out)[::2])
    assert "--overwrite" in err
    assert _cli(export, capsys, "--run", runs["linear"], "--out", out, "--overwrite")[0] == 0
    with pytest.raises(export.UserError, match="no model.json"):
        export.load_exported(tmp_path)
