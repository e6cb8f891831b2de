"""--compat seed: the original code's three quirks, each off by default, each against a hand computation.

(a) experiment 1's schedule, (b) K images drawn with replacement from a class smaller than K,
(c) timm fused-qkv attention run as the original's LoRA attention (one head, no output projection).
"""

import copy
import json
import math
import random

import pytest
import torch
from torch import nn

from datasets.sampling import sample
from datasets.split import load_split
from engine.images import IndexedBatches
from engine.trainer import Trainer, TrainingInterrupted, TrainSettings, steps_per_epoch
from lora import (
    LoRAError,
    LoRASettings,
    OriginalAttentionLoRA,
    apply_lora,
    load_lora,
    lora_layers,
    merge_lora,
    read_lora_settings,
    save_lora,
)
from tests.conftest import feature_batches, make_folder_dataset, run_entry

LR, MIN_LR = 2e-4, 1e-6


# -- (a) experiment 1's schedule -------------------------------------------------------------------------
def original_lrs(lr: float, n_iters: int, warmup: int, steps: int) -> list[float]:
    """The lr of every step of the original's linear probe (``run_uni``), written out: torch's own
    CosineAnnealingLR(T_max=n_iters, eta_min=1e-6) stepped once per batch inside pytorch_warmup's
    ``LinearWarmup(warmup).dampening()`` (restore the undamped lr, step, multiply by min(1, (t + 1) / warmup)),
    the cosine stepped once the warmup's step count t reaches warmup - 1."""
    param = nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=lr)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=n_iters, eta_min=MIN_LR)
    group = opt.param_groups[0]
    undamped, t = group["lr"], 0
    group["lr"] = undamped * min(1.0, (t + 1) / warmup)  # LinearWarmup's constructor dampens step 0
    used = []
    for _ in range(steps):
        used.append(group["lr"])
        opt.step()  # no gradient: nothing moves, but the scheduler sees an optimiser step
        group["lr"] = undamped
        if t + 1 >= warmup:
            cosine.step()
        undamped, t = group["lr"], t + 1
        group["lr"] = undamped * min(1.0, (t + 1) / warmup)
    return used


X = torch.randn(20, 6, generator=torch.Generator().manual_seed(0))
Y = (X[:, 0] > 0).long()


def _settings(total: int, warmup: int, cycle: int, schedule: str = "cosine_annealing") -> TrainSettings:
    return TrainSettings(lr=LR, weight_decay=1e-2, warmup_steps=warmup, total_steps=total, min_lr=MIN_LR, seed=1,
                         device=torch.device("cpu"), precision="fp32", checkpoint_every=7, schedule=schedule,
                         cycle_steps=cycle)


def _head():
    torch.manual_seed(0)
    return nn.Linear(6, 2)


def _feature_batches(kill_at=None):
    return feature_batches(X, Y, 8, kill_at)


def _recording(trainer: Trainer):
    """A `prepare` for trainer.fit that notes the lr each step runs at (prepare runs before its forward), and
    the list it fills."""
    used = []

    def prepare(x, seeds):
        used.append(trainer.optimizer.param_groups[0]["lr"])
        return x

    return prepare, used


def test_original_schedule_is_torch_cosine_annealing_stepped_per_batch():
    n_iters, warmup = 4, 50
    per_epoch = steps_per_epoch(len(Y), 8)  # 3: the last batch partial, as the original's loader
    total = (warmup + n_iters) * per_epoch
    trainer = Trainer(_head(), _settings(total, warmup, n_iters), None, "f")
    prepare, used = _recording(trainer)
    stats = trainer.fit(_feature_batches(), prepare)
    assert stats.steps == len(used) == total == 162
    want = original_lrs(LR, n_iters, warmup, total)
    for got, expected in zip(used, want, strict=True):
        assert got == pytest.approx(expected, rel=1e-9, abs=1e-15)
    # after the warmup, the lr swings between lr and 1e-6 every n_iters steps, to the end of the run
    assert used[warmup - 1] == pytest.approx(LR)
    assert used[warmup - 1 + n_iters] == pytest.approx(MIN_LR)
    assert used[warmup - 1 + 2 * n_iters] == pytest.approx(LR)
    assert used[warmup - 1 + 7 * n_iters] == pytest.approx(MIN_LR)


