"""python -m methods list: the registered methods, what they train and consume, and their flags."""

import sys

from methods import methods
from methods.registry import help_of


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv not in ([], ["list"]):
        print("usage: python -m methods list", file=sys.stderr)
        return 2
    for m in methods():
        flags = " ".join(f"--{f.name}" for f in m.setting_fields()) or "(no settings)"
        print(f"{m.name:<11} {m.inputs:<9} {m.description}")
        print(f"{'':<11} flags: {flags}")
        for f in m.setting_fields():
            print(f"{'':<13}--{f.name} (default {f.default!r}) {help_of(f)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
