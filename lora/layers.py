"""LoRA layers: ``W x + s * B(A(dropout(x)))`` on Linears, fused q/k/v projections and 1x1 convolutions.

Every layer keeps the base parameters under their original names (so state_dict keys of the base
model do not change) and adds ``lora_A*`` / ``lora_B*`` parameters (and, for the DoRA variant, one
``lora_magnitude*`` vector per adapted letter, see ``lora.dora``). The original module is kept aside
and handed back, with the update folded into its weights, by ``merged()``.

Speed rules followed here: ``B @ A`` is never formed in forward or backward; a fused projection
stays one dense matmul, and the selected q/k/v slices share one dropout and one matmul with all
their ``A`` matrices stacked; the low-rank result is added with one ``addmm`` pass (see ``lora.lowrank``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lora import dora as dora_math
from lora.lowrank import keep_mask, low_rank_linear, pointwise_lora

QKV = ("q", "k", "v")
__all__ = ["QKV", "FusedLoRAMixin", "LoRAConv2d", "LoRAFusedLinear", "LoRALinear", "LoRAModule",
           "LoRAMultiheadAttention", "OriginalAttentionLoRA", "keep_mask", "low_rank_linear",
           "original_attention_problem"]


def _new_pair(r: int, in_features: int, out_features: int, like: Tensor) -> tuple[nn.Parameter, nn.Parameter]:
    """A initialised like nn.Linear's default weight, B zeros: the update starts at exactly zero."""
    a = torch.empty(r, in_features, device=like.device, dtype=like.dtype)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    b = torch.zeros(out_features, r, device=like.device, dtype=like.dtype)
    return nn.Parameter(a), nn.Parameter(b)


def _new_magnitude(rows: Tensor, a: Tensor, b: Tensor, scale: float) -> nn.Parameter:
    """DoRA's magnitude, ``||W + s B A||`` per row at creation (B is zero): the layer starts unchanged."""
    return nn.Parameter(dora_math.row_norms(rows, a, b, scale).to(rows.dtype))


