"""Time one LoRA training step against the frozen model's forward+backward and against peft.

Variants (same random-init weights, same input batch, same precision, interleaved):
  floor     open_clip image tower, every weight frozen, input requires grad: forward + backward to the input
  ours      our LoRA on the open_clip tower + a linear head: forward, backward, AdamW step
  peft      Hugging Face peft on the same open_clip tower + head; peft can only target a whole
            nn.MultiheadAttention (LoRA on all of q, k, v and on out_proj), whatever --params says
  peft-hf   peft on --params (q_proj/v_proj...) of a Hugging Face CLIP vision tower of the same shape
            (width, depth, heads, patch, image size) + head: the q/v-only peft reference
  floor-hf  the frozen Hugging Face tower's forward + backward to the input (peft-hf's own floor)

Example: python benchmarks/lora_step.py --model ViT-B-16 --batch 8 --steps 5 --warmup 2
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.errors import UserError
from lora import LoRAError, apply_lora, lora_parameters, parse_params

VARIANTS = ("floor", "ours", "peft", "peft-hf", "floor-hf")
HF_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "out_proj"}
# Dense bf16 / fp32 peak of common accelerators in TFLOP/s, for the model FLOP utilisation estimate.
PEAK_TFLOPS = {"H200": (989.0, 67.0), "H100": (989.0, 67.0), "A100": (312.0, 19.5), "L40S": (362.0, 91.6),
               "A10": (125.0, 31.2), "V100": (125.0, 15.7)}


def _open_clip_tower(name: str) -> nn.Module:
    import open_clip

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return open_clip.create_model(name, pretrained=None).visual


def _hf_tower(tower: nn.Module) -> nn.Module:
    """A Hugging Face CLIP vision tower with the open_clip tower's shape (random init)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    t = tower.transformer
    block = t.resblocks[0]
    config = CLIPVisionConfig(
        hidden_size=t.width, intermediate_size=block.mlp.c_fc.out_features, num_hidden_layers=len(t.resblocks),
        num_attention_heads=block.attn.num_heads, image_size=tower.image_size[0], patch_size=tower.patch_size[0],
        hidden_act="gelu", attn_implementation="sdpa",
    )
    return CLIPVisionModel(config)


def _features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(pixel_values=x) if "transformers" in type(model).__module__ else model(x)
    return out.pooler_output if hasattr(out, "pooler_output") else out


class Step:
    """One timed variant: a callable doing a full step, on its own copy of the model."""

    def __init__(self, name: str, run: Callable[[], None]) -> None:
        self.name, self.run = name, run
        self.times: list[float] = []  # wall-clock seconds per step
        self.cpu: list[float] = []  # CPU seconds of this process per step (less sensitive to other load)


def _floor_step(model: nn.Module, x: torch.Tensor, autocast: Callable) -> Callable[[], None]:
    model.requires_grad_(False)

    def run() -> None:
        xi = x.detach().requires_grad_(True)
        with autocast():
            out = _features(model, xi)
        out.float().sum().backward()

    return run


