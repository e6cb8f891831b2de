"""Batch augmentation and normalisation on the training device.

Images arrive as uint8 tensors already resized to the model's input size, so a whole
batch is cropped, flipped and normalised in a few tensor operations instead of one PIL
call per image in a data-loader worker. The crops follow torchvision's
``RandomResizedCrop(scale=CROP_SCALE, ratio=CROP_RATIO).get_params`` (up to 10 rejection-
sampled tries in integer pixels, then a centre-crop fallback), drawn for the whole batch
at once; the crop is resized back to the input size with one bicubic resampling.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

CROP_SCALE = (0.7, 1.0)  # the paper's RandomResizedCrop scale
CROP_RATIO = (3 / 4, 4 / 3)
CROP_TRIES = 10  # torchvision's number of rejection-sampling tries
FLIP_P = 0.5

# Uniforms drawn per image: area and log-ratio for every try, then top, left and the flip coin.
_N_UNIFORMS = 2 * CROP_TRIES + 3

Size = int | Sequence[int] | None


def normalise(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, S, S) -> float normalised with the model's mean and std."""
    return (images.float().div_(255.0) - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


def _draw_uniforms(batch: int, generator: torch.Generator) -> torch.Tensor:
    """All the randomness of ``batch`` crops and flips, (batch, _N_UNIFORMS) in [0, 1)."""
    return torch.rand(batch, _N_UNIFORMS, generator=generator, dtype=torch.float64, device=generator.device)


def _height_width(size: Size) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, int):
        return size, size
    height, width = (int(s) for s in size)
    return height, width


def _fallback(height: float, width: float, pixels: bool) -> tuple[float, float]:
    """torchvision's fallback (h, w): the centre crop with the image's ratio clamped to CROP_RATIO."""
    rnd = round if pixels else float
    if width / height < CROP_RATIO[0]:
        return rnd(width / CROP_RATIO[0]), width
    if width / height > CROP_RATIO[1]:
        return height, rnd(height * CROP_RATIO[1])
    return height, width


def crop_boxes(uniforms: torch.Tensor, size: Size = None) -> torch.Tensor:
    """(top, left, height, width) of each crop from `_draw_uniforms` output, float64 (B, 4).

    With ``size`` (an int or (H, W), the model's input size) the boxes are in integer pixels
    exactly as torchvision computes them: ``w = round(sqrt(area * ratio))`` with Python's
    half-to-even rounding, accepted if ``0 < w <= W`` and ``0 < h <= H``, at a uniform integer
    offset. Without ``size`` they are in fractions of a square image of unbounded resolution.
    """
    hw = _height_width(size)
    height, width = (1.0, 1.0) if hw is None else (float(hw[0]), float(hw[1]))
    u = uniforms
    area = height * width * (CROP_SCALE[0] + (CROP_SCALE[1] - CROP_SCALE[0]) * u[:, :CROP_TRIES])
    log_lo, log_hi = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    ratio = torch.exp(log_lo + (log_hi - log_lo) * u[:, CROP_TRIES : 2 * CROP_TRIES])
    w, h = torch.sqrt(area * ratio), torch.sqrt(area / ratio)
    if hw is not None:
        w, h = torch.round(w), torch.round(h)  # half to even, as Python's round()
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = ok.to(torch.uint8).argmax(dim=1, keepdim=True)  # the first accepted try
    accepted = ok.any(dim=1)
    fb_h, fb_w = _fallback(height, width, pixels=hw is not None)
    w = torch.where(accepted, w.gather(1, first).squeeze(1), torch.full_like(accepted, fb_w, dtype=w.dtype))
    h = torch.where(accepted, h.gather(1, first).squeeze(1), torch.full_like(accepted, fb_h, dtype=h.dtype))
    u_top, u_left = u[:, 2 * CROP_TRIES], u[:, 2 * CROP_TRIES + 1]
    if hw is None:
        top, left = u_top * (height - h), u_left * (width - w)
    else:  # torch.randint(0, H - h + 1): a uniform integer offset
        top = torch.minimum(torch.floor(u_top * (height - h + 1)), height - h)
        left = torch.minimum(torch.floor(u_left * (width - w + 1)), width - w)
    top = torch.where(accepted, top, torch.floor((height - h) / 2))
    left = torch.where(accepted, left, torch.floor((width - w) / 2))
    return torch.stack([top, left, h, w], dim=1)


