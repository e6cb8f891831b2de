"""Image-text pairs: the caption demo, CLIP's contrastive loss, retrieval evaluation, and validation-based
selection of the trained state (--select best_val), which every task shares."""

import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from common.errors import UserError
from datasets import load_split
from datasets.demo import CAPTION_NAMES
from methods.heads import ImageTextModel, contrastive_loss
from tests.conftest import run_entry
from utils.cli import parse_config

TINY = ["--device", "cpu", "--num_workers", "0", "--batch_size", "16"]


def test_caption_demo_names_each_cells_attributes_and_val_test_captions_are_unique():
    split = load_split(None, "demo_captions", shots=-1, seed=1)
    assert split.task == "captions" and split.classes == sorted(CAPTION_NAMES)
    assert (len(split.train), len(split.val), len(split.test)) == (240, 60, 100)
    for part in ("val", "test"):
        captions = [split.captions[path] for path, _ in split.items(part)]
        assert len(set(captions)) == len(captions)  # the pair of an image is well defined
    for path, label in split.train:
        text = split.captions[path]
        assert CAPTION_NAMES[split.classes[label]] in text
        assert any(w in text for w in ("small", "medium", "large")) and " in the " in text


def test_contrastive_loss_is_clips_symmetric_infonce_by_hand():
    torch.manual_seed(0)
    logits = torch.randn(4, 4)
    image_side = -sum(math.log(logits[i].softmax(0)[i]) for i in range(4)) / 4
    text_side = -sum(math.log(logits[:, j].softmax(0)[j]) for j in range(4)) / 4
    assert contrastive_loss(logits, torch.arange(4)).item() == pytest.approx((image_side + text_side) / 2, abs=1e-6)


def test_image_text_model_scores_pairs_with_the_clamped_learnable_scale():
    from models import load_model

    spec = load_model("tiny_clip", weights="random")
    model = ImageTextModel(spec, ["a small pale koilocyte", "a large dark high-grade cell", "a cell"])
    assert model.scale.item() == pytest.approx(spec.logit_scale.item(), rel=1e-6)
    images = torch.randn(2, 3, spec.input_size, spec.input_size)
    idx = torch.tensor([2, 0])
    with torch.no_grad():
        logits = model(images, idx)
        image = F.normalize(spec.encode_image(images), dim=-1)
        text = F.normalize(spec.encode_text(["a cell", "a small pale koilocyte"]), dim=-1)
    assert torch.allclose(logits, model.scale * image @ text.t(), atol=1e-5)
    with torch.no_grad():
        model.log_scale.fill_(math.log(1000.0))
    assert model.scale.item() == pytest.approx(100.0)  # clamped as in CLIP


def test_image_text_data_puts_lora_in_both_towers_unless_told_otherwise():
    c = parse_config(["--dataset", "demo_captions"], "lora")
    assert c.method_settings["encoder"] == "both" and c.experiment == 0
    assert parse_config(["--dataset", "demo_captions", "--encoder", "vision"], "lora").method_settings["encoder"] == \
        "vision"
    assert parse_config(["--dataset", "demo"], "lora").method_settings["encoder"] == "vision"


def _results(root: Path) -> tuple[dict, Path]:
    [path] = list(root.rglob("results.json"))
    return json.loads(path.read_text()), path.parent


@pytest.fixture(scope="module")
def caption_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("captions")
    args = ["--dataset", "demo_captions", "--shots", "4", "--n_iters", "2", "--warmup_steps", "2", "--lr", "2e-3",
            "--output_dir", str(out), *TINY]
    result = run_entry("main_lora.py", *args)
    assert result.returncode == 0, result.stderr
    return out, result


def test_contrastive_lora_trains_both_towers_and_reports_retrieval(caption_run):
    out, result = caption_run
    r, folder = _results(out)
    assert r["task"] == "captions" and r["headline"] == "recall@1"
    for part, n in (("val", r["n_val"]), ("test", 100)):
        m, before = r["metrics"][part], r["before_finetuning"][part]
        assert m["n"] == before["n"] == n
        for direction in ("image_to_text", "text_to_image"):
            assert 0 <= m[f"{direction}_recall@1"] <= m[f"{direction}_recall@5"] <= m[f"{direction}_recall@10"] <= 1
            assert 1 <= m[f"{direction}_median_rank"] <= n
        assert m["recall@1"] == pytest.approx((m["image_to_text_recall@1"] + m["text_to_image_recall@1"]) / 2)
        assert {"zeroshot_accuracy", "zeroshot_balanced_accuracy"} <= set(m)  # the pairs have classes
    # adapters in the text tower received gradients too, and CLIP's scale was trained
    from safetensors import safe_open

    with safe_open(str(folder / "weights.safetensors"), "pt") as f:
        keys = list(f.keys())
        saved = sum(f.get_tensor(k).numel() for k in keys)
    assert "log_scale" in keys and any("transformer" in k and "visual" not in k for k in keys)
    assert any("visual" in k for k in keys)
    assert r["trainable_params"] == saved  # every saved tensor, text tower included, received a gradient
    assert "before fine-tuning" in result.stdout
    rows = list(csv.DictReader((folder / "predictions.csv").open()))
    assert list(rows[0]) == ["split", "path", "label", "pred"] and len(rows) == r["n_val"] + 100
    test_rows = [row for row in rows if row["split"] == "test"]
    hits = sum(row["label"] == row["pred"] for row in test_rows) / len(test_rows)
    assert hits == pytest.approx(r["metrics"]["test"]["image_to_text_recall@1"])


