"""Learnable prompt tokens inside a model's towers: the one place prompt-learning methods reach into a model.

Text towers (open_clip's CLIP; transformers' CLIPModel). A prompt's token embeddings go through the tower's
own positional embedding, transformer blocks, final layer norm, end-of-text token and text projection: the
tower's encode_text, with the embeddings given instead of looked up. Deep prompts replace the context tokens
at the input of later blocks (IVLP, MaPLe).

Image towers (open_clip's VisionTransformer; timm's VisionTransformer, alone or as open_clip's timm trunk;
transformers' CLIP vision tower). Prompt tokens are inserted after the class (and register) tokens at the
input of the first block (shallow, VPT-shallow) and replaced at the input of each later block up to a depth
(deep, VPT-deep); they are removed again before the tower's own pooling, norm and projection, so those read
the tokens they always read.

Nothing here changes the model's weights: the prompts are parameters of the modules below, the towers are
read through plain references.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from models.errors import ModelError

Init = Literal["uniform", "normal"]


class PromptError(ModelError):
    """A model whose tower prompt learning cannot feed (no token embeddings, not a vision transformer)."""


def _insert(x: torch.Tensor, prompts: torch.Tensor, at: int) -> torch.Tensor:
    """Tokens (B, T, D) with `prompts` (n, D) or (B, n, D) inserted at position `at`."""
    p = prompts.to(x.dtype).expand(x.shape[0], -1, -1) if prompts.dim() == 2 else prompts.to(x.dtype)
    return torch.cat([x[:, :at], p, x[:, at:]], dim=1)


def _replace(x: torch.Tensor, prompts: torch.Tensor, at: int) -> torch.Tensor:
    """Tokens (B, T, D) whose positions at .. at+n are replaced by `prompts` (n, D) or (B, n, D)."""
    n = prompts.shape[-2]
    p = prompts.to(x.dtype).expand(x.shape[0], -1, -1) if prompts.dim() == 2 else prompts.to(x.dtype)
    return torch.cat([x[:, :at], p, x[:, at + n:]], dim=1)


# -- text towers -------------------------------------------------------------------------------------
class TextTower:
    """What prompt learning needs of a text tower: token embeddings, and the encoder from embeddings."""

    width: int  # token embedding size
    depth: int  # transformer blocks

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids (N, L) -> token embeddings (N, L, width)."""
        raise NotImplementedError

    def encode(self, x: torch.Tensor, tokens: torch.Tensor, deep: Sequence[torch.Tensor] = (), at: int = 1
               ) -> torch.Tensor:
        """Token embeddings (N, L, width) of the prompts `tokens` -> projected text features (N, E).

        ``deep[i - 1]`` (n, width) replaces the n tokens from position `at` at the input of block i (1 <= i)."""
        raise NotImplementedError