class LoRAModule(nn.Module):
    """Common part of every LoRA layer: rank, scale, dropout, the letters it adapts and its variant.

    ``enabled`` (True by default; see ``lora.lora_disabled``) switches the low-rank path, and DoRA's
    rescaling, off: the layer then computes what the original module computes, through its own kernels
    (the attention drop-in's SDPA, the 1x1 convolution as a matmul), equal up to float rounding.
    """

    letters: tuple[str, ...]

    def _setup(self, original: nn.Module, r: int, scale: float, dropout_rate: float, dora: bool = False) -> None:
        # Kept outside the module tree: its parameters are the very objects registered here.
        object.__setattr__(self, "_original", original)
        self.r = r
        self.scale = float(scale)
        self.dropout_rate = float(dropout_rate)
        self.dora = bool(dora)
        self.enabled = True

    @property
    def active_dropout(self) -> float:
        """The dropout rate in force now (0 in eval mode)."""
        return self.dropout_rate if self.training else 0.0

    def lora_pair(self, letter: str) -> tuple[Tensor, Tensor]:
        """The (A, B) parameters of one adapted letter."""
        return self.lora_A, self.lora_B

    def magnitude(self, letter: str) -> Tensor:
        """DoRA's magnitude vector of one adapted letter (DoRA layers only)."""
        return self.lora_magnitude

    def base_rows(self, letter: str) -> Tensor:
        """The frozen weight rows one letter adapts, as an (out, in) matrix."""
        return self.weight

    def dora_factor(self, letter: str) -> Tensor:
        """DoRA's per-row factor ``m / ||W + s B A||`` of one letter (norm detached)."""
        a, b = self.lora_pair(letter)
        return dora_math.magnitude_factor(self.magnitude(letter), self.base_rows(letter), a, b, self.scale)

    def delta(self, letter: str) -> Tensor:
        """The dense update ``s * B @ A`` of one letter (for merging and checks only, never in training)."""
        a, b = self.lora_pair(letter)
        dtype = dora_math.accumulation_dtype(b)
        return (b.to(dtype) @ a.to(dtype)) * self.scale

    @torch.no_grad()
    def _merge_into(self, rows: Tensor, letter: str) -> None:
        """Fold one letter's update into its weight rows (a view of the base weight), in place."""
        if self.dora:
            a, b = self.lora_pair(letter)
            rows.copy_(dora_math.merged_rows(rows, a, b, self.scale, self.magnitude(letter)))
        else:
            rows += self.delta(letter).to(rows.dtype)

    def merged(self) -> nn.Module:
        """The original module, with the low-rank update folded into its weights."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        variant = ", dora" if self.dora else ""
        return (f"letters={'+'.join(self.letters)}, r={self.r}, scale={self.scale:.4g}, "
                f"dropout={self.dropout_rate}{variant}")


class LoRALinear(LoRAModule):
    """A Linear (q, k, v or o projection) plus a low-rank update."""

    def __init__(self, base: nn.Linear, letter: str, r: int, scale: float, dropout_rate: float,
                 dora: bool = False) -> None:
        super().__init__()
        self._setup(base, r, scale, dropout_rate, dora)
        self.letters = (letter,)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.lora_A, self.lora_B = _new_pair(r, base.in_features, base.out_features, base.weight)
        if dora:
            self.lora_magnitude = _new_magnitude(base.weight, self.lora_A, self.lora_B, scale)

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return F.linear(x, self.weight, self.bias)
        out = low_rank_linear(x, self.weight, self.bias, self.lora_A, self.lora_B.t().contiguous(), self.scale,
                              self.active_dropout)
        return dora_math.rescale(out, self.dora_factor(self.letters[0]), self.bias) if self.dora else out

    @torch.no_grad()
    def merged(self) -> nn.Module:
        base = self._original
        base.weight, base.bias = self.weight, self.bias
        self._merge_into(base.weight, self.letters[0])
        return base


class LoRAConv2d(LoRAModule):
    """A 1x1 channel-mixing convolution plus a low-rank update (channel matmuls through r channels)."""

    def __init__(self, base: nn.Conv2d, r: int, scale: float, dropout_rate: float, dora: bool = False) -> None:
        super().__init__()
        self._setup(base, r, scale, dropout_rate, dora)
        self.letters = ("pw",)
        self.in_channels, self.out_channels = base.in_channels, base.out_channels
        self.weight = base.weight
        self.bias = base.bias
        self.lora_A, self.lora_B = _new_pair(r, base.in_channels, base.out_channels, base.weight)
        if dora:
            self.lora_magnitude = _new_magnitude(self.base_rows("pw"), self.lora_A, self.lora_B, scale)

    def base_rows(self, letter: str) -> Tensor:
        return self.weight[:, :, 0, 0]

    def _base(self) -> nn.Conv2d:
        base = self._original
        # The base keeps its own forward (e.g. timm's dynamic 'same' padding); point it at our parameters.
        if base.weight is not self.weight or base.bias is not self.bias:
            base.weight, base.bias = self.weight, self.bias
        return base

    def forward(self, x: Tensor) -> Tensor:
        base = self._base()
        if not self.enabled:  # the frozen convolution alone, computed as the adapted layer computes it
            return pointwise_lora(base, x, self.weight, self.bias, None, None, self.scale, 0.0)
        out = pointwise_lora(base, x, self.weight, self.bias, self.lora_A, self.lora_B, self.scale,
                             self.active_dropout)
        if not self.dora:
            return out
        bias = None if self.bias is None else self.bias.view(-1, 1, 1)
        return dora_math.rescale(out, self.dora_factor("pw").view(-1, 1, 1), bias)

    @torch.no_grad()
    def merged(self) -> nn.Module:
        base = self._base()
        self._merge_into(base.weight[:, :, 0, 0], "pw")
        return base


class FusedLoRAMixin(LoRAModule):
    """Low-rank updates on some of the q/k/v row blocks of one fused projection matrix."""

    def _setup_fused(self, letters: tuple[str, ...], rows: int, in_features: int, like: Tensor) -> None:
        self.letters = tuple(letter for letter in QKV if letter in letters)
        self.rows = rows  # rows of each of the q, k, v blocks
        for letter in self.letters:
            a, b = _new_pair(self.r, in_features, rows, like)
            setattr(self, f"lora_A_{letter}", a)
            setattr(self, f"lora_B_{letter}", b)
            if self.dora:
                setattr(self, f"lora_magnitude_{letter}", _new_magnitude(self.base_rows(letter), a, b, self.scale))

    def fused_weight(self) -> Tensor:
        """The fused (3 * rows, in) q/k/v weight."""
        return self.weight

    def base_rows(self, letter: str) -> Tensor:
        j = QKV.index(letter)
        return self.fused_weight()[j * self.rows:(j + 1) * self.rows]

    def lora_pair(self, letter: str) -> tuple[Tensor, Tensor]:
        """The (A, B) parameters of one adapted letter."""
        return getattr(self, f"lora_A_{letter}"), getattr(self, f"lora_B_{letter}")

    def magnitude(self, letter: str) -> Tensor:
        return getattr(self, f"lora_magnitude_{letter}")

    def _zeros(self, rows: int) -> Tensor:
        ref = self.lora_pair(self.letters[0])[1]
        return torch.zeros(rows, self.rows, dtype=ref.dtype, device=ref.device)

    def _stacked_bt(self, groups: tuple[str, ...], chosen: list[str]) -> Tensor:
        """B.T of the chosen letters on their column blocks, zeros elsewhere: (n * r, len(groups) * rows).

        Block-diagonal in the rank dimension, so one addmm adds every letter's update to its own rows.
        Built from tiny tensors each call (cheap) so that autograd gives each B its own gradient.
        """
        n, r = len(chosen), self.r
        columns = []
        for group in groups:
            if group not in chosen:
                columns.append(self._zeros(n * r))
                continue
            i = chosen.index(group)
            parts = [self._zeros(i * r)] if i else []
            parts.append(self.lora_pair(group)[1].t())
            parts += [self._zeros((n - 1 - i) * r)] if i < n - 1 else []
            columns.append(torch.cat(parts, dim=0) if len(parts) > 1 else parts[0])
        return torch.cat(columns, dim=1) if len(columns) > 1 else columns[0].contiguous()

    def _dora_factors(self, groups: tuple[str, ...], chosen: list[str]) -> Tensor:
        """DoRA's per-row factor over the rows of ``groups``: the chosen letters' factors, ones elsewhere."""
        factors = {g: self.dora_factor(g) for g in chosen}
        ones = torch.ones_like(factors[chosen[0]])
        parts = [factors.get(g, ones) for g in groups]
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def project(self, x: Tensor, weight: Tensor, bias: Tensor | None, groups: tuple[str, ...]) -> Tensor:
        """``x @ weight.T + bias`` for the row blocks ``groups`` plus their low-rank updates, fused."""
        chosen = [g for g in groups if g in self.letters] if self.enabled else []
        if not chosen:
            return F.linear(x, weight, bias)
        # one dropout and one matmul with every chosen A stacked, for all letters sharing this input
        a = torch.cat([self.lora_pair(g)[0] for g in chosen]) if len(chosen) > 1 else self.lora_pair(chosen[0])[0]
        out = low_rank_linear(x, weight, bias, a, self._stacked_bt(groups, chosen), self.scale, self.active_dropout)
        return dora_math.rescale(out, self._dora_factors(groups, chosen), bias) if self.dora else out

    @torch.no_grad()
    def _merge_rows(self, weight: Tensor) -> None:
        for j, letter in enumerate(QKV):
            if letter in self.letters:
                self._merge_into(weight[j * self.rows:(j + 1) * self.rows], letter)


class LoRAFusedLinear(FusedLoRAMixin):
    """A fused qkv Linear (timm ``Attention.qkv``): one dense matmul plus low-rank updates on chosen slices."""

    def __init__(self, base: nn.Linear, letters: tuple[str, ...], r: int, scale: float, dropout_rate: float,
                 dora: bool = False) -> None:
        super().__init__()
        self._setup(base, r, scale, dropout_rate, dora)
        if base.out_features % 3:
            raise ValueError(f"fused qkv Linear has {base.out_features} outputs, not a multiple of 3")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self._setup_fused(letters, base.out_features // 3, base.in_features, base.weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.project(x, self.weight, self.bias, QKV)

    @torch.no_grad()
    def merged(self) -> nn.Module:
        base = self._original
        base.weight, base.bias = self.weight, self.bias
        self._merge_rows(base.weight)
        return base


def _additive_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """nn.MultiheadAttention masks (bool True = blocked, or float added) as a float additive mask."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    return mask.to(dtype)


