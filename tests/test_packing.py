"""Packed runs compute what the same runs compute alone: per layer, end to end, and across an interruption."""

import csv
import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import engine.packing as packing
from engine.config import run_dir
from engine.packing import pack_key, run_packed
from engine.run import run
from engine.trainer import TrainingInterrupted
from lora.layers import LoRAConv2d, LoRAFusedLinear, LoRALinear, LoRAMultiheadAttention
from lora.packed import Pack, RandomStream, pack_problem, packed_forward
from utils.cli import parse_config

COUNTS = [2, 3, 1]  # samples of each run in the packed batch


class _Call(nn.Module):
    """A LoRA layer called as its model calls it (attention: self-attention without weights)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        if isinstance(self.layer, LoRAMultiheadAttention):
            return self.layer(x, x, x, need_weights=False)[0]
        return self.layer(x)


LAYERS = {  # (frozen base, its LoRA layer, input shape of one sample)
    "linear": (lambda: nn.Linear(8, 6), lambda b, d: LoRALinear(b, "o", 2, 0.7, 0.25, d), (5, 8)),
    "fused_qkv": (lambda: nn.Linear(8, 24), lambda b, d: LoRAFusedLinear(b, ("q", "v"), 2, 0.7, 0.25, d), (5, 8)),
    "attention": (lambda: nn.MultiheadAttention(8, 2, batch_first=True),
                  lambda b, d: LoRAMultiheadAttention(b, ("q", "v", "o"), 2, 0.7, 0.25, d), (5, 8)),
    "pointwise": (lambda: nn.Conv2d(6, 10, 1), lambda b, d: LoRAConv2d(b, 2, 0.7, 0.25, d), (6, 4, 4)),
}


def _runs(kind: str, dora: bool) -> list[nn.Module]:
    """One adapted layer per run: the same frozen base values, each run's own non-zero adapters."""
    base, adapted, _ = LAYERS[kind]
    runs = []
    for i in range(len(COUNTS)):
        torch.manual_seed(0)
        layer = adapted(base().requires_grad_(False), dora)
        with torch.no_grad():
            for name, p in layer.named_parameters():
                if p.requires_grad and "magnitude" not in name:
                    p.normal_(std=0.3, generator=torch.Generator().manual_seed(10 + i))
        runs.append(_Call(layer).train())
    return runs


def _signed_sum(out: torch.Tensor) -> torch.Tensor:
    return (out * out.detach().sign()).sum()


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("kind", list(LAYERS))
def test_a_packed_layer_equals_each_run_alone(kind, dora):
    runs = _runs(kind, dora)
    xs = [torch.randn(n, *LAYERS[kind][2], generator=torch.Generator().manual_seed(n)) for n in COUNTS]
    alone = []
    for i, (module, x) in enumerate(zip(runs, xs, strict=True)):
        torch.manual_seed(100 + i)  # the run's dropout stream, seeded as the trainer seeds it
        x = x.clone().requires_grad_()
        out = module(x)
        _signed_sum(out).backward()
        alone.append((out.detach(), [p.grad.clone() for p in module.parameters() if p.requires_grad], x.grad))
        module.zero_grad(set_to_none=True)
    streams = [RandomStream(torch.device("cpu")) for _ in runs]
    for i, stream in enumerate(streams):
        stream.seed(100 + i)
    x = torch.cat(xs).requires_grad_()
    with packed_forward(runs, Pack(streams, COUNTS)) as host:
        out = host(x)
    _signed_sum(out).backward()
    for (out_a, grads_a, x_grad_a), out_p, x_grad_p, module in zip(alone, out.split(COUNTS), x.grad.split(COUNTS),
                                                                  runs, strict=True):
        assert torch.equal(out_a, out_p.detach())
        assert torch.equal(x_grad_a, x_grad_p)
        grads_p = [p.grad for p in module.parameters() if p.requires_grad]
        assert len(grads_p) == len(grads_a) and all(torch.equal(a, b) for a, b in zip(grads_a, grads_p, strict=True))
    assert not any("forward" in vars(m) or "project" in vars(m) for r in runs for m in r.modules())  # restored


def test_randomness_outside_the_adapters_is_not_packable():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1), nn.Linear(4, 2)).requires_grad_(False)
    model[2].requires_grad_(True)
    assert "draws random numbers" in pack_problem(model)
    model[1].p = 0.0
    assert pack_problem(model) is None
    model[0].bias.requires_grad_(True)  # a trainable bias beside a frozen weight
    assert "beside frozen ones" in pack_problem(model)


def _config(root, out, method="lora", model="tiny_vit", seed=1, lr=1e-3, shots=2, *extra):
    params = {"tiny_vit": "q v", "tiny_clip": "q v o"}.get(model, "q v")
    return parse_config(["--method", method, "--dataset", "folder", "--root_path", str(root), "--model_name", model,
                         "--shots", str(shots), "--seed", str(seed), "--lr", str(lr), "--n_iters", "2",
                         "--warmup_steps", "1", "--batch_size", "4", "--device", "cpu", "--precision", "fp32",
                         "--output_dir", str(out), "--num_workers", "0", "--params", params,
                         "--dropout_rate", "0.25", *extra], notify=False)


# different seeds, learning rates and shots (so different step counts: 5 and 7 steps)
RUNS = [(1, 1e-3, 2), (2, 5e-3, 3), (3, 2e-3, 2)]
CASES = {"lora-tiny_vit": ("lora", "tiny_vit", RUNS), "dora-tiny_clip": ("dora", "tiny_clip", RUNS[:2])}


def _read(config) -> tuple[dict, list[list[str]], dict]:
    folder = run_dir(config)
    with open(folder / "predictions.csv", newline="") as f:
        rows = list(csv.reader(f))
    return (json.loads((folder / "results.json").read_text()), rows,
            load_file(str(folder / "weights.safetensors")))


