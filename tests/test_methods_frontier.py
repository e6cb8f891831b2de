"""The newer feature-space methods' defining properties: logreg, LP++, CLAP, Tip-Adapter(-F), TaskRes,
CLIP-Adapter; what each reads (validation only for searches, never test labels) and text-tower refusals."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.errors import UserError
from engine.config import RunConfig
from engine.run import RunContext
from methods import get_method

TEXT_METHODS = ("lp_pp", "clap", "tip_adapter", "tip_adapter_f", "taskres", "clip_adapter")
CLASSES = ["a", "b", "c"]


def build(name, ctx, **settings):
    method = get_method(name)
    return method.build(ctx, method.resolve(settings))


def _blobs(seed: int, per_class: int, dim: int, centres: torch.Tensor):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(len(centres)).repeat_interleave(per_class)
    return centres[y] + 1.5 * torch.randn(len(y), dim, generator=g), y


@pytest.fixture(scope="module")
def spec():
    from models import load_model

    s = load_model("tiny_clip")
    s.model.requires_grad_(False)
    return s


def make_ctx(spec, tmp_path, parts=("train", "val", "test")):
    """A tiny_clip run context whose features of each part are given (blobs), and a log of the parts read."""
    torch.manual_seed(0)
    centres = torch.randn(3, spec.feature_dim) * 3
    feats = {part: _blobs(i, n, spec.feature_dim, centres) for i, (part, n) in
             enumerate((("train", 6), ("val", 4), ("test", 8))) if part in parts}
    split = SimpleNamespace(classes=CLASSES, task="single_label",
                            train=[("x", int(v)) for v in feats["train"][1]],
                            val=[("v", int(v)) for v in feats["val"][1]] if "val" in feats else [],
                            counts=lambda: {"train": {c: 6 for c in CLASSES}})
    ctx = RunContext(RunConfig(model_name="tiny_clip", dataset="folder", n_iters=1, shots=6), tmp_path, split, spec,
                     torch.device("cpu"), "fp32")
    ctx._features.update(feats)
    read = []
    plain = ctx.features

    def features(part):
        read.append(part)
        return plain(part)

    ctx.features = features
    return ctx, read


# -- logreg ------------------------------------------------------------------------------------------------
def test_logreg_equals_sklearn_at_the_c_it_chose_on_validation(spec, tmp_path):
    from sklearn.linear_model import LogisticRegression

    ctx, read = make_ctx(spec, tmp_path)
    plan = build("logreg", ctx)
    assert set(read) == {"train", "val"}  # the search touches validation, never test
    c = plan.notes["logreg_c"]
    assert f"{c:.6g}" in plan.notes["c_val_accuracy"] and len(plan.notes["c_val_accuracy"]) > 7
    x, y = ctx._features["train"]
    ref = LogisticRegression(C=c, max_iter=1000, random_state=1).fit(x.numpy(), y.numpy())
    test_x = ctx._features["test"][0]
    ours = plan.model(test_x).softmax(dim=1).numpy()
    np.testing.assert_allclose(ours, ref.predict_proba(test_x.numpy()), atol=1e-5)


def test_logreg_with_two_classes_matches_sklearn_and_a_fixed_c_skips_the_search(spec, tmp_path):
    from sklearn.linear_model import LogisticRegression

    ctx, read = make_ctx(spec, tmp_path)
    x, y = ctx._features["train"]
    keep = y < 2
    ctx._features["train"] = (x[keep], y[keep])
    ctx.split.classes = ["a", "b"]
    plan = build("logreg", ctx, logreg_c=0.5)
    assert read == ["train"] and plan.notes["logreg_c"] == 0.5
    ref = LogisticRegression(C=0.5, max_iter=1000).fit(x[keep].numpy(), y[keep].numpy())
    np.testing.assert_allclose(plan.model(x).softmax(1).numpy(), ref.predict_proba(x.numpy()), atol=1e-5)


def test_logreg_without_validation_images_asks_for_a_c(spec, tmp_path):
    ctx, _ = make_ctx(spec, tmp_path, parts=("train", "test"))
    with pytest.raises(UserError, match="give --logreg_c"):
        build("logreg", ctx)


# -- LP++ --------------------------------------------------------------------------------------------------
def test_lp_pp_at_step_0_is_its_text_and_prototype_initialisation(spec, tmp_path):
    from methods.heads import class_text_embeddings

    ctx, _ = make_ctx(spec, tmp_path)
    plan = build("lp_pp", ctx, lpp_steps=0)
    x, y = ctx._features["train"]
    f = F.normalize(x, dim=-1)
    text = class_text_embeddings(ctx)
    sums = torch.stack([f[y == c].sum(0) for c in range(3)])
    alpha = 250 * torch.stack([(f[y == c] @ text.t()).mean(0) for c in range(3)]).mean()
    test = F.normalize(ctx._features["test"][0], dim=-1)
    assert torch.allclose(plan.model(test), test @ sums.t() + alpha * (test @ text.t()), atol=1e-5)
    # the closed-form step sizes
    lr_w = 4 * len(f) / torch.linalg.eigvalsh((f.t() @ f).double()).max().item()
    assert plan.notes["lp_pp"]["lr_w"] == pytest.approx(lr_w, rel=1e-6)
    trained = build("lp_pp", ctx, lpp_steps=30)
    assert not torch.allclose(trained.model.weight, plan.model.weight)
    assert trained.model.alpha.detach().ne(plan.model.alpha.detach()).all()  # 3 alpha updates in 30 steps
    loss = F.cross_entropy
    assert loss(trained.model(x), y) < loss(plan.model(x), y)


# -- CLAP --------------------------------------------------------------------------------------------------
def test_clap_reads_no_validation_data_and_starts_at_zero_shot_without_penalty(spec, tmp_path):
    ctx, read = make_ctx(spec, tmp_path)
    plan = build("clap", ctx)
    zeroshot = build("zeroshot", ctx)
    test = ctx._features["test"][0]
    assert torch.allclose(plan.model(test), zeroshot.model(test), atol=1e-5)
    (stage,) = plan.stages
    assert stage.extra_loss(plan.model).item() == 0
    with torch.no_grad():
        plan.model.prototypes.add_(0.1)
    assert stage.extra_loss(plan.model).item() > 0
    assert set(read) == {"train"}  # no validation (and no test) features
    m = plan.model.multipliers
    assert ((m > 0) & (m < 1)).all()


# -- Tip-Adapter -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tip_adapter", "tip_adapter_f"])
def test_tip_adapter_with_residual_ratio_0_is_zero_shot(name, spec, tmp_path):
    ctx, _ = make_ctx(spec, tmp_path)
    plan = build(name, ctx, tip_alpha=0.0, tip_beta=5.0)
    zeroshot = build("zeroshot", ctx)
    plan.model.eval()
    test = ctx._features["test"][0]
    assert torch.equal(plan.model(test), zeroshot.model(test))
    with_cache = build(name, ctx, tip_alpha=1.0, tip_beta=5.0).model.eval()
    assert not torch.allclose(with_cache(test), zeroshot.model(test))


def test_tip_adapter_searches_on_validation_only_and_f_trains_only_its_keys(spec, tmp_path):
    ctx, read = make_ctx(spec, tmp_path)
    plan = build("tip_adapter", ctx)
    assert set(read) == {"train", "val"}
    found = plan.notes["tip_adapter"]
    assert 0.1 <= found["alpha"] <= 3 and 0.1 <= found["beta"] <= 7 and found["val_accuracy"] > 0.5
    assert not any(p.requires_grad for p in plan.model.parameters())
    tuned = build("tip_adapter_f", ctx)
    assert [n for n, p in tuned.model.named_parameters() if p.requires_grad] == ["keys"]
    # training uses the original's alpha = beta = 1; entering eval mode searches on validation
    assert (tuned.model.alpha, tuned.model.beta) == (1.0, 1.0)
    tuned.model.eval()
    assert (tuned.model.eval_alpha, tuned.model.eval_beta) == (found["alpha"], found["beta"])
    assert tuned.notes["tip_adapter"] == found


# -- TaskRes and CLIP-Adapter ------------------------------------------------------------------------------
def test_taskres_with_zero_residual_is_zero_shot_and_trains_only_the_residual(spec, tmp_path):
    ctx, _ = make_ctx(spec, tmp_path)
    plan = build("taskres", ctx)
    test = ctx._features["test"][0]
    assert torch.allclose(plan.model(test), build("zeroshot", ctx).model(test), atol=1e-6)
    assert [n for n, p in plan.model.named_parameters() if p.requires_grad] == ["residual"]
    with torch.no_grad():
        plan.model.residual.normal_()
    assert not torch.allclose(plan.model(test), build("zeroshot", ctx).model(test), atol=1e-3)


def test_clip_adapter_blends_adapted_features_with_the_original_ones(spec, tmp_path):
    ctx, _ = make_ctx(spec, tmp_path)
    test = ctx._features["test"][0]
    zeroshot = build("zeroshot", ctx).model(test)
    assert torch.allclose(build("clip_adapter", ctx, ratio=0.0).model(test), zeroshot, atol=1e-5)
    plan = build("clip_adapter", ctx)
    m = plan.model
    expected = m.scale * F.normalize(0.2 * m.mlp(test) + 0.8 * test, dim=-1) @ m.text.t()
    assert torch.allclose(m(test), expected, atol=1e-6) and not torch.allclose(m(test), zeroshot, atol=1e-3)
    assert {n.split(".")[0] for n, p in m.named_parameters() if p.requires_grad} == {"mlp"}


# -- what each needs -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", TEXT_METHODS)
def test_text_methods_refuse_a_model_without_a_text_tower(name, tmp_path):
    from models import load_model

    vit = load_model("tiny_vit")
    x, y = torch.randn(6, vit.feature_dim), torch.tensor([0, 1, 2] * 2)
    split = SimpleNamespace(classes=CLASSES, task="single_label", train=[("x", 0)] * 6, val=[("v", 0)])
    ctx = RunContext(RunConfig(model_name="tiny_vit", dataset="folder"), tmp_path, split, vit, torch.device("cpu"),
                     "fp32")
    ctx._features.update(train=(x, y), val=(x, y))
    with pytest.raises(UserError, match="needs a text tower, and tiny_vit has none"):
        build(name, ctx)


@pytest.mark.parametrize("name", ["logreg", "tip_adapter", "lp_pp"])
def test_methods_without_a_training_stage_refuse_the_proportion_prior_or_have_no_such_flag(name, spec, tmp_path):
    ctx, _ = make_ctx(spec, tmp_path)
    with pytest.raises(UserError, match="proportion|does not apply"):
        build(name, ctx, transductive="proportion")
