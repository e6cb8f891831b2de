"""The transductive class-proportion prior of the feature-space methods."""

import pytest
import torch

from engine.tracking import Tracker
from engine.training import train
from methods import get_method
from methods.transductive import proportion_penalty
from tests.test_methods import feature_ctx


def test_penalty_is_zero_with_margin_one_and_at_the_prior():
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4]])
    assert proportion_penalty(probs, torch.tensor([0.2, 0.8]), margin=1.0) == 0
    logits = torch.tensor([[2.0, 0.0], [0.5, 0.1]], requires_grad=True)
    prior = logits.softmax(1).mean(0).detach()
    value = proportion_penalty(logits.softmax(1), prior, margin=0.0)
    value.backward()
    assert value == 0 and torch.count_nonzero(logits.grad) == 0
    assert proportion_penalty(probs, torch.tensor([0.2, 0.8]), margin=0.0) > 0


def shifted(tmp_path, seed=0):
    """Two overlapping classes, balanced in train, 80/20 in test."""
    g = torch.Generator().manual_seed(seed)
    train_y = torch.tensor([0, 1] * 20)
    train_x = torch.randn(40, 8, generator=g) + train_y[:, None] * 0.8
    test_y = torch.tensor([0] * 80 + [1] * 20)
    test_x = torch.randn(100, 8, generator=g) + test_y[:, None] * 0.8
    ctx = feature_ctx(train_x, train_y, "ab", tmp_path, n_iters=20, batch_size=8, warmup_steps=2, lr=0.05)
    ctx._features["test"] = (test_x, test_y)
    return ctx


def fit(ctx, name="linear", **settings):
    torch.manual_seed(0)
    method = get_method(name)
    plan = method.build(ctx, method.resolve(settings))
    train(ctx, plan, Tracker())
    return plan


def test_margin_one_leaves_the_head_where_the_labelled_steps_put_it(tmp_path):
    a = fit(shifted(tmp_path / "a"), transductive="proportion", ti_steps=30, ti_margin=1.0)
    b = fit(shifted(tmp_path / "b"), transductive="proportion", ti_steps=30, ti_lambda=0.0)
    assert [s.name for s in a.stages] == ["linear", "transductive"]
    for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(pa, pb)


@pytest.mark.parametrize("name", ["linear", "prototype", "adapter"])
def test_the_penalty_moves_test_marginals_toward_the_prior(tmp_path, name):
    ctx = shifted(tmp_path / "ti")
    test_x = ctx.features("test")[0]
    plain = fit(ctx, name, transductive="proportion", ti_steps=60, ti_lambda=0.0)
    ctx = shifted(tmp_path / "ti2")
    pushed = fit(ctx, name, transductive="proportion", ti_steps=60, ti_lambda=5.0, ti_margin=0.0, ti_prior="train")
    prior = torch.tensor([0.5, 0.5])
    with torch.no_grad():
        gap_plain = (plain.model(test_x).softmax(1).mean(0) - prior).abs().sum()
        gap_pushed = (pushed.model(test_x).softmax(1).mean(0) - prior).abs().sum()
    assert gap_pushed < gap_plain - 0.02, (float(gap_plain), float(gap_pushed))


def test_test_labels_are_never_read(tmp_path):
    ctx = shifted(tmp_path / "a")
    plan = fit(ctx, transductive="proportion", ti_steps=20, ti_margin=0.0, ti_lambda=1.0)
    garbage = shifted(tmp_path / "b")
    x, _ = garbage._features["test"]
    garbage._features["test"] = (x, torch.randint(0, 1000, (len(x),)))
    other = fit(garbage, transductive="proportion", ti_steps=20, ti_margin=0.0, ti_lambda=1.0)
    with torch.no_grad():
        assert torch.equal(plan.model(x), other.model(x))


def test_from_the_entry_point_the_stage_and_prior_are_recorded(folder_root, tmp_path):
    import json

    import main
    from tests.test_methods import TINY

    args = ["--root_path", str(folder_root), "--dataset", "folder", "--shots", "2", "--n_iters", "1",
            "--warmup_steps", "1", "--transductive", "proportion", "--ti_steps", "3", "--ti_prior", "uniform",
            "--output_dir", str(tmp_path), *TINY]
    assert main.main(args) == 0
    (path,) = tmp_path.rglob("results.json")
    r = json.loads(path.read_text())
    assert [s["name"] for s in r["stages"]] == ["linear", "transductive"] and r["stages"][1]["steps_run"] == 3
    assert r["method_notes"]["transductive_prior"] == pytest.approx([1 / 3] * 3, abs=1e-6)
    assert "/linear-ti-uniform/" in str(path)
