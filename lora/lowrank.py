"""The low-rank products of LoRA: ``s * B(A(dropout(x)))`` added to a frozen layer's output.

``B @ A`` is never formed. Dropout masks come from 8- or 16-bit lanes of 64-bit random words, several
times cheaper on CPU than one float draw per entry; backward keeps those lanes (a byte per entry at the
usual rates), not a mask in the input's dtype. On CPU, pointwise convolutions run their low-rank path
as channel matmuls on the convolution's own memory layout, added in place to its output, with a
hand-written backward that keeps no full-size tensor beyond the dropped input and its mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GRID = 1 << 16  # keep probabilities are drawn on a grid of 2**-16


def keep_probability(rate: float) -> float:
    """The keep probability a dropout rate is drawn with: 1 - rate on a grid of 2**-16 (0.25, 0.1 -> 0.899994)."""
    return min(max(round((1.0 - rate) * GRID), 1), GRID - 1) / GRID


def _lanes_like(x: Tensor, dtype: torch.dtype) -> Tensor:
    """Uniform random integers of ``dtype`` shaped like ``x`` and, where ``x`` is dense, laid out like it."""
    n = x.numel()
    per_word = 8 // dtype.itemsize
    words = torch.empty((n + per_word - 1) // per_word, dtype=torch.int64, device=x.device).random_(-(2 ** 63), None)
    flat = words.view(dtype)[:n]
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        b, c, h, w = x.shape
        return flat.view(b, h, w, c).permute(0, 3, 1, 2)
    return flat.view(x.shape)


def _lanes(x: Tensor, rate: float) -> tuple[Tensor, int, float]:
    """Random lanes laid out like ``x``, the threshold under which a lane keeps its entry, and the keep
    probability: 8-bit lanes where that probability is a multiple of 1/256 (rates 0.25, 0.5, 0.125...),
    16-bit lanes otherwise."""
    keep = keep_probability(rate)
    levels = 256 if (keep * 256).is_integer() else GRID
    threshold = round(keep * levels) - levels // 2
    return _lanes_like(x, torch.int8 if levels == 256 else torch.int16), threshold, keep


def keep_mask(x: Tensor, rate: float) -> tuple[Tensor, float]:
    """A 0/1 mask in ``x``'s dtype and layout keeping each entry with probability ``keep_probability(rate)``.

    Returns the mask and that probability; inverted dropout divides by it, so ``x * mask / keep`` has
    expectation ``x`` exactly. Each decision compares one lane of a random 64-bit word with a threshold
    (see ``_lanes``).
    """
    if torch.compiler.is_compiling():
        # inside torch.compile: one uniform draw per entry, which the compiler generates inside the kernels
        # that use the mask (the in-place draw of random words below would split the graph at every layer).
        # The keep probability is the same; the masks are other draws than eager mode's
        keep = keep_probability(rate)
        return (torch.rand_like(x) < keep).to(x.dtype), keep
    lanes, threshold, keep = _lanes(x, rate)
    return torch.lt(lanes, threshold, out=torch.empty_like(x)), keep


class _Dropped(torch.autograd.Function):
    """``x * keep_mask(x, rate)``, saving for backward the random lanes (one byte per entry at the usual
    rates, two otherwise) rather than a mask in ``x``'s dtype; backward compares them again."""

    @staticmethod
    def forward(ctx, x: Tensor, rate: float) -> Tensor:
        lanes, threshold, _ = _lanes(x, rate)
        ctx.save_for_backward(lanes)
        ctx.threshold = threshold
        return torch.lt(lanes, threshold, out=torch.empty_like(x)).mul_(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (lanes,) = ctx.saved_tensors
        return torch.lt(lanes, ctx.threshold, out=torch.empty_like(grad)).mul_(grad), None


def dropped(x: Tensor, rate: float) -> tuple[Tensor, float]:
    """``x`` times a fresh ``keep_mask`` (without inverted dropout's 1 / keep) and the keep probability.

    The same draws as ``keep_mask``; what backward keeps is the lanes, not the mask.
    """
    if torch.compiler.is_compiling():  # the compiler chooses what to keep
        mask, keep = keep_mask(x, rate)
        return x * mask, keep
    return _Dropped.apply(x, rate), keep_probability(rate)


def low_rank_linear(x: Tensor, weight: Tensor, bias: Tensor | None, a: Tensor, bt: Tensor, scale: float,
                    dropout_rate: float) -> Tensor:
    """``x @ weight.T + bias + scale * dropout(x) @ a.T @ bt``, the dense matmul done once.

    ``bt`` is B transposed, (rank, out), contiguous: that keeps both backward products of the update
    (``grad @ bt.T`` and ``h.T @ grad``) on fast matmul layouts; a transposed view would make autograd
    compute ``(grad.T @ h).T``, several times slower. The update is added in place (``addmm_``) to
    the dense result, which no backward needs, so no extra output-sized tensor is written.
    """
    # under autocast the input is cast once, for both matmuls: the mask and the dropped input it saves are
    # then in the lower precision too
    flat = x.reshape(-1, x.shape[-1]).to(_compute_dtype(x))
    out = F.linear(flat, weight, bias)
    factor = 1.0
    if dropout_rate > 0:  # inverted dropout; its 1 / keep joins the scalar scale
        flat, keep = dropped(flat, dropout_rate)
        factor = 1.0 / keep
    h = F.linear(flat, a)
    out.addmm_(h.to(out.dtype), bt.to(out.dtype), alpha=scale * factor)
    return out.view(*x.shape[:-1], out.shape[-1])


class _Batched:
    """NCHW tensors as (N, C, H*W): channel mixing is a batched matmul with the weight broadcast."""

    @staticmethod
    def view(t: Tensor) -> Tensor:
        return t.reshape(t.shape[0], t.shape[1], -1)

    @staticmethod
    def back(t: Tensor, shape: torch.Size) -> Tensor:
        return t.view(shape)

    @staticmethod
    def mix(w: Tensor, t: Tensor, out: Tensor | None = None) -> Tensor:
        """``w`` (out, in) applied to the channels of ``t``."""
        return torch.bmm(w.expand(t.shape[0], -1, -1), t, out=out)

    @staticmethod
    def empty(shape: tuple[int, ...], like: Tensor) -> Tensor:
        """A new NCHW tensor of ``shape``."""
        return like.new_empty(shape)

    @staticmethod
    def mix_into(out: Tensor, w: Tensor, t: Tensor, alpha: float) -> None:
        out.baddbmm_(w.expand(t.shape[0], -1, -1), t, alpha=alpha)

    @staticmethod
    def outer(g: Tensor, t: Tensor) -> Tensor:
        """Sum over samples and positions of ``g`` (channels P) times ``t`` (channels Q): (P, Q)."""
        return torch.bmm(g, t.transpose(1, 2)).sum(0)

    @staticmethod
    def bias_view(bias: Tensor) -> Tensor:
        return bias.view(1, -1, 1)

    @staticmethod
    def cat(t: Tensor, extra: Tensor) -> Tensor:
        """``t`` with the channels of ``extra`` appended."""
        return torch.cat([t, extra], dim=1)

    @staticmethod
    def channel_sum(g: Tensor) -> Tensor:
        return g.sum((0, 2))


class _Rows:
    """Channels-last tensors as (N*H*W, C) rows: channel mixing is one plain matmul."""

    @staticmethod
    def view(t: Tensor) -> Tensor:
        return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])

    @staticmethod
    def back(t: Tensor, shape: torch.Size) -> Tensor:
        b, c, h, w = shape
        return t.view(b, h, w, c).permute(0, 3, 1, 2)

    @staticmethod
    def mix(w: Tensor, t: Tensor, out: Tensor | None = None) -> Tensor:
        return torch.mm(t, w.t(), out=out)

    @staticmethod
    def empty(shape: tuple[int, ...], like: Tensor) -> Tensor:
        return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=torch.channels_last)

    @staticmethod
    def mix_into(out: Tensor, w: Tensor, t: Tensor, alpha: float) -> None:
        out.addmm_(t, w.t(), alpha=alpha)

    @staticmethod
    def outer(g: Tensor, t: Tensor) -> Tensor:
        return g.t() @ t

    @staticmethod
    def bias_view(bias: Tensor) -> Tensor:
        return bias

    @staticmethod
    def cat(t: Tensor, extra: Tensor) -> Tensor:
        return torch.cat([t, extra], dim=1)

    @staticmethod
    def channel_sum(g: Tensor) -> Tensor:
        return g.sum(0)


