"""Run one adaptation method on images; --method defaults to lora (experiments 2 and 3).

    python main_lora.py --root_path data --dataset hicervix --shots 16 --model_name uni --level level_3
    python main_lora.py --preset exp3 --root_path data --dataset hicervix --pourcentage 10
    python main_lora.py --method full --root_path data --dataset folder --shots 16 --model_name efficientnet_lite0
    python main_lora.py       # offline demo on synthetic cells
"""

import sys

from utils.cli import parse_config, run_cli


def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv, default_method="lora", prog="main_lora.py")
    from engine.run import run

    return run(config)


if __name__ == "__main__":
    sys.exit(run_cli(main))
