"""Weights & Biases: runs named readably, grouped by setting (seeds aggregate), tagged, offline-safe."""

import json

import pytest

from engine.tracking import identity, start_tracking
from utils.cli import parse_config


def test_seeds_of_one_setting_share_a_group_and_differ_in_name():
    a = identity(parse_config(["--dataset", "demo", "--seed", "1"], "lora").to_dict())
    b = identity(parse_config(["--dataset", "demo", "--seed", "2"], "lora").to_dict())
    c = identity(parse_config(["--dataset", "demo", "--seed", "1", "--r", "4"], "lora").to_dict())
    assert a["group"] == b["group"] != c["group"]
    assert a["name"] != b["name"] and a["name"].endswith("seed1")
    assert a["tags"] == ["exp2", "demo", "tiny_clip", "lora", "shots16"]


def test_an_offline_run_carries_name_group_tags_config_and_result_tables(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    config = parse_config(["--dataset", "demo", "--seed", "3", "--wandb", "--wandb_project", "lab"], "lora")
    tracker = start_tracking(True, config.to_dict(), tmp_path / "run")
    run = tracker.run
    assert run is not None and run.project == "lab"
    assert run.name.endswith("seed3") and run.group == identity(config.to_dict())["group"]
    assert "lora" in run.tags and run.config["method"] == "lora"
    tracker.log({"train/loss": 0.5, "train/lr": 1e-4}, 1)
    tracker.results({"classes": ["a", "b"], "metrics": {"test": {
        "balanced_accuracy": 0.5, "confusion_matrix": [[2, 1], [0, 3]], "per_class_recall": {"a": 2 / 3, "b": 1.0}}}})
    assert run.summary["test/balanced_accuracy"] == 0.5
    tracker.finish()
    (table,) = (tmp_path / "run").rglob("confusion_matrix*.table.json")
    data = json.loads(table.read_text())
    assert data["columns"] == ["true", "predicted", "count"] and ["a", "b", 1] in data["data"]


def test_report_uploads_its_tables_and_plots_to_one_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from tests.test_report import write_run
    from utils.report import main

    monkeypatch.setenv("WANDB_MODE", "offline")
    for seed in (1, 2):
        write_run(tmp_path, seed, 0.5 + 0.1 * seed, method="linear", shots=4)
        write_run(tmp_path, seed, 0.6 + 0.1 * seed, method="lora", shots=4)
    assert main([str(tmp_path), "--wandb", "--n_resamples", "100"]) == 0
    tables = {p.name.rsplit("_", 2)[0] for p in (tmp_path / "report").rglob("*.table.json")}
    assert {"summary", "paired"} <= tables, tables
    assert list((tmp_path / "report").rglob("methods_demo*.png"))
