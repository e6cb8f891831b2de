"""Time (and optionally measure the memory of) one LoRA training step against frozen floors and peft.

Variants (same random-init weights, same input batch, same precision, interleaved):
  floor       the stock model, every weight frozen, input requires grad: forward + backward to the input
  floor-ours  our LoRA layers with the adapters switched off (lora_disabled), everything frozen: forward +
              backward to the input through our modules (for attention: our fused projection and SDPA path)
  ours        our LoRA + a linear head: forward, backward, AdamW step
  dora        our DoRA + a linear head: forward, backward, AdamW step
  peft        Hugging Face peft LoRA on the same model + head. On an open_clip ViT peft can only target a
              whole nn.MultiheadAttention (LoRA on all of q, k, v and on out_proj), whatever --params says,
              and it merges the adapters into the weights at every forward, so no dropout is applied there
              (and no mask kept); on a convolutional model it adapts the same 1x1 convolutions as ours
  peft-dora   peft with use_dora=True on the same targets (not on nn.MultiheadAttention, which peft refuses)
  peft-hf     peft on --params (q_proj/v_proj...) of a Hugging Face CLIP vision tower of the same shape
              (width, depth, heads, patch, image size) + head: the q/v-only peft reference (ViTs only)
  floor-hf    the frozen Hugging Face tower's forward + backward to the input (peft-hf's own floor)
  ours-compiled  ours with the model's forward in torch.compile (what --compile True does in training);
              added by --compile, which also prints its median step time against ours (eager) and their
              ratio. Compilation happens in the first warm-up step, so --compile needs --warmup 1 or more

--model is an open_clip architecture (its image tower) or a timm model (e.g. efficientnet_lite0).
Memory (--memory): each variant runs alone in a fresh subprocess. On CPU: the process's lifetime peak
resident set size (getrusage ru_maxrss, which includes building the model), and, after freed heap memory
is handed back (malloc_trim) and the kernel's peak mark reset, the peak RSS during the warm-up and timed
steps and its rise over the RSS before them. On CUDA: torch.cuda.max_memory_allocated over the steps and
its rise over the memory allocated before them.

Examples:
  python benchmarks/lora_step.py --model ViT-B-16 --batch 8 --threads 1 --memory
  python benchmarks/lora_step.py --model efficientnet_lite0 --params pw --batch 16 --threads 1
  python benchmarks/lora_step.py --model ViT-B-16 --batch 8 --variants ours --compile
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import os
import resource
import statistics
import subprocess
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
from lora import LoRAError, apply_lora, lora_layers, lora_parameters, parse_params

VARIANTS = ("floor", "floor-ours", "ours", "dora", "peft", "peft-dora", "peft-hf", "floor-hf", "ours-compiled")
VIT_VARIANTS = ("floor", "floor-ours", "ours", "dora", "peft", "peft-hf", "floor-hf")
CONV_VARIANTS = ("floor", "floor-ours", "ours", "dora", "peft", "peft-dora")
HF_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "out_proj"}
# Dense bf16 / fp32 peak of common accelerators in TFLOP/s, for the model FLOP utilisation estimate.
PEAK_TFLOPS = {"H200": (989.0, 67.0), "H100": (989.0, 67.0), "A100": (312.0, 19.5), "L40S": (362.0, 91.6),
               "A10": (125.0, 31.2), "V100": (125.0, 15.7)}


def _is_open_clip(name: str) -> bool:
    import open_clip

    return name in open_clip.list_models()


def build_model(name: str) -> tuple[nn.Module, int]:
    """The image model to adapt (an open_clip image tower or a timm model, random init) and its input side."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if _is_open_clip(name):
            import open_clip

            tower = open_clip.create_model(name, pretrained=None).visual
            return tower, tower.image_size[0]
        import timm

        try:
            model = timm.create_model(name, pretrained=False, num_classes=0)
        except RuntimeError as e:
            raise UserError(f"--model {name}: neither an open_clip architecture nor a timm model ({e})") from None
        return model, model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]


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
    inner = getattr(model, "_orig_mod", model)  # the module a torch.compile wrapper compiles
    out = model(pixel_values=x) if "transformers" in type(inner).__module__ else model(x)
    return out.pooler_output if hasattr(out, "pooler_output") else out


class Step:
    """One timed variant: a callable doing a full step, on its own copy of the model."""

    def __init__(self, name: str, run: Callable[[], None]) -> None:
        self.name, self.run = name, run
        self.times: list[float] = []  # wall-clock seconds per step
        self.cpu: list[float] = []  # CPU seconds of this process per step (less sensitive to other load)
        self.first: float | None = None  # wall-clock seconds of the first warm-up step (compilation, if any)


