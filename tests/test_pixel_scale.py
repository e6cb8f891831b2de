"""CLIP-family models see their pixels scaled once.

A public CLIP fine-tuning on cytology captions divided pixels by 255 and then let the CLIP processor
rescale them again, so the image tower saw inputs with a spread of about 0.003 instead of about 1.
For every model of the registry (every backbone of a key that has several; the CLIP family is where the
bug was seen), real Herlev cells (the first image of each class)
go through the toolkit's evaluation preprocessing: ``engine.images`` decoding to uint8 at the model's
input size, then ``engine.augment.normalise`` with the model's mean and std, as ``engine.prediction.predict``
does; and ``ModelSpec.eval_transform`` on the same files. The normalised input must have a per-channel
standard deviation of order 1.

Models are built with random weights (no download; their preprocessing comes from the same open_clip
configuration as with their usual weights, except where a hub folder brings its own), on the meta device
where possible (no memory, no initialisation); one whose random build still needs the hub is skipped
with the reason.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from datasets import load_image
from engine.augment import normalise
from engine.images import decode_resized
from models import ModelError, capabilities, load_model
from models.registry import entries

REPO = Path(__file__).resolve().parents[1]
HERLEV = REPO.parent / "shared" / "data" / "herlev"
STD_RANGE = (0.3, 3.0)
MEAN_RANGE = (-3.0, 3.0)


def registry_models() -> list[tuple[str, str | None]]:
    """(key, backbone) of every plain registry entry, every backbone of a key that has several."""
    pairs = []
    for entry in entries():
        if not entry.namespace:  # "timm:<architecture>": any architecture, no fixed preprocessing
            pairs += [(entry.key, b) for b in entry.backbones] or [(entry.key, None)]
    return pairs


def clip_family() -> list[str]:
    """Plain registry keys whose declared capabilities include a text tower."""
    return list(dict.fromkeys(key for key, backbone in registry_models() if capabilities(key, backbone).has_text))


CLIP_FAMILY = clip_family()


@pytest.fixture(scope="module")
def herlev_cells() -> list[Path]:
    """The first Herlev image of each class, in the manifest's order."""
    manifest = HERLEV / "manifest.csv"
    if not manifest.is_file():
        pytest.skip(f"the shared Herlev images are absent ({manifest} not found; see ../shared/data/README.md)")
    first: dict[str, Path] = {}
    with open(manifest, newline="") as handle:
        for row in csv.DictReader(handle):
            first.setdefault(row["label"], HERLEV / row["path"])
    return list(first.values())


def build_without_weights(key: str, monkeypatch, backbone: str | None = None) -> object:
    """The ModelSpec of `key` with random weights: on the meta device where open_clip lets the model stay
    there (its device move skipped), else, and for any failure there, an ordinary build on the CPU."""
    import open_clip.factory

    if hasattr(open_clip.factory, "_set_model_device_and_precision"):
        with monkeypatch.context() as patch:
            patch.setattr(open_clip.factory, "_set_model_device_and_precision", lambda *args, **kwargs: None)
            try:
                with torch.device("meta"):
                    return load_model(key, backbone=backbone, weights="random")
            except Exception:  # noqa: BLE001  (only a shortcut: the CPU build below says what is wrong)
                pass
    return load_model(key, backbone=backbone, weights="random")


def channel_stats(x: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel standard deviation and mean of a (B, 3, S, S) batch."""
    return x.std(dim=(0, 2, 3)).tolist(), x.mean(dim=(0, 2, 3)).tolist()


def test_the_registry_has_clip_family_models():
    assert CLIP_FAMILY, "no registry entry has a text tower: the pixel-scale check below checks nothing"


@pytest.mark.parametrize(("key", "backbone"), registry_models())
def test_inputs_are_scaled_once(key, backbone, herlev_cells, monkeypatch):
    try:
        spec = build_without_weights(key, monkeypatch, backbone)
    except ModelError as error:
        pytest.skip(f"{key} cannot be built offline here, so its preprocessing is not checked: {error}")
    assert spec.has_text == capabilities(key, backbone).has_text, f"{key}: its text tower is not as declared"
    size, mean, std, transform = spec.input_size, torch.tensor(spec.mean), torch.tensor(spec.std), spec.eval_transform
    del spec  # only the preprocessing is needed

    raw = torch.stack([decode_resized(str(path), size) for path in herlev_cells])  # what predict() batches
    assert raw.dtype == torch.uint8 and raw.shape == (len(herlev_cells), 3, size, size)
    inputs = normalise(raw, mean, std)
    sd, mu = channel_stats(inputs)
    assert all(STD_RANGE[0] <= s <= STD_RANGE[1] for s in sd), f"{key}: per-channel std {sd} (mean {mu})"
    assert all(MEAN_RANGE[0] <= m <= MEAN_RANGE[1] for m in mu), f"{key}: per-channel mean {mu}"

    # ModelSpec.eval_transform (PIL resize, ToTensor, Normalize) gives the same inputs
    pil = torch.stack([transform(load_image(path)) for path in herlev_cells])
    torch.testing.assert_close(pil, inputs, atol=1e-4, rtol=0)

    # the bug this guards against: pixels divided by 255 before the normalisation rescales them again
    twice = normalise(raw.float() / 255, mean, std)
    sd_twice, mu_twice = channel_stats(twice)
    assert max(sd_twice) < STD_RANGE[0] / 10, f"{key}: double rescaling left a std of {sd_twice}"
    assert all(MEAN_RANGE[0] <= m <= MEAN_RANGE[1] for m in mu_twice)  # the mean alone would not see it
