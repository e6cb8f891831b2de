"""Our LoRA equals Hugging Face peft (rsLoRA scaling) on Hugging Face q/k/v/o Linears, given the same A and B."""

from __future__ import annotations

import copy

import pytest
import torch

from lora import apply_lora, lora_state_dict
from tests.test_lora_cases import hf_bert, hf_clip, hf_vit, run_bert, run_hf_clip, run_image_model

peft = pytest.importorskip("peft")

CASES = [
    ("hf_vit", hf_vit, run_image_model, "vision", ("q", "v"), ["q_proj", "v_proj"]),
    ("hf_clip", hf_clip, run_hf_clip, "both", ("q", "k", "v", "o"), ["q_proj", "k_proj", "v_proj", "out_proj"]),
    ("bert", hf_bert, run_bert, "vision", ("q", "v", "o"), ["query", "value", "output.dense"]),
]


@pytest.mark.parametrize(("name", "build", "run", "encoder", "params", "targets"), CASES, ids=[c[0] for c in CASES])
def test_outputs_equal_peft_with_same_a_and_b(name, build, run, encoder, params, targets):
    r, alpha = 4, 2.0
    ours = copy.deepcopy(build())
    apply_lora(ours, params, r=r, alpha=alpha, dropout_rate=0.0, encoder=encoder, scaling="sqrt")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in lora_state_dict(ours).values():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    if name == "bert":  # 'output.dense' would also match the MLP's output; peft gets the attention's only
        targets = [t for t in targets if t != "output.dense"] + [r"encoder\.layer\.\d+\.attention\.output\.dense"]
        targets = r"(.*\.(query|value))|(" + targets[-1] + ")"
    config = peft.LoraConfig(r=r, lora_alpha=alpha, use_rslora=True, lora_dropout=0.0, target_modules=targets)
    theirs = peft.get_peft_model(copy.deepcopy(build()), config)
    copied = 0
    with torch.no_grad():
        for key, p in lora_state_dict(ours).items():
            owner, _, pname = key.rpartition(".")
            target = f"base_model.model.{owner}.{pname}.default.weight"
            theirs.get_parameter(target).copy_(p)
            copied += 1
    n_peft = sum(1 for n, _ in theirs.named_parameters() if "lora_" in n)
    assert copied == n_peft, "peft and our LoRA adapt different layers"
    with torch.no_grad():
        expected = run(theirs.base_model.model, encoder)
        got = run(ours, encoder)
        untouched = run(build(), encoder)
    assert (got - untouched).abs().max() > 1e-3
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
