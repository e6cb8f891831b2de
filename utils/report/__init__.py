"""Turn a folder of runs into the paper's tables and plots, with honest statistics.

``python -m utils.report OUTPUT_DIR [--out DIR] [--confusion RUN_DIR] [--skip_invalid]
[--ensemble seeds|models|methods]`` reads every
``results.json`` below OUTPUT_DIR (folders named ``checkpoints`` and hidden folders are ignored) and
writes, into ``OUTPUT_DIR/report`` unless ``--out`` says otherwise:

- ``summary.csv``: one row per setting (every config field that changes results, except the seed)
  with the seeds, the raw per-seed test metrics and their mean, std and 95% t-interval;
- ``summary_lr_selected.csv`` (when a setting was run with several learning rates): the lr chosen
  per setting on the mean validation headline metric (the one the runs' task names), never on test;
- ``paired.csv``: every method against the baseline method (``--baseline``, default linear), and
  pretrained against random weights or one model against another, on the same data and seeds: the
  mean difference of the test headline metric with its paired t-interval (refused between methods when a
  run did not train for its method's intended step budget, unless ``--compare_cut_budgets``);
- ``ensembles.csv`` with ``--ensemble``: ensembles (mean per-image test probabilities) beside their members,
  with the paired interval against the best member (utils/report/ensemble.py);
- PNG plots and ``report.md`` with the tables laid out like the paper's.

Runs whose settings or schema versions differ are never averaged together. An unreadable or
incomplete results.json is an error naming the file (exit 2); with ``--skip_invalid`` it is a
warning and the file is left out.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from common.errors import exit_status
from utils.report.ensemble import KINDS, build_ensembles, ensemble_markdown, write_ensembles
from utils.report.load import Group, ReportError, Run, group_runs, load_runs, settings_key, varying_fields
from utils.report.plots import plot_confusion, plot_confusion_sums, plot_curves, plot_methods, plot_reliability
from utils.report.tables import markdown_report, paired_rows, select_lr, summary_row, write_csv

__all__ = ["Group", "ReportError", "Run", "build_report", "group_runs", "load_runs", "main", "paired_rows",
           "select_lr", "settings_key", "summary_row", "varying_fields"]


# ---------------------------------------------------------------- entry


def build_report(output_dir: str | Path, out: str | Path | None = None, confusion: str | Path | None = None,
                 skip_invalid: bool = False, n_resamples: int = 10_000, seed: int = 0,
                 plots: bool = True, baseline: str = "linear", cut_budgets: bool = False,
                 ensemble: str | None = None) -> list[Path]:
    """Read every run below output_dir and write the CSV tables, plots and report.md; returns the files.

    ensemble: "seeds", "models" or "methods" also averages the test probabilities of such runs (ensembles.csv
    and a section of report.md; see utils.report.ensemble)."""
    source = Path(output_dir)
    runs = load_runs(source, skip_invalid)
    out_dir = Path(out) if out else source / "report"
    groups = group_runs(runs)
    varying = varying_fields(groups)
    chosen, candidates = select_lr(groups)
    several = any(len(v) > 1 for v in candidates.values())
    extra: list[str] = []
    if ensemble:  # before anything is written: a set that cannot be ensembled leaves no partial report
        outcomes, refused = build_ensembles(chosen, ensemble, varying, n_resamples, seed, baseline)
        for reason in refused:
            print(f"warning: not ensembled: {reason}", file=sys.stderr)
        extra = ensemble_markdown(ensemble, outcomes, refused)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [write_csv(out_dir / "summary.csv", [summary_row(g, varying) for g in groups])]
    if ensemble:
        written.append(write_ensembles(out_dir, outcomes))
    if several:
        rows = []
        for g in chosen:
            row = summary_row(g, varying)
            row["lr_candidates"] = ";".join(map(repr, candidates[id(g)]))
            row["lr_selected_by"] = f"mean val {g.headline}"
            rows.append(row)
        written.append(write_csv(out_dir / "summary_lr_selected.csv", rows))
    pairs = paired_rows(chosen, varying, n_resamples, seed, baseline, cut_budgets)
    if pairs:
        written.append(write_csv(out_dir / "paired.csv", pairs))
    figures: list[Path] = []
    if plots:
        figures += plot_curves(chosen, varying, out_dir, baseline) + plot_methods(chosen, varying, out_dir, baseline)
        figures += plot_reliability(chosen, varying, out_dir, baseline)
        figures += plot_confusion_sums(chosen, varying, out_dir, baseline)
        if confusion:
            figures.append(plot_confusion(confusion, out_dir))
    report = out_dir / "report.md"
    report.write_text(markdown_report(source, runs, groups, chosen, several, varying, pairs, figures, baseline,
                                      extra))
    return written + figures + [report]


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: python -m utils.report OUTPUT_DIR [--out DIR] [--confusion RUN_DIR] [--skip_invalid]."""
    parser = argparse.ArgumentParser(prog="python -m utils.report", description=__doc__.split("\n")[0])
    parser.add_argument("output_dir", help="folder holding the runs (the sweep's --output_dir)")
    parser.add_argument("--out", default=None, help="where to write the report (default OUTPUT_DIR/report)")
    parser.add_argument("--confusion", default=None, help="a run folder whose test confusion matrix to plot")
    parser.add_argument("--skip_invalid", action="store_true",
                        help="warn about and leave out unreadable results.json files instead of stopping")
    parser.add_argument("--n_resamples", type=int, default=10_000, help="paired bootstrap resamples")
    parser.add_argument("--bootstrap_seed", type=int, default=0)
    parser.add_argument("--no_plots", action="store_true")
    parser.add_argument("--baseline", default="linear", help="the method every other method is compared with")
    parser.add_argument("--compare_cut_budgets", action="store_true",
                        help="also compute paired differences between methods when a run did not train for its "
                             "method's intended step budget (marked in the report); by default they are refused")
    parser.add_argument("--ensemble", choices=KINDS, default=None,
                        help="also average the per-image test probabilities of a setting's seeds, of the models run "
                             "with one method, or of the methods run on one model (same test images only) and "
                             "report the ensemble beside its members")
    parser.add_argument("--wandb", action="store_true",
                        help="also upload the tables and plots to one Weights & Biases run (offline without a login)")
    args = parser.parse_args(argv)
    return exit_status(lambda: _write(args))


