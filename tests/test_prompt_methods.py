"""Prompt learning (models/prompts.py and the methods on it): each method's defining property on tiny_clip /
tiny_vit, frozen towers, and every prompt method end to end through the entry point with --eval_only."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import main_lora
from common.errors import UserError
from engine.config import RunConfig
from engine.context import RunContext
from methods import get_method
from models import load_model
from models.prompts import ClassPrompts, VisualPrompts, text_tower, visual_tower

CLASSES = ["blue", "red", "green-ish"]  # the folder fixture's classes
TINY = ["--model_name", "tiny_clip", "--device", "cpu", "--num_workers", "0", "--batch_size", "8"]
PROMPT_METHODS = ("coop", "kgcoop", "prograd", "cocoop", "ivlp")  # text-prompt methods trained by the engine


@pytest.fixture(scope="module")
def spec():
    s = load_model("tiny_clip")
    s.model.requires_grad_(False)
    return s.model.eval() and s


def make_ctx(spec, tmp_path, **config) -> RunContext:
    split = SimpleNamespace(classes=CLASSES, task="single_label", train=[("x", i % 3) for i in range(6)],
                            counts=lambda: {"train": {c: 2 for c in CLASSES}})
    config = {"model_name": "tiny_clip", "dataset": "folder", "n_iters": 1, "shots": 2, **config}
    return RunContext(RunConfig(**config), tmp_path, split, spec, torch.device("cpu"), "fp32")


def build(name, ctx, **settings):
    method = get_method(name)
    return method.build(ctx, method.resolve(settings))


def images(spec, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, spec.input_size, spec.input_size, generator=g)


def text_state(spec) -> dict:
    return {k: v.clone() for k, v in spec.model.state_dict().items()}


# -- the towers ------------------------------------------------------------------------------------------
def test_prompts_from_their_own_text_encode_exactly_as_the_model(spec):
    tokens = spec.tokenizer(["a photo of a red cell.", "a photo of a blue cell."])
    prompts = ClassPrompts(text_tower(spec), tokens, 4, "text")
    with torch.no_grad():
        assert torch.equal(prompts(), spec.model.encode_text(tokens))
        moved = prompts(prompts.ctx + torch.randn(prompts.ctx.shape, generator=torch.Generator().manual_seed(0)))
    assert not torch.allclose(moved, spec.model.encode_text(tokens), atol=1e-3)


@pytest.mark.parametrize("key", ["tiny_clip", "tiny_vit"])
@pytest.mark.parametrize("depth", [1, 2])
def test_hidden_visual_prompts_give_the_frozen_models_features(key, depth):
    s = load_model(key)
    s.model.eval()
    x = images(s, 3)
    prompts = VisualPrompts(visual_tower(s), 3, depth)
    with torch.no_grad():
        frozen = s.encode_image(x)
        assert torch.allclose(prompts(x, hide_prompts=True), frozen, atol=1e-5)
        assert not torch.allclose(prompts(x), frozen, atol=1e-3)  # seen, the prompts change the features


def test_transformers_clip_towers_take_prompts():
    from transformers import CLIPConfig, CLIPModel

    from models import hf_clip

    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config={**small, "max_position_embeddings": 77}, projection_dim=16,
                                 vision_config={**small, "image_size": 32, "patch_size": 8})).eval()
    s = SimpleNamespace(model=model, has_text=True, key="hf")
    tokens = load_model("tiny_clip").tokenizer(["a photo of a red cell."])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(ClassPrompts(text_tower(s), tokens, 4, "text")(), hf_clip.encode_text(model, tokens),
                              atol=1e-6)
        assert torch.allclose(VisualPrompts(visual_tower(s), 2, 2)(x, hide_prompts=True),
                              hf_clip.encode_image(model, x), atol=1e-5)


# -- coop --------------------------------------------------------------------------------------------------
def test_coop_from_a_photo_of_a_predicts_exactly_as_zero_shot_with_that_prompt(spec, tmp_path):
    from tasks.text import class_text_embeddings

    ctx = make_ctx(spec, tmp_path)
    plan = build("coop", ctx, ctx_init="a photo of a")
    assert plan.model.prompts.n_ctx == 4  # the phrase's tokens, not --n_ctx 16
    x = images(spec)
    text = class_text_embeddings(ctx, ["a photo of a {}."])
    with torch.no_grad():
        zero_shot = spec.logit_scale * F.normalize(spec.encode_image(x), dim=-1) @ text.t()
        logits = plan.model.eval()(x)
    assert torch.allclose(logits, zero_shot, atol=1e-5)
    assert torch.equal(logits.argmax(1), zero_shot.argmax(1))


def test_coop_contexts_shared_per_class_and_random(spec, tmp_path):
    ctx = make_ctx(spec, tmp_path)
    shared = build("coop", ctx).model.prompts
    assert shared.ctx.shape == (16, text_tower(spec).width) and 0.01 < shared.ctx.std() < 0.03
    per_class = build("coop", ctx, class_specific_ctx=True, n_ctx=2).model.prompts
    assert per_class.ctx.shape == (3, 2, text_tower(spec).width)
    with pytest.raises(UserError, match="--n_ctx must be at least 1"):
        build("coop", ctx, n_ctx=0)
    from utils.cli import parse_config

    for name in ("cocoop", "ivlp", "tpt"):  # one shared context (shifted per image, or tuned per image)
        with pytest.raises(UserError, match=f"--class_specific_ctx does not apply to --method {name}"):
            parse_config(["--method", name, "--class_specific_ctx", "True"], "lora")


def test_coop_needs_a_text_tower(tmp_path):
    s = load_model("tiny_vit")
    with pytest.raises(UserError, match="needs a text tower"):
        build("coop", make_ctx(s, tmp_path, model_name="tiny_vit"))


def test_coop_trains_on_the_paper_schedule_unless_n_iters_is_given(spec, tmp_path):
    paper = build("coop", make_ctx(spec, tmp_path, shots=2, warmup_steps=1, batch_size=4, n_iters_from="default"))
    assert paper.notes == {"epochs": 100, "epochs_from": "paper"}  # CoOp: 100 epochs at 2 shots
    assert paper.stages[0].steps == 1 + 100 * 2  # 6 train images in batches of 4
    given = build("coop", make_ctx(spec, tmp_path, warmup_steps=1, batch_size=4, n_iters=3, n_iters_from="flag"))
    assert given.notes == {"epochs": 3, "epochs_from": "n_iters"} and given.stages[0].steps == 1 + 3 * 2


# -- kgcoop ------------------------------------------------------------------------------------------------
def test_kgcoop_penalty_is_zero_at_start_and_grows_as_the_context_moves(spec, tmp_path):
    plan = build("kgcoop", make_ctx(spec, tmp_path))
    model = plan.model.train()
    model(images(spec))
    assert plan.stages[0].extra_loss(model).item() == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        model.prompts.ctx.add_(0.05 * torch.randn_like(model.prompts.ctx))
    model(images(spec))
    assert plan.stages[0].extra_loss(model).item() > 1e-4


# -- prograd -----------------------------------------------------------------------------------------------
def test_prograd_gradient_never_points_against_the_zero_shot_gradient(spec, tmp_path):
    plan = build("prograd", make_ctx(spec, tmp_path))
    model = plan.model.train()
    ctx_param = model.prompts.ctx
    with torch.no_grad():  # away from the start, where the model is the zero-shot one and the KL gradient is 0
        ctx_param.add_(0.5 * torch.randn(ctx_param.shape, generator=torch.Generator().manual_seed(0)))
    x = images(spec, 8)
    image = model.image_features(x)
    conflicts = 0
    for seed in range(12):  # label draws: some give a cross-entropy gradient that conflicts with the KL one
        labels = torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(seed))
        logits = model(x)
        model._computing_reference = True  # the hook off: the unprojected gradients, for comparison
        raw = torch.autograd.grad(F.cross_entropy(logits, labels), ctx_param, retain_graph=True)[0]
        kl = torch.autograd.grad(model.kl_loss(logits, image), ctx_param, retain_graph=True)[0]
        model._computing_reference = False
        ctx_param.grad = None
        F.cross_entropy(logits, labels).backward()  # what the engine does: the hook projects
        projected = ctx_param.grad
        assert (projected * kl).sum() >= -1e-5 * raw.norm() * kl.norm()
        if (raw * kl).sum() < -1e-2 * raw.norm() * kl.norm():
            conflicts += 1
            unit = kl / kl.norm()
            assert torch.allclose(projected, raw - (raw * unit).sum() * unit, atol=1e-7)
        else:
            assert torch.equal(projected, raw)
    assert conflicts >= 2  # the projection was exercised, not only the agreeing case


# -- cocoop ------------------------------------------------------------------------------------------------
def test_cocoop_with_a_silent_meta_network_is_coop_with_its_context(spec, tmp_path):
    plan = build("cocoop", make_ctx(spec, tmp_path))
    model = plan.model.eval()
    x = images(spec)
    with torch.no_grad():
        shifted = model(x)
        model.meta_net.linear2.weight.zero_()
        model.meta_net.linear2.bias.zero_()
        silent = model(x)
        coop = model.scale * model.image_features(x) @ model.text_features().t()  # one context for every image
    assert torch.allclose(silent, coop, atol=1e-5)
    assert not torch.allclose(shifted, silent, atol=1e-4)  # the meta-network moves each image's prompts
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "prompts.ctx", "meta_net.linear1.weight", "meta_net.linear1.bias", "meta_net.linear2.weight",
        "meta_net.linear2.bias"}


# -- ivlp --------------------------------------------------------------------------------------------------
def test_ivlp_prompts_both_towers_at_every_block(spec, tmp_path):
    plan = build("ivlp", make_ctx(spec, tmp_path))
    model = plan.model.eval()
    assert (plan.notes["vision_depth"], plan.notes["text_depth"]) == (2, 2)  # tiny_clip: 2 blocks per tower
    assert model.text_deep.shape == (1, 2, text_tower(spec).width) and model.visual_prompts.tokens.shape[:2] == (2, 2)
    x = images(spec, 4)
    with torch.no_grad():
        frozen = F.normalize(spec.encode_image(x), dim=-1)
        assert torch.allclose(F.normalize(model.visual_prompts(x, hide_prompts=True), dim=-1), frozen, atol=1e-5)
        text = model.text_features()
        model.text_deep.add_(torch.randn(model.text_deep.shape, generator=torch.Generator().manual_seed(0)))
        assert not torch.allclose(model.text_features(), text, atol=1e-4)  # the deep text prompts are read
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "prompts.ctx", "text_deep", "visual_prompts.tokens"}
    shallow = build("ivlp", make_ctx(spec, tmp_path), prompt_depth=1).model
    assert shallow.text_deep.shape[0] == 0 and shallow.visual_prompts.tokens.shape[0] == 1


# -- vpt ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key, head", [("tiny_clip", "text"), ("tiny_vit", "linear")])
@pytest.mark.parametrize("depth", [1, 0])
def test_vpt_with_hidden_prompts_is_the_frozen_model_under_its_head(key, head, depth, tmp_path):
    s = load_model(key)
    s.model.requires_grad_(False)
    plan = build("vpt", make_ctx(s, tmp_path, model_name=key), prompt_depth=depth)
    model = plan.model.eval()
    assert plan.notes["head"] == head and plan.notes["prompt_depth"] == (1 if depth else 2 if key == "tiny_clip" else 6)
    x = images(s, 4)
    with torch.no_grad():
        frozen = model.head(s.encode_image(x))
        assert torch.allclose(model.head(model.visual_prompts(x, hide_prompts=True)), frozen, atol=1e-5)
        assert not torch.allclose(model(x), frozen, atol=1e-4)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {"visual_prompts.tokens"} | ({"head.weight", "head.bias"} if head == "linear" else set())
    assert trained == expected


def test_vpt_refuses_a_convolutional_model_in_one_line(tmp_path):
    s = load_model("efficientnet_lite0", weights="random")
    with pytest.raises(UserError, match=r"need a vision transformer, and efficientnet_lite0 is a \w+, not one") as e:
        build("vpt", make_ctx(s, tmp_path, model_name="efficientnet_lite0"))
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="--prompt_depth 3: this model has 2 blocks"):
        build("vpt", make_ctx(load_model("tiny_clip"), tmp_path), prompt_depth=3)


# -- tpt ---------------------------------------------------------------------------------------------------
def test_tpt_without_steps_is_zero_shot_and_its_steps_move_the_prediction(spec, tmp_path):
    from tasks.text import class_text_embeddings

    ctx = make_ctx(spec, tmp_path)
    x = images(spec, 3)
    with torch.no_grad():
        zero_shot = spec.logit_scale * F.normalize(spec.encode_image(x), dim=-1) @ class_text_embeddings(ctx).t()
        still = build("tpt", ctx, tpt_steps=0).model.eval()(x)
        tuned = build("tpt", ctx, tpt_views=8, tpt_lr=0.5).model.eval()(x)
    assert torch.allclose(still, zero_shot, atol=1e-5)
    assert not torch.allclose(tuned, zero_shot, atol=1e-3)


def test_tpt_tunes_each_image_on_its_own_and_changes_no_weight(spec, tmp_path):
    before = text_state(spec)
    model = build("tpt", make_ctx(spec, tmp_path), tpt_views=8, tpt_steps=2).model.eval()
    start = model.prompts.ctx.clone()
    x = images(spec, 4)
    with torch.no_grad():
        batch = model(x)
        alone = torch.cat([model(x[i:i + 1]) for i in (3, 0)])
    assert torch.allclose(batch[[3, 0]], alone, atol=1e-6)  # the same image, the same views and steps
    assert torch.equal(model.prompts.ctx, start) and not model.prompts.ctx.requires_grad
    assert all(torch.equal(v, spec.model.state_dict()[k]) for k, v in before.items())


def test_tpt_reads_no_test_label(folder_root, tmp_path):
    from engine.context import prepare_context
    from engine.prediction import predict
    from utils.cli import parse_config

    config = parse_config(["--method", "tpt", "--root_path", str(folder_root), "--dataset", "folder", "--shots", "2",
                           "--tpt_views", "8", "--output_dir", str(tmp_path), *TINY], "lora")
    ctx = prepare_context(config)
    method = get_method("tpt")
    plan = method.build(ctx, method.resolve(config.method_settings))
    logits, labels = predict(ctx, plan, "test")
    ctx.split.test = [(path, (label + 1) % 3) for path, label in ctx.split.test]  # every test label wrong
    again, permuted = predict(ctx, plan, "test")
    assert torch.equal(permuted, (labels + 1) % 3)
    assert torch.equal(again, logits)


# -- every prompt method -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", PROMPT_METHODS)
def test_training_leaves_every_model_weight_unchanged(name, spec, tmp_path):
    before = text_state(spec)
    plan = build(name, make_ctx(spec, tmp_path))
    model = plan.model.train()
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(not p.requires_grad for p in spec.model.parameters())
    optimizer = torch.optim.AdamW(trained, lr=0.1)
    for _ in range(2):
        loss = F.cross_entropy(model(images(spec)), torch.tensor([0, 1, 2, 0, 1, 2]))
        if plan.stages[0].extra_loss is not None:
            loss = loss + plan.stages[0].extra_loss(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = spec.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(model.prompts.ctx, build(name, make_ctx(spec, tmp_path)).model.prompts.ctx)


def _result(out: Path, name: str = "results.json") -> tuple[dict, Path]:
    found = sorted(out.rglob(name))
    assert len(found) == 1, found
    return json.loads(found[0].read_text()), found[0].parent


# tests/test_methods.py runs every registered method end to end with --eval_only on tiny_clip; here the budget and
# the trained parameters, and VPT on a ViT without a text tower
@pytest.mark.parametrize("name, model", [("coop", "tiny_clip"), ("vpt", "tiny_vit")])
def test_prompt_methods_run_end_to_end_and_reload(name, model, folder_root, tmp_path):
    args = ["--method", name, "--root_path", str(folder_root), "--dataset", "folder", "--shots", "2",
            "--n_iters", "1", "--warmup_steps", "1", "--output_dir", str(tmp_path), *TINY, "--model_name", model]
    assert main_lora.main(args) == 0
    r, folder = _result(tmp_path)
    assert r["method"] == name and r["stages"][0]["steps_run"] == r["stages"][0]["steps"] == 1 + 1
    assert r["method_notes"]["epochs_from"] == "n_iters"
    assert 0 < r["trainable_params"] <= 16 * 64 + 65 * 3  # the prompt tokens (and VPT's linear head) only
    assert main_lora.main([*args, "--eval_only", "--run", str(folder)]) == 0
    again = json.loads((folder / "eval_results.json").read_text())
    assert again["metrics"]["test"] == r["metrics"]["test"]
