"""Real Pap smear cells (Herlev): pretrained EfficientNet-Lite0 features beat random-init ones.

A short version of the real-data check: a grouped split (cells of one source image never on
both sides), 8 shots per class, the linear head of experiment 1 through main.py (in-process),
once with the packaged ImageNet weights and once with the same architecture randomly
initialised, both at the model's own preprocessing (224 px). Every image costs a CPU forward
pass, so the test part is cut to at most 12 images per class, drawn with a fixed seed; on the
whole test part of this split the difference is about the same (0.21 at 8 shots).
"""

import json
import random
import shutil
from collections import defaultdict

import pytest

from datasets.readers import class_of
from tests.conftest import HERLEV, run_entry

pytestmark = pytest.mark.skipif(
    not (HERLEV / "manifest.csv").is_file(), reason=f"real data not present: {HERLEV} is absent"
)
MARGIN = 0.10
SHOTS = 8
TEST_PER_CLASS = 12


@pytest.fixture(scope="module")
def herlev_root(herlev_prepared, tmp_path_factory):
    """The prepared split with train and val as they are and a seeded draw of its test images."""
    prepared, _ = herlev_prepared
    root = tmp_path_factory.mktemp("herlev_subset") / "data"
    root.mkdir()
    for part in ("train", "val"):
        (root / part).symlink_to(prepared / part, target_is_directory=True)
    by_class = defaultdict(list)
    for path in sorted((prepared / "test").iterdir()):
        by_class[class_of(path.name)].append(path)
    rng = random.Random(0)
    (root / "test").mkdir()
    for cls in sorted(by_class):
        for path in rng.sample(by_class[cls], min(TEST_PER_CLASS, len(by_class[cls]))):
            shutil.copy2(path, root / "test" / path.name)
    return root


def _balanced_accuracy(root, out, *extra: str) -> float:
    done = run_entry("main.py", "--root_path", str(root), "--dataset", "folder", "--shots", str(SHOTS),
                     "--model_name", "efficientnet_lite0", "--n_iters", "100", "--lr", "1e-3", "--device", "cpu",
                     "--num_workers", "0", "--output_dir", str(out), *extra)
    assert done.returncode == 0, done.stderr
    result = json.loads(next(out.rglob("results.json")).read_text())
    assert len(result["classes"]) == 7 and result["n_train"] == 7 * SHOTS
    assert result["n_test"] == 7 * TEST_PER_CLASS  # every class has at least 12 test images in this split
    return result["metrics"]["test"]["balanced_accuracy"]


def test_pretrained_features_beat_random_features_on_herlev(herlev_root, tmp_path):
    pretrained = _balanced_accuracy(herlev_root, tmp_path / "pretrained")
    random_init = _balanced_accuracy(herlev_root, tmp_path / "random", "--weights", "random")
    assert pretrained - random_init >= MARGIN, (pretrained, random_init)
