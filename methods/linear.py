"""Linear probe: a linear head on cached frozen features (the paper's experiment 1)."""

from dataclasses import dataclass, field

import torch

from methods.heads import class_text_embeddings, linear_head
from methods.registry import HEAD_TASKS, Method, Plan, Stage, compat_notes, register
from methods.transductive import TransductiveSettings, add_transductive_stage, ti_suffix


@dataclass(frozen=True)
class LinearSettings(TransductiveSettings):
    textual: bool = field(default=False, metadata={"help": "True: start the head from text embeddings of the "
                                                           "class prompts (CLIP-family models)"})


def build(ctx, s: LinearSettings) -> Plan:
    head = linear_head(ctx)
    if s.textual:
        with torch.no_grad():
            head.weight.copy_(class_text_embeddings(ctx))
            head.bias.zero_()
    if ctx.config.compat == "seed":
        # the original's experiment 1: 50 (warmup) + n_iters epochs under CosineAnnealingLR(T_max=n_iters)
        # stepped per batch after a 50-step linear warmup (engine.trainer.cosine_annealing_factor)
        stage = Stage("linear", head, "features", ctx.probe_steps(), ctx.config.lr, schedule="cosine_annealing")
    else:
        stage = Stage("linear", head, "features", ctx.probe_steps(), ctx.config.lr)
    plan = add_transductive_stage(ctx, Plan(head, "features", [stage]), s)
    plan.notes.update(compat_notes(ctx, "exp1_schedule"))
    return plan


register(Method(
    tasks=HEAD_TASKS,
    name="linear", description="linear head on frozen features (optionally text-initialised)",
    settings=LinearSettings, inputs="features", build=build,
    source="the cytology paper, experiment 1 (CLIP-LoRA's linear probe)",
    label=lambda s: ("linear-textual" if s.textual else "linear") + ti_suffix(s), paper_experiment=1,
))