class OpenClipText(TextTower):
    """open_clip's CLIP text tower: token_embedding, positional_embedding, transformer, ln_final, text_projection."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.width = int(model.token_embedding.weight.shape[1])
        self.depth = len(model.transformer.resblocks)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.token_embedding(tokens)

    def encode(self, x, tokens, deep=(), at=1):
        from open_clip.transformer import text_global_pool

        m = self.model
        cast = m.transformer.get_cast_dtype()
        x = x.to(cast) + m.positional_embedding.to(cast)
        x = _run_open_clip_blocks(m.transformer, x, m.attn_mask, deep, at)
        x = m.ln_final(x)
        x = text_global_pool(x, tokens, m.text_pool_type, eos_token_id=getattr(m, "text_eos_id", None))
        if m.text_projection is None:
            return x
        return m.text_projection(x) if isinstance(m.text_projection, nn.Linear) else x @ m.text_projection


def _run_open_clip_blocks(transformer: nn.Module, x: torch.Tensor, mask: torch.Tensor | None,
                          deep: Sequence[torch.Tensor], at: int) -> torch.Tensor:
    """open_clip Transformer.forward block by block (batch-first tokens in and out), with deep prompts."""
    for i, block in enumerate(transformer.resblocks):
        if 0 < i <= len(deep):
            x = _replace(x, deep[i - 1], at)
        if transformer.batch_first:
            x = block(x, attn_mask=mask)
        else:  # older open_clip layouts run sequence-first
            x = block(x.transpose(0, 1), attn_mask=mask).transpose(0, 1)
    return x


class HFClipText(TextTower):
    """transformers' CLIPModel text tower: embeddings, encoder layers, final_layer_norm, text_projection."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.text = model.text_model
        self.width = int(self.text.embeddings.token_embedding.weight.shape[1])
        self.depth = len(self.text.encoder.layers)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.text.embeddings.token_embedding(tokens)

    def encode(self, x, tokens, deep=(), at=1):
        t = self.text
        length = x.shape[1]
        x = x + t.embeddings.position_embedding(t.embeddings.position_ids[:, :length])
        # the causal mask CLIP's text encoder applies, additive, for every layer
        causal = torch.full((length, length), torch.finfo(x.dtype).min, device=x.device, dtype=x.dtype).triu(1)
        causal = causal[None, None]
        for i, layer in enumerate(t.encoder.layers):
            if 0 < i <= len(deep):
                x = _replace(x, deep[i - 1], at)
            out = layer(x, causal)
            x = out[0] if isinstance(out, tuple) else out  # transformers < 5 returns a tuple
        x = t.final_layer_norm(x)
        rows = torch.arange(x.shape[0], device=x.device)
        eos = getattr(t, "eos_token_id", 2)
        # transformers' own rule: the legacy id 2 means "the highest token id", else the first end-of-text token
        idx = tokens.argmax(dim=-1) if eos == 2 else (tokens == eos).int().argmax(dim=-1)
        return self.model.text_projection(x[rows, idx.to(x.device)])


def text_tower(spec) -> TextTower:
    """The text tower of a loaded model (models.ModelSpec) as prompt learning sees it; PromptError otherwise."""
    model = spec.model
    if not spec.has_text:
        raise PromptError(f"prompt learning on class names needs a text tower, and {spec.key} has none: use a "
                          "CLIP-family model (python -m models list shows which have one)")
    if hasattr(model, "token_embedding") and hasattr(model, "transformer"):
        return OpenClipText(model)
    if hasattr(model, "text_model") and hasattr(model, "text_projection"):
        return HFClipText(model)
    kind = type(getattr(model, "text", model)).__name__
    raise PromptError(f"{spec.key}'s text tower ({kind}) has no token-embedding layer prompts can be fed "
                      "through: choose an open_clip CLIP or transformers CLIPModel model")


def phrase_length(tokenizer, phrase: str) -> int:
    """Tokens of `phrase` without the start and end tokens (CLIP's end-of-text id is the largest)."""
    tokens = tokenizer([phrase])[0]
    return int(tokens.argmax()) - 1


