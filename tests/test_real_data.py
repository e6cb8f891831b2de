"""Real Pap smear cells (Herlev): pretrained EfficientNet-Lite0 features beat random-init ones.

A short version of the real-data check: a grouped split (cells of one source image never on
both sides), 16 shots per class, the linear head of experiment 1 through main.py, once with
the packaged ImageNet weights and once with the same architecture randomly initialised.
"""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, SHARED_DATA

HERLEV = SHARED_DATA / "herlev"
pytestmark = pytest.mark.skipif(
    not (HERLEV / "manifest.csv").is_file(), reason=f"real data not present: {HERLEV} is absent"
)
MARGIN = 0.10


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=900, cwd=REPO)


@pytest.fixture(scope="module")
def herlev_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("herlev")
    p = _run("-m", "datasets", "prepare", "folder", "--src", str(HERLEV), "--dst", str(root / "data"),
             "--manifest", str(HERLEV / "manifest.csv"), "--seed", "0")
    assert p.returncode == 0, p.stderr
    return root / "data"


def _balanced_accuracy(root, out, *extra: str) -> float:
    p = _run(str(REPO / "main.py"), "--root_path", str(root), "--dataset", "folder", "--shots", "16",
             "--model_name", "efficientnet_lite0", "--n_iters", "100", "--lr", "1e-3", "--device", "cpu",
             "--num_workers", "0", "--output_dir", str(out), *extra)
    assert p.returncode == 0, p.stderr
    result = json.loads(next(out.rglob("results.json")).read_text())
    assert result["n_test"] == 183 and len(result["classes"]) == 7
    return result["metrics"]["test"]["balanced_accuracy"]


def test_pretrained_features_beat_random_features_on_herlev(herlev_root, tmp_path):
    pretrained = _balanced_accuracy(herlev_root, tmp_path / "pretrained")
    random_init = _balanced_accuracy(herlev_root, tmp_path / "random", "--weights", "random")
    assert pretrained - random_init >= MARGIN, (pretrained, random_init)
