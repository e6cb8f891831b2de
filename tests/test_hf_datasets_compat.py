"""Our top-level `datasets` package shares its name with Hugging Face's: the tool must work beside it."""

import json
import os
import subprocess
import sys

from tests.conftest import REPO


def test_a_run_works_when_hugging_face_datasets_looks_installed(folder_root, tmp_path):
    # Imitate an installed Hugging Face `datasets`: its metadata makes transformers and peft believe it is
    # there, so any of their code paths that then imports `datasets` would find ours instead.
    site = tmp_path / "site"
    info = site / "datasets-3.0.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: datasets\nVersion: 3.0.0\n")
    (info / "top_level.txt").write_text("datasets\n")
    code = (
        "import sys, main_lora\n"
        "from transformers.utils import is_datasets_available\n"
        "assert is_datasets_available()\n"
        f"sys.exit(main_lora.main(['--root_path', {str(folder_root)!r}, '--dataset', 'folder', '--shots', '2', "
        "'--n_iters', '1', '--warmup_steps', '1', '--model_name', 'tiny_hf_vit', '--device', 'cpu', "
        f"'--num_workers', '0', '--batch_size', '8', '--output_dir', {str(tmp_path / 'out')!r}]))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(site)])}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (path,) = (tmp_path / "out").rglob("results.json")
    assert json.loads(path.read_text())["model_name"] == "tiny_hf_vit"