class ClassPrompts(nn.Module):
    """One prompt per class, ``[SOS] c_1 .. c_n <rest of the prompt> [EOS]``, whose n context token embeddings
    c_1 .. c_n (positions 1 .. n) are learnable: one set shared by the classes, or one per class.

    ``init="text"`` starts the context from the prompts' own embeddings at those positions (the words of a
    phrase such as "a photo of a"), so that before training the prompts encode exactly as their text does;
    ``init="random"`` draws it from N(0, 0.02^2) (CoOp)."""

    def __init__(self, tower: TextTower, tokens: torch.Tensor, n_ctx: int, init: Literal["text", "random"],
                 class_specific: bool = False):
        super().__init__()
        self._tower = tower  # a reference: the model's weights belong to the model, not to the prompts
        with torch.no_grad():
            embedding = tower.embed(tokens).detach().float()
        classes = tokens.shape[0]
        if init == "text":
            ctx = embedding[:, 1:1 + n_ctx] if class_specific else embedding[0, 1:1 + n_ctx]
        else:
            ctx = torch.randn(classes, n_ctx, tower.width) if class_specific else torch.randn(n_ctx, tower.width)
            ctx = ctx * 0.02
        self.ctx = nn.Parameter(ctx.clone())
        self.n_ctx = n_ctx
        self.register_buffer("tokens", tokens.clone(), persistent=False)
        self.register_buffer("prefix", embedding[:, :1].clone(), persistent=False)  # start-of-text
        self.register_buffer("suffix", embedding[:, 1 + n_ctx:].clone(), persistent=False)  # class words, EOS, pad

    @property
    def tower(self) -> TextTower:
        return self._tower

    @property
    def classes(self) -> int:
        return self.tokens.shape[0]

    def embeddings(self, ctx: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings (C, L, D) of the class prompts with context `ctx` (default: the learned one)."""
        ctx = self.ctx if ctx is None else ctx
        if ctx.dim() == 2:
            ctx = ctx.expand(self.classes, -1, -1)
        return torch.cat([self.prefix, ctx.to(self.prefix.dtype), self.suffix], dim=1)

    def forward(self, ctx: torch.Tensor | None = None, deep: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """Text features (C, E) of the class prompts (not L2-normalised)."""
        return self._tower.encode(self.embeddings(ctx), self.tokens, deep)

    def per_sample(self, ctx: torch.Tensor) -> torch.Tensor:
        """Text features (B, C, E) for a context per sample, ctx (B, n, D) (CoCoOp's image-conditioned one)."""
        b, c = ctx.shape[0], self.classes
        x = torch.cat([self.prefix.expand(b, -1, -1, -1).reshape(b * c, 1, -1),
                       ctx[:, None].expand(-1, c, -1, -1).reshape(b * c, self.n_ctx, -1).to(self.prefix.dtype),
                       self.suffix.expand(b, -1, -1, -1).reshape(b * c, self.suffix.shape[1], -1)], dim=1)
        return self._tower.encode(x, self.tokens.repeat(b, 1)).reshape(b, c, -1)


# -- image towers ------------------------------------------------------------------------------------
class VisualTower:
    """What visual prompts need of a vision transformer: its tokens, its blocks one by one, and its head."""

    width: int
    depth: int
    prefix: int  # tokens before the patches (class token, registers): prompts go right after them
    patch: int  # patch side in pixels (VPT's initialisation range)

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images -> the input tokens of the first block (B, T, width)."""
        raise NotImplementedError

    def blocks(self) -> Sequence[nn.Module]:
        raise NotImplementedError

    def run(self, block: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Output tokens of the last block (prompts removed) -> the image features the model's encoder gives."""
        raise NotImplementedError


class OpenClipViT(VisualTower):
    """open_clip's VisionTransformer (CLIP, QuiltNet): _embeds (ln_pre included), resblocks, _pool, proj."""

    def __init__(self, visual: nn.Module):
        self.visual = visual
        self.width = int(visual.class_embedding.shape[-1])
        self.depth = len(visual.transformer.resblocks)
        self.prefix = 1
        self.patch = int(visual.conv1.kernel_size[0])

    def tokens(self, images):
        return self.visual._embeds(images)

    def blocks(self):
        return self.visual.transformer.resblocks

    def run(self, block, x, mask):
        if self.visual.transformer.batch_first:
            return block(x, attn_mask=mask)
        return block(x.transpose(0, 1), attn_mask=mask).transpose(0, 1)

    def head(self, x):
        pooled, _ = self.visual._pool(x)
        return pooled @ self.visual.proj if self.visual.proj is not None else pooled


class TimmViT(VisualTower):
    """timm's VisionTransformer (UNI, DinoBloom, the tiny test ViT, BiomedCLIP's trunk), then `post` if given."""

    def __init__(self, vit: nn.Module, post: nn.Module | None = None):
        self.vit, self.post = vit, post
        self.width = int(vit.embed_dim)
        self.depth = len(vit.blocks)
        self.prefix = int(vit.num_prefix_tokens)
        size = vit.patch_embed.patch_size
        self.patch = int(size[0] if isinstance(size, (tuple, list)) else size)

    def tokens(self, images):
        v = self.vit
        return v.norm_pre(v.patch_drop(v._pos_embed(v.patch_embed(images))))

    def blocks(self):
        return self.vit.blocks

    def run(self, block, x, mask):
        return block(x, attn_mask=mask)

    def head(self, x):
        x = self.vit.forward_head(self.vit.norm(x))
        return self.post(x) if self.post is not None else x


class HFClipViT(VisualTower):
    """transformers' CLIPModel vision tower (PLIP, PubMedCLIP): embeddings, pre_layrnorm, layers, post_layernorm
    of the class token, visual_projection."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.vision = model.vision_model
        self.width = int(self.vision.config.hidden_size)
        self.depth = len(self.vision.encoder.layers)
        self.prefix = 1
        self.patch = int(self.vision.config.patch_size)

    def tokens(self, images):
        return self.vision.pre_layrnorm(self.vision.embeddings(images))

    def blocks(self):
        return self.vision.encoder.layers

    def run(self, block, x, mask):
        out = block(x, None if mask is None else mask[None, None])
        return out[0] if isinstance(out, tuple) else out

    def head(self, x):
        return self.model.visual_projection(self.vision.post_layernorm(x[:, 0]))


def visual_tower(spec) -> VisualTower:
    """The image tower of a loaded model as visual prompts see it; PromptError (one line) for anything that is not
    a vision transformer, convolutional networks included."""
    model = spec.model
    visual = getattr(model, "visual", None)
    if visual is not None and hasattr(visual, "class_embedding") and hasattr(visual, "transformer"):
        return OpenClipViT(visual)
    if visual is not None and _is_timm_vit(getattr(visual, "trunk", None)):
        return TimmViT(visual.trunk, visual.head)
    if _is_timm_vit(model):
        return TimmViT(model)
    if hasattr(model, "vision_model") and hasattr(model, "visual_projection"):
        return HFClipViT(model)
    kind = type(visual if visual is not None else model).__name__
    raise PromptError(f"visual prompts need a vision transformer, and {spec.key} is a {kind}, not one (a "
                      "convolutional network has no tokens to prompt): choose a ViT model, or a method such as "
                      "linear or lora")


def _is_timm_vit(module: nn.Module | None) -> bool:
    return module is not None and all(hasattr(module, a) for a in ("patch_embed", "_pos_embed", "blocks",
                                                                   "num_prefix_tokens", "forward_head"))


def prompt_mask(length: int, at: int, n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """An additive attention mask (length, length) that hides the n prompt tokens from every other token."""
    mask = torch.zeros(length, length, device=device, dtype=dtype)
    others = torch.ones(length, dtype=torch.bool, device=device)
    others[at:at + n] = False
    mask[others.nonzero()[:, 0, None], torch.arange(at, at + n, device=device)] = float("-inf")
    return mask


class VisualPrompts(nn.Module):
    """n learnable tokens in a vision transformer: inserted at the first block's input (shallow), and replaced at
    the input of each of the first `depth` blocks (deep; depth 1 = shallow).

    ``init="uniform"``: VPT's U(-v, v) with v = sqrt(6 / (3 * patch^2 + width)); ``"normal"``: N(0, 0.02^2)
    (IVLP)."""

    def __init__(self, tower: VisualTower, n_tokens: int, depth: int, init: Init = "uniform"):
        super().__init__()
        if not 1 <= depth <= tower.depth:
            raise PromptError(f"visual prompt depth {depth} is outside 1 .. {tower.depth}, the blocks of this model")
        self._tower = tower
        if init == "uniform":
            bound = math.sqrt(6.0 / (3 * tower.patch ** 2 + tower.width))
            tokens = torch.empty(depth, n_tokens, tower.width).uniform_(-bound, bound)
        else:
            tokens = torch.randn(depth, n_tokens, tower.width) * 0.02
        self.tokens = nn.Parameter(tokens)

    def forward(self, images: torch.Tensor, hide_prompts: bool = False) -> torch.Tensor:
        """Image features of the prompted tower. ``hide_prompts``: no other token attends to the prompts (then the
        features are the frozen model's own, which tests use to check the insertion and removal)."""
        tower, prompts = self._tower, self.tokens
        at, n = tower.prefix, prompts.shape[1]
        x = _insert(tower.tokens(images), prompts[0], at)
        mask = prompt_mask(x.shape[1], at, n, x.device, x.dtype) if hide_prompts else None
        for i, block in enumerate(tower.blocks()):
            if 0 < i < prompts.shape[0]:
                x = _replace(x, prompts[i], at)
            x = tower.run(block, x, mask)
        return tower.head(torch.cat([x[:, :at], x[:, at + n:]], dim=1))