def _set_mode(model: nn.Module, freeze_bn: bool) -> nn.Module:
    """Training mode (as the trainer runs), BatchNorm in eval mode with --freeze-bn (as the trainer does)."""
    model.train()
    if freeze_bn:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    return model


def _floor_step(model: nn.Module, x: torch.Tensor, autocast: Callable) -> Callable[[], None]:
    model.requires_grad_(False)

    def run() -> None:
        xi = x.detach().requires_grad_(True)
        with autocast():
            out = _features(model, xi)
        out.float().sum().backward()

    return run


def _train_step(model: nn.Module, params: list[nn.Parameter], x: torch.Tensor, labels: torch.Tensor,
                autocast: Callable, compiled: bool = False) -> Callable[[], None]:
    with torch.no_grad():
        dim = _features(model, x[:1]).shape[-1]  # eager: no compilation for this one-image probe
    head = nn.Linear(dim, int(labels.max()) + 1).to(x.device)
    opt = torch.optim.AdamW(params + list(head.parameters()), lr=1e-4, weight_decay=1e-2)
    # compiled on its first call, a warm-up step; static shapes, as the trainer compiles
    forward = torch.compile(model, dynamic=False) if compiled else model

    def run() -> None:
        with autocast():
            loss = F.cross_entropy(head(_features(forward, x)).float(), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return run


def _peft(model: nn.Module, targets: list[str], args: argparse.Namespace, dora: bool = False
          ) -> tuple[nn.Module, list[nn.Parameter]]:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise UserError("peft is not installed: pip install peft, or leave out the peft variants") from None

    config = LoraConfig(r=args.r, lora_alpha=args.alpha, use_rslora=True, lora_dropout=args.dropout,
                        target_modules=targets, use_dora=dora)
    wrapped = get_peft_model(model, config)
    return wrapped, [p for p in wrapped.parameters() if p.requires_grad]


def _ours(base: nn.Module, letters: tuple[str, ...], args: argparse.Namespace, dora: bool = False) -> nn.Module:
    model = copy.deepcopy(base)
    apply_lora(model, letters, r=args.r, alpha=args.alpha, dropout_rate=args.dropout, dora=dora)
    return model


def _peft_targets(base: nn.Module, letters: tuple[str, ...], args: argparse.Namespace, vit: bool) -> list[str]:
    """peft's target modules: the whole attention on open_clip, else the very layers ours adapts."""
    if vit:
        return ["attn"]
    return [name for name, _ in lora_layers(_ours(base, letters, args))]


def build_step(name: str, base: nn.Module, args: argparse.Namespace, x: torch.Tensor, labels: torch.Tensor,
               autocast: Callable, vit: bool) -> Step:
    """One variant on its own copy of ``base``."""
    letters = parse_params(args.params)
    if name == "floor":
        return Step(name, _floor_step(_set_mode(copy.deepcopy(base), args.freeze_bn), x, autocast))
    if name == "floor-ours":
        model = _set_mode(_ours(base, letters, args), args.freeze_bn)
        for _, layer in lora_layers(model):
            layer.enabled = False  # what lora_disabled does, for the lifetime of this copy
        return Step(name, _floor_step(model, x, autocast))
    if name in ("ours", "dora", "ours-compiled"):
        model = _set_mode(_ours(base, letters, args, dora=name == "dora"), args.freeze_bn)
        return Step(name, _train_step(model, lora_parameters(model), x, labels, autocast,
                                      compiled=name == "ours-compiled"))
    if name in ("peft", "peft-dora"):
        if name == "peft-dora" and vit:
            raise UserError("peft has no DoRA for nn.MultiheadAttention; use peft-hf or leave out peft-dora")
        targets = _peft_targets(base, letters, args, vit)
        model, params = _peft(copy.deepcopy(base), targets, args, dora=name == "peft-dora")
        return Step(name, _train_step(_set_mode(model, args.freeze_bn), params, x, labels, autocast))
    if not vit:
        raise UserError(f"variant {name} needs an open_clip ViT --model")
    hf = _hf_tower(base).to(x.device)
    if name == "peft-hf":
        model, params = _peft(hf, [HF_NAMES[c] for c in letters if c in HF_NAMES], args)
        return Step(name, _train_step(model.train(), params, x, labels, autocast))
    return Step(name, _floor_step(hf.train(), x, autocast))  # floor-hf


def build_steps(args: argparse.Namespace, device: torch.device) -> tuple[list[Step], nn.Module]:
    """Every requested variant, each on its own copy of the same random-init model."""
    torch.manual_seed(0)
    base, size = build_model(args.model)
    base = base.to(device)
    vit = hasattr(base, "transformer") and hasattr(base, "image_size")
    x = torch.randn(args.batch, 3, size, size, device=device)
    labels = torch.randint(0, 10, (args.batch,), device=device)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.dtype == "bf16" else (
        lambda: torch.autocast(device.type, enabled=False))
    return [build_step(name, base, args, x, labels, autocast, vit) for name in args.variants], base


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(steps: list[Step], warmup: int, repeats: int, device: torch.device) -> None:
    """Warm every variant up, then time them in turns so that machine noise hits all alike."""
    for step in steps:
        for i in range(warmup):
            start = time.perf_counter()
            step.run()
            if i == 0:
                _sync(device)
                step.first = time.perf_counter() - start
    _sync(device)
    for _ in range(repeats):
        for step in steps:
            start, cpu = time.perf_counter(), time.process_time()
            step.run()
            _sync(device)
            step.times.append(time.perf_counter() - start)
            step.cpu.append(time.process_time() - cpu)


def _rss_mib() -> float:
    """The resident set size now (Linux /proc), in MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def _rss_peak_mib() -> float:
    """The kernel's peak-RSS mark (VmHWM; Linux /proc), in MiB."""
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def _settle_rss() -> bool:
    """Give freed heap memory back to the OS and reset the peak-RSS mark (Linux >= 4.0), so that the peak
    and rise cover the steps, not the build; False where the mark cannot be reset."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_memory_child(args: argparse.Namespace, device: torch.device) -> dict:
    """Build one variant alone, run warm-up and timed steps, and report its memory peak and rise."""
    steps = build_steps(args, device)[0]  # the base model is dropped: only the variant's copy stays
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2 ** 20
    else:
        reset = _settle_rss()
        before = _rss_mib()
    for _ in range(args.warmup + args.steps):
        steps[0].run()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = lifetime = torch.cuda.max_memory_allocated() / 2 ** 20
    else:
        lifetime = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        peak = _rss_peak_mib() if reset else lifetime
    return {"variant": args.variants[0], "lifetime_mib": lifetime, "peak_mib": peak, "rise_mib": peak - before}


def measure_memory(args: argparse.Namespace, argv: list[str]) -> dict[str, dict]:
    """Each variant's memory, measured alone in a fresh subprocess."""
    results = {}
    for name in args.variants:
        child = [sys.executable, str(Path(__file__).resolve()), *argv, "--variants", name, "--memory-child"]
        done = subprocess.run(child, capture_output=True, text=True, check=False)
        if done.returncode:
            raise UserError(f"memory run of {name} failed:\n{done.stderr[-2000:]}")
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    return results


def forward_flops_per_image(model: nn.Module, size: int, device: torch.device) -> float:
    """FLOPs of one image through the model's forward (counted by torch's FLOP counter)."""
    from torch.utils.flop_counter import FlopCounterMode

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


def _ratio(value: float, ref: float | None, width: int) -> str:
    return f"{value / ref:>{width}.3f}" if ref else f"{'-':>{width}}"


def _paired(step: Step, ref: Step) -> float:
    """Median over rounds of this variant's CPU seconds over the reference's in the same round."""
    return statistics.median(a / b for a, b in zip(step.cpu, ref.cpu, strict=True))


def report(steps: list[Step], args: argparse.Namespace, device: torch.device, flops: float | None,
           memory: dict[str, dict] | None) -> None:
    """Median and min step times, ratios to the floors, ours and peft, paired ratios, memory."""
    med = {s.name: statistics.median(s.times) for s in steps}
    by_name = {s.name: s for s in steps}
    print(f"model={args.model} batch={args.batch} params={' '.join(parse_params(args.params))} r={args.r} "
          f"dropout={args.dropout} dtype={args.dtype} device={device} threads={torch.get_num_threads()} "
          f"freeze_bn={args.freeze_bn} warmup={args.warmup} repeats={args.steps}")
    refs = [r for r in ("floor", "floor-ours", "ours", "peft") if r in med]
    paired = [r for r in ("floor", "floor-ours", "ours") if r in med]
    print("median and min: wall-clock seconds per step; /x: ratio of wall-clock medians; cpu s: median CPU "
          "seconds of this process; cpu~x: median over rounds of the CPU-time ratio to x in the same round "
          "(every round runs each variant once, so a slow spell of a shared machine hits both)")
    if memory:
        print("memory, each variant alone in a fresh process, MiB: life = lifetime peak RSS (getrusage, build "
              "included), peak = peak during the steps, rise = peak over the start of the steps")
    width = max([11] + [len(s.name) + 1 for s in steps])
    header = f"{'variant':<{width}}{'median s':>9}{'min s':>8}" + "".join(f"{'/' + r:>12}" for r in refs)
    header += f"{'cpu s':>7}" + "".join(f"{'cpu~' + r:>15}" for r in paired)
    header += f"{'life MiB':>9}{'peak MiB':>9}{'rise MiB':>9}" if memory else ""
    header += f"{'img/s':>9}{'MFU':>7}" if flops else ""
    print(header)
    for s in steps:
        line = f"{s.name:<{width}}{med[s.name]:>9.3f}{min(s.times):>8.3f}"
        line += "".join(_ratio(med[s.name], med[r], 12) for r in refs)
        line += f"{statistics.median(s.cpu):>7.2f}" + "".join(f"{_paired(s, by_name[r]):>15.3f}" for r in paired)
        if memory:
            m = memory[s.name]
            line += f"{m['lifetime_mib']:>9.0f}{m['peak_mib']:>9.0f}{m['rise_mib']:>9.0f}"
        if flops:
            ips = args.batch / med[s.name]
            peak = _peak_tflops(args)
            mfu = f"{3 * flops * ips / (peak * 1e12):>7.1%}" if peak else f"{'?':>7}"
            line += f"{ips:>9.1f}{mfu}"
        print(line)
    if "ours-compiled" in by_name and "ours" in by_name:
        compiled, eager = med["ours-compiled"], med["ours"]
        first = by_name["ours-compiled"].first
        print(f"compiled vs eager LoRA step (ours), median of {args.steps} timed steps after {args.warmup} warm-up "
              f"steps: compiled {compiled:.4f} s, eager {eager:.4f} s, compiled/eager {compiled / eager:.3f} "
              f"(speed-up x{eager / compiled:.2f}); first compiled step (compilation, excluded) "
              f"{first if first is not None else float('nan'):.1f} s")


def build_model_size(model: nn.Module) -> int:
    """The input side of a model built by build_model."""
    if hasattr(model, "image_size"):
        return model.image_size[0]
    return model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]


