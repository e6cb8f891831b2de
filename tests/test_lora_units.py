"""LoRA settings, errors, positions, the nn.MultiheadAttention drop-in, dropout, speed rules and adapter files."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from lora import (
    LoRAError,
    LoRALinear,
    LoRAMultiheadAttention,
    LoRASettings,
    apply_lora,
    block_indices,
    load_lora,
    lora_disabled,
    lora_layers,
    lora_state_dict,
    merge_lora,
    parse_params,
    read_lora_settings,
    save_lora,
)
from tests.test_lora_cases import efficientnet, images, open_clip_model, timm_vit


@pytest.mark.parametrize(("spec", "expected"), [
    ("q v", ("q", "v")), (["q", "v"], ("q", "v")), (["q v"], ("q", "v")), ("qv", ("q", "v")),
    ("q,v", ("q", "v")), ("qkvo", ("q", "k", "v", "o")), ("pw", ("pw",)), (["q", "v", "pw"], ("q", "v", "pw")),
    ("v q", ("q", "v")), ("Q  K", ("q", "k")), (["o", "q k"], ("q", "k", "o")), ("qvpw", ("q", "v", "pw")),
])
def test_parse_params_forms(spec, expected):
    assert parse_params(spec) == expected


@pytest.mark.parametrize("spec", ["x", "", [], "q x", "qz", ["q", "w"], "p", 3, None])
def test_parse_params_rejects(spec):
    with pytest.raises(LoRAError) as e:
        parse_params(spec)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("bad", [
    {"r": 0}, {"r": 1.5}, {"r": True}, {"alpha": 0}, {"alpha": "1"}, {"dropout_rate": 1.0},
    {"dropout_rate": -0.1}, {"position": "middle"}, {"encoder": "audio"}, {"scaling": "rs"},
    {"params": "q w"},
])
def test_settings_reject_bad_values(bad):
    with pytest.raises(LoRAError) as e:
        LoRASettings(**bad)
    assert "\n" not in str(e.value)
    with pytest.raises(LoRAError):
        apply_lora(copy.deepcopy(timm_vit()), **bad)


def test_scaling_options():
    assert LoRASettings(r=4, alpha=2).scale == pytest.approx(1.0)
    assert LoRASettings(r=4, alpha=2, scaling="standard").scale == pytest.approx(0.5)
    model = copy.deepcopy(timm_vit())
    layers = apply_lora(model, "q", r=4, alpha=2, scaling="standard")
    assert all(layer.scale == pytest.approx(0.5) for layer in layers)


def test_positions_match_the_paper_for_12_and_24_blocks():
    paper12 = {"top": [11], "top3": [9, 10, 11], "bottom": [0, 1, 2, 3], "mid": [4, 5, 6, 7],
               "up": [8, 9, 10, 11], "half-up": [6, 7, 8, 9, 10, 11], "half-bottom": [0, 1, 2, 3, 4, 5],
               "all": list(range(12))}
    for position, blocks in paper12.items():
        assert block_indices(12, position) == blocks
    assert block_indices(24, "bottom") == list(range(8))
    assert block_indices(24, "mid") == list(range(8, 16))
    assert block_indices(24, "up") == list(range(16, 24))
    assert block_indices(24, "half-up") == list(range(12, 24))
    assert block_indices(24, "top3") == [21, 22, 23]


def test_missing_tower_letters_and_blocks_raise():
    with pytest.raises(LoRAError, match="no text tower"):
        apply_lora(copy.deepcopy(timm_vit()), "q v", encoder="text")
    with pytest.raises(LoRAError, match="offers: pw"):
        apply_lora(copy.deepcopy(efficientnet()), "q v")
    with pytest.raises(LoRAError, match="offers: q k v o"):
        apply_lora(copy.deepcopy(timm_vit()), "pw")
    model = copy.deepcopy(timm_vit())
    apply_lora(model, "q")
    with pytest.raises(LoRAError, match="already has LoRA"):
        apply_lora(model, "v")


class ConvAndText(nn.Module):
    """open_clip-like towers: a small convolutional ``visual`` and an nn.MultiheadAttention ``transformer``."""

    def __init__(self) -> None:
        from open_clip.transformer import Transformer

        super().__init__()
        self.visual = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 1))
        self.transformer = Transformer(width=32, layers=2, heads=4)


def test_nothing_changes_when_apply_fails():
    model = ConvAndText()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(LoRAError, match="text tower .* no 1x1"):  # the vision tower alone would be fine
        apply_lora(model, "pw", encoder="both")
    assert not lora_layers(model)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert len(apply_lora(model, "pw", encoder="vision")) == 2


def test_every_position_selects_a_block_at_any_depth():
    for n in range(1, 40):
        for position in ("bottom", "mid", "up", "half-up", "half-bottom", "all", "top", "top3"):
            blocks = block_indices(n, position)
            assert blocks and blocks == sorted(set(blocks)) and 0 <= blocks[0] and blocks[-1] < n
        assert block_indices(n, "bottom")[0] == 0 and block_indices(n, "up")[-1] == n - 1
        assert len(block_indices(n, "bottom")) == len(block_indices(n, "up"))


def test_unsupported_attention_is_named():
    from open_clip.transformer import Transformer

    tower = Transformer(width=32, layers=2, heads=4, block_type="custom")
    with pytest.raises(LoRAError, match="unsupported attention modules: Attention"):
        apply_lora(tower, "q")


# --- the nn.MultiheadAttention drop-in ---------------------------------------------------------------

def _pair(batch_first: bool, letters=("q", "v", "o"), dropout: float = 0.0):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=batch_first, dropout=dropout).eval()
    ours = LoRAMultiheadAttention(copy.deepcopy(mha), letters, r=2, scale=1.0, dropout_rate=0.0).eval()
    return mha, ours


def _inputs(batch_first: bool, n=3, length=5, source=7):
    def t(L):
        x = torch.randn(n, L, 32) if batch_first else torch.randn(L, n, 32)
        return x.requires_grad_(True)
    return t(length), t(source)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("call", ["self", "self_weights", "self_head_weights", "causal_float", "mask_bool",
                                  "mask_3d", "padding", "cross", "cross_qkv", "unbatched"])
def test_mha_drop_in_matches_torch(batch_first, call):
    mha, ours = _pair(batch_first)
    x, y = _inputs(batch_first)
    n, L, _S = 3, 5, 7
    kw: dict = {"need_weights": False}
    args = (x, x, x)
    if call == "self_weights":
        kw = {"need_weights": True}
    elif call == "self_head_weights":
        kw = {"need_weights": True, "average_attn_weights": False}
    elif call == "causal_float":
        kw["attn_mask"] = torch.full((L, L), float("-inf")).triu(1)
    elif call == "mask_bool":
        kw["attn_mask"] = torch.rand(L, L) > 0.7
        kw["attn_mask"].fill_diagonal_(False)
    elif call == "mask_3d":
        kw["attn_mask"] = torch.randn(n * 4, L, L)
    elif call == "padding":
        kw["key_padding_mask"] = torch.tensor([[False] * (L - 1) + [True]] * n)
    elif call == "cross":
        args = (x, y, y)
    elif call == "cross_qkv":
        args = (x, y, y.detach().clone().requires_grad_(True))
    elif call == "unbatched":
        x1 = (x[0] if batch_first else x[:, 0]).detach().requires_grad_(True)
        args = (x1, x1, x1)
    want, want_w = mha(*args, **kw)
    got, got_w = ours(*args, **kw)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if kw["need_weights"]:
        torch.testing.assert_close(got_w, want_w, atol=1e-6, rtol=1e-5)
    else:
        assert got_w is None and want_w is None
    g = torch.randn_like(want)
    grads_want = torch.autograd.grad(want, args[0], g)[0]
    grads_got = torch.autograd.grad(got, args[0], g)[0]
    torch.testing.assert_close(grads_got, grads_want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch_first", [True, False])
def test_mha_adapted_equals_merged(batch_first):
    _, ours = _pair(batch_first, letters=("q", "k", "v", "o"))
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_B" in name:
                p.normal_()
    x, y = _inputs(batch_first)
    mask = torch.full((5, 5), float("-inf")).triu(1)
    adapted = (ours(x, x, x, attn_mask=mask, need_weights=False)[0], ours(x, y, y)[0])
    merged = ours.merged()
    assert type(merged) is nn.MultiheadAttention
    torch.testing.assert_close(merged(x, x, x, attn_mask=mask, need_weights=False)[0], adapted[0],
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged(x, y, y)[0], adapted[1], atol=1e-5, rtol=1e-5)


def test_mha_dropout_on_attention_follows_training_mode():
    _, ours = _pair(True, dropout=0.5)
    x, _ = _inputs(True)
    ours.train()
    a, b = ours(x, x, x, need_weights=False)[0], ours(x, x, x, need_weights=False)[0]
    assert not torch.allclose(a, b)
    ours.eval()
    torch.testing.assert_close(ours(x, x, x)[0], ours(x, x, x)[0])


# --- dropout, speed rules ------------------------------------------------------------------------------

def test_lora_dropout_is_unbiased_and_off_in_eval():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 8), "q", r=2, scale=1.0, dropout_rate=0.5)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(1, 16).expand(20000, 16)
    base = nn.functional.linear(x[:1], layer.weight, layer.bias)
    layer.eval()
    exact = layer(x[:1]) - base
    layer.train()
    with torch.no_grad():
        noisy = layer(x) - base
    assert noisy.std(dim=0).min() > 1e-3  # dropout is active in training
    torch.testing.assert_close(noisy.mean(dim=0, keepdim=True), exact, atol=0.05 * exact.abs().max().item(), rtol=0)
    # about half of the 16 inputs survive in each row: the update differs between rows
    assert len({round(v, 5) for v in noisy[:50, 0].tolist()}) > 10


def _matmul_shapes(model: nn.Module, x: torch.Tensor) -> tuple[list, list]:
    """Input shapes of every matrix product in a forward + backward, and of the F.linear calls."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        model(x).square().sum().backward()
    products = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::matmul")
    return ([e.input_shapes for e in prof.events() if e.name in products],
            [e.input_shapes for e in prof.events() if e.name == "aten::linear"])