class LoRAMultiheadAttention(FusedLoRAMixin):
    """Drop-in for ``nn.MultiheadAttention`` (fused ``in_proj_weight``) with LoRA on q/k/v and optionally o.

    Same call signature and outputs as the original; one matmul for q, k and v, the low-rank paths of
    the chosen letters, and ``scaled_dot_product_attention`` when attention weights are not asked for.
    """

    def __init__(self, base: nn.MultiheadAttention, letters: tuple[str, ...], r: int, scale: float,
                 dropout_rate: float, dora: bool = False) -> None:
        super().__init__()
        self._setup(base, r, scale, dropout_rate, dora)
        self.embed_dim, self.num_heads = base.embed_dim, base.num_heads
        self.head_dim = base.embed_dim // base.num_heads
        self.kdim, self.vdim = base.kdim, base.vdim
        self._qkv_same_embed_dim = True
        self.batch_first = base.batch_first
        self.dropout = base.dropout
        self.bias_k = self.bias_v = None
        self.add_zero_attn = False
        self.in_proj_weight = base.in_proj_weight
        self.in_proj_bias = base.in_proj_bias
        self.out_proj = (LoRALinear(base.out_proj, "o", r, scale, dropout_rate, dora) if "o" in letters
                         else base.out_proj)
        self._setup_fused(letters, base.embed_dim, base.embed_dim, base.in_proj_weight)
        if "o" in letters:
            self.letters = (*self.letters, "o")

    def _to_heads(self, t: Tensor) -> Tensor:
        """(B, L, E) or (L, B, E) -> (B, H, L, head_dim), a view."""
        if self.batch_first:
            return t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)
        return t.unflatten(-1, (self.num_heads, self.head_dim)).permute(1, 2, 0, 3)

    def _heads_of(self, x: Tensor, groups: tuple[str, ...]) -> tuple[Tensor, ...]:
        """Project ``x`` with the in_proj row blocks ``groups`` (one matmul) and split into heads."""
        first = QKV.index(groups[0])
        rows = slice(first * self.embed_dim, (first + len(groups)) * self.embed_dim)
        bias = None if self.in_proj_bias is None else self.in_proj_bias[rows]
        out = self.project(x, self.in_proj_weight[rows], bias, groups)
        # split (not unbind of a 5-d view): its backward is one cat straight into the layout of `out`
        return tuple(self._to_heads(t) for t in out.split(self.embed_dim, dim=-1))

    def _qkv(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, ...]:
        if query is key and key is value:  # self-attention: one fused projection
            return self._heads_of(query, QKV)
        if key is value:
            return self._heads_of(query, ("q",)) + self._heads_of(key, ("k", "v"))
        return self._heads_of(query, ("q",)) + self._heads_of(key, ("k",)) + self._heads_of(value, ("v",))

    def _batched(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        dim = 0 if self.batch_first else 1
        q = query.unsqueeze(dim)
        k = q if key is query else key.unsqueeze(dim)
        v = k if value is key else value.unsqueeze(dim)
        return q, k, v

    def _mask(self, attn_mask: Tensor | None, key_padding_mask: Tensor | None, n: int, dtype: torch.dtype
              ) -> Tensor | None:
        mask = None
        if attn_mask is not None:
            mask = _additive_mask(attn_mask, dtype)
            if mask.dim() == 3:  # (N * heads, L, S)
                mask = mask.view(n, self.num_heads, *mask.shape[-2:])
        if key_padding_mask is not None:
            pad = _additive_mask(key_padding_mask, dtype).view(n, 1, 1, -1)
            mask = pad if mask is None else mask + pad
        return mask

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        unbatched = query.dim() == 2
        if unbatched:  # (L, E): add a batch of one where the layout expects it
            query, key, value = self._batched(query, key, value)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        n = query.shape[0] if self.batch_first else query.shape[1]
        q, k, v = self._qkv(query, key, value)
        causal = is_causal and attn_mask is None and key_padding_mask is None and not need_weights
        if is_causal and attn_mask is None and not causal:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint.")
        mask = None if causal else self._mask(attn_mask, key_padding_mask, n, q.dtype)
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q * self.head_dim ** -0.5) @ k.transpose(-2, -1)
            weights = (scores if mask is None else scores + mask).softmax(dim=-1)
            weights = F.dropout(weights, p, True) if p > 0 else weights  # returned dropped, as torch does
            out = weights @ v
            weights = weights.mean(dim=1) if average_attn_weights else weights
            weights = weights.squeeze(0) if unbatched else weights
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal)
        # (B, H, L, hd) -> the input's layout, then the output projection
        out = out.transpose(1, 2).flatten(2) if self.batch_first else out.permute(2, 0, 1, 3).flatten(2)
        out = self.out_proj(out)
        if unbatched:
            out = out.squeeze(0 if self.batch_first else 1)
        return out, weights

    def fused_weight(self) -> Tensor:
        return self.in_proj_weight

    def lora_pair(self, letter: str) -> tuple[Tensor, Tensor]:
        """The (A, B) parameters of one adapted letter ('o' lives on the output projection)."""
        return self.out_proj.lora_pair("o") if letter == "o" else super().lora_pair(letter)

    def magnitude(self, letter: str) -> Tensor:
        return self.out_proj.magnitude("o") if letter == "o" else super().magnitude(letter)

    def base_rows(self, letter: str) -> Tensor:
        return self.out_proj.base_rows("o") if letter == "o" else super().base_rows(letter)

    def delta(self, letter: str) -> Tensor:
        """The dense update of one letter, with the scale of the layer holding it."""
        return self.out_proj.delta("o") if letter == "o" else super().delta(letter)

    @torch.no_grad()
    def merged(self) -> nn.Module:
        base = self._original
        base.in_proj_weight, base.in_proj_bias = self.in_proj_weight, self.in_proj_bias
        self._merge_rows(base.in_proj_weight)
        base.out_proj = self.out_proj.merged() if isinstance(self.out_proj, LoRAModule) else self.out_proj
        return base