def test_default_schedule_is_unchanged():
    total, warmup = 30, 5
    trainer = Trainer(_head(), _settings(total, warmup, 4, schedule="warmup_cosine"), None, "f")
    prepare, used = _recording(trainer)
    trainer.fit(_feature_batches(), prepare)
    assert used[0] == pytest.approx(LR / warmup)
    assert used[-1] == pytest.approx(MIN_LR + (LR - MIN_LR) * 0.5 * (1 + math.cos(math.pi * 24 / 25)))
    assert sorted(used[warmup:], reverse=True) == used[warmup:]  # one cosine, no restart
    with pytest.raises(ValueError, match="unknown lr schedule"):
        Trainer(_head(), _settings(total, warmup, 4, schedule="nope"), None, "f")


def test_original_schedule_resumes_exactly(tmp_path):
    total, warmup, n_iters = 30, 5, 4
    straight = _head()
    first = Trainer(straight, _settings(total, warmup, n_iters), tmp_path / "a", "f")
    prepare, lrs_straight = _recording(first)
    first.fit(_feature_batches(), prepare)

    interrupted = _head()
    with pytest.raises(TrainingInterrupted) as info:
        Trainer(interrupted, _settings(total, warmup, n_iters), tmp_path / "b", "f").fit(
            _feature_batches(kill_at=12), lambda x, seeds: x)
    assert info.value.step == 13
    resumed = _head()
    trainer = Trainer(resumed, _settings(total, warmup, n_iters), tmp_path / "b", "f")
    assert trainer.try_resume() == 13
    prepare, lrs_resumed = _recording(trainer)
    trainer.fit(_feature_batches(), prepare)
    assert lrs_resumed == lrs_straight[13:]
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


# -- (b) K images drawn with replacement ---------------------------------------------------------------
SMALL = [(f"a/{i}.png", "a") for i in range(3)]
LARGE = [(f"b/{i}.png", "b") for i in range(9)]


def test_class_smaller_than_k_is_drawn_with_replacement_only_under_compat():
    items = SMALL + LARGE
    plain = sample(items, ["a", "b"], "train", 5, None, seed=1)
    assert [p for p, c in plain if c == "a"] == sorted(p for p, _ in SMALL)  # the 3 that exist
    drawn = sample(items, ["a", "b"], "train", 5, None, seed=1, replacement=True)
    small = [p for p, c in drawn if c == "a"]
    # by hand: random.choices over the sorted files, with the class's own seeded generator
    rng = random.Random("cytology-lora/1/train/a/with-replacement")
    assert small == sorted(rng.choices(sorted(p for p, _ in SMALL), k=5))
    assert len(small) == 5 and set(small) <= {p for p, _ in SMALL} and len(set(small)) < 5
    assert sample(items, ["a", "b"], "train", 5, None, seed=1, replacement=True) == drawn  # deterministic
    draws = {tuple(p for p, c in sample(items, ["a", "b"], "train", 5, None, s, True) if c == "a") for s in range(8)}
    assert len(draws) > 1  # and a function of the seed
    # a class with K images or more is drawn as without compat
    assert [x for x in drawn if x[1] == "b"] == [x for x in plain if x[1] == "b"]
    # val asks min(K, 4): 4 of the 3 with replacement
    assert len(sample(items, ["a", "b"], "val", 5, None, seed=1, replacement=True)) == 8


def test_split_keeps_repeated_paths_in_lists_counts_manifest_and_batches(tmp_path):
    root = make_folder_dataset(tmp_path / "data", per_split={"train": 3, "val": 2, "test": 2})
    plain = load_split(root, "folder", shots=5, seed=1)
    assert plain.counts()["train"] == {"blue": 3, "red": 3, "green-ish": 3} and len(plain.val) == 6
    split = load_split(root, "folder", shots=5, seed=1, replacement=True)
    assert split.counts()["train"] == {"blue": 5, "red": 5, "green-ish": 5}
    assert split.counts()["val"] == {"blue": 4, "red": 4, "green-ish": 4} and len(split.test) == 6
    assert {p for p, _ in split.train} <= {p for p, _ in plain.train} and len(set(split.train)) < len(split.train)
    assert load_split(root, "folder", shots=5, seed=1, replacement=True).sha256 == split.sha256
    assert split.sha256 != plain.sha256
    # enough images: the same split either way
    assert load_split(root, "folder", shots=2, seed=1, replacement=True).sha256 == \
        load_split(root, "folder", shots=2, seed=1).sha256
    split.write_manifest(tmp_path / "split.json")
    doc = json.loads((tmp_path / "split.json").read_text())
    assert len(doc["train"]) == 15 and doc["replacement"] is True and doc["split_sha256"] == split.sha256
    # each listed entry is its own batch row, repeats included
    data = IndexedBatches(split.train, 16)
    images, labels = next(data.stream(iter([list(range(15))])))
    assert images.shape[0] == 15 and labels.tolist() == [label for _, label in split.train]
    first = split.train.index(next(x for x in split.train if split.train.count(x) > 1))
    assert torch.equal(images[first], images[first + 1])


