"""The shared training loop: schedule, batch order, exact resume after a signal, NaN stop."""


import pytest
import torch
from torch import nn

from engine.trainer import (
    Trainer,
    TrainingDiverged,
    TrainingInterrupted,
    TrainSettings,
    batch_indices,
    lr_factor,
)
from tests.conftest import feature_batches


def test_warmup_then_cosine_to_min_lr():
    lr, lo = 1e-3, 1e-6
    assert lr_factor(0, 50, 150, lr, lo) == pytest.approx(1 / 50)
    assert lr_factor(49, 50, 150, lr, lo) == pytest.approx(1.0)
    assert lr_factor(50, 50, 150, lr, lo) == pytest.approx(1.0)
    assert lr_factor(100, 50, 150, lr, lo) * lr == pytest.approx(lo + (lr - lo) / 2)
    assert lr_factor(150, 50, 150, lr, lo) * lr == pytest.approx(lo)


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_batches_are_epoch_permutations_and_resume_exactly():
    full = _take(batch_indices(10, 4, seed=3, start_step=0), 9)  # 4 + 4 + a partial 2 per epoch
    assert [len(b) for b in full] == [4, 4, 2] * 3
    for e in range(3):
        assert sorted(full[3 * e] + full[3 * e + 1] + full[3 * e + 2]) == list(range(10))
    assert _take(batch_indices(10, 4, seed=3, start_step=5), 4) == full[5:9]
    assert full != _take(batch_indices(10, 4, seed=4, start_step=0), 9)


def test_drop_last_keeps_full_batches_only():
    full = _take(batch_indices(10, 4, seed=3, start_step=0, drop_last=True), 6)
    assert all(len(b) == 4 for b in full)
    for e in range(3):
        assert len(set(full[2 * e] + full[2 * e + 1])) == 8


def test_small_set_uses_everything_each_step():
    b = _take(batch_indices(3, 32, seed=0, start_step=0), 2)
    assert sorted(b[0]) == [0, 1, 2] and sorted(b[1]) == [0, 1, 2]


X = torch.randn(40, 8, generator=torch.Generator().manual_seed(0))
Y = (X[:, 0] > 0).long()


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Dropout(0.3), nn.Linear(8, 2))


def _trainer(model, run_dir, total=30, lr=0.05):
    settings = TrainSettings(lr=lr, weight_decay=1e-2, warmup_steps=5, total_steps=total, min_lr=1e-6, seed=1,
                             device=torch.device("cpu"), precision="fp32", checkpoint_every=7)
    return Trainer(model, settings, run_dir, fingerprint="abc")


def _batches(kill_at=None):
    return feature_batches(X, Y, 8, kill_at)


def _augment(x, seeds):
    noise = [torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(s)) for s in seeds]
    return x + 0.01 * torch.stack(noise)


def test_interrupted_and_resumed_training_equals_uninterrupted(tmp_path):
    straight = _model()
    _trainer(straight, tmp_path / "a").fit(_batches(), _augment)

    interrupted = _model()
    with pytest.raises(TrainingInterrupted) as info:
        _trainer(interrupted, tmp_path / "b").fit(_batches(kill_at=12), _augment)
    assert info.value.step == 13 and (tmp_path / "b" / "checkpoint.pt").is_file()

    resumed = _model()
    trainer = _trainer(resumed, tmp_path / "b")
    assert trainer.try_resume() == 13
    stats = trainer.fit(_batches(), _augment)
    assert stats.resumed_from == 13 and stats.steps == 17
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=False):
        assert torch.equal(a, b)


def test_checkpoint_from_other_settings_is_refused(tmp_path):
    model = _model()
    t = _trainer(model, tmp_path)
    t.save_checkpoint()
    other = Trainer(_model(), t.s, tmp_path, fingerprint="different")
    with pytest.raises(Exception, match="other settings"):
        other.try_resume()


def test_non_finite_loss_names_the_step(tmp_path):
    model = _model()

    def bad(start):
        for step in range(start, 100):
            yield (X[:8] * (float("inf") if step == 3 else 1.0)), Y[:8]

    with pytest.raises(TrainingDiverged, match="at step 4: lower the learning rate"):
        _trainer(model, tmp_path).fit(bad, lambda x, seeds: x)