def _params_from_uniforms(uniforms: torch.Tensor, size: Size) -> torch.Tensor:
    """Affine parameters (sx, sy, tx, ty) of the crops, sx negated for mirrored images."""
    hw = _height_width(size)
    height, width = (1.0, 1.0) if hw is None else (float(hw[0]), float(hw[1]))
    top, left, h, w = crop_boxes(uniforms, size).unbind(dim=1)
    # grid_sample's [-1, 1] spans the pixel edges (align_corners=False): edge x maps to 2x/W - 1
    sx, sy = w / width, h / height
    cx, cy = (2 * left + w) / width - 1, (2 * top + h) / height - 1
    flip = torch.where(uniforms[:, -1] < FLIP_P, -1.0, 1.0).to(sx.dtype)
    return torch.stack([sx * flip, sy, cx, cy], dim=1).float()


def crop_flip_params(batch: int, generator: torch.Generator, size: Size = None) -> torch.Tensor:
    """Per-image affine parameters (sx, sy, tx, ty) of a RandomResizedCrop and a coin-flip mirror.

    ``size`` is the image's (H, W) or side in pixels, for torchvision's integer arithmetic;
    without it the crop is drawn in continuous fractions of a square image. |sx| and sy are
    the crop's width and height as fractions of the image, (tx, ty) its centre in [-1, 1];
    sx < 0 mirrors the image horizontally (probability FLIP_P).
    """
    return _params_from_uniforms(_draw_uniforms(batch, generator), size)


def crop_flip_params_seeded(sample_seeds: Sequence[int] | torch.Tensor, size: Size = None) -> torch.Tensor:
    """crop_flip_params with image i drawn from its own seed, independent of the rest of the batch.

    A batch split across processes therefore draws the same crops as the whole batch, and
    ``crop_flip_params_seeded([s], size)`` equals ``crop_flip_params(1, Generator().manual_seed(s), size)``.
    """
    seeds = [int(s) for s in (sample_seeds.tolist() if torch.is_tensor(sample_seeds) else sample_seeds)]
    if not seeds:
        return torch.zeros(0, 4)
    uniforms = torch.cat([_draw_uniforms(1, torch.Generator().manual_seed(s)) for s in seeds])
    return _params_from_uniforms(uniforms, size)


def random_resized_crop_flip(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Apply crop_flip_params to a float batch with one bicubic resampling to the same size."""
    batch = images.shape[0]
    theta = torch.zeros(batch, 2, 3, device=images.device, dtype=images.dtype)
    params = params.to(device=images.device, dtype=images.dtype)
    theta[:, 0, 0] = params[:, 0]
    theta[:, 1, 1] = params[:, 1]
    theta[:, 0, 2] = params[:, 2]
    theta[:, 1, 2] = params[:, 3]
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bicubic", padding_mode="border", align_corners=False)


def augment_batch(
    images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """uint8 batch -> normalised, randomly crop-resized and flipped float batch on the same device."""
    params = crop_flip_params(images.shape[0], generator, size=images.shape[-2:])
    return random_resized_crop_flip(normalise(images, mean, std), params)


def augment_batch_seeded(
    images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, sample_seeds: Sequence[int] | torch.Tensor
) -> torch.Tensor:
    """augment_batch with image i's crop and flip drawn from ``sample_seeds[i]`` alone."""
    if len(sample_seeds) != images.shape[0]:
        raise ValueError(f"need one seed per image: got {len(sample_seeds)} seeds for {images.shape[0]} images")
    params = crop_flip_params_seeded(sample_seeds, size=images.shape[-2:])
    return random_resized_crop_flip(normalise(images, mean, std), params)