# -- (c) timm fused-qkv attention as the original runs it ------------------------------------------------
@pytest.fixture(scope="module")
def vit():
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8,
                             depth=2).eval()


def _by_hand(attn: nn.Module, x: torch.Tensor, deltas: dict | None = None) -> torch.Tensor:
    """The original's SimpleAttentionLoRA.forward: q, k, v of the full width C, one softmax attention head
    with SDPA's default scale 1/sqrt(C), ``transpose(1, 2).reshape(B, N, C)``, and no output projection."""
    b, n, c = x.shape
    w, bias = attn.qkv.weight, attn.qkv.bias
    q, k, v = (x @ w[i * c:(i + 1) * c].T + bias[i * c:(i + 1) * c] for i in range(3))
    deltas = deltas or {}
    q = q + deltas.get("q", 0)
    v = v + deltas.get("v", 0)
    weights = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(c), dim=-1)
    return (weights @ v).transpose(1, 2).reshape(b, n, c)


def test_original_attention_is_single_head_over_full_width_without_projection(vit):
    attn = vit.blocks[0].attn
    assert attn.num_heads == 3
    x = torch.randn(2, 17, 192, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        pretrained = attn(x)
        exact = copy.deepcopy(vit)
        apply_lora(exact, params="q v", dropout_rate=0.0)
        assert torch.allclose(exact.blocks[0].attn(x), pretrained, atol=1e-6)  # without compat: unchanged
        compat = copy.deepcopy(vit)
        apply_lora(compat, params="q v", dropout_rate=0.0, original_attention=True)
        layer = compat.blocks[0].attn
        assert isinstance(layer, OriginalAttentionLoRA)
        got = layer(x)  # every B is zero
        assert torch.allclose(got, _by_hand(attn, x), atol=1e-5)
        assert not torch.allclose(got, pretrained, atol=1e-2)
        # with the adapters set, q and v move by s * x A^T B^T, and nothing else changes
        qkv = layer.qkv
        for letter in ("q", "v"):
            qkv.lora_pair(letter)[1].normal_(generator=torch.Generator().manual_seed(ord(letter)))
        deltas = {g: qkv.scale * x @ qkv.lora_pair(g)[0].T @ qkv.lora_pair(g)[1].T for g in ("q", "v")}
        assert torch.allclose(layer(x), _by_hand(attn, x, deltas), atol=1e-4)
        whole = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
        adapted = compat(whole)
        assert not torch.allclose(adapted, vit(whole), atol=1e-2)
        merge_lora(compat)  # folds the updates into qkv; the attention stays the original code's
        assert isinstance(compat.blocks[0].attn, OriginalAttentionLoRA) and not lora_layers(compat)
        assert torch.allclose(compat(whole), adapted, atol=1e-5)


def test_output_projection_adapter_gets_no_gradient_as_in_the_original(vit):
    model = copy.deepcopy(vit)
    apply_lora(model, params="q k v o", dropout_rate=0.0, original_attention=True)
    layer = model.blocks[0].attn
    with torch.no_grad():
        layer.qkv.lora_pair("q")[1].fill_(0.01)
    model.train()
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert layer.qkv.lora_pair("q")[0].grad is not None
    assert layer.proj.lora_A.grad is None and layer.proj.lora_B.grad is None


def test_adapter_file_records_the_attention_mode_and_refuses_a_mismatch(vit, tmp_path):
    settings = LoRASettings(params="q v", dropout_rate=0.0, original_attention=True)
    model = copy.deepcopy(vit)
    apply_lora(model, params="q v", dropout_rate=0.0, original_attention=True)
    path = tmp_path / "lora.safetensors"
    save_lora(model, path, settings)
    assert read_lora_settings(path)["original_attention"] is True
    fresh = copy.deepcopy(vit)
    load_lora(fresh, path, settings.to_dict())
    assert isinstance(fresh.blocks[1].attn, OriginalAttentionLoRA)
    with pytest.raises(LoRAError, match="--compat"):
        load_lora(copy.deepcopy(vit), path, settings.to_dict() | {"original_attention": False})
    exact = copy.deepcopy(vit)
    apply_lora(exact, params="q v", dropout_rate=0.0)
    with pytest.raises(LoRAError, match="--compat"):
        load_lora(exact, path)
    with pytest.raises(LoRAError, match="--compat"):
        save_lora(exact, tmp_path / "other.safetensors", settings)


def test_open_clip_attention_is_unaffected():
    import open_clip

    torch.manual_seed(0)
    vision = {"image_size": 32, "patch_size": 8, "width": 48, "layers": 2, "head_width": 16}
    text = {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}
    model = open_clip.model.CLIP(embed_dim=16, vision_cfg=vision, text_cfg=text).eval()
    reference = copy.deepcopy(model)
    apply_lora(model, params="q v", dropout_rate=0.0, original_attention=True)
    assert not any(isinstance(m, OriginalAttentionLoRA) for m in model.modules())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.encode_image(x), reference.encode_image(x), atol=1e-5)


