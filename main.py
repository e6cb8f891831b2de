"""Experiment 1: a frozen foundation model with a linear head trained on cached features.

    python main.py --root_path data --dataset sipakmed --shots -1 --model_name clip
    python main.py            # offline demo on synthetic cells
"""

import sys

from utils.cli import parse_config, run_cli


def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv, lora=False)
    from utils.runner import run_linear

    return run_linear(config)


if __name__ == "__main__":
    sys.exit(run_cli(main))