def original_attention_problem(attention: nn.Module) -> str | None:
    """Why a timm fused-qkv attention cannot run as the original code's LoRA attention (None when it can).

    The original splits ``qkv`` into three blocks of the input width and runs them as they are; q/k
    normalisation, a gate, or a qkv wider than 3 x the input have no counterpart there.
    """
    qkv = attention.qkv
    if qkv.out_features != 3 * qkv.in_features:
        return f"its qkv projection has {qkv.out_features} outputs, not 3 x its {qkv.in_features} inputs"
    for name in ("q_norm", "k_norm"):
        if not isinstance(getattr(attention, name, None), (nn.Identity, type(None))):
            return f"it normalises q and k ({name} is {type(getattr(attention, name)).__name__})"
    if getattr(attention, "gate", None) is not None:
        return "it has an output gate"
    return None


class OriginalAttentionLoRA(nn.Module):
    """timm fused-qkv attention as the original code's LoRA attention computes it (``--compat seed``).

    The original (mdausort/Cytology-fine-tuning, ``loralib/layers.py``, ``SimpleAttentionLoRA``) splits the
    fused projection into q, k, v of the full width C, each (B, N, C), and calls
    ``F.scaled_dot_product_attention(q, k, v)`` on them: ONE head over all C channels,
    ``softmax(q k^T / sqrt(C)) v`` (SDPA's default scale is 1/sqrt of q's last dimension, here C, not the
    timm module's ``scale = head_dim ** -0.5``; we keep that default, as the original runs it). It then
    applies ``transpose(1, 2).reshape(B, N, C)`` to that (B, N, C) result, which reads the (B, C, N)
    transpose back as (B, N, C) (tokens and channels mixed), computes the output projection and discards it:
    the block returns ``proj_drop`` of the reshaped attention. All of it is reproduced as written, so the
    model differs from the pretrained one even with every B at zero.

    ``qkv`` (a LoRAFusedLinear when q, k or v are adapted) and ``proj`` (a LoRALinear with 'o', an adapter
    that, as in the original, receives no gradient) keep timm's names, so state_dict keys are those of the
    exact attention; ``lora.io`` records the mode in the adapter file's settings and refuses a mismatch.
    Not a LoRAModule itself: its LoRA layers are ``qkv`` and ``proj``, and merging folds them in place.
    """

    def __init__(self, attention: nn.Module, qkv: nn.Module, proj: nn.Module) -> None:
        super().__init__()
        problem = original_attention_problem(attention)
        if problem:
            raise ValueError(f"this attention cannot run as the original code's: {problem}")
        self.qkv = qkv
        self.proj = proj
        self.q_norm = getattr(attention, "q_norm", None) or nn.Identity()
        self.k_norm = getattr(attention, "k_norm", None) or nn.Identity()
        self.attn_drop = attention.attn_drop
        self.proj_drop = attention.proj_drop
        self.num_heads = getattr(attention, "num_heads", None)  # informative only: the forward uses one head

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal:
            raise RuntimeError("the original code's LoRA attention takes no attention mask (--compat seed)")
        b, n, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=-1)
        q, k = self.q_norm(q), self.k_norm(k)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        return self.proj_drop(out.transpose(1, 2).reshape(b, n, c))

    def extra_repr(self) -> str:
        return "single head over the full width, no output projection (the original code's, --compat seed)"