# -- end to end: budgets and results.json ---------------------------------------------------------------
TINY = ["--device", "cpu", "--num_workers", "0", "--batch_size", "8", "--dataset", "folder"]


def _result(folder) -> dict:
    found = sorted(folder.rglob("results.json"))
    assert len(found) == 1, found
    return json.loads(found[0].read_text())


def test_linear_probe_under_compat_trains_50_plus_n_iters_epochs(folder_root, tmp_path):
    p = run_entry("main.py", "--root_path", str(folder_root), "--model_name", "tiny_clip", "--shots", "-1",
                  "--n_iters", "2", "--compat", "seed", "--output_dir", str(tmp_path / "seed"), *TINY)
    assert p.returncode == 0, p.stderr
    r = _result(tmp_path / "seed")
    per_epoch = steps_per_epoch(r["n_train"], 8)
    assert r["config"]["compat"] == "seed" and r["method_notes"]["compat_seed"] == ["exp1_schedule"]
    assert r["stages"][0]["steps"] == r["stages"][0]["steps_run"] == (50 + 2) * per_epoch
    p = run_entry("main.py", "--root_path", str(folder_root), "--model_name", "tiny_clip", "--shots", "-1",
                  "--n_iters", "2", "--output_dir", str(tmp_path / "none"), *TINY)
    assert p.returncode == 0, p.stderr
    r = _result(tmp_path / "none")
    assert r["config"]["compat"] == "none" and "compat_seed" not in r["method_notes"]
    assert r["stages"][0]["steps"] == 50 + 2 * per_epoch


def test_lora_under_compat_records_the_quirks_that_apply(folder_root, tmp_path):
    # 6 train and 3 val images per class: K = 8 is drawn with replacement, val 4 of 3
    p = run_entry("main_lora.py", "--root_path", str(folder_root), "--model_name", "tiny_vit", "--shots", "8",
                  "--n_iters", "1", "--warmup_steps", "2", "--compat", "seed", "--output_dir", str(tmp_path), *TINY)
    assert p.returncode == 0, p.stderr
    r = _result(tmp_path)
    assert r["method_notes"]["compat_seed"] == ["original_attention", "few_shot_replacement"]
    assert r["n_train"] == 24 and r["n_val"] == 12
    assert r["stages"][0]["steps"] == 2 + 1 * 8  # warmup + n_iters x K, K the 8 drawn
    folder = sorted(tmp_path.rglob("results.json"))[0].parent
    assert read_lora_settings(folder / "lora.safetensors")["original_attention"] is True
    assert json.loads((folder / "split.json").read_text())["replacement"] is True


def test_weights_saved_before_compat_existed_load_as_compat_none(tmp_path):
    from types import SimpleNamespace

    from safetensors.torch import save_file

    from common.errors import UserError
    from engine.config import RunConfig
    from engine.weights import WEIGHTS_FILE, _identity, load_weights

    head = nn.Linear(2, 2)
    ctx = SimpleNamespace(config=RunConfig(method="linear"), split=SimpleNamespace(classes=["a", "b"]))
    metadata = {k: v for k, v in _identity(ctx).items() if k != "compat"}
    save_file({n: p.detach() for n, p in head.named_parameters()}, str(tmp_path / WEIGHTS_FILE), metadata=metadata)
    plan = SimpleNamespace(model=nn.Linear(2, 2))
    load_weights(ctx, plan, tmp_path)
    assert torch.equal(plan.model.weight, head.weight)
    ctx.config.compat = "seed"
    with pytest.raises(UserError, match="saved with compat none, but this run has seed"):
        load_weights(ctx, plan, tmp_path)