def test_training_never_forms_b_at_a_and_keeps_qkv_fused():
    model = copy.deepcopy(timm_vit())  # width 64, 2 images x 5 tokens = 10 rows
    model.train()
    apply_lora(model, "q v", r=2)
    for p in lora_state_dict(model).values():
        p.data.normal_()
    shapes, linears = _matmul_shapes(model, images())
    weight_rows = {64, 3 * 64}
    for s in shapes:
        dims = [tuple(t) for t in s if len(t) == 2]
        for a, b in itertools.pairwise(dims):
            # B @ A: a (weight rows, rank) by (rank, 64) product; rank is 2, or 4 for q and v stacked
            assert not (a[0] in weight_rows and a[1] == b[0] and a[1] in (2, 4) and b[1] == 64), f"B @ A: {s}"
    # one dense qkv product per block, on the 10 token rows (test_vit's MLP fc1 is also 64 -> 192, on 3-d input)
    assert sum(s[:2] == [[10, 64], [3 * 64, 64]] for s in linears) == 6


def test_q_and_v_share_one_dropout_and_one_a_matmul():
    model = copy.deepcopy(timm_vit())
    model.train()
    apply_lora(model, "q v", r=2)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof, torch.no_grad():
        model(images())
    a_products = [e for e in prof.events() if e.name == "aten::linear" and [4, 64] in e.input_shapes]
    draws = [e for e in prof.events() if e.name == "aten::random_"]
    assert len(draws) == 6  # one dropout mask per block for q and v together
    assert len(a_products) == 6  # A_q and A_v stacked: one (rows, 64) x (64, 2 + 2) product per block


