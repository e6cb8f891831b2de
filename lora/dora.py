"""DoRA (weight-decomposed LoRA) as a variant of the LoRA layers: a learnable magnitude per output row.

For every adapted output row i (a Linear row, a q/k/v row of a fused projection, a convolution's output
channel): ``W'_i = m_i * (W_i + s B_i A) / ||W_i + s B_i A||``, the norm treated as a constant in
backward (detached, section 4.3 of the DoRA paper, as peft does). ``m`` starts at ``||W_i||`` so the
model starts unchanged. The layers compute it without forming ``W'`` or ``B @ A``:
``out = g * (W x + s B A dropout(x)) + bias`` with ``g = m / ||W + s B A||`` per row.

With dropout 0 (and in eval mode) this is peft's ``LoraConfig(use_dora=True)`` exactly. With dropout in
training, peft computes ``W x + bias + (g - 1) * W dropout(x) + g * s * B A dropout(x)`` (an extra full
matmul on the dropped input); ours drops only the input of the low-rank path, as LoRA does. Both have
the same expectation over the dropout mask.
"""

from __future__ import annotations

import torch
from torch import Tensor


def accumulation_dtype(t: Tensor) -> torch.dtype:
    """float32, or float64 for float64 tensors: the precision dense updates and norms are computed in."""
    return torch.promote_types(t.dtype, torch.float32)


@torch.no_grad()
def row_norms(weight: Tensor, a: Tensor, b: Tensor, scale: float) -> Tensor:
    """``||W_i + scale * B_i A||`` for every row i of ``weight`` (out, in), without forming ``B @ A``.

    ``||w + s b A||^2 = ||w||^2 + 2 s b.(A w) + s^2 b.(A A^T) b`` costs one pass over W and products
    with r columns; computed in float32 at least, and detached.
    """
    dtype = accumulation_dtype(weight)
    w, a, b = weight.to(dtype), a.to(dtype), b.to(dtype)
    squares = w.square().sum(1)
    squares += (2 * scale) * (b * (w @ a.t())).sum(1)
    squares += scale ** 2 * ((b @ (a @ a.t())) * b).sum(1)
    return squares.clamp_min_(0).sqrt_()


def magnitude_factor(magnitude: Tensor, weight: Tensor, a: Tensor, b: Tensor, scale: float) -> Tensor:
    """``g = m / ||W + s B A||`` per row; gradients reach ``m`` only."""
    return magnitude / row_norms(weight, a, b, scale).to(magnitude.dtype)


def rescale(out: Tensor, factor: Tensor, bias: Tensor | None) -> Tensor:
    """``factor * (out - bias) + bias`` on the last dimension of ``out`` (which includes ``bias``)."""
    factor = factor.to(out.dtype)
    if bias is None:
        return out * factor
    return torch.addcmul((1 - factor) * bias.to(out.dtype), out, factor)


@torch.no_grad()
def merged_rows(weight: Tensor, a: Tensor, b: Tensor, scale: float, magnitude: Tensor) -> Tensor:
    """The merged rows ``m * (W + s B A) / ||W + s B A||`` (for merging only)."""
    dtype = accumulation_dtype(weight)
    w = weight.to(dtype) + scale * (b.to(dtype) @ a.to(dtype))
    return (w * (magnitude.to(dtype) / row_norms(weight, a, b, scale))[:, None]).to(weight.dtype)
