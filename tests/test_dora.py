"""DoRA invariants on every attention kind and on pointwise convolutions (tiny random models), and peft parity."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from lora import (
    LoRAError,
    LoRALinear,
    apply_lora,
    load_lora,
    lora_disabled,
    lora_layers,
    lora_parameters,
    lora_state_dict,
    merge_lora,
    read_lora_settings,
    save_lora,
)
from tests.test_lora import ALPHA, R, assert_near, pw_keys
from tests.test_lora import inject as lora_inject
from tests.test_lora_cases import CASES, Case, efficientnet, hf_bert, hf_vit, run_bert, run_image_model

IDS = [c.name for c in CASES]


def inject(case: Case, model: nn.Module, **kw) -> list[nn.Module]:
    """The LoRA tests' injection, as DoRA."""
    return lora_inject(case, model, **({"dora": True} | kw))


def perturb(model: nn.Module, seed: int = 0) -> None:
    """Random A and B, magnitudes off their initial norms: every part of DoRA shows in the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lora_state_dict(model).items():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
            if ".lora_magnitude" in name:
                p.mul_(1 + 0.2 * noise)
            elif ".lora_B" in name:
                p.copy_(noise * 0.5)
            else:
                p.add_(noise * 0.1)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_identity_at_init_and_changes_when_perturbed(case: Case):
    model = case.fresh()
    before = case.output(model)
    layers = inject(case, model)
    assert layers and all(layer.dora for layer in layers)
    torch.testing.assert_close(case.output(model), before, atol=1e-6, rtol=1e-5)
    perturb(model)
    adapted = case.output(model)
    assert (adapted - before).abs().max() > 1e-3
    with lora_disabled(model):  # the adapters switched off: the base model again (our attention kernels)
        torch.testing.assert_close(case.output(model), before, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(case.output(model), adapted, atol=0, rtol=0)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_merge_equals_unmerged_and_restores_plain_modules(case: Case, float64):
    base = case.fresh().double()
    keys, types = list(base.state_dict()), [type(m) for m in base.modules()]
    model = case.fresh().double()
    inject(case, model)
    perturb(model)
    adapted = case.output(model)
    merged = merge_lora(model)
    assert not lora_layers(merged)
    assert list(merged.state_dict()) == keys
    assert [type(m) for m in merged.modules()] == types
    assert_near(case.output(merged), adapted, tol=1e-10)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_merge_changes_only_the_chosen_rows(case: Case):
    base = case.fresh()
    model = case.fresh()
    inject(case, model)
    perturb(model)
    merge_lora(model)
    before, after = base.state_dict(), model.state_dict()
    expected = case.expected_rows() | {k: [] for k in pw_keys(case, base)}
    for key, old in before.items():
        new = after[key]
        if key not in expected:
            assert torch.equal(new, old), f"{key} changed but was not selected"
            continue
        thirds = expected[key]
        for j, (o, n) in enumerate(zip(old.chunk(3) if thirds else [old], new.chunk(3) if thirds else [new],
                                       strict=True)):
            if thirds and j not in thirds:
                assert torch.equal(n, o), f"{key} rows {j} changed"  # e.g. the k rows when only q v are adapted
            else:
                assert (n - o).abs().max() > 1e-4, f"{key} part {j} did not change"


def _hand_merged(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """DoRA's definition, with B @ A formed and the norm taken by torch.linalg.norm."""
    full = weight + ALPHA / math.sqrt(R) * b @ a
    return m[:, None] * full / torch.linalg.norm(full, dim=1, keepdim=True)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_equals_the_definition_computed_by_hand(case: Case, float64):
    """Run the untouched base model with m * (W + s B A) / ||W + s B A|| built here from the saved tensors."""
    model = case.fresh().double()
    inject(case, model)
    perturb(model, seed=1)
    adapted = case.output(model)
    tensors = lora_state_dict(model)
    base = case.fresh().double()
    weights = base.state_dict()
    for name in (n for n in tensors if ".lora_A" in n):
        owner, _, pname = name.rpartition(".")
        suffix = pname[len("lora_A"):]
        a, b, m = tensors[name], tensors[f"{owner}.lora_B{suffix}"], tensors[f"{owner}.lora_magnitude{suffix}"]
        letter = suffix.lstrip("_")
        if letter in ("q", "k", "v"):  # a slice of a fused matrix
            key = f"{owner}.in_proj_weight" if f"{owner}.in_proj_weight" in weights else f"{owner}.weight"
            rows = weights[key].shape[0] // 3
            part = weights[key]["qkv".index(letter) * rows:("qkv".index(letter) + 1) * rows]
            part.copy_(_hand_merged(part, a, b, m))
        else:
            w = weights[f"{owner}.weight"]
            w.copy_(_hand_merged(w.flatten(1), a, b, m).view(w.shape))
    base.load_state_dict(weights)
    assert_near(case.output(base), adapted, tol=1e-10)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_save_load_round_trip_records_the_variant(case: Case, tmp_path):
    settings = {"params": list(case.params), "r": R, "alpha": ALPHA, "position": case.position,
                "encoder": case.encoder, "model_key": case.name, "dora": True}
    model = case.fresh()
    inject(case, model)
    perturb(model, seed=2)
    adapted = case.output(model)
    path = tmp_path / "dora.safetensors"
    save_lora(model, path, settings)
    assert read_lora_settings(path)["dora"] is True
    assert any(".lora_magnitude" in k for k in lora_state_dict(model))
    fresh = case.fresh()
    inject(case, fresh)
    load_lora(fresh, path, settings)
    torch.testing.assert_close(case.output(fresh), adapted, atol=0, rtol=0)
    plain = case.fresh()  # no LoRA layers yet: injected as DoRA from the file's settings
    load_lora(plain, path)
    assert all(layer.dora for _, layer in lora_layers(plain))
    torch.testing.assert_close(case.output(plain), adapted, atol=0, rtol=0)
    lora_model = case.fresh()
    inject(case, lora_model, dora=False)
    with pytest.raises(LoRAError, match="plain LoRA but the adapter settings are DoRA"):
        load_lora(lora_model, path)
    with pytest.raises(LoRAError, match="dora"):
        load_lora(case.fresh(), path, settings | {"dora": False})


