"""--compile: torch.compile of the training forward computes what eager mode computes, keeps checkpoints
and the run's identity, and a missing compiler toolchain is a one-line error."""

from __future__ import annotations

import copy
import functools
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from common.errors import UserError
from engine.config import fingerprint, run_dir
from engine.trainer import CompileFailed, Trainer, TrainSettings, batch_indices
from utils.cli import parse_config


@functools.cache
def _compiler_problem() -> str | None:
    """Why torch.compile cannot run here (None where it can): one tiny function compiled once."""
    try:
        torch.compile(lambda x: x * 2 + 1)(torch.ones(3))
    except Exception as exc:  # whatever stops the toolchain (no C++ compiler, no Python headers...)
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    return None


def needs_compiler():
    problem = _compiler_problem()
    if problem is not None:
        pytest.skip(f"torch.compile cannot run here (no working compiler toolchain?): {problem}")


# -- the run setting -------------------------------------------------------------------------------------
def test_compile_is_a_runtime_field(folder_root, tmp_path):
    base = ["--method", "lora", "--dataset", "folder", "--root_path", str(folder_root), "--model_name", "tiny_clip",
            "--shots", "4", "--output_dir", str(tmp_path)]
    eager, compiled = parse_config([*base, "--compile", "False"], "lora"), parse_config([*base, "--compile", "True"])
    assert (eager.compile, compiled.compile) == (False, True)
    assert run_dir(compiled) == run_dir(eager) and fingerprint(compiled) == fingerprint(eager)


def test_engine_passes_compile_to_the_trainer(folder_root, tmp_path):
    from engine.training import _train_settings
    from methods.registry import Stage

    config = parse_config(["--dataset", "folder", "--root_path", str(folder_root), "--model_name", "tiny_clip",
                           "--compile", "True", "--output_dir", str(tmp_path)], "lora")
    ctx = SimpleNamespace(device=torch.device("cpu"), precision="fp32", split=SimpleNamespace(train=[("a", 0)] * 40))
    stage = Stage("lora", nn.Linear(2, 2), "images", 3, 1e-3)
    assert _train_settings(config, ctx, stage).compile is True
    assert _train_settings(config, ctx, stage).full_batch == 32  # batches are padded to the full batch's rows
    ctx.split.train = ctx.split.train[:5]
    assert _train_settings(config, ctx, stage).full_batch == 5  # a set smaller than a batch: every batch is full
    config.compile = False
    assert _train_settings(config, ctx, stage).compile is False


# -- compiled training equals eager training ------------------------------------------------------------
X = torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(0))
Y = torch.tensor([0, 1, 2, 0, 1])  # batches of 2: an epoch is 2, 2 and a partial 1


@functools.cache
def _lora_classifier(dropout: float = 0.0) -> nn.Module:
    """The tiny CLIP (64 px, 2 vision blocks) with LoRA on q and v and a linear head.

    Dropout off by default: compiled code draws LoRA's dropout masks inside its kernels, other draws
    than eager mode's, so only dropout-free steps can be compared number for number.
    """
    from lora import apply_lora
    from methods.heads import ImageClassifier
    from models import load_model

    spec = load_model("tiny_clip")
    torch.manual_seed(0)
    apply_lora(spec.model, params=("q", "v"), r=2, alpha=1.0, dropout_rate=dropout)
    model = ImageClassifier(spec, nn.Linear(spec.feature_dim, 3))
    model.head.requires_grad_(True)
    return model


def _batches(start):
    for idx in batch_indices(len(Y), 2, 1, start):
        ids = torch.as_tensor(idx)
        yield X[ids], Y[ids]


def _train(compile: bool, total: int, run_dir=None, resume: bool = False, dropout: float = 0.0
           ) -> tuple[nn.Module, list[float]]:
    """A fresh copy of the model trained to step `total` (from the run's checkpoint with `resume`); the
    loss of every step run."""
    model = copy.deepcopy(_lora_classifier(dropout))
    settings = TrainSettings(lr=1e-2, weight_decay=1e-2, warmup_steps=1, total_steps=total, min_lr=1e-6, seed=1,
                             device=torch.device("cpu"), precision="fp32", checkpoint_every=1, log_every=1,
                             compile=compile)
    trainer = Trainer(model, settings, run_dir, fingerprint="fp")
    if resume:
        assert trainer.try_resume() == 1
    losses: list[float] = []
    trainer.fit(_batches, lambda x, seeds: x, log=lambda record, step: losses.append(record["train/loss"]))
    return model, losses


