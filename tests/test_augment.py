"""The on-device batch augmentation: torchvision's crop distribution, exact geometry and flips, determinism."""

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import RandomResizedCrop

from engine.augment import (
    CROP_RATIO,
    CROP_SCALE,
    CROP_TRIES,
    augment_batch,
    augment_batch_seeded,
    crop_boxes,
    crop_flip_params,
    crop_flip_params_seeded,
    normalise,
    random_resized_crop_flip,
)

SIDE = 224


def _crop_stats(h: torch.Tensor, w: torch.Tensor) -> dict:
    return {
        "area": (h * w).double().mean().item() / SIDE**2,
        "log_ratio": torch.log(w.double() / h.double()).mean().item(),
        "full_span": ((w == SIDE) | (h == SIDE)).double().mean().item(),
    }


def test_crop_distribution_matches_torchvision():
    n = 20_000
    torch.manual_seed(0)
    image = torch.zeros(3, SIDE, SIDE)
    theirs = torch.tensor([RandomResizedCrop.get_params(image, list(CROP_SCALE), list(CROP_RATIO)) for _ in range(n)])
    ours = crop_flip_params(n, torch.Generator().manual_seed(0), size=SIDE).double()
    w, h = torch.round(ours[:, 0].abs() * SIDE), torch.round(ours[:, 1] * SIDE)
    a, b = _crop_stats(theirs[:, 2], theirs[:, 3]), _crop_stats(h, w)
    assert a["area"] == pytest.approx(b["area"], abs=0.005)
    assert a["log_ratio"] == pytest.approx(b["log_ratio"], abs=0.01)
    assert a["full_span"] == pytest.approx(b["full_span"], abs=0.01)
    assert 0.03 < b["full_span"] < 0.06  # the old clamped crops spanned the image 44% of the time


def _uniforms(areas, log_ratios, top=0.5, left=0.5, flip=0.9):
    """Uniforms that give these area fractions and log ratios for the first tries (the rest reject)."""
    u = torch.zeros(1, 2 * CROP_TRIES + 3, dtype=torch.float64)
    u[0, :CROP_TRIES] = 1.0  # area 1 ...
    u[0, CROP_TRIES : 2 * CROP_TRIES] = 1.0  # ... at ratio 4/3: wider than the image, rejected
    lo, hi = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    for k, (area, log_ratio) in enumerate(zip(areas, log_ratios, strict=True)):
        u[0, k] = (area - CROP_SCALE[0]) / (CROP_SCALE[1] - CROP_SCALE[0])
        u[0, CROP_TRIES + k] = (log_ratio - lo) / (hi - lo)
    u[0, -3:] = torch.tensor([top, left, flip], dtype=torch.float64)
    return u


def test_first_accepted_try_in_integer_pixels():
    # try 1: w = round(sqrt(0.99 * 1.2) * 224) = 244 > 224, rejected; try 2: area 0.75, ratio 1 -> 194 x 194
    u = _uniforms([0.99, 0.75], [math.log(1.2), 0.0], top=0.0, left=0.999)
    top, left, h, w = crop_boxes(u, SIDE)[0].tolist()
    side = round(math.sqrt(0.75) * SIDE)
    assert (h, w) == (side, side) and top == 0 and left == SIDE - side


def test_fallback_is_the_whole_square_image():
    top, left, h, w = crop_boxes(_uniforms([], []), SIDE)[0].tolist()
    assert (top, left, h, w) == (0, 0, SIDE, SIDE)
    params = crop_flip_params_seeded([0], size=SIDE)
    assert params.shape == (1, 4)


def test_fallback_on_a_wide_image_clamps_the_ratio_like_torchvision():
    top, left, h, w = crop_boxes(_uniforms([], []), (100, 200))[0].tolist()
    assert (h, w) == (100, round(100 * CROP_RATIO[1])) and top == 0 and left == (200 - w) // 2


