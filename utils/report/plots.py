"""Plots: balanced accuracy against shots or percentage with one styled line per method, bars per method,
and one run's confusion matrix."""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from engine.config import RunConfig, data_label, method_label, model_label
from evaluation.stats import Summary, summarize
from utils.report.load import HEADLINE, RESULTS_FILE, Group, ReportError, _read_one, arm_label
from utils.report.tables import _arm_rank, _column_label, _column_order, by_dataset, by_slot, chance_level

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
LINESTYLES = ("-", "--", ":", "-.")
HATCHES = ("", "//", "xx", "..", "\\\\", "++", "oo", "--")


# ---------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")


def _curve_points(members: Sequence[Group], varying: Sequence[str],
                  percentage: bool) -> dict[str, list[tuple[float, Summary]]]:
    """Per arm, (shots or percentage, summary of test balanced accuracy), sorted along x."""
    curves: dict[str, list[tuple[float, Summary]]] = defaultdict(list)
    for g in sorted(members, key=_arm_rank):
        c = g.config
        is_pct = c.shots == 0 and c.percentage is not None
        if is_pct != percentage or (not percentage and c.shots < 1):
            continue  # "all images" (-1) has no place on a log axis of K
        x = float(c.percentage) if percentage else float(c.shots)
        curves[arm_label(g, varying)].append((x, summarize(g.values("test", HEADLINE))))
    return {k: sorted(v, key=lambda p: p[0]) for k, v in curves.items()}


def plot_curves(groups: Sequence[Group], varying: Sequence[str], out: Path) -> list[Path]:
    """Test balanced accuracy vs shots (and vs percentage) per dataset, one styled line per arm, CI bands."""
    plt = _pyplot()
    written = []
    for dataset, members in by_dataset(groups):
        for percentage, axis in ((False, "shots per class (K)"), (True, "% of training data")):
            curves = _curve_points(members, varying, percentage)
            if not curves:
                continue
            fig, ax = plt.subplots(figsize=(6.4, 4.4))
            for i, (label, points) in enumerate(curves.items()):
                xs = [p[0] for p in points]
                line = ax.plot(xs, [p[1].mean for p in points], marker=MARKERS[i % len(MARKERS)], markersize=6,
                               linestyle=LINESTYLES[i % len(LINESTYLES)], label=label)[0]
                low = [_clip(p[1].ci_low, p[1].mean) for p in points]
                high = [_clip(p[1].ci_high, p[1].mean) for p in points]
                if len(xs) == 1:  # a single K: an error bar, so the interval stays visible
                    mean = points[0][1].mean
                    ax.errorbar(xs, [mean], yerr=[[mean - low[0]], [high[0] - mean]], color=line.get_color(),
                                capsize=4)
                else:
                    ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.15, linewidth=0)
            chance = _chance(members)
            if chance is not None:
                ax.axhline(chance, color="black", linestyle=":", linewidth=1, label=f"chance ({chance:.2f})")
            ax.set_xscale("log", base=2 if not percentage else 10)
            ticks = sorted({x for pts in curves.values() for x, _ in pts})
            if len(ticks) == 1:
                ax.set_xlim(ticks[0] / 1.5, ticks[0] * 1.5)
            ax.set_ylim(0, 1)
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
            ax.minorticks_off()  # only the measured shots/percentages are labelled
            ax.set_xlabel(axis)
            ax.set_ylabel(f"test {members[0].headline}")
            ax.set_title(f"{dataset}: mean and 95% CI over seeds")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            name = f"{_safe(members[0].headline_key)}_vs_{'percentage' if percentage else 'shots'}_{_safe(dataset)}.png"
            written.append(_save(fig, out / name))
    return written


def _clip(bound: float, mean: float) -> float:
    """An interval bound clipped to [0, 1] (a missing one collapses to the mean)."""
    return mean if math.isnan(bound) else min(1.0, max(0.0, bound))


def _chance(members: Sequence[Group]) -> float | None:
    """The chance level of the headline metric, as the runs' task defines it."""
    return chance_level(members[0])