class _PointwiseLoRA(torch.autograd.Function):
    """A 1x1 stride-1 unpadded convolution plus ``alpha * B(A(x * mask))``, all as channel matmuls.

    The frozen convolution itself is one (batched) matmul over channels: the same sums as ``F.conv2d``,
    without the layout reorders oneDNN does for NCHW on CPU. The update joins that matmul (``h = A x``
    appended to the input channels, ``s B`` to the weight columns) where the output has more channels
    than the input, and is added in place to its output otherwise. In backward one matmul gives both
    the input gradient and ``s B^T g`` (the input gradient is then a slice of a slightly wider tensor),
    and the update's masked input gradient is added into it in one ``addcmul_`` pass. ``a`` None: the
    convolution alone (adapters switched off).
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, a: Tensor | None, b: Tensor | None,
                scale: float, rate: float) -> Tensor:
        layout, dtype = _layout(x), _compute_dtype(x)
        x3, w = layout.view(x.to(dtype)), weight.flatten(1).to(dtype)
        # the output is made here and filled through a view: a view returned from a Function could not
        # be modified in place afterwards (an in-place activation, say)
        result = layout.empty((x.shape[0], w.shape[0], *x.shape[2:]), x3)
        out = layout.view(result)
        mask, keep, kept, h = None, 1.0, None, None
        if a is None:
            layout.mix(w, x3, out=out)
        else:
            a, b = a.to(dtype), b.to(dtype)
            mask, keep = keep_mask(x3, rate) if rate > 0 else (None, 1.0)
            kept = x3 * mask if mask is not None else x3
            h = layout.mix(a, kept)
            if w.shape[0] > w.shape[1] + a.shape[0]:
                # more output than input channels: appending h to the input rows and s * B to the weight
                # columns costs less than a second pass over the output
                layout.mix(torch.cat([w, b * (scale / keep)], dim=1), layout.cat(x3, h), out=out)
            else:
                layout.mix(w, x3, out=out)
                layout.mix_into(out, b, h, alpha=scale / keep)
        if bias is not None:
            out += layout.bias_view(bias.to(dtype))
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.save_for_backward(kept, mask if need_x else None, a, b, h, w, x3 if need_w else None)
        ctx.alpha, ctx.layout, ctx.x_shape, ctx.x_dtype = scale / keep, layout, x.shape, x.dtype
        return result

    @staticmethod
    def backward(ctx, grad: Tensor):
        kept, mask, a, b, h, weight, x3 = ctx.saved_tensors
        layout, alpha, need = ctx.layout, ctx.alpha, ctx.needs_input_grad
        g = layout.view(grad.to(weight.dtype))
        grad_x = grad_w = grad_bias = grad_a = grad_b = None
        if a is None:
            grad_x = layout.mix(weight.t(), g) if need[0] else None
        elif need[0]:
            # one pass over the output gradient for both the input gradient and s B^T g: [W, s B]^T g
            both = layout.mix(torch.cat([weight, b * alpha], dim=1).t(), g)
            grad_x, gh = both.narrow(1, 0, weight.shape[1]), both.narrow(1, weight.shape[1], b.shape[1])
        else:
            gh = layout.mix(b.t(), g).mul_(alpha)
            grad_x = layout.mix(weight.t(), g) if need[0] else None
        if a is not None:
            grad_b = layout.outer(g, h).mul_(alpha) if need[4] else None
            grad_a = layout.outer(gh, kept) if need[3] else None
            if grad_x is not None:
                update = layout.mix(a.t(), gh)
                grad_x = grad_x.add_(update) if mask is None else grad_x.addcmul_(mask, update)
        if grad_x is not None:
            grad_x = layout.back(grad_x, ctx.x_shape).to(ctx.x_dtype)
        if need[1]:
            grad_w = layout.outer(g, x3).view(*weight.shape, 1, 1)
        if need[2]:
            grad_bias = layout.channel_sum(g)
        return grad_x, grad_w, grad_bias, grad_a, grad_b, None, None


def _layout(x: Tensor) -> type[_Batched] | type[_Rows] | None:
    """How the channel matmuls see ``x`` without copies: NCHW as (N, C, H*W), channels-last as rows."""
    if x.is_contiguous():
        return _Batched
    if x.is_contiguous(memory_format=torch.channels_last):
        return _Rows
    return None


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a matmul or convolution of ``x`` runs in: autocast's lower precision for float32 inputs under
    autocast."""
    device = x.device.type
    if x.dtype == torch.float32 and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def _fast_path(conv: nn.Conv2d, x: Tensor) -> bool:
    """Whether to run the fused function, which computes exactly what ``conv(x)`` computes (a plain stride-1
    unpadded 1x1), on this input.

    Only on CPU and in eager mode: it saves oneDNN's NCHW layout reorders there. On a GPU, cuDNN runs
    1x1 convolutions faster than these channel matmuls, and under torch.compile the compiler fuses the
    plain path's elementwise work itself.
    """
    return (x.device.type == "cpu" and not torch.compiler.is_compiling() and type(conv).forward is nn.Conv2d.forward
            and conv.stride == (1, 1) and conv.padding in ((0, 0), "valid") and x.dim() == 4
            and _layout(x) is not None)