def test_identity_and_mirror_params_are_exact():
    x = torch.rand(2, 3, 16, 16)
    same = random_resized_crop_flip(x, torch.tensor([[1.0, 1.0, 0.0, 0.0]] * 2))
    mirror = random_resized_crop_flip(x, torch.tensor([[-1.0, 1.0, 0.0, 0.0]] * 2))
    assert torch.allclose(same, x, atol=1e-5)
    assert torch.allclose(mirror, x.flip(-1), atol=1e-5)


def test_crop_samples_the_same_pixels_as_crop_then_bicubic_resize():
    x = torch.rand(1, 3, 32, 32, dtype=torch.float64)
    top, left, h, w = 5, 9, 16, 20  # upsampled 2x and 1.6x
    params = torch.tensor([[w / 32, h / 32, (2 * left + w) / 32 - 1, (2 * top + h) / 32 - 1]])
    ours = random_resized_crop_flip(x, params)
    ref = F.interpolate(x[:, :, top : top + h, left : left + w], size=(32, 32), mode="bicubic", align_corners=False)
    # the border differs only because interpolate pads the crop where grid_sample reads the image around it
    assert torch.allclose(ours[..., 4:-4, 4:-4], ref[..., 4:-4, 4:-4], atol=1e-6)


def test_continuous_crops_stay_inside_the_image_with_the_paper_scale():
    p = crop_flip_params(4096, torch.Generator().manual_seed(0))
    w, h, cx, cy = p[:, 0].abs(), p[:, 1], p[:, 2], p[:, 3]
    assert (w <= 1).all() and (h <= 1).all()
    assert (cx.abs() <= 1 - w + 1e-6).all() and (cy.abs() <= 1 - h + 1e-6).all()
    assert (w * h >= CROP_SCALE[0] - 1e-6).all() and (w * h <= CROP_SCALE[1] + 1e-6).all()
    ratio = w / h
    assert (ratio >= CROP_RATIO[0] - 1e-5).all() and (ratio <= CROP_RATIO[1] + 1e-5).all()
    flipped = (p[:, 0] < 0).float().mean()
    assert 0.45 < flipped < 0.55


def test_integer_crops_are_whole_pixels_inside_the_image():
    top, left, h, w = crop_boxes(torch.rand(2048, 2 * CROP_TRIES + 3, dtype=torch.float64), SIDE).unbind(1)
    for v in (top, left, h, w):
        assert torch.equal(v, v.round())
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= SIDE).all() and (left + w <= SIDE).all()
    # offsets reach both ends of their range
    assert (left == 0).any() and (left + w == SIDE).any()


def test_seeded_params_do_not_depend_on_the_rest_of_the_batch():
    seeds = [11, 12, 13, 14, 15]
    batch = crop_flip_params_seeded(seeds, size=SIDE)
    for i, s in enumerate(seeds):
        assert torch.equal(crop_flip_params_seeded([s], size=SIDE)[0], batch[i])
    assert torch.equal(crop_flip_params_seeded(torch.tensor(seeds[2:]), size=SIDE), batch[2:])
    # a single seeded draw is the generator draw of the same seed
    assert torch.equal(batch[:1], crop_flip_params(1, torch.Generator().manual_seed(11), size=SIDE))
    assert not torch.equal(batch[0], batch[1])


def test_seeded_batch_split_in_two_equals_the_whole_batch():
    x = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    mean, std = torch.tensor([0.5] * 3), torch.tensor([0.25] * 3)
    whole = augment_batch_seeded(x, mean, std, [7, 8, 9, 10])
    first, second = augment_batch_seeded(x[:2], mean, std, [7, 8]), augment_batch_seeded(x[2:], mean, std, [9, 10])
    halves = torch.cat([first, second])
    assert torch.equal(whole, halves)
    with pytest.raises(ValueError, match="one seed per image"):
        augment_batch_seeded(x, mean, std, [1, 2])


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