def draw_confusion(ax, matrix: list[list[int]], classes: Sequence[str], fontsize: int) -> None:
    """Counts written in every cell, grey shades by row fraction (readable without colour)."""
    n = len(matrix)
    fractions = [[v / max(1, sum(row)) for v in row] for row in matrix]
    ax.imshow(fractions, cmap="Greys", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(matrix[i][j]), ha="center", va="center", fontsize=fontsize + 1,
                    color="white" if fractions[i][j] > 0.5 else "black")
    ax.set_xticks(range(n), classes, rotation=45, ha="right", fontsize=fontsize)
    ax.set_yticks(range(n), classes, fontsize=fontsize)
    ax.set_xlabel("predicted")


def plot_confusion_sums(groups: Sequence[Group], varying: Sequence[str], out: Path) -> list[Path]:
    """Per dataset and data size, one test confusion matrix per arm, summed over its seeds."""
    plt = _pyplot()
    written = []
    with_matrices = [g for g in groups if all(r.data["metrics"]["test"].get("confusion_matrix") for r in g.runs)]
    for (dataset, _, data), members in by_slot(with_matrices):
        members = sorted(members, key=_arm_rank)
        classes = members[0].runs[0].data.get("classes") or []
        n = len(classes)
        side = max(3.0, 0.45 * n + 1.5)
        fig, axes = plt.subplots(1, len(members), figsize=(side * len(members), side + 0.6), squeeze=False)
        for ax, g in zip(axes[0], members, strict=True):
            total = [[sum(r.data["metrics"]["test"]["confusion_matrix"][i][j] for r in g.runs) for j in range(n)]
                     for i in range(n)]
            draw_confusion(ax, total, classes, fontsize=6)
            ax.set_title(f"{arm_label(g, varying)}\n({len(g.runs)} seeds summed)", fontsize=7)
        axes[0][0].set_ylabel("true")
        written.append(_save(fig, out / f"confusion_sum_{_safe(dataset)}_{_safe(data)}.png"))
    return written


def plot_methods(groups: Sequence[Group], varying: Sequence[str], out: Path) -> list[Path]:
    """Bars of test balanced accuracy per data size, one hatched bar per arm (model and method), CI error bars.

    Drawn for every dataset with at least two arms, whatever the methods.
    """
    plt = _pyplot()
    written = []
    for dataset, members in by_dataset(groups):
        arms = list(dict.fromkeys(arm_label(g, varying) for g in sorted(members, key=_arm_rank)))
        if len(arms) < 2:
            continue
        slots = sorted({(_column_label(g.config), _column_order(g.config)) for g in members}, key=lambda s: s[1])
        width = 0.8 / len(arms)
        fig, ax = plt.subplots(figsize=(max(6.4, 0.9 * len(slots) * len(arms)), 4.4))
        for j, arm in enumerate(arms):
            xs, means, errs = [], [], [[], []]
            for i, (slot, _) in enumerate(slots):
                g = next((g for g in members if _column_label(g.config) == slot and arm_label(g, varying) == arm),
                         None)
                if g is None:
                    continue
                s = summarize(g.values("test", HEADLINE))
                xs.append(i + (j - (len(arms) - 1) / 2) * width)
                means.append(s.mean)
                errs[0].append(0 if math.isnan(s.ci_low) else s.mean - s.ci_low)
                errs[1].append(0 if math.isnan(s.ci_high) else s.ci_high - s.mean)
            ax.bar(xs, means, width, yerr=errs, capsize=3, label=arm, hatch=HATCHES[j % len(HATCHES)],
                   edgecolor="black", alpha=0.8)
        ax.set_xticks(range(len(slots)), [slot for slot, _ in slots], fontsize=8)
        ax.set_ylim(0, 1)
        chance = _chance(members)
        if chance is not None:
            ax.axhline(chance, color="black", linestyle=":", linewidth=1, label=f"chance ({chance:.2f})")
        ax.set_ylabel(f"test {members[0].headline}")
        ax.set_title(f"{dataset}: methods compared (mean, 95% t-interval over seeds)")
        ax.legend(fontsize=7)
        written.append(_save(fig, out / f"methods_{_safe(dataset)}.png"))
    return written


