"""Run one adaptation method on frozen features or images; --method defaults to linear (experiment 1).

    python main.py --root_path data --dataset sipakmed --shots -1 --model_name clip
    python main.py --method knn --root_path data --dataset sipakmed --shots 16 --model_name uni
    python main.py            # offline demo on synthetic cells
"""

import sys

from utils.cli import parse_config, run_cli


def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv, default_method="linear", prog="main.py")
    from engine.run import run

    return run(config)


if __name__ == "__main__":
    sys.exit(run_cli(main))