def _write(args: argparse.Namespace) -> int:
    files = build_report(args.output_dir, args.out, args.confusion, args.skip_invalid,
                         args.n_resamples, args.bootstrap_seed, not args.no_plots, args.baseline,
                         args.compare_cut_budgets, args.ensemble)
    print(f"report written to {files[-1].parent}:")
    for path in files:
        print(f"  {path.name}")
    if args.wandb:
        upload(files, Path(args.output_dir))
    return 0


def upload(files: Sequence[Path], source: Path) -> None:
    """The report's CSV tables (as wandb Tables), plots (as images) and report.md in one wandb run."""
    import csv

    from engine.tracking import start_tracking

    tracker = start_tracking(True, {"report_of": str(source.resolve())}, files[-1].parent, name="report")
    if tracker.run is None:
        return
    import wandb

    logged: dict = {}
    for path in files:
        if path.suffix == ".csv":
            with open(path, newline="", encoding="utf-8") as handle:
                rows = list(csv.reader(handle))
            if rows:
                logged[f"report/{path.stem}"] = wandb.Table(columns=rows[0], data=rows[1:])
        elif path.suffix == ".png":
            logged[f"plots/{path.stem}"] = wandb.Image(str(path))
        elif path.suffix == ".md":
            logged["report/markdown"] = wandb.Html(f"<pre>{path.read_text(encoding='utf-8')}</pre>")
    tracker.run.log(logged)
    tracker.finish()


if __name__ == "__main__":
    sys.exit(main())
