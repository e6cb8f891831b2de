"""--method dora: the DoRA variant of the LoRA layers, driven by the engine like every method."""

import json

import pytest
import torch
from safetensors import safe_open

import main_lora
from common.errors import UserError
from methods import get_method
from tests.test_methods import TINY, _grads, tiny_ctx  # noqa: F401  (fixture)


def test_dora_starts_as_the_unadapted_model_and_trains_magnitudes(tiny_ctx):  # noqa: F811
    spec = tiny_ctx.spec
    images = torch.randn(2, 3, spec.input_size, spec.input_size)
    with torch.no_grad():
        before = spec.encode_image(images)
    method = get_method("dora")
    plan = method.build(tiny_ctx, method.resolve({"params": ("q", "v"), "dropout_rate": 0.0}))
    with torch.no_grad():
        assert torch.allclose(spec.encode_image(images), before, atol=1e-5)
    got = _grads(plan.model, spec)
    assert any("magnitude" in n for n in got), sorted(got)
    assert all(("lora" in n or "magnitude" in n or n.startswith("head.")) for n in got), sorted(got)


def test_dora_run_records_the_variant_in_its_adapter(folder_root, tmp_path):
    args = ["--method", "dora", "--root_path", str(folder_root), "--dataset", "folder", "--shots", "2",
            "--n_iters", "1", "--warmup_steps", "1", "--output_dir", str(tmp_path), *TINY]
    assert main_lora.main(args) == 0
    (path,) = tmp_path.rglob("results.json")
    r = json.loads(path.read_text())
    assert r["method"] == "dora" and "/dora-qv-r2-all-vision/" in str(path)
    with safe_open(str(path.parent / "lora.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["settings"])["dora"] is True
    # reloaded with its recorded method it evaluates; forced to plain LoRA its weights are refused
    assert main_lora.main(["--eval_only", "--run", str(path.parent), "--device", "cpu", "--num_workers", "0"]) == 0
    with pytest.raises(UserError, match="method dora"):
        main_lora.main(["--method", "lora", "--eval_only", "--run", str(path.parent), "--overwrite"])