def _without_option(argv: list[str], option: str) -> list[str]:
    """``argv`` without ``option`` and the values that follow it."""
    out, skipping = [], False
    for a in argv:
        if a == option:
            skipping = True
            continue
        if skipping and not a.startswith("--"):
            continue
        skipping = False
        out.append(a)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-B-16",
                   help="open_clip architecture (its image tower) or timm model, random init; e.g. ViT-L-14, "
                        "efficientnet_lite0")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant (interleaved)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--params", nargs="+", default=["q", "v"], help='LoRA letters, e.g. q v, "q k v o" or pw')
    p.add_argument("--r", type=int, default=2)
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--dropout", type=float, default=0.25)
    p.add_argument("--variants", nargs="+", choices=VARIANTS,
                   help=f"default: {' '.join(VIT_VARIANTS)} on a ViT, {' '.join(CONV_VARIANTS)} otherwise")
    p.add_argument("--freeze-bn", action="store_true", help="BatchNorm in eval mode in every variant (as the "
                                                            "trainer runs LoRA)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--memory", action="store_true", help="also measure each variant's memory in a fresh process")
    p.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--peak-tflops", type=float, default=0.0, help="accelerator peak for the MFU estimate")
    p.add_argument("--compile", action="store_true", help="also time ours with torch.compile (ours-compiled) and "
                                                          "print compiled vs eager step time and their ratio")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; user mistakes print one line and exit 2."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        if args.device == "cuda" and not torch.cuda.is_available():
            raise LoRAError("--device cuda: no CUDA device is visible; use --device cpu")
        if args.threads:
            torch.set_num_threads(args.threads)
        if args.variants is None:
            args.variants = list(VIT_VARIANTS if _is_open_clip(args.model) else CONV_VARIANTS)
        if args.compile and not args.memory_child:  # a memory child runs the one variant it is given
            args.variants += [v for v in ("ours", "ours-compiled") if v not in args.variants]
        if "ours-compiled" in args.variants and args.warmup < 1:
            raise UserError("ours-compiled compiles in its first step: give --warmup 1 or more, so that the "
                            "timed steps exclude compilation")
        device = torch.device(args.device)
        if args.memory_child:
            print(json.dumps(measure_memory_child(args, device)))
            return 0
        memory = None
        if args.memory:
            parent = [a for a in argv if a != "--memory"]
            parent = _without_option(parent, "--variants")
            memory = measure_memory(args, parent)
        steps, base = build_steps(args, device)
        measure(steps, args.warmup, args.steps, device)
        flops = forward_flops_per_image(base, build_model_size(base), device) if device.type == "cuda" else None
        report(steps, args, device, flops, memory)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