def test_eval_only_reproduces_an_image_text_run(caption_run):
    out, _ = caption_run
    r, folder = _results(out)
    result = run_entry("main_lora.py", "--eval_only", "--run", str(folder), "--device", "cpu", "--num_workers", "0")
    assert result.returncode == 0, result.stderr
    again = json.loads((folder / "eval_results.json").read_text())
    assert again["metrics"]["test"] == pytest.approx(r["metrics"]["test"])


def test_methods_without_image_text_training_refuse_caption_data(tmp_path):
    result = run_entry("main.py", "--dataset", "demo_captions", "--method", "linear", "--output_dir", str(tmp_path),
                       *TINY)
    assert result.returncode == 2
    assert "linear handles single_label, multilabel data, and this data is captions: choose one of" in result.stderr
    assert "lora" in result.stderr and "Traceback" not in result.stderr


# -- --select best_val -------------------------------------------------------------------------
def _validation(scores, every=1, keep_best=True):
    from engine import training

    plan = SimpleNamespace(model=torch.nn.Linear(1, 1))
    plan.model.weight.requires_grad_(True)
    ctx = SimpleNamespace(config=SimpleNamespace(select="best_val" if keep_best else "last", eval_every=every),
                          split=SimpleNamespace(task="single_label", val=[("v", 0)]))
    stage = SimpleNamespace(steps=len(scores) * every)
    return training.Validation(ctx, plan, stage, every, keep_best, SimpleNamespace(log=lambda *a: None)), plan


def test_best_val_keeps_and_restores_the_state_of_the_best_validation_step(monkeypatch):
    from engine import training

    scores = [0.2, 0.7, 0.5, 0.7, float("nan")]
    validation, plan = _validation(scores)
    calls = iter(scores)
    monkeypatch.setattr(training, "evaluate", lambda ctx, plan, parts, extras: SimpleNamespace(metrics={"val": {
                        "balanced_accuracy": next(calls)}}))
    for step in range(1, len(scores) + 1):
        with torch.no_grad():
            plan.model.weight.fill_(step)  # the state after this step
        validation(step)
    record = validation.finish()
    assert record["selected_step"] == 2 and record["selected_val"] == 0.7  # the first best; NaN never wins
    assert plan.model.weight.item() == 2.0
    assert [s for _, s in record["curve"]] == [0.2, 0.7, 0.5, 0.7, None]


def test_validation_state_travels_in_the_checkpoint(tmp_path):
    from engine.trainer import Trainer, TrainSettings

    settings = TrainSettings(lr=0.1, weight_decay=0, warmup_steps=0, total_steps=4, min_lr=0, seed=0,
                             device=torch.device("cpu"), precision="fp32")
    module = torch.nn.Linear(2, 2)
    first = Trainer(module, settings, tmp_path, "fp")
    first.extra_state.update(best_step=3, best_state={"weight": torch.ones(2, 2)})
    first.save_checkpoint()
    second = Trainer(module, settings, tmp_path, "fp")
    second.extra_state = {"best_step": None}
    second.try_resume()
    assert second.extra_state["best_step"] == 3 and torch.equal(second.extra_state["best_state"]["weight"],
                                                                 torch.ones(2, 2))


def test_select_best_val_end_to_end_evaluates_the_selected_state(tmp_path):
    result = run_entry("main.py", "--dataset", "demo", "--shots", "4", "--n_iters", "6", "--lr", "0.05",
                       "--select", "best_val", "--eval_every", "3", "--output_dir", str(tmp_path), *TINY)
    assert result.returncode == 0, result.stderr
    r, _ = _results(tmp_path)
    v = r["stages"][0]["validation"]
    assert v["every"] == 3 and [s for s, _ in v["curve"]][-1] == r["stages"][0]["steps"]
    assert v["selected_val"] == max(s for _, s in v["curve"])
    assert r["metrics"]["val"]["balanced_accuracy"] == pytest.approx(v["selected_val"])  # the restored state


def test_eval_every_must_be_a_positive_number_of_steps():
    with pytest.raises(UserError, match="--eval_every must be at least 1"):
        parse_config(["--dataset", "demo", "--eval_every", "0"], "linear")


def test_report_summarises_image_text_runs_with_retrieval_and_before_after(caption_run):
    from utils.report import build_report

    out, _ = caption_run
    build_report(out, plots=False)
    md = (out / "report" / "report.md").read_text()
    assert "chance level of the headline metric: 1.0 (1 / 100 test pairs)" in md
    assert "image_to_text_recall@5" in md and "before and after fine-tuning" in md
    r, _ = _results(out)
    before, after = r["before_finetuning"]["test"]["image_to_text_recall@1"], r["metrics"]["test"][
        "image_to_text_recall@1"]
    assert f"{100 * before:.1f} → {100 * after:.1f}" in md
