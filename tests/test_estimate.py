"""launch_run.sh --estimate: runs, steps, images and wall time of a sweep before it runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.config import run_dir
from engine.context import load_data
from utils import estimate as est
from utils import sweep
from utils.cli import parse_config

GRID = ["--methods", "linear lora lp_ft knn", "--datasets", "demo", "--models", "tiny_clip", "--shots", "1 2",
        "--seeds", "1", "--n_iters", "3"]


def run_sweep(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = sweep.main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def finish(config) -> None:
    folder = run_dir(config)
    folder.mkdir(parents=True)
    metrics = {"balanced_accuracy": 0.5}
    (folder / "results.json").write_text(json.dumps({"schema_version": 2, "config": config.to_dict(),
                                                     "method": config.method,
                                                     "metrics": {"val": metrics, "test": metrics}}))


def test_step_seconds_gives_exact_steps_images_and_time_and_times_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(est, "measure", lambda *a, **k: pytest.fail("--step_seconds must time nothing"))
    out = tmp_path / "out"
    lora_k1 = parse_config(["--method", "lora", "--dataset", "demo", "--model_name", "tiny_clip", "--shots", "1",
                            "--seed", "1", "--n_iters", "3", "--output_dir", str(out)], "lora")
    finish(lora_k1)
    code, stdout, stderr = run_sweep(capsys, *GRID, "--output_dir", str(out), "--estimate", "--step_seconds", "2")
    assert code == 0, stderr
    # demo data: 4 classes with enough images, so K = shots and the train set holds 4K images (< batch 32,
    # one step per epoch). --n_iters goes to the methods counting it in shots when the sweep has some (lora,
    # lp_ft); linear keeps its own 100 epochs. Budgets: linear = warmup 50 + 100 x 1 epoch step = 150; lp_ft's
    # stage 1 = 50 + n_iters 3 x 1 = 53; lora and lp_ft's stage 2 = 50 + 3 x K; knn trains nothing; lora K=1 is
    # finished.
    image_steps = (50 + 3 * 2) + (50 + 3 * 1) + (50 + 3 * 2)  # lora K2, lp_ft ft K1, lp_ft ft K2
    images = 56 * 8 + 53 * 4 + 56 * 8
    feature_steps = 150 * 2 + 53 * 2  # linear K1, K2; lp_ft lp K1, K2
    assert (image_steps, images, feature_steps) == (165, 1108, 406)
    assert "estimate: 7 runs to run, 1 finished (not counted)" in stdout
    assert "training: 571 steps; 165 on images (1,108 images), 406 on cached features" in stdout
    assert "wall time at 2 s per training step on images (--step_seconds; nothing timed): 5 min 30 s for 7 runs" \
        in stdout
    # frozen features once per model and images (test is shared by K=1 and K=2); images evaluated per run
    splits = {k: load_data(parse_config(["--dataset", "demo", "--model_name", "tiny_clip", "--shots", str(k)],
                                        "lora")) for k in (1, 2)}
    features = sum(len(s.train) + len(s.val) for s in splits.values()) + len(splits[1].test)
    evaluated = sum(len(splits[k].val) + len(splits[k].test) for k in (2, 1, 2))  # lora K2, lp_ft K1, K2
    assert f"forward passes without training: {features + evaluated:,} images" in stdout
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == ["results.json"]  # nothing else written


def test_workers_share_the_wall_time(tmp_path, capsys):
    code, stdout, _ = run_sweep(capsys, *GRID, "--output_dir", str(tmp_path), "--estimate", "--step_seconds", "2",
                                "--gpus", "0 1")
    assert code == 0
    image_steps = 53 + 56 + 53 + 56  # lora K1, K2; lp_ft stage 2 K1, K2; at 2 s each, over 2 workers
    assert f"with 2 workers (--gpus), if the runs spread evenly: about {est.duration(image_steps)}" in stdout
    assert est.duration(image_steps) == "3 min 38 s"


def test_step_budgets_are_the_engines(tmp_path):
    """Stage budgets come from the engine's RunContext (epoch_steps, paper_steps), transductive stages add
    --ti_steps, and an epoch's partial last batch counts its own images."""
    c = parse_config(["--method", "linear", "--dataset", "demo", "--model_name", "tiny_clip", "--shots", "10",
                      "--batch_size", "16", "--n_iters", "2", "--transductive", "proportion", "--ti_steps", "7"],
                     "linear")
    split = load_data(c)
    assert len(split.train) == 40  # 4 classes x 10: batches of 16, 16 and 8 per epoch
    (linear, transductive) = est.run_stages(c, split, est.method_shape(c))
    assert (linear.name, linear.inputs, linear.steps) == ("linear", "features", 50 + 2 * 3)
    assert (linear.partial_steps, linear.partial_batch, linear.images) == (56 // 3, 8, (56 - 18) * 16 + 18 * 8)
    assert (transductive.name, transductive.steps) == ("transductive", 7)
    c = parse_config(["--method", "lp_ft", "--dataset", "demo", "--model_name", "tiny_clip", "--shots", "10",
                      "--n_iters", "2"], "lora")
    assert [(s.name, s.inputs, s.steps) for s in est.run_stages(c, split, est.method_shape(c))] == [
        ("lp", "features", 50 + 2 * 2), ("ft", "images", 50 + 2 * 10)]  # 2 batches of 32 per epoch
    c = parse_config(["--method", "linear", "--dataset", "demo", "--model_name", "tiny_clip", "--shots", "10",
                      "--batch_size", "16", "--n_iters", "2", "--compat", "seed"], "linear")
    (linear,) = est.run_stages(c, split, est.method_shape(c))
    assert linear.steps == (50 + 2) * 3  # the original's experiment 1: warmup + n_iters whole epochs


@pytest.fixture
def untimable_models():
    """Two registered models: one that builds only with random weights, one that never builds."""
    from models import load_model
    from models.errors import ModelError
    from models.registry import Entry, register, unregister

    def weightless(request):
        if request.weights.kind != "random":
            raise ModelError("no weights here for this test")
        return load_model("tiny_clip", weights="random")

    def broken(request):
        raise ModelError("this architecture cannot be built here")

    register(Entry(key="weightless_test", build=weightless, summary="test"))
    register(Entry(key="broken_test", build=broken, summary="test"))
    yield
    unregister("weightless_test")
    unregister("broken_test")


def test_real_timing_on_tiny_clip(tmp_path, untimable_models):
    args = sweep.build_parser().parse_args([
        "--methods", "lora linear", "--datasets", "demo", "--models", "tiny_clip weightless_test broken_test",
        "--shots", "1", "--seeds", "1 2", "--n_iters", "2", "--output_dir", str(tmp_path),
        "--extra", "--device cpu"])
    jobs = sweep.expand(args)
    result = est.estimate(jobs)
    timings = {t.label: t for t in result.timings.values()}
    assert sorted(timings) == ["broken_test linear", "broken_test lora", "tiny_clip linear", "tiny_clip lora",
                               "weightless_test linear", "weightless_test lora"]
    lora = timings["tiny_clip lora"]
    assert list(lora.step_seconds) == [("lora", 4)] and lora.step_seconds[("lora", 4)] > 0  # 4 classes x 1 shot
    assert lora.forward_seconds > 0 and not lora.error and not lora.note and lora.device == "cpu (fp32)"
    assert list(timings["tiny_clip linear"].step_seconds) == [("linear", 4)]
    assert "timed with random init" in timings["weightless_test lora"].note
    assert timings["weightless_test lora"].step_seconds[("lora", 4)] > 0
    assert "this architecture cannot be built here" in timings["broken_test lora"].error
    assert len(result.timed_runs()) == 8  # 12 runs, the 4 of broken_test cannot be timed
    seconds = result.seconds()
    one = lora.step_seconds[("lora", 4)] * (50 + 2 * 1)
    assert seconds["training"] >= 2 * one  # at least tiny_clip's two LoRA seeds (other terms are positive)
    text = result.text()
    assert "estimate: 12 runs to run, 0 finished" in text
    assert "broken_test lora: cannot be timed here (ModelError: this architecture cannot be built here); its 2 " \
           "run(s) are left out of the wall time" in text
    assert "wall time on this device, cpu (fp32): " in text and "for 8 of 12 runs" in text
    assert not any(Path(tmp_path).rglob("*"))  # an estimate writes nothing
