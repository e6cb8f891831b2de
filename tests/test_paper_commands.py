"""The paper's README commands (mdausort/Cytology-fine-tuning), as written, through their entry point's parser and
through the sweep's --dry_run: every resolved setting."""

import contextlib
import io
import shlex
from dataclasses import asdict
from pathlib import Path

import pytest

from engine.config import RunConfig, run_dir
from utils.cli import parse_config

# The README's three templates, verbatim but for the line continuations.
README = {
    1: """python3 main.py --root_path ./data/ --dataset {dataset} --seed {seed} --shots -1 --lr {lr} --n_iters 50
          --model_name {model_name} --num_classes {num_classes} --level {level} --textual False""",
    2: """python3 main_lora.py --root_path ./data/ --dataset {dataset} --seed {seed} --shots {shots} --lr {lr}
          --n_iters 50 --position "all" --encoder "vision" --params "q v" --r 2 --model_name {model_name}
          --num_classes {num_classes} --level {level}""",
    3: """python3 main_lora.py --root_path ./data/ --dataset hicervix --seed {seed} --shots 0 --lr 1e-3 --n_iters 100
          --position "all" --encoder "vision" --pourcentage {pourcentage} --params "q k v o" --r 16
          --model_name clip --level level_3""",
}
# run.py's values for the placeholders: level_1 is its default --level_launch, sipakmed has 5 classes
FILLED = dict(dataset="sipakmed", seed=1, lr="1e-3", model_name="clip", num_classes=5, level="level_1", shots=4,
              pourcentage=10)
# The same runs through launch_run.sh (utils/sweep.py).
SWEEP = {
    1: ["--experiment", "1", "--datasets", "sipakmed", "--models", "clip", "--seeds", "1", "--lrs", "1e-3"],
    2: ["--experiment", "2", "--datasets", "sipakmed", "--models", "clip", "--seeds", "1", "--lrs", "1e-3",
        "--shots", "4"],
    3: ["--experiment", "3", "--datasets", "hicervix", "--models", "clip", "--seeds", "1", "--percentages", "10",
        "--level", "level_3"],
}
IGNORED_LEVEL = "--level level_1 ignored: sipakmed has no label levels"


def expected(experiment: int, root: Path) -> dict:
    """Every resolved setting of README command N: the RunConfig defaults, then what the command sets."""
    common = dict(root_path=str(root), seed=1, lr=1e-3, model_name="clip", backbone="ViT-B/16", experiment=experiment,
                  task_settings=dict(loss="ce", hxe_alpha=0.1, soft_beta=10.0, decision="argmax",
                                     backoff_threshold=None, backoff_target=0.9))
    sipakmed = dict(dataset="sipakmed", num_classes=5, level=None, warnings=[IGNORED_LEVEL], n_iters=50,
                    n_iters_from="paper")
    lora = dict(method="lora", method_settings=dict(params=["q", "v"], r=2, alpha=1.0, dropout_rate=0.25,
                                                    position="all", encoder="vision", scaling="sqrt"))
    by_experiment = {
        1: dict(method="linear", shots=-1, **sipakmed,
                method_settings=dict(textual=False, transductive="none", ti_steps=100, ti_prior="train",
                                     ti_lambda=0.1, ti_margin=0.3, transclip_kl=1.0)),
        2: dict(shots=4, **sipakmed, **lora),
        3: dict(dataset="hicervix", shots=0, percentage=10.0, level="level_3", level_fallback="original",
                n_iters=100, n_iters_from="paper", warnings=[],
                **{**lora, "method_settings": {**lora["method_settings"], "params": ["q", "k", "v", "o"], "r": 16}}),
    }
    values = {**asdict(RunConfig()), **common, **by_experiment[experiment]}
    return values


def _readme_args(experiment: int) -> tuple[str, list[str]]:
    words = shlex.split(README[experiment].format(**FILLED))
    assert words[0] == "python3"
    return words[1], words[2:]


