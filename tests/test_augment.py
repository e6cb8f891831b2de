"""The on-device batch augmentation: the paper's crop range, exact flips, determinism."""

import torch

from utils.augment import CROP_SCALE, augment_batch, crop_flip_params, normalise, random_resized_crop_flip


def test_identity_and_mirror_params_are_exact():
    x = torch.rand(2, 3, 16, 16)
    same = random_resized_crop_flip(x, torch.tensor([[1.0, 1.0, 0.0, 0.0]] * 2))
    mirror = random_resized_crop_flip(x, torch.tensor([[-1.0, 1.0, 0.0, 0.0]] * 2))
    assert torch.allclose(same, x, atol=1e-5)
    assert torch.allclose(mirror, x.flip(-1), atol=1e-5)


def test_crops_stay_inside_the_image_with_the_paper_scale():
    p = crop_flip_params(4096, torch.Generator().manual_seed(0))
    w, h, cx, cy = p[:, 0].abs(), p[:, 1], p[:, 2], p[:, 3]
    assert (w <= 1).all() and (h <= 1).all()
    assert (cx.abs() <= 1 - w + 1e-6).all() and (cy.abs() <= 1 - h + 1e-6).all()
    # clipping a crop to the image happens only above 0.75 of the area and keeps it above 0.7
    assert (w * h >= CROP_SCALE[0] - 1e-6).all() and (w * h <= CROP_SCALE[1] + 1e-6).all()
    flipped = (p[:, 0] < 0).float().mean()
    assert 0.45 < flipped < 0.55


def test_same_generator_seed_same_batch():
    x = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    mean, std = torch.tensor([0.5] * 3), torch.tensor([0.25] * 3)
    a = augment_batch(x, mean, std, torch.Generator().manual_seed(3))
    b = augment_batch(x, mean, std, torch.Generator().manual_seed(3))
    c = augment_batch(x, mean, std, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (4, 3, 16, 16) and a.dtype == torch.float32


def test_normalise_uses_mean_and_std():
    x = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    out = normalise(x, torch.tensor([0.5, 0.0, 1.0]), torch.tensor([0.5, 1.0, 2.0]))
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([1.0, 1.0, 0.0]))