def _train_step(model: nn.Module, params: list[nn.Parameter], x: torch.Tensor, labels: torch.Tensor,
                autocast: Callable) -> Callable[[], None]:
    dim = _features(model, x[:1]).shape[-1]
    head = nn.Linear(dim, int(labels.max()) + 1).to(x.device)
    opt = torch.optim.AdamW(params + list(head.parameters()), lr=1e-4, weight_decay=1e-2)

    def run() -> None:
        with autocast():
            loss = F.cross_entropy(head(_features(model, x)).float(), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return run


def _peft(model: nn.Module, targets: list[str], args: argparse.Namespace) -> tuple[nn.Module, list[nn.Parameter]]:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise UserError("peft is not installed: pip install peft, or leave out --variants peft peft-hf") from None

    config = LoraConfig(r=args.r, lora_alpha=args.alpha, use_rslora=True, lora_dropout=args.dropout,
                        target_modules=targets)
    wrapped = get_peft_model(model, config)
    return wrapped, [p for p in wrapped.parameters() if p.requires_grad]


def build_steps(args: argparse.Namespace, device: torch.device) -> tuple[list[Step], nn.Module]:
    """Every requested variant, each on its own copy of the same random-init tower."""
    letters = parse_params(args.params)
    torch.manual_seed(0)
    base = _open_clip_tower(args.model).to(device)
    size = base.image_size[0]
    x = torch.randn(args.batch, 3, size, size, device=device)
    labels = torch.randint(0, 10, (args.batch,), device=device)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.dtype == "bf16" else (
        lambda: torch.autocast(device.type, enabled=False))
    steps = []
    hf = _hf_tower(base).to(device) if {"peft-hf", "floor-hf"} & set(args.variants) else None
    for name in args.variants:
        if name == "floor":
            steps.append(Step(name, _floor_step(copy.deepcopy(base), x, autocast)))
        elif name == "ours":
            model = copy.deepcopy(base)
            apply_lora(model, letters, r=args.r, alpha=args.alpha, dropout_rate=args.dropout)
            steps.append(Step(name, _train_step(model, lora_parameters(model), x, labels, autocast)))
        elif name == "peft":
            model, params = _peft(copy.deepcopy(base), ["attn"], args)
            steps.append(Step(name, _train_step(model, params, x, labels, autocast)))
        elif name == "peft-hf":
            model, params = _peft(copy.deepcopy(hf), [HF_NAMES[x] for x in letters if x in HF_NAMES], args)
            steps.append(Step(name, _train_step(model, params, x, labels, autocast)))
        elif name == "floor-hf":
            steps.append(Step(name, _floor_step(copy.deepcopy(hf), x, autocast)))
    return steps, base


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(steps: list[Step], warmup: int, repeats: int, device: torch.device) -> None:
    """Warm every variant up, then time them in turns so that machine noise hits all alike."""
    for step in steps:
        for _ in range(warmup):
            step.run()
    _sync(device)
    for _ in range(repeats):
        for step in steps:
            start, cpu = time.perf_counter(), time.process_time()
            step.run()
            _sync(device)
            step.times.append(time.perf_counter() - start)
            step.cpu.append(time.process_time() - cpu)


def forward_flops_per_image(model: nn.Module, device: torch.device) -> float:
    """FLOPs of one image through the tower's forward (counted by torch's FLOP counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    size = model.image_size[0]
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.randn(1, 3, size, size, device=device))
    return float(counter.get_total_flops())


def _peak_tflops(args: argparse.Namespace) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    name = torch.cuda.get_device_name()
    for key, (bf16, fp32) in PEAK_TFLOPS.items():
        if key in name:
            return bf16 if args.dtype == "bf16" else fp32
    return None


def report(steps: list[Step], args: argparse.Namespace, device: torch.device, flops: float | None) -> None:
    """Median and min step time per variant, and ratios of the medians to the floor and to peft."""
    med = {s.name: statistics.median(s.times) for s in steps}
    cpu = {s.name: statistics.median(s.cpu) for s in steps}
    print(f"model={args.model} batch={args.batch} params={' '.join(parse_params(args.params))} r={args.r} "
          f"dtype={args.dtype} device={device} threads={torch.get_num_threads()} repeats={args.steps}")
    print("wall-clock median and min per step; ratios of medians; cpu = median CPU seconds of this process")
    print(f"{'variant':<10}{'median s':>10}{'min s':>9}{'/floor':>8}{'/peft':>7}{'/peft-hf':>9}"
          f"{'cpu s':>8}{'cpu/floor':>10}" + (f"{'img/s':>9}{'MFU':>7}" if flops else ""))
    for s in steps:
        ratios = [f"{med[s.name] / med[ref]:>{w}.3f}" if ref in med else f"{'-':>{w}}"
                  for ref, w in (("floor", 8), ("peft", 7), ("peft-hf", 9))]
        cpu_ratio = f"{cpu[s.name] / cpu['floor']:>10.3f}" if "floor" in cpu else f"{'-':>10}"
        line = f"{s.name:<10}{med[s.name]:>10.3f}{min(s.times):>9.3f}" + "".join(ratios)
        line += f"{cpu[s.name]:>8.2f}{cpu_ratio}"
        if flops:
            ips = args.batch / med[s.name]
            peak = _peak_tflops(args)
            mfu = f"{3 * flops * ips / (peak * 1e12):>7.1%}" if peak else f"{'?':>7}"
            line += f"{ips:>9.1f}{mfu}"
        print(line)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-B-16", help="open_clip architecture (random init), e.g. ViT-L-14")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant (interleaved)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--params", nargs="+", default=["q", "v"], help='LoRA letters, e.g. q v or "q k v o"')
    p.add_argument("--r", type=int, default=2)
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--dropout", type=float, default=0.25)
    p.add_argument("--variants", nargs="+", default=["floor", "ours", "peft", "peft-hf", "floor-hf"],
                   choices=VARIANTS)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="accelerator peak for the MFU estimate")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; user mistakes print one line and exit 2."""
    args = parse_args(argv)
    try:
        if args.device == "cuda" and not torch.cuda.is_available():
            raise LoRAError("--device cuda: no CUDA device is visible; use --device cpu")
        if args.threads:
            torch.set_num_threads(args.threads)
        device = torch.device(args.device)
        steps, base = build_steps(args, device)
        measure(steps, args.warmup, args.steps, device)
        flops = forward_flops_per_image(base, device) if device.type == "cuda" else None
        report(steps, args, device, flops)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
