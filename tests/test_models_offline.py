"""Offline hub loads fail at once with one line, cached files still load, and the hub is probed once."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import constants

from models import ModelError, hub, load_model

REPO_ROOT = Path(__file__).resolve().parents[1]
CLIP_REPO = "timm/vit_base_patch16_clip_224.openai"
UNREACHABLE = "http://127.0.0.1:9"  # the discard port: refused at once


@pytest.fixture(autouse=True)
def empty_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face home and cache, a fresh probe memory, and the library's offline flag restored."""
    cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", constants.HF_HUB_OFFLINE)
    monkeypatch.setattr(hub, "_PROBED", {})
    import open_clip  # noqa: F401  (imported before timing: the bound is on the hub, not on imports)

    return cache


@pytest.fixture
def downloads(monkeypatch) -> list[dict]:
    """Every hf_hub_download call's keyword arguments (the real function still runs)."""
    calls: list[dict] = []
    real = huggingface_hub.hf_hub_download

    def recording(**kwargs):
        calls.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", recording)
    return calls


@pytest.mark.parametrize("variable", ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"])
def test_clip_offline_and_not_cached_fails_at_once_with_one_line(monkeypatch, downloads, variable):
    for name in hub.OFFLINE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(variable, "1")
    start = time.perf_counter()
    with pytest.raises(ModelError) as info:
        load_model("clip")
    assert time.perf_counter() - start < 10  # a generous bound: with retries it took over a minute
    message = str(info.value)
    assert "\n" not in message
    assert f"hf-hub:{CLIP_REPO}" in message and f"{variable}=1 is set" in message
    assert "not in the Hugging Face cache" in message and "--weights PATH" in message
    assert f"download {CLIP_REPO}" in message and "connect to the internet" in message
    assert downloads and all(call["local_files_only"] for call in downloads)


def test_an_unreachable_hub_is_probed_once_and_never_retried(monkeypatch, downloads):
    for name in hub.OFFLINE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", UNREACHABLE)
    probes = []
    real_session = huggingface_hub.utils.get_session

    def counting_session():
        probes.append(1)
        return real_session()

    monkeypatch.setattr(huggingface_hub.utils, "get_session", counting_session)
    start = time.perf_counter()
    for key in ("clip", "quilt", "clip"):
        with pytest.raises(ModelError, match=f"no internet: {UNREACHABLE} cannot be reached"):
            load_model(key)
    assert time.perf_counter() - start < 10
    assert len(probes) == 1
    assert all(call["local_files_only"] for call in downloads)
    assert constants.HF_HUB_OFFLINE  # transformers and open_clip now read their caches without retrying


def _cache_file(cache: Path, repo_id: str, name: str, text: str = "{}") -> Path:
    """A file laid out as huggingface_hub caches it: refs/main names the snapshot that holds it."""
    folder = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(commit)
    path = folder / "snapshots" / commit / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_cached_files_load_offline_including_a_later_alternative(monkeypatch, empty_cache):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = _cache_file(empty_cache, "org/model", "config.json")
    weights = _cache_file(empty_cache, "org/model", "pytorch_model.bin")
    found = hub.fetch("org/model", ["config.json", ("model.safetensors", "pytorch_model.bin")], "mine")
    assert [p.resolve() for p in found] == [config.resolve(), weights.resolve()]
    with pytest.raises(ModelError, match="not in the Hugging Face cache"):
        hub.fetch("org/model", ["open_clip_config.json"], "mine")


def test_text_tower_files_offline_do_not_suggest_weights(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError) as info:
        hub.fetch("org/bert", ["config.json"], "biomedclip", what="the text-tower config", local_option=False)
    message = str(info.value)
    assert "the text-tower config" in message and "--weights" not in message and "\n" not in message


def test_models_show_clip_without_network_is_one_error_line(tmp_path):
    """The command line, with no offline variable and no network: one probe, no retry loop, one line."""
    env = {k: v for k, v in os.environ.items() if k not in hub.OFFLINE_VARIABLES}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT=UNREACHABLE, OMP_NUM_THREADS="1")
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "models", "show", "clip"], check=False, cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - start
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "Retrying" not in result.stderr and "Traceback" not in result.stderr
    assert seconds < 60  # imports included; with the hub's retries it took over 80 s
