"""Batch augmentation and normalisation on the training device.

Images arrive as uint8 tensors already resized to the model's input size, so a whole
batch is cropped, flipped and normalised in a few tensor operations instead of one PIL
call per image in a data-loader worker.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

CROP_SCALE = (0.7, 1.0)  # the paper's RandomResizedCrop scale
CROP_RATIO = (3 / 4, 4 / 3)


def normalise(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, S, S) -> float normalised with the model's mean and std."""
    return (images.float().div_(255.0) - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


def crop_flip_params(batch: int, generator: torch.Generator) -> torch.Tensor:
    """Per-image affine parameters (sx, sy, tx, ty) of a random resized crop and a coin-flip mirror.

    Crops cover a fraction of the area drawn from CROP_SCALE with an aspect ratio drawn
    log-uniformly from CROP_RATIO, clipped to the image, at a uniformly random position.
    """
    u = torch.rand(batch, 5, generator=generator, dtype=torch.float64)
    area = CROP_SCALE[0] + (CROP_SCALE[1] - CROP_SCALE[0]) * u[:, 0]
    log_lo, log_hi = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    ratio = torch.exp(log_lo + (log_hi - log_lo) * u[:, 1])
    w = torch.sqrt(area * ratio).clamp(max=1.0)
    h = torch.sqrt(area / ratio).clamp(max=1.0)
    # crop centre in [-1, 1] coordinates, kept inside the image
    cx = (2 * u[:, 2] - 1) * (1 - w)
    cy = (2 * u[:, 3] - 1) * (1 - h)
    flip = torch.where(u[:, 4] < 0.5, -1.0, 1.0)
    return torch.stack([w * flip, h, cx, cy], dim=1).float()


def random_resized_crop_flip(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Apply crop_flip_params to a float batch with one bicubic resampling."""
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
    """uint8 batch -> normalised, randomly cropped and flipped float batch on the same device."""
    params = crop_flip_params(images.shape[0], generator)
    return random_resized_crop_flip(normalise(images, mean, std), params)
