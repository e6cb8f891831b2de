"""benchmarks/gpu_check.py on the CPU with --quick: the step part runs through the engine and writes its figures
(the run and sweep parts start processes and take minutes here: `python benchmarks/gpu_check.py --quick`)."""

from __future__ import annotations

import importlib.util
import json
from types import SimpleNamespace

import torch

from tests.conftest import REPO


def _script():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_step_check_prints_labelled_figures_and_writes_json(tmp_path, capsys):
    gpu_check = _script()
    out = tmp_path / "figures.json"
    assert gpu_check.main(["--quick", "--device", "cpu", "--parts", "step", "--out", str(out)]) == 0
    figures = json.loads(out.read_text())
    rows = figures["step"]["rows"]
    assert [(r["batch"], r["mode"]) for r in rows] == [(2, "eager"), (4, "eager")]
    assert all(r["img_per_s"] > 0 and r["gflops_per_image"] > 0 and "error" not in r for r in rows)
    printed = capsys.readouterr().out
    assert "1. LoRA training step (tiny_clip" in printed and "img/s" in printed and "GFLOP/img" in printed


def test_peak_flops_come_from_the_device_name_or_the_flag(monkeypatch):
    gpu_check = _script()
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert gpu_check.peak_tflops(cuda, None) == 756.0  # the more specific name wins over "H100"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert gpu_check.peak_tflops(cuda, None) == 989.4
    assert gpu_check.peak_tflops(cuda, 500.0) == 500.0
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future Card")
    assert gpu_check.peak_tflops(cuda, None) is None
    assert gpu_check.peak_tflops(torch.device("cpu"), None) is None


def test_the_sweep_part_asks_the_sweep_for_its_options_and_builds_its_command(tmp_path):
    gpu_check = _script()
    assert gpu_check.sweep_has("--estimate") and not gpu_check.sweep_has("--no-such-option")
    a = SimpleNamespace(model="tiny_clip", shots=2, seeds=2, lrs=["1e-3", "2e-3"], sweep_n_iters=1, batch=4,
                        warmup_steps=1, device="cpu")
    from utils import sweep

    jobs = sweep.expand(sweep.build_parser().parse_args(gpu_check.sweep_argv(a, tmp_path, tmp_path / "out")))
    assert len(jobs) == 4 and {j.config.lr for j in jobs} == {1e-3, 2e-3}
