"""LoRA invariants on every attention kind, tower, letter subset and position (tiny random models)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lora import (
    LoRAError,
    LoRAModule,
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
from tests.test_lora_cases import CASES, Case

IDS = [c.name for c in CASES]
R, ALPHA = 2, 3.0


def inject(case: Case, model: nn.Module, **kw) -> list[nn.Module]:
    settings = {"params": case.params, "r": R, "alpha": ALPHA, "dropout_rate": 0.25, "position": case.position,
                    "encoder": case.encoder} | kw
    return apply_lora(model, **settings)


def randomise_b(model: nn.Module, seed: int = 0) -> None:
    """Give every B a random value (B starts at zero) so that the update is visible."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lora_state_dict(model).items():
            if ".lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def assert_near(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5) -> None:
    """Equal up to float32 rounding, relative to the size of the outputs (deep nets amplify rounding)."""
    err = (actual - expected).abs().max().item()
    assert err <= tol * (1.0 + expected.abs().max().item()), f"max difference {err:.3g}"


def pw_keys(case: Case, model: nn.Module) -> set[str]:
    """state_dict keys of the 1x1 channel-mixing convolution weights the case adapts."""
    keys = set()
    for name, m in model.named_modules():
        pointwise = isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1
        owned = "*" in case.pw_owners or any(name == o or name.startswith(o + ".") for o in case.pw_owners)
        if pointwise and owned:
            keys.add(name + ".weight")
    return keys


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_identity_at_init_random_b_changes_output_and_disabling_restores_it(case: Case):
    model = case.fresh()
    before = case.output(model)
    layers = inject(case, model)
    assert layers, "no LoRA layer injected"
    torch.testing.assert_close(case.output(model), before, atol=1e-6, rtol=1e-5)
    randomise_b(model)
    adapted = case.output(model)
    assert (adapted - before).abs().max() > 1e-3
    with lora_disabled(model):  # adapters off: the original computation (our attention kernels, same sums)
        torch.testing.assert_close(case.output(model), before, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(case.output(model), adapted, atol=0, rtol=0)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_merge_equals_unmerged_and_restores_plain_modules(case: Case):
    base = case.fresh()
    keys, types = list(base.state_dict()), [type(m) for m in base.modules()]
    model = case.fresh()
    inject(case, model)
    randomise_b(model)
    adapted = case.output(model)
    merged = merge_lora(model)
    assert merged is model
    assert not lora_layers(merged)
    assert list(merged.state_dict()) == keys
    assert [type(m) for m in merged.modules()] == types
    assert_near(case.output(merged), adapted)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_merge_changes_only_selected_rows_by_rank_at_most_r(case: Case):
    base = case.fresh()
    model = case.fresh()
    inject(case, model)
    randomise_b(model)
    merge_lora(model)
    before, after = base.state_dict(), model.state_dict()
    expected = case.expected_rows() | {k: [] for k in pw_keys(case, base)}
    assert expected, "the case adapts nothing"
    for key, old in before.items():
        new = after[key]
        if key not in expected:
            assert torch.equal(new, old), f"{key} changed but was not selected"
            continue
        diff = (new - old).double()
        diff = diff.flatten(1) if diff.dim() == 4 else diff  # 1x1 conv: (out, in, 1, 1) -> (out, in)
        thirds = expected[key] or None
        chunks = diff.chunk(3) if thirds else [diff]
        for j, chunk in enumerate(chunks):
            if thirds and j not in thirds:
                assert torch.equal(chunk, torch.zeros_like(chunk)), f"{key} rows {j} changed"
                continue
            rank = int(torch.linalg.matrix_rank(chunk, atol=1e-6))
            assert 1 <= rank <= R, f"{key} part {j} changed with rank {rank}"


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_equals_independent_computation_of_adapted_weights(case: Case, float64):
    """Run the untouched base model with W + s * B @ A computed here by hand from the saved A and B."""
    model = case.fresh().double()
    inject(case, model)
    randomise_b(model, seed=1)
    adapted = case.output(model)
    tensors = lora_state_dict(model)
    scale = ALPHA / math.sqrt(R)
    base = case.fresh().double()
    weights = base.state_dict()
    for name in (n for n in tensors if ".lora_A" in n):
        owner, _, pname = name.rpartition(".")
        letter = pname.removeprefix("lora_A").lstrip("_")
        delta = scale * tensors[f"{owner}.lora_B{pname[len('lora_A'):]}"] @ tensors[name]
        if letter in ("q", "k", "v"):  # a slice of a fused matrix
            key = f"{owner}.in_proj_weight" if f"{owner}.in_proj_weight" in weights else f"{owner}.weight"
            third = "qkv".index(letter)
            rows = weights[key].shape[0] // 3
            weights[key][third * rows:(third + 1) * rows] += delta
        else:
            w = weights[f"{owner}.weight"]
            w += delta.view(w.shape)
    base.load_state_dict(weights)
    assert_near(case.output(base), adapted, tol=1e-10)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_save_load_round_trip_and_mismatch(case: Case, tmp_path):
    settings = {"params": list(case.params), "r": R, "alpha": ALPHA, "scaling": "sqrt", "position": case.position,
                    "encoder": case.encoder, "dropout_rate": 0.25, "model_key": case.name}
    model = case.fresh()
    inject(case, model)
    randomise_b(model, seed=2)
    adapted = case.output(model)
    path = tmp_path / "adapter.safetensors"
    save_lora(model, path, settings)
    assert read_lora_settings(path)["r"] == R
    fresh = case.fresh()
    inject(case, fresh)
    assert not torch.allclose(case.output(fresh), adapted)
    load_lora(fresh, path, settings)
    torch.testing.assert_close(case.output(fresh), adapted, atol=0, rtol=0)
    with pytest.raises(LoRAError, match="r=4"):
        load_lora(case.fresh(), path, settings | {"r": 4})
    with pytest.raises(LoRAError, match="model_key"):
        load_lora(case.fresh(), path, settings | {"model_key": "other"})


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_only_lora_and_head_train(case: Case):
    model = case.fresh()
    model.train()
    layers = inject(case, model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert {id(p) for p in lora_parameters(model)} == {id(p) for n, p in model.named_parameters() if p.requires_grad}
    assert all(layer.training for layer in layers)  # injected layers follow the model's mode
    out = case.output(model, grad=True)
    head = nn.Linear(out.numel(), 3)
    head(out.flatten()[None]).square().sum().backward()
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert p.grad is not None, name
            if ".lora_B" in name:
                assert p.grad.abs().sum() > 0, f"{name} got a zero gradient"
        else:
            assert p.grad is None, f"frozen {name} got a gradient"
    assert head.weight.grad is not None


def test_injected_layers_keep_eval_mode_and_are_lora_modules():
    case = CASES[0]
    model = case.fresh()  # eval mode
    layers = inject(case, model)
    assert all(isinstance(layer, LoRAModule) and not layer.training for layer in layers)
    names = [n for n, _ in lora_layers(model)]
    assert len(names) == 6 and names[0] == "visual.transformer.resblocks.0.attn"
