"""Experiments 2 and 3: LoRA fine-tuning with a linear head, few-shot or on a percentage of the data.

    python main_lora.py --root_path data --dataset hicervix --shots 16 --model_name uni --level level_3
    python main_lora.py --root_path data --dataset hicervix --shots 0 --pourcentage 10 --params "q k v o" --r 16
    python main_lora.py       # offline demo on synthetic cells
"""

import sys

from utils.cli import parse_config, run_cli


def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv, lora=True)
    from utils.runner import run_lora

    return run_lora(config)


if __name__ == "__main__":
    sys.exit(run_cli(main))