def _comparable(config: RunConfig) -> dict:
    values = asdict(config)
    values["warnings"] = [w.split(" (")[0] for w in values["warnings"]]  # the message's first clause
    return values


@pytest.fixture
def in_repo_layout(tmp_path, monkeypatch) -> Path:
    """A working folder with ./data, as the README assumes."""
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    return (tmp_path / "data").resolve()


@pytest.mark.parametrize("experiment", [1, 2, 3])
def test_the_readme_command_as_written_resolves_to_the_paper_settings(experiment, in_repo_layout):
    script, args = _readme_args(experiment)
    config = parse_config(args, "linear" if script == "main.py" else "lora", prog=script, notify=False)
    assert _comparable(config) == expected(experiment, in_repo_layout)


def _dry_run(argv: list[str]) -> list[list[str]]:
    """launch_run.sh --dry_run in-process: the entry-point arguments of each printed command."""
    from utils.sweep import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([*argv, "--dry_run"])
    assert code == 0, err.getvalue()
    commands = [line for line in out.getvalue().splitlines() if not line.startswith("#")]
    return [shlex.split(line.split(" > ")[0])[1:] for line in commands]


@pytest.mark.parametrize("experiment", [1, 2, 3])
def test_the_sweep_runs_the_readme_command(experiment, in_repo_layout, tmp_path):
    (command,) = _dry_run([*SWEEP[experiment], "--root_path", "data", "--output_dir", str(tmp_path / "out")])
    script, args = command[0], command[1:]
    assert script == _readme_args(experiment)[0]
    swept = parse_config(args, "linear" if script == "main.py" else "lora", prog=script, notify=False)
    want = expected(experiment, in_repo_layout)
    # what the sweep differs in, and why: its own output folder; the preset, named; a sweep gives --level to
    # datasets with levels only (no warning); the preset's budget; no --num_classes (a check, not a setting)
    want.update(output_dir=str(tmp_path / "out"), preset=f"exp{experiment}", n_iters_from="preset", warnings=[],
                num_classes=None)
    if experiment == 3:
        want["backbone"] = "ViT-L/14"  # run.py's backbone for percentage_lora (the README's command gives none)
    assert _comparable(swept) == want
    direct = parse_config(_readme_args(experiment)[1], swept.method, notify=False)
    if experiment != 3:  # the same computation (num_classes only checks the data): the same run folder
        assert run_dir(swept).relative_to(swept.output_dir) == run_dir(direct).relative_to(direct.output_dir)


def test_the_experiment_3_preset_keeps_vit_l14_when_the_model_is_named_and_drops_it_for_another(in_repo_layout,
                                                                                                tmp_path):
    (command,) = _dry_run([*SWEEP[3], "--root_path", "data", "--output_dir", str(tmp_path)])
    assert "clip-ViT-L14" in str(run_dir(parse_config(command[1:], notify=False)))
    config = parse_config(["--preset", "exp3", "--model_name", "clip", "--pourcentage", "10"], notify=False)
    assert config.backbone == "ViT-L/14" and config.warnings == []
    config = parse_config(["--preset", "exp3", "--model_name", "uni", "--pourcentage", "10"], notify=False)
    assert config.backbone is None
    assert config.warnings == ["--model_name uni replaces the clip ViT-L/14 of --preset exp3: uni runs with its own "
                               "default backbone (add --backbone to choose one)"]


def test_launch_run_experiment_1_runs_all_images_and_flags_typed_still_win(in_repo_layout, tmp_path):
    commands = _dry_run([*SWEEP[1], "--root_path", "data", "--output_dir", str(tmp_path)])
    assert [c[c.index("--shots") + 1] for c in commands] == ["-1"]
    commands = _dry_run([*SWEEP[1], "--shots", "2 4", "--root_path", "data", "--output_dir", str(tmp_path)])
    assert [c[c.index("--shots") + 1] for c in commands] == ["2", "4"]