def _trained(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def test_compiled_lora_steps_equal_eager_ones_and_checkpoints_keep_plain_keys(tmp_path):
    needs_compiler()
    eager, eager_losses = _train(False, 3)
    # two compiled steps (the first one compiles), a checkpoint after the first; a fresh compiled trainer
    # resumes it for steps 2 and 3 (the partial batch: another shape)
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    _, compiled_losses = _train(True, 2, tmp_path)
    assert counters["stats"]["unique_graphs"] > graphs  # the forward did go through torch.compile
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["trainable"]
    assert set(state) == set(_trained(eager)) and not any("_orig_mod" in k for k in state)
    resumed, resumed_losses = _train(True, 3, tmp_path, resume=True)
    assert len(compiled_losses) == 2 and len(resumed_losses) == 2
    torch.testing.assert_close(torch.tensor(compiled_losses + resumed_losses[1:]), torch.tensor(eager_losses),
                               atol=1e-5, rtol=1e-5)
    expected, got = _trained(eager), _trained(resumed)
    assert set(got) == set(expected) and any(".lora_A" in k for k in got)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, atol=1e-5, rtol=1e-4, msg=name)
    assert not any("_orig_mod" in k for k in resumed.state_dict())


def test_compiled_lora_dropout_is_one_graph_keeps_its_probability_and_resumes_exactly(tmp_path):
    needs_compiler()
    from lora.lowrank import keep_mask

    # the in-place draw of eager mode's masks would split the graph at every adapted layer
    explained = torch._dynamo.explain(_lora_classifier(0.25))(X[:2])
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)
    x = torch.ones(64, 16, 32, 32).to(memory_format=torch.channels_last)
    torch.manual_seed(0)
    mask, keep = torch.compile(lambda t: keep_mask(t, 0.25), dynamic=False)(x)
    assert keep == 0.75 and mask.dtype == x.dtype and mask.is_contiguous(memory_format=torch.channels_last)
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    assert abs(mask.mean().item() - 0.75) < 0.005  # 1M draws: the standard error is 0.0004
    # the compiled masks come from the global generator, which checkpoints restore: a resumed compiled run
    # draws what an uninterrupted one draws
    _, straight = _train(True, 3, tmp_path / "straight", dropout=0.25)
    _, first = _train(True, 2, tmp_path / "split", dropout=0.25)
    _, resumed = _train(True, 3, tmp_path / "split", resume=True, dropout=0.25)
    assert first + resumed[1:] == straight
    _, eager = _train(False, 3, dropout=0.25)
    assert eager[1:] != straight[1:]  # dropout did act (the first step's B = 0 hides it): other masks than eager


# -- a missing toolchain ---------------------------------------------------------------------------------
class _Small(nn.Module):
    """A module of its own class, so that no compiled code of another test is reused."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 2)

    def forward(self, x):
        return self.linear(x).relu() * 2


def test_a_missing_compiler_is_a_one_line_error_that_says_to_drop_compile():
    import torch._inductor.config as inductor

    torch.manual_seed(0)
    model = _Small()
    settings = TrainSettings(lr=1e-2, weight_decay=0.0, warmup_steps=1, total_steps=2, min_lr=1e-6, seed=1,
                             device=torch.device("cpu"), precision="fp32", checkpoint_every=0, compile=True)
    x, y = torch.randn(4, 4), torch.tensor([0, 1, 0, 1])
    # a C++ compiler that does not exist, and no cached kernels that would not need one
    with inductor.patch({"cpp.cxx": ("cytolora-no-such-compiler",), "force_disable_caches": True}):
        with pytest.raises(CompileFailed) as info:
            Trainer(model, settings, None, "fp").fit(lambda start: iter([(x, y)] * 2), lambda x, seeds: x)
    message = str(info.value)
    assert isinstance(info.value, UserError) and "\n" not in message
    assert "drop --compile" in message and "C++ compiler" in message
