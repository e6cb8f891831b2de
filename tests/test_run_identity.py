"""Run identity: one folder per computation; runtime-only settings never make a new run."""

import pytest

from common.errors import UserError
from engine.config import run_dir
from utils.cli import parse_config

BASE = ["--method", "lora", "--dataset", "folder", "--model_name", "tiny_clip", "--shots", "4"]

COMPUTING = {
    "n_iters": ["--n_iters", "7"], "alpha": ["--alpha", "2"], "dropout": ["--dropout_rate", "0.1"],
    "batch": ["--batch_size", "8"], "warmup": ["--warmup_steps", "3"], "weight decay": ["--weight_decay", "0"],
    "rank": ["--r", "4"], "params": ["--params", "q", "k", "v"], "lr": ["--lr", "1e-3"], "seed": ["--seed", "2"],
    "precision": ["--precision", "bf16"], "label map": ["--label_map", "warm=red,green-ish"],
}
RUNTIME = {"device": ["--device", "cpu"], "workers": ["--num_workers", "0"], "checkpoints": ["--checkpoint_every", "3"],
           "wandb": ["--wandb"], "overwrite": ["--overwrite"]}


@pytest.fixture
def base(folder_root, tmp_path):
    return [*BASE, "--root_path", str(folder_root), "--output_dir", str(tmp_path)]


def folder(args):
    return run_dir(parse_config(args, "lora"))


@pytest.mark.parametrize("name", sorted(COMPUTING))
def test_a_computing_setting_gives_a_new_run(base, name):
    assert folder([*base, *COMPUTING[name]]) != folder(base)


@pytest.mark.parametrize("name", sorted(RUNTIME))
def test_a_runtime_setting_keeps_the_run(base, name):
    assert folder([*base, *RUNTIME[name]]) == folder(base)


def test_output_folder_moves_the_run_but_keeps_its_identity(base, tmp_path):
    a = folder(base)
    b = folder([*base, "--output_dir", str(tmp_path / "elsewhere")])
    assert a.relative_to(tmp_path) == b.relative_to(tmp_path / "elsewhere")


def test_two_data_roots_with_the_same_flags_are_two_runs(folder_root, tmp_path):
    herlev = tmp_path / "herlev"
    herlev.mkdir()
    a = folder([*BASE, "--root_path", str(folder_root), "--output_dir", str(tmp_path)])
    b = folder([*BASE, "--root_path", str(herlev), "--output_dir", str(tmp_path)])
    assert a != b
    assert b.parts[-6] == "herlev" and a.parts[-6] == folder_root.name  # named after the data folder


def test_a_replaced_weights_file_is_a_new_run(base, tmp_path):
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"x" * 10)
    a = folder([*base, "--weights", str(weights)])
    weights.write_bytes(b"y" * 20)
    assert folder([*base, "--weights", str(weights)]) != a


def test_dataset_name_names_generic_data_only(base):
    assert folder([*base, "--dataset_name", "herlev"]).parts[-6] == "herlev"
    with pytest.raises(UserError, match="--dataset_name names folder or csv data"):
        parse_config(["--dataset", "demo", "--dataset_name", "x"], "lora")
