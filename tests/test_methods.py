"""The method registry and each method's defining property, plus every method end to end in-process."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import main
import main_lora
from common.errors import UserError
from engine.config import RunConfig
from engine.context import RunContext
from methods import get_method, method_names
from utils.cli import parse_config

TINY = ["--model_name", "tiny_clip", "--device", "cpu", "--num_workers", "0", "--batch_size", "8"]
ALL = ("linear", "lora", "zeroshot", "simpleshot", "knn", "prototype", "adapter", "bitfit", "full", "lp_ft")


def feature_ctx(x: torch.Tensor, y: torch.Tensor, classes, tmp_path: Path, **config) -> RunContext:
    """A run context whose train features are given (no model, no images)."""
    split = SimpleNamespace(classes=list(classes), train=[("x", int(v)) for v in y], task="single_label")
    spec = SimpleNamespace(feature_dim=x.shape[1], model=torch.nn.Linear(1, 1))
    ctx = RunContext(RunConfig(**config), tmp_path, split, spec, torch.device("cpu"), "fp32")
    ctx._features["train"] = (x, y)
    return ctx


def build(name: str, ctx: RunContext, **settings):
    method = get_method(name)
    return method.build(ctx, method.resolve(settings))


@pytest.fixture
def blobs():
    torch.manual_seed(0)
    centres = torch.randn(3, 16) * 3
    y = torch.arange(3).repeat_interleave(5)
    x = centres[y] + torch.randn(15, 16)
    return x, y


def test_every_method_is_registered_once_with_a_description():
    assert set(ALL) <= set(method_names())
    for name in ALL:
        m = get_method(name)
        assert m.description and m.inputs in ("features", "images")


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(UserError, match="invalid choice: .nope. .choose from .*knn"):
        parse_config(["--method", "nope"], "linear")


def test_a_flag_of_another_method_is_a_one_line_error():
    with pytest.raises(UserError, match=r"--r does not apply to --method knn"):
        parse_config(["--method", "knn", "--r", "4"], "linear")
    with pytest.raises(UserError, match=r"--textual does not apply to --method lora"):
        parse_config(["--textual", "True"], "lora")


def test_entry_points_keep_their_default_method_and_settings_resolve_once():
    assert parse_config(["--dataset", "demo"], "linear").method == "linear"
    c = parse_config(["--dataset", "demo", "--params", "v", "q", "--r", "4"], "lora")
    assert c.method == "lora" and c.method_settings["params"] == ["q", "v"] and c.method_settings["r"] == 4
    assert parse_config(["--dataset", "demo", "--method", "full"], "lora").lr == 1e-5  # its own default
    assert parse_config(["--dataset", "demo", "--method", "full", "--lr", "3e-4"], "lora").lr == 3e-4


def test_presets_are_the_papers_commands_and_flags_override_them():
    c = parse_config(["--preset", "exp2", "--dataset", "demo"], "lora")
    assert (c.n_iters, c.method_settings["params"], c.method_settings["r"]) == (50, ["q", "v"], 2)
    c = parse_config(["--preset", "exp1", "--dataset", "demo"], "lora")
    assert (c.method, c.shots, c.n_iters, c.method_settings["textual"]) == ("linear", -1, 50, False)
    c = parse_config(["--preset", "exp3", "--dataset", "demo", "--pourcentage", "10", "--r", "4",
                      "--model_name", "tiny_clip"], "lora")
    assert (c.shots, c.lr, c.n_iters, c.method_settings["r"], c.method_settings["params"]) == (
        0, 1e-3, 100, 4, ["q", "k", "v", "o"])
    assert c.level is None  # the preset's level_3 applies to HiCervix only


@pytest.mark.parametrize("pct, rank", [("1", 4), ("10", 8), ("50", 32)])
def test_medpeft_preset_picks_the_rank_by_percentage(pct, rank):
    c = parse_config(["--preset", "medpeft", "--dataset", "demo", "--shots", "0", "--pourcentage", pct], "lora")
    s = c.method_settings
    assert (s["params"], s["alpha"], s["dropout_rate"], s["r"]) == (["q", "v"], 32.0, 0.1, rank)
    assert parse_config(["--preset", "medpeft", "--dataset", "demo", "--r", "2"], "lora").method_settings["r"] == 2


def test_simpleshot_equals_a_hand_computation(blobs, tmp_path):
    x, y = blobs
    plan = build("simpleshot", feature_ctx(x, y, "abc", tmp_path))
    test = torch.randn(7, 16) * 3
    mean = x.mean(0)
    norm = F.normalize(x - mean, dim=-1)
    centroids = torch.stack([norm[y == c].mean(0) for c in range(3)])
    q = F.normalize(test - mean, dim=-1)
    expected = torch.stack([((q[:, None] - centroids[None]) ** 2).sum(-1).sqrt()]).squeeze(0).argmin(1)
    assert torch.equal(plan.model(test).argmax(1), expected)
    assert plan.stages == []


def test_knn_with_k1_is_the_nearest_train_image_and_k_is_capped(blobs, tmp_path):
    x, y = blobs
    plan = build("knn", feature_ctx(x, y, "abc", tmp_path), k=1)
    test = torch.randn(9, 16) * 3
    nearest = (F.normalize(test, dim=-1) @ F.normalize(x, dim=-1).t()).argmax(1)
    assert torch.equal(plan.model(test).argmax(1), y[nearest])
    capped = build("knn", feature_ctx(x, y, "abc", tmp_path), k=500)
    assert capped.notes["k_used"] == len(y)
    probs = capped.model(test).softmax(1)
    assert torch.allclose(probs.sum(1), torch.ones(9), atol=1e-5)


def test_prototype_head_starts_as_nearest_class_mean_with_temperature_007(blobs, tmp_path):
    x, y = blobs
    plan = build("prototype", feature_ctx(x, y, "abc", tmp_path, n_iters=1, batch_size=4), )
    head = plan.model
    assert head.log_scale.exp().item() == pytest.approx(1 / 0.07)
    test = torch.randn(11, 16) * 3
    means = torch.stack([F.normalize(x, dim=-1)[y == c].mean(0) for c in range(3)])
    expected = (F.normalize(test, dim=-1) @ F.normalize(means, dim=-1).t()).argmax(1)
    assert torch.equal(head(test).argmax(1), expected)
    assert [p.requires_grad for p in head.parameters()] == [True, True]


def test_adapter_starts_as_the_head_alone(blobs, tmp_path):
    x, y = blobs
    plan = build("adapter", feature_ctx(x, y, "abc", tmp_path, n_iters=1), reduction=4)
    model = plan.model
    assert model.down.out_features == 4
    assert torch.equal(model(x), model.head(x))


def _grads(model, spec, n_classes=3):
    images = torch.randn(2, 3, spec.input_size, spec.input_size)
    F.cross_entropy(model(images), torch.tensor([0, 1])).backward()
    return {n for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture
def tiny_ctx(tmp_path):
    from models import load_model

    spec = load_model("tiny_clip")
    spec.model.requires_grad_(False)
    split = SimpleNamespace(classes=["a", "b", "c"], train=[("x", 0)] * 4, counts=lambda: {"train": {"a": 4}},
                            task="single_label")
    return RunContext(RunConfig(model_name="tiny_clip", n_iters=1, shots=4), tmp_path, split, spec,
                      torch.device("cpu"), "fp32")


def test_bitfit_trains_only_biases_and_the_head(tiny_ctx):
    plan = build("bitfit", tiny_ctx)
    got = _grads(plan.model, tiny_ctx.spec)
    backbone = {n for n in got if not n.startswith("head.")}
    assert backbone and all(n.rsplit(".", 1)[-1].endswith("bias") for n in backbone)
    assert {"head.weight", "head.bias"} <= got


def test_full_fine_tuning_reaches_every_image_parameter(tiny_ctx):
    plan = build("full", tiny_ctx)
    got = _grads(plan.model, tiny_ctx.spec)
    visual = {n for n, _ in plan.model.named_parameters() if n.startswith("backbone.visual.")}
    assert visual and visual <= got


def test_lp_ft_stage_two_starts_from_the_stage_one_head(tiny_ctx):
    tiny_ctx._features["train"] = (torch.randn(4, tiny_ctx.spec.feature_dim), torch.tensor([0, 1, 2, 0]))
    plan = build("lp_ft", tiny_ctx)
    lp, ft = plan.stages
    assert (lp.inputs, ft.inputs) == ("features", "images")
    assert lp.module is plan.model.head  # the very same head object: stage 2 starts from stage 1 exactly
    assert ft.lr == pytest.approx(lp.lr / 10)


def test_zeroshot_is_logit_scale_times_cosine(tiny_ctx):
    from datasets.registry import class_prompts

    tiny_ctx.config.dataset = "folder"
    plan = build("zeroshot", tiny_ctx)
    spec = tiny_ctx.spec
    with torch.no_grad():
        text = F.normalize(spec.encode_text(class_prompts("folder", ["a", "b", "c"])), dim=-1)
        feats = spec.encode_image(torch.randn(5, 3, spec.input_size, spec.input_size))
        expected = spec.model.logit_scale.exp() * F.normalize(feats, dim=-1) @ text.t()
        assert torch.allclose(plan.model(feats), expected, atol=1e-5)
    ensemble = build("zeroshot", tiny_ctx, ensemble=True)
    assert not torch.allclose(ensemble.model.text, plan.model.text)


# -- end to end through the entry points, in-process ---------------------------------------------
def _run(entry, argv):
    return (main if entry == "main.py" else main_lora).main(argv)


def _result(out: Path, name: str = "results.json") -> tuple[dict, Path]:
    found = sorted(out.rglob(name))
    assert len(found) == 1, found
    return json.loads(found[0].read_text()), found[0].parent


@pytest.mark.parametrize("name", method_names())  # every registered method, new ones included
def test_every_method_runs_end_to_end_and_trained_ones_reload(name, folder_root, tmp_path, capsys):
    method = get_method(name)
    args = ["--method", name, "--root_path", str(folder_root), "--dataset", "folder", "--shots", "2",
            "--n_iters", "1", "--warmup_steps", "2", "--output_dir", str(tmp_path), *TINY]
    assert _run(method.entry_point, args) == 0
    r, folder = _result(tmp_path)
    assert r["method"] == name and r["metrics"]["test"]["n"] == r["n_test"] == 12
    assert set(r["method_settings"]) == {f.name for f in method.setting_fields()}
    calibration = r["calibration"]
    assert calibration["temperature"] > 0 and calibration["val_nll_after"] <= calibration["val_nll_before"] + 1e-9
    assert set(r["test_before"]) >= {"ece", "nll", "brier"} and set(r["test_after"]) >= {"ece", "nll", "brier"}
    assert r["test_after"]["accuracy"] == r["test_before"]["accuracy"] == r["metrics"]["test"]["accuracy"]
    assert sum(r["test_reliability"]["count"]) == r["n_test"]
    lines = (folder / "predictions.csv").read_text().splitlines()
    assert lines[0].startswith("split,path,label,pred,p_") and len(lines) == 1 + r["n_val"] + r["n_test"]
    if not method.trains:
        assert r["trainable_params"] == 0 and r["timing"]["train_seconds"] == 0 and r["stages"] == []
        with pytest.raises(UserError, match="trains nothing"):
            _run(method.entry_point, [*args, "--eval_only", "--run", str(folder)])
        return
    assert r["trainable_params"] > 0 and all(s["steps"] == s["steps_run"] > 0 for s in r["stages"])
    assert (folder / "weights.safetensors").is_file() and not list(folder.glob("checkpoint*"))
    assert _run(method.entry_point, [*args, "--eval_only", "--run", str(folder)]) == 0
    again = json.loads((folder / "eval_results.json").read_text())
    assert again["metrics"]["test"]["balanced_accuracy"] == r["metrics"]["test"]["balanced_accuracy"]


def test_lora_counts_only_parameters_that_receive_gradients(folder_root, tmp_path):
    args = ["--root_path", str(folder_root), "--dataset", "folder", "--shots", "2", "--n_iters", "1",
            "--warmup_steps", "1", "--output_dir", str(tmp_path), *TINY]
    assert main_lora.main([*args, "--encoder", "both", "--params", "q", "v"]) == 0
    both, _ = _result(tmp_path)
    other = tmp_path / "vision"
    assert main_lora.main([*args, "--params", "q", "v", "--output_dir", str(other)]) == 0
    vision, _ = _result(other)
    # the text tower's adapters never get a gradient in image classification: not counted
    assert both["trainable_params"] == vision["trainable_params"]


def test_lp_ft_records_both_stages(folder_root, tmp_path):
    args = ["--method", "lp_ft", "--root_path", str(folder_root), "--dataset", "folder", "--shots", "2",
            "--n_iters", "2", "--warmup_steps", "1", "--lr", "0.01", "--output_dir", str(tmp_path), *TINY]
    assert main.main(args) == 0
    r, _ = _result(tmp_path)
    lp, ft = r["stages"]
    assert (lp["name"], lp["inputs"], lp["lr"]) == ("lp", "features", 0.01)
    assert (ft["name"], ft["inputs"], ft["lr"]) == ("ft", "images", pytest.approx(0.001))
    assert lp["steps"] == 1 + 2 * 1 and ft["steps"] == 1 + 2 * 2


def test_zeroshot_needs_a_text_tower(folder_root, tmp_path):
    args = ["--method", "zeroshot", "--root_path", str(folder_root), "--dataset", "folder", "--shots", "2",
            "--output_dir", str(tmp_path), "--device", "cpu", "--num_workers", "0", "--model_name", "tiny_vit"]
    with pytest.raises(UserError, match="needs a text tower"):
        main.main(args)


@pytest.fixture(scope="session")
def multilabel_root(tmp_path_factory):
    """A csv multi-label dataset: colour channels as three 0/1 labels on small noisy images."""
    from tests.conftest import make_multilabel_dataset

    return make_multilabel_dataset(tmp_path_factory.mktemp("multilabel"))


@pytest.mark.parametrize("name", ["linear", "lora"])
def test_multilabel_data_trains_with_bce_and_reports_auroc(name, multilabel_root, tmp_path):
    method = get_method(name)
    args = ["--method", name, "--root_path", str(multilabel_root), "--dataset", "csv", "--shots", "-1",
            "--n_iters", "3", "--warmup_steps", "1", "--lr", "0.01", "--pos_weight", "auto",
            "--output_dir", str(tmp_path), *TINY]
    assert _run(method.entry_point, args) == 0
    r, folder = _result(tmp_path)
    assert r["task"] == "multilabel" and r["headline"] == "macro_auroc" and r["classes"] == ["red", "green", "blue"]
    test = r["metrics"]["test"]
    assert {"macro_auroc", "mAP", "macro_f1", "exact_match", "labels"} <= set(test)
    assert 0 <= test["macro_auroc"] <= 1 and len(r["thresholds"]) == 3
    lines = (folder / "predictions.csv").read_text().splitlines()
    assert lines[1].count(";") == 4  # three 0/1 labels and three 0/1 predictions
    from utils.report import build_report

    build_report(tmp_path, plots=False)
    md = (tmp_path / "report" / "report.md").read_text()
    assert "test mean AUROC (%)" in md
    summary = (tmp_path / "report" / "summary.csv").read_text()
    assert "test_macro_auroc_mean" in summary and "test_mAP_mean" in summary


def test_single_label_only_methods_refuse_multilabel_data(multilabel_root, tmp_path):
    args = ["--method", "knn", "--root_path", str(multilabel_root), "--dataset", "csv", "--shots", "-1",
            "--output_dir", str(tmp_path), *TINY]
    with pytest.raises(UserError, match="knn handles single_label data, and this data is multilabel"):
        main.main(args)


def test_cross_validation_runs_each_fold_from_the_entry_point(folder_root, tmp_path):
    vals = []
    for fold in (0, 1):
        args = ["--method", "knn", "--root_path", str(folder_root), "--dataset", "folder", "--shots", "-1",
                "--cv", "2", "--fold", str(fold), "--output_dir", str(tmp_path), *TINY]
        assert main.main(args) == 0
    for path in sorted(tmp_path.rglob("results.json")):
        r = json.loads(path.read_text())
        assert r["config"]["cv"] == 2 and f"-fold{r['config']['fold']}of2-" in str(path)
        vals.append(r["n_val"])
    assert sum(vals) == 6 * 3 + 3 * 3  # every train and val image is validation once
