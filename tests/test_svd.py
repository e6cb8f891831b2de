"""Singular-value tuning over every attention kind LoRA supports: exact at initialisation, only singular
values train, the update is U diag(delta) V^T of each adapted block, merge equals unmerged, save/load."""

import pytest
import torch
from torch.nn.utils import parametrize

from lora import LoRAError, apply_svd, load_svd, merge_svd, save_svd, svd_layers, svd_state_dict
from tests.test_lora_cases import CASES

PICKED = [c for c in CASES if c.name in {"open_clip-vision-qv-all", "open_clip-both-ko-top3", "timm-qv-all",
                                         "timm-qkvo-top", "hf_vit-qkvo-mid", "hf_clip-both-qv-all", "bert-qkvo-all",
                                         "efficientnet-pw-top", "mobilevit-pw+qv-top3"}]


def _adapted(case):
    model = case.fresh().eval()
    before = case.output(model)
    apply_svd(model, params=case.params, position=case.position, encoder=case.encoder)
    return model, before


def _perturb(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in svd_state_dict(model).values():
            p.copy_(0.05 * torch.randn(p.shape, generator=g) * p.new_ones(p.shape))


@pytest.mark.parametrize("case", PICKED, ids=lambda c: c.name)
def test_svd_is_exact_at_start_trains_only_singular_values_and_merges(case, tmp_path):
    model, before = _adapted(case)
    assert torch.allclose(case.output(model), before, atol=1e-5)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".svd_delta_" in n for n in trainable)
    letters = {letter for _, p in svd_layers(model) for letter, _, _ in p.blocks}
    assert letters == set(case.params)
    case.output(model, grad=True).float().pow(2).mean().backward()
    assert all(p.grad is not None for p in svd_state_dict(model).values())
    _perturb(model)
    changed = case.output(model)
    assert not torch.allclose(changed, before, atol=1e-4)
    # save, reload into a fresh model, then merge into plain weights: the same outputs
    save_svd(model, tmp_path / "svd.safetensors", {"params": list(case.params), "position": case.position,
                                                  "encoder": case.encoder})
    again = load_svd(case.fresh().eval(), tmp_path / "svd.safetensors")
    assert torch.allclose(case.output(again), changed, atol=1e-5)
    merged = merge_svd(again)
    assert not any(parametrize.is_parametrized(m) for m in merged.modules())
    assert torch.allclose(case.output(merged), changed, atol=1e-5)


def test_the_update_is_u_diag_delta_vt_of_each_fused_block_and_singular_values_shift(float64):
    (case,) = [c for c in CASES if c.name == "timm-qv-all"]
    model = case.fresh().double()
    plain = model.blocks[0].attn.qkv.weight.detach().clone()
    apply_svd(model, params=("q", "v"))
    layer = model.blocks[0].attn.qkv
    (delta,) = layer.parametrizations.weight
    rows = plain.shape[0] // 3
    with torch.no_grad():
        delta.svd_delta_q.fill_(0.1)
        delta.svd_delta_v[0] = -0.2
    w = layer.weight
    assert torch.allclose(w[rows:2 * rows], plain[rows:2 * rows])  # k untouched
    s_q = torch.linalg.svdvals(plain[:rows])
    assert torch.allclose(torch.linalg.svdvals(w[:rows]), s_q + 0.1, atol=1e-10)
    assert torch.allclose(delta.singular_values("q"), s_q + 0.1)
    s_v = torch.linalg.svdvals(plain[2 * rows:])
    shifted = s_v.clone()
    shifted[0] -= 0.2
    assert torch.allclose(torch.linalg.svdvals(w[2 * rows:]), shifted.sort(descending=True).values, atol=1e-10)


def test_svd_refuses_what_lora_refuses_and_a_second_injection():
    (case,) = [c for c in CASES if c.name == "efficientnet-pw-top"]
    with pytest.raises(LoRAError, match="has no attention blocks"):
        apply_svd(case.fresh(), params=("q", "v"))
    model = case.fresh()
    apply_svd(model, params=("pw",), position="top")
    with pytest.raises(LoRAError, match="already has singular-value layers"):
        apply_svd(model, params=("pw",))


def test_svd_method_runs_end_to_end_and_reloads(folder_root, tmp_path):
    import json

    import main_lora

    args = ["--method", "svd", "--params", "q", "v", "--root_path", str(folder_root), "--dataset", "folder",
            "--shots", "2", "--n_iters", "1", "--warmup_steps", "2", "--output_dir", str(tmp_path),
            "--model_name", "tiny_clip", "--device", "cpu", "--num_workers", "0", "--batch_size", "8"]
    assert main_lora.main(args) == 0
    (found,) = tmp_path.rglob("results.json")
    r = json.loads(found.read_text())
    assert (found.parent / "svd.safetensors").is_file() and r["trainable_params"] > 0
    assert main_lora.main([*args, "--eval_only", "--run", str(found.parent)]) == 0
    again = json.loads((found.parent / "eval_results.json").read_text())
    assert again["metrics"]["test"]["balanced_accuracy"] == r["metrics"]["test"]["balanced_accuracy"]