def pointwise_lora(conv: nn.Conv2d, x: Tensor, weight: Tensor, bias: Tensor | None, a: Tensor | None,
                   b: Tensor | None, scale: float, rate: float) -> Tensor:
    """``conv(x) + scale * B(A(dropout(x)))`` for a 1x1 convolution ``conv`` (with ``weight`` and ``bias``).

    ``a`` is (r, in), ``b`` is (out, r); both None: ``conv(x)`` alone. On CPU in eager mode, plain
    stride-1 unpadded convolutions run as channel matmuls (see ``_PointwiseLoRA`` and ``_fast_path``);
    everything else runs ``conv``'s own forward and two small convolutions mirroring its stride and
    padding.
    """
    if _fast_path(conv, x):
        return _PointwiseLoRA.apply(x, weight, bias, a, b, scale, rate)
    x = x.to(_compute_dtype(x))  # cast once under autocast, as in low_rank_linear
    out = conv(x)
    if a is None:
        return out
    factor = 1.0
    if rate > 0:
        x, keep = dropped(x, rate)
        factor = 1.0 / keep
    padding = conv.padding if conv.padding_mode == "zeros" else 0
    h = F.conv2d(x.to(out.dtype), a.to(out.dtype).view(*a.shape, 1, 1), stride=conv.stride, padding=padding)
    return out + F.conv2d(h, (b * (scale * factor)).to(out.dtype).view(*b.shape, 1, 1))