def pooled_reliability(group: Group) -> dict | None:
    """Test reliability bins of a setting pooled over its seeds (counts added, means weighted by count)."""
    pooled = None
    for run in group.runs:
        bins = run.data.get("test_reliability")
        if not bins:
            continue
        if pooled is None:
            pooled = {"edges": bins["edges"], "count": [0] * len(bins["count"]),
                      "conf_sum": [0.0] * len(bins["count"]), "acc_sum": [0.0] * len(bins["count"])}
        for i, n in enumerate(bins["count"]):
            if n:
                pooled["count"][i] += n
                pooled["conf_sum"][i] += n * bins["confidence"][i]
                pooled["acc_sum"][i] += n * bins["accuracy"][i]
    return pooled


def plot_reliability(groups: Sequence[Group], varying: Sequence[str], out: Path) -> list[Path]:
    """Reliability diagrams per dataset and data size: accuracy against confidence per bin, one panel per
    arm, with the number of test images in each bin written above its bar (pooled over seeds)."""
    plt = _pyplot()
    written = []
    for (dataset, _, data), members in by_slot([g for g in groups if pooled_reliability(g)]):
        members = sorted(members, key=_arm_rank)
        fig, axes = plt.subplots(1, len(members), figsize=(3.2 * len(members), 3.4), squeeze=False)
        for ax, g in zip(axes[0], members, strict=True):
            bins = pooled_reliability(g)
            edges = bins["edges"]
            width = edges[1] - edges[0]
            centres = [lo + width / 2 for lo in edges[:-1]]
            acc = [a / n if n else 0.0 for a, n in zip(bins["acc_sum"], bins["count"], strict=True)]
            ax.bar(centres, acc, width * 0.9, edgecolor="black", color="0.7", label="accuracy")
            ax.plot([0, 1], [0, 1], linestyle="--", color="black", linewidth=1, label="perfect calibration")
            for x, a, n in zip(centres, acc, bins["count"], strict=True):
                if n:
                    ax.text(x, min(a + 0.02, 0.95), str(n), ha="center", fontsize=6)
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1)
            ax.set_xlabel("confidence")
            ax.set_title(arm_label(g, varying), fontsize=7)
        axes[0][0].set_ylabel("accuracy (test, pooled over seeds)")
        axes[0][0].legend(fontsize=6, loc="upper left")
        fig.suptitle(f"{dataset}, {data}: reliability (bar labels: images per bin)", fontsize=9)
        written.append(_save(fig, out / f"reliability_{_safe(dataset)}_{_safe(data)}.png"))
    return written


def plot_confusion(run_folder: str | Path, out: Path) -> Path:
    """The test confusion matrix of one run (counts written in every cell, grey shades by row fraction)."""
    path = Path(run_folder)
    path = path if path.name == RESULTS_FILE else path / RESULTS_FILE
    if not path.is_file():
        raise ReportError(f"--confusion: {path} does not exist; give a run folder that holds {RESULTS_FILE}")
    run = _read_one(path)
    matrix = run.data["metrics"]["test"].get("confusion_matrix")
    classes = run.data.get("classes") or [str(i) for i in range(len(matrix or []))]
    if not matrix:
        raise ReportError(f"--confusion: {path} has no metrics.test.confusion_matrix")
    plt = _pyplot()
    side = max(4.0, 1.5 + 0.6 * len(matrix))
    fig, ax = plt.subplots(figsize=(side, side))
    draw_confusion(ax, matrix, classes, fontsize=7)
    ax.set_ylabel("true")
    c = RunConfig.from_dict(run.config)
    where = f"{c.dataset} {data_label(c)} lr {c.lr:g} seed {c.seed} (test)"
    ax.set_title(f"{model_label(c)}\n{method_label(c)}\n{where}", fontsize=8)
    name = f"confusion_{c.dataset}_{model_label(c)}_{method_label(c)}_{data_label(c)}_lr{c.lr:g}_seed{c.seed}"
    return _save(fig, out / f"{_safe(name)}.png")


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path

