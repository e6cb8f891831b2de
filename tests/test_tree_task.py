"""The single-label task on a class tree: tree.csv read from the dataset's root, hierarchy-aware losses and
decisions as task settings, tree metrics in results, the decided node in predictions; flat data unaffected."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from common.errors import UserError
from evaluation.hierarchy import crm_nodes
from tasks import get_task
from tasks.single_label import class_tree

CLASSES = ["a1", "a2", "b1", "b2"]  # a1, a2 under A; b1, b2 under B


def _ctx(root: Path, **settings) -> SimpleNamespace:
    items = {"val": [(f"v{i}.png", i % 4) for i in range(8)], "test": [(f"t{i}.png", i % 4) for i in range(8)]}
    split = SimpleNamespace(classes=CLASSES, task="single_label", items=lambda part: items.get(part, []),
                            relative=lambda p: p)
    return SimpleNamespace(config=SimpleNamespace(dataset="folder", root_path=str(root), level=None,
                                                  task_settings=settings), split=split, device=torch.device("cpu"))


@pytest.fixture
def tree_root(tmp_path) -> Path:
    (tmp_path / "tree.csv").write_text("class,parent\nA,\nB,\na1,A\na2,A\nb1,B\nb2,B\n")
    return tmp_path


def _predict(logits: dict):
    return lambda part, fn=None: (logits[part], torch.arange(8) % 4)


def test_flat_data_has_no_tree_and_refuses_tree_settings(tmp_path):
    assert class_tree(_ctx(tmp_path)) is None
    with pytest.raises(UserError, match="need a class tree"):
        class_tree(_ctx(tmp_path, decision="crm"))
    with pytest.raises(UserError, match="--hxe_alpha"):
        class_tree(_ctx(tmp_path, hxe_alpha=-1.0))


def test_hxe_with_alpha_zero_is_cross_entropy_on_the_datasets_tree(tree_root):
    loss = get_task("single_label").loss(_ctx(tree_root, loss="hxe", hxe_alpha=0.0))
    logits, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 2])
    assert torch.allclose(loss(logits, y), F.cross_entropy(logits, y), atol=1e-6)
    assert get_task("single_label").loss(_ctx(tree_root)) is F.cross_entropy


def test_evaluation_adds_tree_metrics_and_the_decided_node(tree_root):
    torch.manual_seed(0)
    logits = {"val": torch.randn(8, 4), "test": torch.randn(8, 4)}
    ctx = _ctx(tree_root, decision="crm")
    evaluation = get_task("single_label").evaluate(ctx, None, _predict(logits), extras=False)
    test = evaluation.metrics["test"]
    probs = logits["test"].softmax(1).numpy()
    tree = class_tree(ctx)
    nodes = crm_nodes(tree, probs)
    assert test["tree"]["accuracy"] == pytest.approx(float((nodes == tree.leaves[torch.arange(8) % 4]).mean()))
    assert {"accuracy_level_1", "mistake_severity", "hierarchical_distance@1", "lca_f1"} <= set(test["tree"])
    assert "mean_hierarchical_distance" in test["hicervix_protocol"]
    assert evaluation.extra["decision"]["rule"] == "crm"
    assert evaluation.extra_columns == ["pred_node", "pred_level"]
    test_rows = [r for r in evaluation.rows if r[0] == "test"]
    assert [r[5] for r in test_rows] == [label for label, _ in tree.describe(nodes)]


def test_backoff_threshold_one_predicts_the_root_and_zero_the_argmax(tree_root):
    logits = {"val": torch.randn(8, 4), "test": torch.randn(8, 4)}
    task = get_task("single_label")
    root = task.evaluate(_ctx(tree_root, decision="backoff", backoff_threshold=1.0), None, _predict(logits),
                         extras=False)
    assert {r[6] for r in root.rows} == {0} and root.metrics["test"]["tree"]["mean_predicted_level"] == 0
    leaf = task.evaluate(_ctx(tree_root, decision="backoff", backoff_threshold=0.0), None, _predict(logits),
                         extras=False)
    argmax = [CLASSES[i] for i in logits["test"].argmax(1).tolist()]
    assert [r[5] for r in leaf.rows if r[0] == "test"] == argmax


def test_backoff_chooses_its_threshold_on_validation_only(tree_root):
    logits = {"val": torch.randn(8, 4), "test": torch.randn(8, 4)}
    task = get_task("single_label")
    first = task.evaluate(_ctx(tree_root, decision="backoff"), None, _predict(logits), extras=False)
    logits["test"] = torch.randn(8, 4)  # another test set: the chosen threshold must not move
    second = task.evaluate(_ctx(tree_root, decision="backoff"), None, _predict(logits), extras=False)
    assert first.extra["decision"]["threshold"] == second.extra["decision"]["threshold"]


def test_a_task_setting_of_no_task_is_refused():
    with pytest.raises(UserError, match="--nonsense applies to no data"):
        get_task("single_label").resolve({"nonsense": 1})


# -- through the entry points ------------------------------------------------------------------------------
def _folder_with_tree(root: Path) -> Path:
    from tests.conftest import make_folder_dataset

    make_folder_dataset(root, per_split={"train": 3, "val": 2, "test": 2})
    (root / "tree.csv").write_text("class,parent\nwarm,\ncool,\nred,warm\ngreen-ish,cool\nblue,cool\n")
    return root


TINY = ["--device", "cpu", "--num_workers", "0", "--model_name", "tiny_clip", "--shots", "-1", "--n_iters", "2",
        "--warmup_steps", "1", "--lr", "1e-2", "--dataset", "folder"]


def test_loss_and_decision_run_end_to_end_and_are_recorded(tmp_path):
    import json

    import main

    root = _folder_with_tree(tmp_path / "data")
    out = tmp_path / "runs"
    assert main.main(["--root_path", str(root), "--output_dir", str(out), "--loss", "hxe", "--decision", "crm",
                      *TINY]) == 0
    result = next(out.rglob("results.json"))
    r = json.loads(result.read_text())
    assert r["config"]["task_settings"]["loss"] == "hxe" and r["config"]["task_settings"]["decision"] == "crm"
    assert r["decision"]["rule"] == "crm" and r["metrics"]["test"]["tree"]["accuracy_level_1"] >= 0
    header = (result.parent / "predictions.csv").read_text().splitlines()[0]
    assert header.endswith("pred_node,pred_level")
    # another loss is another run: its own folder
    assert main.main(["--root_path", str(root), "--output_dir", str(out), *TINY]) == 0
    assert len(list(out.rglob("results.json"))) == 2
    # --eval_only keeps the run's task settings
    assert main.main(["--eval_only", "--run", str(result.parent), "--device", "cpu"]) == 0
    again = json.loads((result.parent / "eval_results.json").read_text())
    assert again["metrics"]["test"]["tree"] == r["metrics"]["test"]["tree"]


def test_tree_flags_on_flat_data_and_on_methods_that_train_nothing(tmp_path, capsys):
    import main
    from tests.conftest import make_folder_dataset

    flat = make_folder_dataset(tmp_path / "flat", per_split={"train": 2, "val": 1, "test": 1})
    with pytest.raises(UserError, match="need a class tree"):
        main.main(["--root_path", str(flat), "--output_dir", str(tmp_path / "o"), "--loss", "soft", *TINY])
    root = _folder_with_tree(tmp_path / "tree")
    from utils.cli import parse_config

    config = parse_config(["--root_path", str(root), "--dataset", "folder", "--method", "knn", "--loss", "hxe"],
                          "linear", notify=False)
    assert config.task_settings["loss"] == "ce" and any("--loss hxe ignored" in w for w in config.warnings)
    with pytest.raises(UserError, match="--decision"):
        parse_config(["--root_path", str(root), "--dataset", "folder", "--decision", "bogus"], "linear")
