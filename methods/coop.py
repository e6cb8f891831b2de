"""Context optimisation on the text tower: CoOp, KgCoOp and ProGrad, and what every prompt-learning method shares.

    logits = logit_scale * cos(f(image), g([SOS] c_1 .. c_n <class name>. [EOS]))

The image tower and the text tower stay frozen; only the n context token embeddings c_i train (shared by the
classes, or one set per class with --class_specific_ctx), through the text tower (models/prompts.py). The
context starts from a phrase's embeddings (--ctx_init "a photo of a"; --ctx_init template: the words of the
dataset's own prompt before the class name, the rest of the prompt kept after it) or, with no phrase, from
N(0, 0.02^2). Initialised from a phrase, the untrained prompts encode exactly as the written prompt does.

- coop: cross-entropy only (Zhou et al., IJCV 2022; KaiyangZhou/CoOp: 16 random tokens, lr 0.002, 50/100/200
  epochs at 1/2-4/8-16 shots).
- kgcoop: plus lambda * (1 - mean_c cos(g_c, hand-written prompt_c)) (Yao et al., CVPR 2023; htyao89/KgCoOp:
  lambda 8, "a photo of a", 100 epochs), zero at the start when initialised from the hand-written prompt.
- prograd: the cross-entropy gradient of each trained tensor, when it points against the gradient of the KL
  divergence from the zero-shot prediction, loses lambda times its component along that gradient (Zhu et al.,
  ICCV 2023; BeierZhu/Prompt-align: lambda 1, T 1, CoOp's schedule). Projected before the optimiser sees it.

The engine trains with AdamW and its warmup + cosine schedule (the papers: SGD); the lr defaults are the papers'.
Unless --n_iters is given, a stage lasts the paper's number of epochs for the run's shots (results.json
method_notes: epochs, epochs_from).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from methods.heads import class_text_embeddings
from methods.registry import Method, MethodError, Plan, Stage, register
from models.prompts import ClassPrompts, phrase_length, text_tower

TEMPLATE = "template"  # --ctx_init keyword: the dataset's own prompt template


# -- shared by every prompt-learning method --------------------------------------------------------------
@dataclass(frozen=True)
class ContextSettings:
    n_ctx: int = field(default=16, metadata={"help": "learnable context tokens (with --ctx_init: at most the "
                                                     "phrase's tokens, its first n learn and the rest stay)"})
    ctx_init: str = field(default="", metadata={"help": 'initial context: a phrase ("a photo of a"), "template" '
                                                        "(the dataset's prompt before the class name), or empty "
                                                        "for random N(0, 0.02^2) tokens"})

    def __post_init__(self):
        if self.n_ctx < 1:
            raise MethodError(f"--n_ctx must be at least 1, got {self.n_ctx}")


@dataclass(frozen=True)
class ClassContextSettings(ContextSettings):
    """Context settings of the CoOp family, whose context may also be one per class."""

    class_specific_ctx: bool = field(default=False, metadata={"help": "True: one context per class (CoOp's CSC)"})


def class_names(ctx) -> list[str]:
    """The names the class prompts use (the dataset's prompt names, "_" read as a space)."""
    from datasets.registry import get_dataset

    info = get_dataset(ctx.config.dataset)
    return [info.prompt_names.get(str(c), str(c)).replace("_", " ") for c in ctx.split.classes]


def class_prompts(ctx, s: ContextSettings) -> ClassPrompts:
    """The learnable class prompts of a run from its context settings (seeded by the run)."""
    from datasets.registry import get_dataset

    tower = text_tower(ctx.spec)
    names = class_names(ctx)
    if s.ctx_init == TEMPLATE:
        template = get_dataset(ctx.config.dataset).prompt_template
        phrase = template.split("{}")[0].strip()
        if not phrase:
            raise MethodError(f"--ctx_init template: the prompt template {template!r} of {ctx.config.dataset} has "
                              "no words before the class name; give a phrase instead, e.g. --ctx_init 'a photo of a'")
        texts = [template.format(n) for n in names]
    else:
        phrase = s.ctx_init.strip() or " ".join(["X"] * s.n_ctx)  # CoOp's placeholder words for a random context
        texts = [f"{phrase} {n}." for n in names]
    n_ctx = min(s.n_ctx, phrase_length(ctx.spec.tokenizer, phrase)) if s.ctx_init.strip() else s.n_ctx
    torch.manual_seed(ctx.config.seed)
    ctx.spec.model.to(ctx.device)
    tokens = ctx.spec.tokenizer(texts).to(ctx.device)
    prompts = ClassPrompts(tower, tokens, n_ctx, "text" if s.ctx_init.strip() else "random",
                           getattr(s, "class_specific_ctx", False))
    return prompts.cpu()


def paper_epochs_steps(ctx, epochs: int) -> tuple[int, dict]:
    """A stage's steps: warmup + --n_iters epochs when --n_iters (or a preset, the demo, a repeated run) sets
    it, else warmup + the paper's `epochs`; and the notes saying which."""
    c = ctx.config
    if c.n_iters_from == "default":
        paper = dataclasses.replace(ctx, config=dataclasses.replace(c, n_iters=epochs))
        return paper.epoch_steps(), {"epochs": epochs, "epochs_from": "paper"}
    return ctx.epoch_steps(), {"epochs": c.n_iters, "epochs_from": "n_iters"}


def coop_epochs(shots: int) -> int:
    """CoOp's schedule (its README): 50 epochs at 1 shot, 100 at 2-4, 200 at 8-16; 50 on whole training sets."""
    if shots == 1 or shots <= 0:
        return 50
    return 100 if shots <= 4 else 200


def init_label(s: ContextSettings) -> str:
    """The context's initialisation in a folder name: rand, template, or the phrase's words."""
    words = re.sub(r"[^a-z0-9]+", "_", s.ctx_init.strip().lower()).strip("_")
    return (words[:24] or "rand") if s.ctx_init != TEMPLATE else TEMPLATE


def context_label(name: str, s: ContextSettings) -> str:
    return f"{name}-ctx{s.n_ctx}-{init_label(s)}" + ("-csc" if getattr(s, "class_specific_ctx", False) else "")


class PromptedCLIP(nn.Module):
    """Frozen image features against the text features of learnable class prompts: logit_scale x cosine."""

    def __init__(self, spec, prompts: ClassPrompts):
        super().__init__()
        self.backbone = spec.model  # frozen; registered so that .to() moves it with the prompts
        self.prompts = prompts
        self._encode = spec.encode_image
        self.register_buffer("scale", spec.logit_scale.reshape(()))
        self.last_text: torch.Tensor | None = None  # the training step's text features (penalties read them)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # the image tower is frozen: no graph through it
            return F.normalize(self._encode(images).float(), dim=-1)

    def text_features(self) -> torch.Tensor:
        return F.normalize(self.prompts().float(), dim=-1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        image, text = self.image_features(images), self.text_features()
        if self.training:
            self.last_text = text
        return self.scale * image @ text.t()


def prompt_plan(ctx, name: str, model: nn.Module, epochs: int, extra_loss=None) -> Plan:
    steps, notes = paper_epochs_steps(ctx, epochs)
    stage = Stage(name, model, "images", steps, ctx.config.lr, extra_loss=extra_loss)
    return Plan(model, "images", [stage], notes=notes)


# -- coop ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CoOpSettings(ClassContextSettings):
    pass


def build_coop(ctx, s: CoOpSettings) -> Plan:
    model = PromptedCLIP(ctx.spec, class_prompts(ctx, s))
    return prompt_plan(ctx, "coop", model, coop_epochs(ctx.config.shots))


register(Method(
    name="coop", description="CoOp: learnable context tokens of the class prompts, both towers frozen, on images",
    settings=CoOpSettings, inputs="images", build=build_coop, lr=2e-3, budget="epochs",
    source="CoOp (Zhou et al., IJCV 2022; KaiyangZhou/CoOp): 16 tokens, lr 0.002, 50/100/200 epochs by shots",
    label=lambda s: context_label("coop", s),
))


# -- kgcoop ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KgCoOpSettings(ClassContextSettings):
    n_ctx: int = field(default=4, metadata={"help": "learnable context tokens (at most the phrase's tokens)"})
    ctx_init: str = field(default=TEMPLATE, metadata={"help": 'initial context: "template" (the dataset\'s prompt '
                                                              'before the class name: the hand-written prompt '
                                                              'itself, as KgCoOp\'s "a photo of a"), a phrase, or '
                                                              "empty for random"})
    kg_lambda: float = field(default=8.0, metadata={"help": "weight of 1 - cos(learned, hand-written class "
                                                            "embedding)"})

    def __post_init__(self):
        super().__post_init__()
        if self.kg_lambda < 0:
            raise MethodError(f"--kg_lambda must be >= 0, got {self.kg_lambda:g}")


class KnowledgeGuided(PromptedCLIP):
    """PromptedCLIP whose learned class embeddings are pulled towards the hand-written prompts' embeddings."""

    def __init__(self, spec, prompts: ClassPrompts, hand: torch.Tensor, weight: float):
        super().__init__(spec, prompts)
        self.register_buffer("hand", F.normalize(hand.float(), dim=-1))
        self.weight = weight

    def penalty(self, text: torch.Tensor | None = None) -> torch.Tensor:
        """1 - mean cosine between the learned (the last training step's, by default) and hand-written embeddings."""
        text = self.last_text if text is None else text
        return 1.0 - F.cosine_similarity(text, self.hand, dim=-1).mean()


def build_kgcoop(ctx, s: KgCoOpSettings) -> Plan:
    model = KnowledgeGuided(ctx.spec, class_prompts(ctx, s), class_text_embeddings(ctx), s.kg_lambda)
    return prompt_plan(ctx, "kgcoop", model, 100, extra_loss=lambda m: m.weight * m.penalty())


register(Method(
    name="kgcoop", description="KgCoOp: CoOp plus a pull of the learned class embeddings towards the hand-written "
                               "prompts'",
    settings=KgCoOpSettings, inputs="images", build=build_kgcoop, lr=2e-3, budget="epochs",
    source="KgCoOp (Yao et al., CVPR 2023; htyao89/KgCoOp): lambda 8, 4 tokens from the hand-written prompt, "
           "lr 0.002, 100 epochs",
    label=lambda s: context_label("kgcoop", s) + f"-l{s.kg_lambda:g}",
))


# -- prograd ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProGradSettings(ClassContextSettings):
    n_ctx: int = field(default=16, metadata={"help": "learnable context tokens (at most the phrase's tokens)"})
    ctx_init: str = field(default=TEMPLATE, metadata={"help": 'initial context: "template" (the hand-written '
                                                              "prompt, ProGrad's CTX_INIT), a phrase, or empty for "
                                                              "random"})
    prograd_lambda: float = field(default=1.0, metadata={"help": "share of a conflicting gradient's component along "
                                                                 "the zero-shot KL gradient that is removed (1: "
                                                                 "orthogonal projection)"})
    prograd_t: float = field(default=1.0, metadata={"help": "temperature of the KL divergence from the zero-shot "
                                                            "prediction"})

    def __post_init__(self):
        super().__post_init__()
        if self.prograd_lambda < 0 or self.prograd_t <= 0:
            raise MethodError("--prograd_lambda must be >= 0 and --prograd_t positive")


class ProjectedGradient(PromptedCLIP):
    """PromptedCLIP whose prompt gradients are projected against the zero-shot KL gradient (ProGrad).

    Every training forward also computes the gradient g_kl of KL(zero-shot || model) with respect to each
    trained tensor; a hook on that tensor then turns the gradient g the engine's loss gives it into
    g - lambda (g . u) u, u = g_kl / |g_kl|, whenever g . u < 0 (the original's per-tensor rule)."""

    def __init__(self, spec, prompts: ClassPrompts, zero_shot: torch.Tensor, lam: float, temperature: float):
        super().__init__(spec, prompts)
        self.register_buffer("zero_shot", F.normalize(zero_shot.float(), dim=-1))
        self.lam, self.temperature = lam, temperature
        self.reference: dict[int, torch.Tensor] = {}
        self._computing_reference = False
        for p in self.prompts.parameters():
            p.register_hook(lambda grad, p=p: self._project(p, grad))

    def kl_loss(self, logits: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """KL divergence (up to the teacher's entropy) from the zero-shot prediction, x T^2 (the original's)."""
        t = self.temperature
        teacher = (self.scale * image @ self.zero_shot.t() / t).softmax(dim=-1)
        return -(teacher * (logits / t).log_softmax(dim=-1)).sum(dim=-1).mean() * t * t

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        image, text = self.image_features(images), self.text_features()
        logits = self.scale * image @ text.t()
        if self.training and torch.is_grad_enabled():
            params = [p for p in self.prompts.parameters() if p.requires_grad]
            self._computing_reference = True
            try:
                grads = torch.autograd.grad(self.kl_loss(logits.float(), image), params, retain_graph=True)
            finally:
                self._computing_reference = False
            self.reference = {id(p): g.detach() for p, g in zip(params, grads, strict=True)}
        return logits

    def _project(self, p: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        ref = None if self._computing_reference else self.reference.get(id(p))
        if ref is None:
            return grad
        unit = ref / ref.norm().clamp_min(1e-12)
        along = (grad * unit).sum()
        return grad - self.lam * along * unit if along < 0 else grad


def build_prograd(ctx, s: ProGradSettings) -> Plan:
    model = ProjectedGradient(ctx.spec, class_prompts(ctx, s), class_text_embeddings(ctx), s.prograd_lambda,
                              s.prograd_t)
    return prompt_plan(ctx, "prograd", model, coop_epochs(ctx.config.shots))


register(Method(
    name="prograd", description="ProGrad: CoOp whose gradient is projected so it does not conflict with the "
                                "zero-shot prediction's",
    settings=ProGradSettings, inputs="images", build=build_prograd, lr=2e-3, budget="epochs",
    source="ProGrad (Zhu et al., ICCV 2023; BeierZhu/Prompt-align): lambda 1, T 1, CoOp's lr and schedule",
    label=lambda s: context_label("prograd", s) + f"-l{s.prograd_lambda:g}",
))