# --- 1x1 convolutions outside the usual layouts ---------------------------------------------------------

def test_strided_pointwise_conv():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1, stride=2), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                          nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(2, 3, 9, 9)
    base = model(x)
    layers = apply_lora(model, "pw", r=2)
    assert len(layers) == 2  # the depthwise 3x3 is left alone
    torch.testing.assert_close(model(x), base, atol=0, rtol=0)
    for p in lora_state_dict(model).values():
        p.data.normal_()
    adapted = model(x)
    assert (adapted - base).abs().max() > 1e-3
    merged = merge_lora(model)
    assert all(type(m) is nn.Conv2d for m in merged if not isinstance(m, nn.ReLU))
    torch.testing.assert_close(merged(x), adapted, atol=1e-5, rtol=1e-5)


# --- adapter files -----------------------------------------------------------------------------------

def test_adapter_file_errors(tmp_path):
    model = copy.deepcopy(open_clip_model())
    apply_lora(model, "q v", r=2, position="top3")
    settings = {"params": "q v", "r": 2, "alpha": 1, "position": "top3", "encoder": "vision", "model_key": "tiny"}
    with pytest.raises(LoRAError, match="r=2 but the settings say r=4"):
        save_lora(model, tmp_path / "a.safetensors", settings | {"r": 4})
    with pytest.raises(LoRAError, match="params"):
        save_lora(model, tmp_path / "a.safetensors", settings | {"params": "q k v"})
    path = tmp_path / "sub" / "a.safetensors"
    save_lora(model, path, settings)
    assert read_lora_settings(path)["params"] == ["q", "v"]
    assert [p.name for p in path.parent.iterdir()] == ["a.safetensors"]  # no temporary file left behind
    other = copy.deepcopy(open_clip_model())
    apply_lora(other, "q v", r=2, position="all")
    with pytest.raises(LoRAError, match="does not fit this model"):
        load_lora(other, path)
    with pytest.raises(LoRAError, match="position"):
        load_lora(copy.deepcopy(open_clip_model()), path, settings | {"position": "all"})
    with pytest.raises(LoRAError, match="not found"):
        read_lora_settings(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(LoRAError, match="not a readable"):
        read_lora_settings(junk)


def test_load_into_plain_model_injects_with_saved_settings(tmp_path):
    model = copy.deepcopy(open_clip_model())
    apply_lora(model, "k o", r=3, alpha=2, position="bottom", scaling="standard")
    for p in lora_state_dict(model).values():
        p.data.normal_()
    x = images()
    with torch.no_grad():
        want = model.encode_image(x)
    save_lora(model, tmp_path / "a.safetensors", {"params": "k o", "r": 3, "alpha": 2, "position": "bottom",
                                                       "scaling": "standard"})
    plain = copy.deepcopy(open_clip_model())
    saved = load_lora(plain, tmp_path / "a.safetensors", {"r": 3, "dropout_rate": 0.9})  # dropout is not compared
    assert saved["scaling"] == "standard"
    assert all(layer.scale == pytest.approx(2 / 3) for _, layer in lora_layers(plain))
    with torch.no_grad():
        torch.testing.assert_close(plain.encode_image(x), want, atol=0, rtol=0)


def test_merge_without_lora_is_a_no_op():
    model = copy.deepcopy(timm_vit())
    before = copy.deepcopy(model.state_dict())
    assert merge_lora(model) is model
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert math.isfinite(LoRASettings().scale)


# --- pointwise convolutions: the fused channel-matmul path -------------------------------------------------

def _pointwise_run(conv: nn.Conv2d, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, fast: bool, seed: int,
                   rate: float):
    """Output and gradients of ``pointwise_lora`` on the fused path or on the convolution fallback."""
    import lora.lowrank as lowrank

    x, a, b = (t.detach().clone().requires_grad_(True) for t in (x, a, b))
    params = [p for p in conv.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    original = lowrank._fast_path
    try:
        lowrank._fast_path = original if fast else (lambda conv, x: False)
        assert lowrank._fast_path(conv, x) == fast
        torch.manual_seed(seed)
        out = lowrank.pointwise_lora(conv, x, conv.weight, conv.bias, a, b, 0.7, rate)
    finally:
        lowrank._fast_path = original
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    out.backward(grad)
    return [out, x.grad, a.grad, b.grad] + [p.grad for p in params]


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("rate", [0.0, 0.25, 0.1])
@pytest.mark.parametrize("train_base", [False, True])
@pytest.mark.parametrize(("c_in", "c_out"), [(6, 5), (3, 9)])  # the update added after, or inside, the matmul
def test_fused_pointwise_path_equals_the_convolution_path(channels_last, rate, train_base, c_in, c_out):
    torch.manual_seed(0)
    conv = nn.Conv2d(c_in, c_out, 1, bias=True).requires_grad_(train_base)
    x = torch.randn(3, c_in, 4, 7)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    a, b = torch.randn(2, c_in), torch.randn(c_out, 2)
    fused = _pointwise_run(conv, x, a, b, fast=True, seed=3, rate=rate)
    plain = _pointwise_run(conv, x, a, b, fast=False, seed=3, rate=rate)  # the same mask from the same seed
    assert len(fused) == (6 if train_base else 4)
    for got, want in zip(fused, plain, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if channels_last:
        assert fused[0].is_contiguous(memory_format=torch.channels_last)


def test_pointwise_path_under_autocast_runs_in_the_convolution_precision():
    torch.manual_seed(0)
    layer = apply_lora(nn.Sequential(nn.Conv2d(8, 8, 1)), "pw", r=2)[0]
    layer.train()
    for p in lora_state_dict(layer).values():
        p.data.normal_()
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert x.grad.dtype == torch.float32 and layer.lora_A.grad.dtype == torch.float32


@pytest.mark.parametrize(("layer", "bytes_per_entry"), [("linear", 3), ("strided_conv", 5)])
def test_under_autocast_the_adapter_saves_bf16_activations_and_one_byte_of_mask(layer, bytes_per_entry):
    """The float32 input is cast once, before dropout, and backward keeps the mask's random lanes: per
    input entry, the dropped input in bf16 (2 bytes) and one byte of lanes, plus, for a convolution, the
    input it saves itself (2 bytes). A float32 copy or a float mask would add 2 to 4 bytes."""
    from lora.lowrank import low_rank_linear, pointwise_lora

    torch.manual_seed(0)
    a, b = torch.randn(2, 16, requires_grad=True), torch.randn(24, 2, requires_grad=True)
    if layer == "linear":
        x = torch.randn(3, 5, 16, requires_grad=True)
        run = lambda: low_rank_linear(x, torch.randn(24, 16), None, a, b.t().contiguous(), 0.5, 0.25)  # noqa: E731
    else:  # a strided 1x1 convolution: the convolution path that GPUs and compiled code also take
        conv = nn.Conv2d(16, 24, 1, stride=2).requires_grad_(False)
        x = torch.randn(2, 16, 6, 6, requires_grad=True)
        run = lambda: pointwise_lora(conv, x, conv.weight, conv.bias, a, b, 0.5, 0.25)  # noqa: E731
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = run()
    activations = [t for t in saved if t.numel() == x.numel()]  # the input, the dropped input, the lanes
    assert {t.dtype for t in activations} == {torch.bfloat16, torch.int8}
    assert sum(t.element_size() for t in activations) == bytes_per_entry
    out.float().sum().backward()
    assert x.grad.dtype == torch.float32 and a.grad is not None and b.grad is not None


@pytest.mark.parametrize("rate", [0.25, 0.1])
def test_dropping_keeps_the_lanes_and_matches_the_mask_it_was_drawn_with(rate):
    from lora.lowrank import dropped, keep_mask

    x = torch.randn(6, 40, requires_grad=True)
    torch.manual_seed(3)
    mask, keep = keep_mask(x, rate)
    torch.manual_seed(3)
    out, keep_again = dropped(x, rate)
    assert keep_again == keep and torch.equal(out, x * mask)  # the same draw as keep_mask
    grad = torch.randn(out.shape)
    out.backward(grad)
    assert torch.equal(x.grad, grad * mask)


@pytest.mark.parametrize(("rate", "lane_bits"), [(0.25, 8), (0.5, 8), (0.1, 16), (0.3, 16)])
def test_dropout_masks_keep_the_drawn_probability(rate, lane_bits):
    from lora.lowrank import keep_mask, keep_probability

    torch.manual_seed(0)
    x = torch.randn(400, 1000)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        mask, keep = keep_mask(x, rate)
    assert keep == keep_probability(rate) and abs(keep - (1 - rate)) <= 2 ** -17
    assert mask.dtype == x.dtype and set(mask.unique().tolist()) == {0.0, 1.0}
    assert abs(mask.mean().item() - keep) < 4 * math.sqrt(keep * (1 - keep) / x.numel())
    words = [e.input_shapes[0][0] for e in prof.events() if e.name == "aten::random_"]
    assert words == [x.numel() * lane_bits // 64]  # one 64-bit draw per 8 (or 4) decisions


# --- switching adapters off, the benchmark ------------------------------------------------------------------

def test_lora_disabled_restores_the_original_computation_and_nests():
    model = copy.deepcopy(timm_vit())
    x = images()
    with torch.no_grad():
        want = model(x)
        apply_lora(model, "q v o", r=2)
        for p in lora_state_dict(model).values():
            p.normal_()
        adapted = model(x)
        with lora_disabled(model):
            torch.testing.assert_close(model(x), want, atol=0, rtol=0)
            with lora_disabled(model):
                pass
            torch.testing.assert_close(model(x), want, atol=0, rtol=0)
        torch.testing.assert_close(model(x), adapted, atol=0, rtol=0)


def test_benchmark_runs_every_variant_on_a_tiny_convolutional_model(capsys):
    import importlib.util

    from tests.conftest import REPO

    spec = importlib.util.spec_from_file_location("lora_step", REPO / "benchmarks" / "lora_step.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    argv = ["--model", "test_efficientnet", "--params", "pw", "--batch", "2", "--steps", "1", "--warmup", "0",
            "--variants", "floor", "floor-ours", "ours", "dora", "peft", "peft-dora"]
    assert bench.main(argv) == 0
    table = capsys.readouterr().out
    for variant in ("floor", "floor-ours", "ours", "dora", "peft", "peft-dora"):
        assert f"\n{variant} " in table
    assert bench.main(["--model", "test_efficientnet", "--params", "q", "--variants", "ours"]) == 2
    assert bench._without_option(["--a", "1", "--variants", "x", "y", "--b"], "--variants") == ["--a", "1", "--b"]
