"""LoRA: low-rank adapters in the backbone's attention (or pointwise convolutions) and a linear head
(the paper's experiments 2 and 3)."""

from dataclasses import dataclass, field

from lora import LoRASettings, OriginalAttentionLoRA, apply_lora, save_lora
from methods.heads import ImageClassifier, ImageTextModel, contrastive_loss, linear_head
from methods.registry import TASKS, Method, Plan, Stage, compat_notes, register
from tasks import get_task, tasks

_D = LoRASettings()


@dataclass(frozen=True)
class LoRAMethodSettings:
    params: tuple[str, ...] = field(default=_D.params, metadata={"help": 'q k v o and/or pw; "q v", q v or qv'})
    r: int = field(default=_D.r, metadata={"help": "LoRA rank"})
    alpha: float = field(default=_D.alpha, metadata={"help": "LoRA alpha"})
    dropout_rate: float = field(default=_D.dropout_rate, metadata={"help": "dropout on the LoRA input"})
    position: str = field(default=_D.position, metadata={"help": "blocks: bottom, mid, up, half-up, half-bottom, "
                                                                 "all, top, top3"})
    encoder: str = field(default=_D.encoder, metadata={"help": "towers: vision, text or both"})
    scaling: str = field(default=_D.scaling, metadata={"help": "sqrt: alpha/sqrt(r) (the paper); standard: "
                                                               "alpha/r"})

    def __post_init__(self):
        # one validation, the LoRA package's own; it also puts the letters in canonical order
        checked = self.lora()
        object.__setattr__(self, "params", checked.params)
        object.__setattr__(self, "alpha", checked.alpha)
        object.__setattr__(self, "dropout_rate", checked.dropout_rate)

    def lora(self, model_key: str | None = None, dora: bool = False, original_attention: bool = False
             ) -> LoRASettings:
        return LoRASettings(params=self.params, r=self.r, alpha=self.alpha, dropout_rate=self.dropout_rate,
                            position=self.position, encoder=self.encoder, scaling=self.scaling, dora=dora,
                            model_key=model_key, original_attention=original_attention)


def build(ctx, s: LoRAMethodSettings, dora: bool = False) -> Plan:
    """Adapters in the backbone (the DoRA variant with ``dora=True``) and a linear head, trained on images."""
    # --compat seed: timm fused-qkv attention (UNI, BiomedCLIP's image tower) as the original code's LoRA runs
    # it (lora.layers.OriginalAttentionLoRA); LoRA only: the original has no DoRA to reproduce
    original = ctx.config.compat == "seed" and not dora
    lora = s.lora(ctx.model_label, dora, original)
    apply_lora(ctx.spec.model, settings=lora)
    replaced = any(isinstance(m, OriginalAttentionLoRA) for m in ctx.spec.model.modules())
    notes = compat_notes(ctx, *(["original_attention"] if replaced else []))

    def export(folder):
        save_lora(ctx.spec.model, folder / "lora.safetensors", lora)

    name = "dora" if dora else "lora"
    if get_task(ctx.split.task).contrastive:  # image-text pairs: both towers' adapters and CLIP's scale
        model = ImageTextModel(ctx.spec, [ctx.split.captions[path] for path, _ in ctx.split.train])
        stage = Stage(name, model, "images", ctx.paper_steps(), ctx.config.lr,
                      targets=list(range(len(ctx.split.train))), loss=contrastive_loss)
        return Plan(model, "images", [stage], export=export, notes=notes)
    model = ImageClassifier(ctx.spec, linear_head(ctx))
    model.head.requires_grad_(True)
    return Plan(model, "images", [Stage(name, model, "images", ctx.paper_steps(), ctx.config.lr)], export=export,
                notes=notes)


def label(s: LoRAMethodSettings) -> str:
    return f"lora-{''.join(s.params)}-r{s.r}-{s.position}-{s.encoder}"


def experiment(c) -> int:
    """The paper's experiment a run of single-label data is (3: a percentage of the data, 2: few-shot)."""
    from datasets.registry import dataset_task

    task = dataset_task(c.dataset, c.root_path)
    if task is not None and not get_task(task).exclusive:
        return 0
    return 3 if c.shots == 0 else 2


IMAGE_TEXT_DEFAULTS = {t.name: {"encoder": "both"} for t in tasks() if t.contrastive}  # adapters in both towers

register(Method(
    tasks=TASKS, task_defaults=IMAGE_TEXT_DEFAULTS,
    name="lora", description="LoRA in the backbone + linear head, trained on images (image-text pairs: "
                             "contrastively, both towers)",
    settings=LoRAMethodSettings, inputs="images", build=build, packable=True,
    source="the cytology paper, experiments 2 and 3 (CLIP-LoRA)", label=label,
    paper_experiment=experiment,
))
