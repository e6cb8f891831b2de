"""python -m methods list: the registered methods, what they train and consume, the kinds of task they handle,
where they come from, their typical learning rate and their flags."""

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
        lr = f"lr {m.lr:g}" if m.lr is not None else ("lr: the run's --lr" if m.trains else "trains nothing")
        print(f"{m.name:<13} {m.inputs:<9} {m.description}")
        print(f"{'':<13} tasks: {', '.join(m.tasks)}; {lr}; packable: {'yes' if m.packable else 'no'}")
        if m.source:
            print(f"{'':<13} source: {m.source}")
        print(f"{'':<13} flags: {flags}")
        for f in m.setting_fields():
            print(f"{'':<15}--{f.name} (default {f.default!r}) {help_of(f)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