def _alone(case: str, root, out) -> list:
    """The case's runs, each trained alone by engine.run.run."""
    method, model, runs = CASES[case]
    configs = [_config(root, out, method, model, *r) for r in runs]
    for config in configs:
        assert run(config) == 0
    return [_read(c) for c in configs]


@pytest.fixture(scope="module")
def alone_vit(folder_root, tmp_path_factory):
    return _alone("lora-tiny_vit", folder_root, tmp_path_factory.mktemp("alone-vit"))


@pytest.fixture(scope="module")
def alone_clip(folder_root, tmp_path_factory):
    return _alone("dora-tiny_clip", folder_root, tmp_path_factory.mktemp("alone-clip"))


def _assert_same(alone, packed, runs: int, resumed: bool = False) -> float:
    """Same predicted labels, probabilities and metrics within 1e-6; returns the largest weight difference."""
    largest = 0.0
    for (res_a, rows_a, w_a), (res_p, rows_p, w_p) in zip(alone, packed, strict=True):
        assert res_p["packed"] == {"runs": runs} and "packed" not in res_a
        assert res_p["budget"]["steps"] == res_a["budget"]["steps"]
        if not resumed:
            assert res_p["timing"]["train_steps"] == res_a["timing"]["train_steps"]
        assert rows_a[0] == rows_p[0] and len(rows_a) == len(rows_p)
        for row_a, row_p in zip(rows_a[1:], rows_p[1:], strict=True):
            for a, p in zip(row_a, row_p, strict=True):
                try:
                    assert abs(float(a) - float(p)) <= 1e-6 + 1e-12
                except ValueError:  # labels, paths
                    assert a == p
        for part in ("val", "test"):
            for key, value in res_a["metrics"][part].items():
                if isinstance(value, float):
                    assert res_p["metrics"][part][key] == pytest.approx(value, abs=1e-6), (part, key)
        assert w_a.keys() == w_p.keys()
        largest = max(largest, *((w_a[k] - w_p[k]).abs().max().item() for k in w_a))
    return largest


@pytest.mark.parametrize("case", list(CASES))
def test_packed_runs_equal_the_same_runs_alone(case, request, folder_root, tmp_path):
    alone = request.getfixturevalue({"lora-tiny_vit": "alone_vit", "dora-tiny_clip": "alone_clip"}[case])
    method, model, runs = CASES[case]
    configs = [_config(folder_root, tmp_path, method, model, *r) for r in runs]
    assert len({pack_key(c) for c in configs}) == 1
    assert run_packed(configs) == [0] * len(configs)
    largest = _assert_same(alone, [_read(c) for c in configs], len(configs))
    # tiny_vit: bit for bit. tiny_clip: open_clip's visual projection (`pooled @ proj`, a plain matmul) rounds
    # rows differently when the batch has more rows (last bits, up to about 6e-7 on the trained weights)
    assert largest == 0.0 if model == "tiny_vit" else largest < 1e-5


def _killing(stage_batches, at_step: int):
    """stage_batches whose streams send this process a SIGTERM when step `at_step`'s batch is drawn."""

    def wrapped(ctx, stage):
        batches, prepare = stage_batches(ctx, stage)

        def gen(start):
            for step, item in enumerate(batches(start), start=start):
                if step == at_step:
                    os.kill(os.getpid(), signal.SIGTERM)
                yield item

        return gen, prepare

    return wrapped


def test_an_interrupted_pack_resumes_every_run_exactly(alone_vit, folder_root, tmp_path, monkeypatch):
    alone = alone_vit
    configs = [_config(folder_root, tmp_path, "lora", "tiny_vit", *r) for r in RUNS]
    monkeypatch.setattr(packing, "stage_batches", _killing(packing.stage_batches, 3))
    with pytest.raises(TrainingInterrupted) as caught:
        run_packed(configs)
    assert caught.value.step == 4 and caught.value.signum == signal.SIGTERM
    assert all((run_dir(c) / "checkpoint.pt").is_file() and not (run_dir(c) / "results.json").exists()
               for c in configs)
    monkeypatch.undo()
    assert run_packed(configs) == [0, 0, 0]
    packed = [_read(c) for c in configs]
    assert all(r["timing"]["resumed_from_step"] == 4 for r, _, _ in packed)
    assert _assert_same(alone, packed, 3, resumed=True) == 0.0


def test_pack_keys_and_runs_that_stay_alone(folder_root, tmp_path):
    base = _config(folder_root, tmp_path)
    assert pack_key(base) == pack_key(_config(folder_root, tmp_path, "lora", "tiny_vit", 7, 1e-2, 4))
    assert pack_key(base) != pack_key(_config(folder_root, tmp_path, "dora"))
    assert pack_key(base) != pack_key(_config(folder_root, tmp_path, "lora", "tiny_clip"))
    assert pack_key(_config(folder_root, tmp_path, "lora", "tiny_vit", 1, 1e-3, 2, "--compile", "True")) is None
    linear = parse_config(["--method", "linear", "--dataset", "folder", "--root_path", str(folder_root),
                           "--model_name", "tiny_vit", "--shots", "2", "--n_iters", "1", "--device", "cpu",
                           "--output_dir", str(tmp_path), "--num_workers", "0"], notify=False)
    assert pack_key(linear) is None  # the method's registry entry does not say packable
    codes = run_packed([linear, _config(folder_root, tmp_path)])  # two keys: each alone
    assert codes == [0, 0]
    assert all("packed" not in json.loads((run_dir(c) / "results.json").read_text())
               for c in (linear, _config(folder_root, tmp_path)))