def test_lora_file_is_refused_by_a_dora_model(tmp_path):
    case = CASES[0]
    model = case.fresh()
    inject(case, model, dora=False)
    settings = {"params": list(case.params), "r": R, "alpha": ALPHA, "position": case.position}
    save_lora(model, tmp_path / "lora.safetensors", settings)
    assert read_lora_settings(tmp_path / "lora.safetensors")["dora"] is False
    with pytest.raises(LoRAError, match="layers are DoRA but the adapter settings are plain LoRA"):
        load_lora(inject_into_fresh(case), tmp_path / "lora.safetensors")
    with pytest.raises(LoRAError, match="layers are DoRA but the adapter settings are plain LoRA"):
        save_lora(inject_into_fresh(case), tmp_path / "x.safetensors", settings)


def inject_into_fresh(case: Case) -> nn.Module:
    model = case.fresh()
    inject(case, model)
    return model


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_only_a_b_and_magnitudes_train(case: Case):
    model = case.fresh()
    model.train()
    inject(case, model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(any(f".{k}" in n for k in ("lora_A", "lora_B", "lora_magnitude")) for n in trainable)
    assert any(".lora_magnitude" in n for n in trainable)
    assert {id(p) for p in lora_parameters(model)} == {id(p) for n, p in model.named_parameters() if p.requires_grad}
    out = case.output(model, grad=True)
    head = nn.Linear(out.numel(), 3)
    head(out.flatten()[None]).square().sum().backward()
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert p.grad is not None, name
            if ".lora_A" not in name:  # A's gradient is zero while B is zero, as in LoRA
                assert p.grad.abs().sum() > 0, f"{name} got a zero gradient"
        else:
            assert p.grad is None, f"frozen {name} got a gradient"


# --- parity with peft's DoRA ---------------------------------------------------------------------------

peft = pytest.importorskip("peft")

BERT_TARGETS = r"(.*\.(query|value))|(encoder\.layer\.\d+\.attention\.output\.dense)"  # not the MLP's output.dense
PEFT_CASES = [
    ("hf_vit", hf_vit, run_image_model, ("q", "v"), ["q_proj", "v_proj"]),
    ("bert", hf_bert, run_bert, ("q", "v", "o"), BERT_TARGETS),
    ("efficientnet-pw", efficientnet, run_image_model, ("pw",), None),
]


@pytest.mark.parametrize(("name", "build", "run", "params", "targets"), PEFT_CASES, ids=[c[0] for c in PEFT_CASES])
def test_outputs_equal_peft_dora_with_same_a_b_and_magnitude(name, build, run, params, targets):
    r, alpha = 4, 2.0
    ours = copy.deepcopy(build())
    apply_lora(ours, params, r=r, alpha=alpha, dropout_rate=0.0, dora=True)
    perturb(ours, seed=3)
    if targets is None:  # the very convolutions ours adapts
        targets = [n for n, _ in lora_layers(ours)]
    config = peft.LoraConfig(r=r, lora_alpha=alpha, use_rslora=True, lora_dropout=0.0, target_modules=targets,
                             use_dora=True)
    theirs = peft.get_peft_model(copy.deepcopy(build()), config)
    names = {"lora_A": "lora_A.default.weight", "lora_B": "lora_B.default.weight",
             "lora_magnitude": "lora_magnitude_vector.default.weight"}
    copied = 0
    with torch.no_grad():
        for key, p in lora_state_dict(ours).items():
            owner, _, pname = key.rpartition(".")
            target = theirs.get_parameter(f"base_model.model.{owner}.{names[pname]}")
            target.copy_(p.view(target.shape))
            copied += 1
    assert copied == sum(1 for n, _ in theirs.named_parameters() if "lora_" in n), "different layers adapted"
    with torch.no_grad():
        expected = run(theirs.base_model.model, "vision")
        got = run(ours, "vision")
        untouched = run(build(), "vision")
    assert (got - untouched).abs().max() > 1e-3
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


# --- dropout --------------------------------------------------------------------------------------------

def test_dropout_keeps_the_expectation_of_the_eval_output():
    """With dropout in training, DoRA drops the low-rank path's input only; its mean is the eval output."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 8), "q", r=2, scale=1.0, dropout_rate=0.5, dora=True)
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.lora_magnitude.mul_(1.5)
    x = torch.randn(1, 16).expand(20000, 16)
    layer.eval()
    exact = layer(x[:1])
    layer.train()
    with torch.no_grad():
        noisy = layer(x)
    assert noisy.std(dim=0).min() > 1e-3
    torch.testing.assert_close(noisy.mean(dim=0, keepdim=True), exact, atol=0.05 * exact.abs().max().item(), rtol=0)
