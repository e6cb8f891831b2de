"""The step loop at device speed: feature stages indexed on the device give the batches and weights of the
host-side loop they replace, a padded (compiled) step computes what the unpadded one computes, one graph serves
an epoch with a partial batch, and the losses are read every log_every steps (a NaN still stops the run)."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from engine import batches as eb
from engine import distributed as dist
from engine.context import RunContext, load_data
from engine.tracking import Tracker
from engine.trainer import Trainer, TrainingDiverged, TrainSettings, batch_indices, batch_slices
from methods import get_method, method_names
from utils.cli import parse_config


# -- the feature loop: the same batches and weights as the host-side loop it replaces ----------------------
def host_feature_batches(ctx, stage):
    """The feature stream before device-resident batches: Python index lists and rows gathered on the host."""
    c = ctx.config
    x, y = ctx.features("train")
    if stage.targets is not None:
        y = torch.as_tensor(stage.targets)

    def gen(start):
        for idx in batch_indices(len(y), c.batch_size, c.seed, start, c.drop_last):
            shard = dist.shard_batch(idx)
            ids = torch.as_tensor(shard.indices)
            yield x[ids], y[ids], shard

    return gen, lambda x, seeds: x


@functools.cache
def _context_parts():
    from models import load_model

    config = parse_config(["--dataset", "demo", "--model_name", "tiny_clip", "--shots", "10", "--batch_size", "16",
                           "--n_iters", "3", "--warmup_steps", "4", "--device", "cpu", "--checkpoint_every", "0"],
                          "linear")
    return config, load_data(config), load_model("tiny_clip")


def _context(tmp_path, method: str, settings: dict) -> RunContext:
    import copy
    import dataclasses

    config, split, spec = _context_parts()
    spec = copy.deepcopy(spec)  # methods on images adapt the model in place
    config = dataclasses.replace(config, method=method, method_settings=settings, lr=1e-2)
    ctx = RunContext(config=config, out=tmp_path, split=split, spec=spec, device=torch.device("cpu"),
                     precision="fp32")
    g = torch.Generator().manual_seed(0)
    for part in ("train", "val", "test"):  # stand-in frozen features (no image is decoded)
        labels = torch.tensor([label for _, label in split.items(part)])
        ctx._features[part] = (torch.randn(len(labels), spec.feature_dim, generator=g), labels)
    return ctx


def _feature_plans() -> list[tuple[str, dict]]:
    """Every registered method that trains on features (from the registry), and the transductive stage."""
    cases = [(name, {}) for name in method_names() if get_method(name).trains]
    return [*cases, ("linear", {"transductive": "proportion", "ti_steps": 5})]


def _train_feature_stages(tmp_path, method: str, settings: dict, stream) -> dict[str, torch.Tensor] | None:
    from engine import training

    ctx = _context(tmp_path, method, settings)
    m = get_method(method)
    try:
        plan = m.build(ctx, m.resolve(settings))
    except Exception as exc:  # a method this context cannot build (e.g. it needs images) is not a feature case
        pytest.skip(f"{method} is not built on stand-in features: {exc}")
    plan.stages = [s for s in plan.stages if s.inputs == "features"]
    if not plan.stages:
        return None
    original = training.stage_batches
    training.stage_batches = stream
    try:
        training.train(ctx, plan, Tracker())
    finally:
        training.stage_batches = original
    return {k: v.detach().clone() for k, v in plan.model.state_dict().items()}


@pytest.mark.parametrize(("method", "settings"), _feature_plans(), ids=lambda v: v if isinstance(v, str) else "")
def test_device_feature_loop_trains_what_the_host_loop_trained(tmp_path, method, settings):
    new = _train_feature_stages(tmp_path / "new", method, settings, eb.stage_batches)
    if new is None:
        pytest.skip(f"{method} has no feature stage")
    old = _train_feature_stages(tmp_path / "old", method, settings, host_feature_batches)
    assert set(new) == set(old)
    for name, value in old.items():
        torch.testing.assert_close(new[name], value, atol=1e-6, rtol=0, msg=name)


def test_device_feature_batches_are_the_host_batches(tmp_path):
    from methods.registry import Stage

    ctx = _context(tmp_path, "linear", {})
    stage = Stage("linear", nn.Linear(2, 2), "features", 10, 1e-3)
    new, _ = eb.stage_batches(ctx, stage)
    old, _ = host_feature_batches(ctx, stage)
    for start in (0, 5):  # from the start and resumed in an epoch
        pairs = zip(range(9), new(start), old(start), strict=False)
        for _, (x, y, shard), (x0, y0, shard0) in pairs:
            assert torch.equal(x, x0) and torch.equal(y, y0)
            assert (shard.first, shard.count, shard.total) == (shard0.first, shard0.count, shard0.total)
    slices = [(a, b) for _, (_, a, b) in zip(range(6), batch_slices(40, 16, 1, 0), strict=False)]
    assert slices == [(0, 16), (16, 32), (32, 40)] * 2  # 40 rows in batches of 16: the last one partial


# -- padding: a padded step is the unpadded step ------------------------------------------------------------
def _settings(**kw) -> TrainSettings:
    base = dict(lr=0.05, weight_decay=1e-2, warmup_steps=1, total_steps=6, min_lr=1e-6, seed=1,
                device=torch.device("cpu"), precision="fp32", checkpoint_every=0)
    return TrainSettings(**{**base, **kw})


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.LayerNorm(8), nn.Linear(8, 3))


def test_a_padded_step_has_the_loss_and_gradients_of_the_unpadded_one():
    x, y = torch.randn(5, 6, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 0, 1])
    results = []
    for pad in (None, 8):
        model = _net()
        trainer = Trainer(model, _settings(), None, "fp")
        trainer._pad_rows = pad
        shard = dist.shard_batch(range(5))
        loss = trainer._one_step(model, x, y, shard, lambda t, seeds: t)
        results.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
    (loss, grads), (padded_loss, padded_grads) = results
    assert padded_loss == pytest.approx(loss, abs=1e-7)
    for g, pg in zip(grads, padded_grads, strict=True):
        torch.testing.assert_close(pg, g, atol=1e-7, rtol=1e-6)


def test_compile_pads_the_partial_batch_so_an_epoch_is_one_graph(monkeypatch):
    """Dynamo with its eager backend (no C++ compiler needed): every graph it makes is counted."""
    from torch._dynamo.utils import counters

    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **kw: real(m, **{**kw, "mode": None, "backend": "eager"}))
    x, y = torch.randn(10, 6, generator=torch.Generator().manual_seed(2)), torch.arange(10) % 3

    def batches(start):  # batches of 4, 4 and a partial 2 per epoch
        for idx in batch_indices(10, 4, 1, start):
            ids = torch.as_tensor(idx)
            yield x[ids], y[ids]

    graphs = []
    for full_batch in (4, 0):  # known, or learnt from the first (full) batch
        torch._dynamo.reset()
        before = counters["stats"]["unique_graphs"]
        Trainer(_net(), _settings(compile=True, full_batch=full_batch), None, "fp").fit(batches, lambda t, s: t)
        graphs.append(counters["stats"]["unique_graphs"] - before)
    assert graphs == [1, 1]


# -- losses read every log_every steps ----------------------------------------------------------------------
def test_losses_are_read_every_log_every_steps_and_a_nan_names_its_step():
    x, y = torch.randn(40, 6, generator=torch.Generator().manual_seed(3)), torch.arange(40) % 3
    reads = []
    original = torch.Tensor.tolist

    def counting(t):
        reads.append(t.numel())
        return original(t)

    def batches(start, bad_step=None):
        for step, idx in enumerate(batch_indices(40, 8, 1, start), start=start):
            ids = torch.as_tensor(idx)
            yield x[ids] * (float("nan") if step == bad_step else 1.0), y[ids]

    trainer = Trainer(_net(), _settings(total_steps=25, log_every=10), None, "fp")
    logged = []
    torch.Tensor.tolist = counting
    try:
        stats = trainer.fit(lambda s: batches(s), lambda t, s: t, log=lambda r, step: logged.append(step))
    finally:
        torch.Tensor.tolist = original
    assert logged == [10, 20, 25] and stats.steps == 25
    assert reads.count(10) == 2 and reads.count(5) == 1  # one host read per window of steps
    # a NaN at step 13 (index 12) is found at the read after step 20 and named as step 13
    trainer = Trainer(_net(), _settings(total_steps=25, log_every=10), None, "fp")
    with pytest.raises(TrainingDiverged, match="at step 13: lower the learning rate") as info:
        trainer.fit(lambda s: batches(s, bad_step=12), lambda t, s: t)
    assert trainer.step == 20 and "\n" not in str(info.value)
