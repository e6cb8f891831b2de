"""Plots: the headline metric against shots or percentage (one styled line per arm, or one dot and interval per
arm where a dataset has a single data size), bars per arm, reliability and confusion grids, one run's confusion.

Every figure fits a page width (PAGE_WIDTH_IN at DPI), facet figures wrap into at most MAX_COLUMNS columns,
legends sit below the axes (never on the data), and an interval clipped at the metric's bounds ends in an arrow.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from engine.config import RunConfig, data_label, method_label, model_label
from evaluation.stats import Summary, summarize
from utils.report.load import HEADLINE, RESULTS_FILE, Group, ReportError, _read_one, arm_label, learning_rate
from utils.report.tables import _column_label, _column_order, by_dataset, by_slot, chance_level, display_rank

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
LINESTYLES = ("-", "--", ":", "-.")
HATCHES = ("", "//", "xx", "..", "\\\\", "++", "oo", "--")
PAGE_WIDTH_IN = 7.5  # a figure is at most this wide (a printed page or a screen column at 100%)
DPI = 120
MAX_COLUMNS = 4  # facet figures wrap into rows of at most this many panels
LEGEND_FONT = 7
CLIPPED = "clipped-interval"  # gid of the arrow marking an interval clipped at the metric's bound
ALL_STEP = 4.0  # "all images" sits two octaves right of the largest K on the shots axis


# ---------------------------------------------------------------- figure helpers


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")


def _legend_layout(labels: Sequence[str]) -> tuple[int, float]:
    """Columns and height (inches) of a legend below the axes that fits the page width."""
    if not labels:
        return 1, 0.0
    longest = max(len(label) for label in labels) * LEGEND_FONT * 0.55 / 72 + 0.45  # text plus handle, inches
    columns = max(1, min(len(labels), int(PAGE_WIDTH_IN * 0.95 // longest)))
    rows = math.ceil(len(labels) / columns)
    return columns, 0.2 + rows * LEGEND_FONT * 1.6 / 72


def _finish(fig, handles: Sequence, labels: Sequence[str], title_in: float = 0.0) -> None:
    """Lay the axes out with a legend below them (outside every axes) and room for a suptitle above."""
    columns, legend_in = _legend_layout(labels)
    height = fig.get_figheight()
    if labels:
        fig.legend(handles, labels, loc="lower center", ncol=columns, fontsize=LEGEND_FONT, frameon=False,
                   bbox_to_anchor=(0.5, 0.0))
    fig.tight_layout(rect=(0.0, legend_in / height, 1.0, 1.0 - title_in / height))


def _with_legend_room(width: float, axes_height: float, labels: Sequence[str], title_in: float = 0.0) -> tuple:
    """A figure size of `width` (at most the page width) with room for the axes, a legend and a title."""
    return min(width, PAGE_WIDTH_IN), axes_height + _legend_layout(labels)[1] + title_in


def _grid(plt, n: int, panel: float, extra_height: float = 0.0, labels: Sequence[str] = (),
          title_in: float = 0.0):
    """A grid of n panels in at most MAX_COLUMNS columns of `panel`-inch squares within the page width; unused
    cells hidden. Returns (figure, axes in reading order)."""
    columns = max(1, min(MAX_COLUMNS, n, int(PAGE_WIDTH_IN / panel + 1e-9)))
    panel = min(panel, PAGE_WIDTH_IN / columns)
    rows = math.ceil(n / columns)
    size = _with_legend_room(columns * panel, rows * (panel + extra_height), labels, title_in)
    fig, axes = plt.subplots(rows, columns, figsize=size, squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _bounds(s: Summary) -> tuple[float, float, bool, bool]:
    """The interval clipped to [0, 1] (a missing one collapses to the mean), and whether each end was clipped."""
    if math.isnan(s.ci_low) or math.isnan(s.ci_high):
        return s.mean, s.mean, False, False
    return max(0.0, s.ci_low), min(1.0, s.ci_high), s.ci_low < 0.0, s.ci_high > 1.0


def _arrows(ax, position: float, s: Summary, color, horizontal: bool = False) -> None:
    """An arrow head at each end of an interval that the metric's bounds clipped."""
    _, _, low_cut, high_cut = _bounds(s)
    for cut, end, marker in ((low_cut, 0.0, "<" if horizontal else "v"), (high_cut, 1.0, ">" if horizontal else "^")):
        if cut:
            xy = (end, position) if horizontal else (position, end)
            ax.plot(*xy, marker=marker, markersize=7, color=color, clip_on=False, linestyle="none", gid=CLIPPED)


def _interval_bar(ax, position: float, s: Summary, color, horizontal: bool = False, capsize: float = 3) -> None:
    """The clipped interval as an error bar at `position` (no marker), with arrows where it was clipped."""
    low, high, _, _ = _bounds(s)
    err = [[s.mean - low], [high - s.mean]]
    if horizontal:
        ax.errorbar([s.mean], [position], xerr=err, color=color, capsize=capsize, linestyle="none")
    else:
        ax.errorbar([position], [s.mean], yerr=err, color=color, capsize=capsize, linestyle="none")
    _arrows(ax, position, s, color, horizontal)


def _chance_line(ax, members: Sequence[Group], horizontal: bool = False) -> None:
    chance = _chance(members)
    if chance is None:
        return
    line = ax.axvline if horizontal else ax.axhline
    line(chance, color="black", linestyle=":", linewidth=1, label=f"chance ({100 * chance:.1f}%)")


def _metric_name(members: Sequence[Group]) -> str:
    return f"test {members[0].headline}"


def _metric_file(members: Sequence[Group]) -> str:
    return _safe(members[0].headline_key)


# ---------------------------------------------------------------- the headline against data size


def _curve_points(members: Sequence[Group], varying: Sequence[str], percentage: bool,
                  baseline: str) -> dict[str, list[tuple[float, Summary]]]:
    """Per arm (baseline first), (shots or percentage, summary of the test headline), sorted along x; all-images
    runs (shots -1) are on the shots axis at x = inf."""
    curves: dict[str, list[tuple[float, Summary]]] = defaultdict(list)
    for g in sorted(members, key=display_rank(baseline)):
        c = g.config
        is_pct = c.shots == 0 and c.percentage is not None
        if is_pct != percentage or (not percentage and c.shots == 0):
            continue
        x = float(c.percentage) if percentage else (math.inf if c.shots < 0 else float(c.shots))
        curves[arm_label(g, varying)].append((x, summarize(g.values("test", HEADLINE))))
    return {k: sorted(v, key=lambda p: p[0]) for k, v in curves.items()}


def plot_curves(groups: Sequence[Group], varying: Sequence[str], out: Path, baseline: str = "linear") -> list[Path]:
    """The test headline metric vs shots (all images at the right end) and vs percentage, per dataset: one
    styled line per arm with its 95% band; a dot and interval per arm where there is a single data size."""
    plt = _pyplot()
    written = []
    for dataset, members in by_dataset(groups):
        for percentage, axis in ((False, "shots per class (K)"), (True, "% of training data")):
            curves = _curve_points(members, varying, percentage, baseline)
            if not curves:
                continue
            xs = sorted({x for points in curves.values() for x, _ in points})
            if len(xs) == 1:
                slot = f"{xs[0]:g}%" if percentage else ("all" if math.isinf(xs[0]) else f"K={xs[0]:g}")
                written.append(_dot_plot(plt, dataset, slot, members, curves, out))
                continue
            written.append(_line_plot(plt, dataset, members, curves, xs, percentage, axis, out))
    return written


def _line_plot(plt, dataset: str, members: Sequence[Group], curves: dict, xs: list[float], percentage: bool,
               axis: str, out: Path) -> Path:
    finite = [x for x in xs if math.isfinite(x)]
    all_at = (finite[-1] if finite else 1.0) * ALL_STEP  # where "all images" is drawn
    labels = [*curves, "chance"]
    fig, ax = plt.subplots(figsize=_with_legend_room(PAGE_WIDTH_IN * 0.85, 3.6, labels))
    for i, (label, points) in enumerate(curves.items()):
        along = [(x if math.isfinite(x) else all_at, s) for x, s in points]
        finite_points = [(x, s) for (x, s), (raw, _) in zip(along, points, strict=True) if math.isfinite(raw)]
        style = dict(marker=MARKERS[i % len(MARKERS)], markersize=5, label=label)
        if finite_points:
            line = ax.plot([x for x, _ in finite_points], [s.mean for _, s in finite_points],
                           linestyle=LINESTYLES[i % len(LINESTYLES)], **style)[0]
            style.pop("label")
        color = line.get_color() if finite_points else f"C{i % 10}"
        if len(finite_points) > 1:
            ax.fill_between([x for x, _ in finite_points], [_bounds(s)[0] for _, s in finite_points],
                            [_bounds(s)[1] for _, s in finite_points], color=color, alpha=0.12, linewidth=0)
            for x, s in finite_points:
                _arrows(ax, x, s, color)
        else:
            for x, s in finite_points:
                _interval_bar(ax, x, s, color)
        for x, s in ((x, s) for (x, s), (raw, _) in zip(along, points, strict=True) if not math.isfinite(raw)):
            ax.plot([x], [s.mean], linestyle="none", color=color, **style)  # all images: not on the K scale
            _interval_bar(ax, x, s, color)
    _chance_line(ax, members)
    ticks = [x if math.isfinite(x) else all_at for x in xs]
    ax.set_xscale("log", base=2 if not percentage else 10)
    if any(not math.isfinite(x) for x in xs) and finite:
        ax.axvline(math.sqrt(finite[-1] * all_at), color="0.6", linewidth=0.8, linestyle="--")
    ax.set_xlim(ticks[0] / 1.5, ticks[-1] * 1.5)
    ax.set_ylim(0, 1)
    ax.set_xticks(ticks, [f"{x:g}" if math.isfinite(x) else "all" for x in xs])
    ax.minorticks_off()  # only the measured shots/percentages are labelled
    ax.set_xlabel(axis)
    ax.set_ylabel(_metric_name(members))
    ax.set_title(f"{dataset}: {_metric_name(members)}, mean and 95% t-interval over seeds", fontsize=9)
    ax.grid(alpha=0.3)
    handles, names = ax.get_legend_handles_labels()
    _finish(fig, handles, names)
    name = f"{_metric_file(members)}_vs_{'percentage' if percentage else 'shots'}_{_safe(dataset)}.png"
    return _save(fig, out / name)


def _dot_plot(plt, dataset: str, slot: str, members: Sequence[Group], curves: dict, out: Path) -> Path:
    """One row per arm (baseline at the top): the mean as a dot, the clipped 95% interval as a bar."""
    labels = list(curves)
    height = 0.9 + 0.28 * len(labels)
    fig, ax = plt.subplots(figsize=_with_legend_room(PAGE_WIDTH_IN, height, ["chance"]))
    for i, ((_, s),) in enumerate(curves.values()):
        y = len(labels) - 1 - i
        color = f"C{i % 10}"
        ax.plot([s.mean], [y], marker=MARKERS[i % len(MARKERS)], color=color, linestyle="none")
        _interval_bar(ax, y, s, color, horizontal=True)
    _chance_line(ax, members, horizontal=True)
    ax.set_yticks(range(len(labels)), list(reversed(labels)), fontsize=7)
    ax.set_ylim(-0.6, len(labels) - 0.4)
    ax.set_xlim(0, 1)
    ax.set_xlabel(_metric_name(members))
    ax.grid(alpha=0.3, axis="x")
    ax.set_title(f"{dataset}, {slot}: {_metric_name(members)}, mean and 95% t-interval over seeds", fontsize=9)
    handles, names = ax.get_legend_handles_labels()
    _finish(fig, handles, names)
    return _save(fig, out / f"{_metric_file(members)}_{_safe(dataset)}_{_safe(slot)}.png")


def _chance(members: Sequence[Group]) -> float | None:
    """The chance level of the headline metric, as the runs' task defines it."""
    return chance_level(members[0])


# ---------------------------------------------------------------- bars


def plot_methods(groups: Sequence[Group], varying: Sequence[str], out: Path, baseline: str = "linear") -> list[Path]:
    """Bars of the test headline metric per data size, one hatched bar per arm (baseline first), clipped 95%
    error bars with arrows where clipped. Drawn for every dataset with at least two arms."""
    plt = _pyplot()
    written = []
    for dataset, members in by_dataset(groups):
        arms = list(dict.fromkeys(arm_label(g, varying) for g in sorted(members, key=display_rank(baseline))))
        if len(arms) < 2:
            continue
        slots = sorted({(_column_label(g.config), _column_order(g.config)) for g in members}, key=lambda s: s[1])
        width = 0.8 / len(arms)
        fig, ax = plt.subplots(figsize=_with_legend_room(PAGE_WIDTH_IN, 3.6, [*arms, "chance"]))
        for j, arm in enumerate(arms):
            xs, means, summaries = [], [], []
            for i, (slot, _) in enumerate(slots):
                g = next((g for g in members if _column_label(g.config) == slot and arm_label(g, varying) == arm),
                         None)
                if g is None:
                    continue
                s = summarize(g.values("test", HEADLINE))
                xs.append(i + (j - (len(arms) - 1) / 2) * width)
                means.append(s.mean)
                summaries.append(s)
            ax.bar(xs, means, width, label=arm, hatch=HATCHES[j % len(HATCHES)], edgecolor="black", alpha=0.8)
            for x, s in zip(xs, summaries, strict=True):
                _interval_bar(ax, x, s, "black", capsize=2)
        ax.set_xticks(range(len(slots)), [slot for slot, _ in slots], fontsize=8)
        ax.set_ylim(0, 1)
        _chance_line(ax, members)
        ax.set_ylabel(_metric_name(members))
        ax.set_title(f"{dataset}: {_metric_name(members)} per arm (mean, 95% t-interval over seeds)", fontsize=9)
        handles, names = ax.get_legend_handles_labels()
        _finish(fig, handles, names)
        written.append(_save(fig, out / f"methods_{_safe(dataset)}.png"))
    return written


# ---------------------------------------------------------------- facets: confusion and reliability


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
    ax.set_xlabel("predicted", fontsize=fontsize + 1)


def plot_confusion_sums(groups: Sequence[Group], varying: Sequence[str], out: Path,
                        baseline: str = "linear") -> list[Path]:
    """Per dataset and data size, one test confusion matrix per arm summed over its seeds, in a grid of at most
    MAX_COLUMNS columns."""
    plt = _pyplot()
    written = []
    with_matrices = [g for g in groups if all(r.data["metrics"]["test"].get("confusion_matrix") for r in g.runs)]
    for (dataset, _, data), members in by_slot(with_matrices):
        members = sorted(members, key=display_rank(baseline))
        classes = members[0].runs[0].data.get("classes") or []
        n = len(classes)
        fig, axes = _grid(plt, len(members), panel=max(1.8, 0.3 * n + 1.2), extra_height=0.5, title_in=0.3)
        for k, (ax, g) in enumerate(zip(axes, members, strict=True)):
            total = [[sum(r.data["metrics"]["test"]["confusion_matrix"][i][j] for r in g.runs) for j in range(n)]
                     for i in range(n)]
            draw_confusion(ax, total, classes, fontsize=6)
            ax.set_title(f"{arm_label(g, varying)}\n({len(g.runs)} seeds summed)", fontsize=6)
            if k % MAX_COLUMNS == 0:
                ax.set_ylabel("true", fontsize=7)
        fig.suptitle(f"{dataset}, {data}: test confusion matrices", fontsize=9)
        _finish(fig, [], [], title_in=0.3)
        written.append(_save(fig, out / f"confusion_sum_{_safe(dataset)}_{_safe(data)}.png"))
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


def plot_reliability(groups: Sequence[Group], varying: Sequence[str], out: Path,
                     baseline: str = "linear") -> list[Path]:
    """Reliability diagrams per dataset and data size: accuracy against confidence per bin, one panel per
    arm in a grid of at most MAX_COLUMNS columns, the number of test images in each bin written above its bar
    (pooled over seeds), the legend below the grid."""
    plt = _pyplot()
    written = []
    legend = ["accuracy", "perfect calibration"]
    for (dataset, _, data), members in by_slot([g for g in groups if pooled_reliability(g)]):
        members = sorted(members, key=display_rank(baseline))
        fig, axes = _grid(plt, len(members), panel=PAGE_WIDTH_IN / MAX_COLUMNS, extra_height=0.45, labels=legend,
                          title_in=0.3)
        for k, (ax, g) in enumerate(zip(axes, members, strict=True)):
            bins = pooled_reliability(g)
            edges = bins["edges"]
            width = edges[1] - edges[0]
            centres = [lo + width / 2 for lo in edges[:-1]]
            acc = [a / n if n else 0.0 for a, n in zip(bins["acc_sum"], bins["count"], strict=True)]
            ax.bar(centres, acc, width * 0.9, edgecolor="black", color="0.7", label=legend[0])
            ax.plot([0, 1], [0, 1], linestyle="--", color="black", linewidth=1, label=legend[1])
            for x, a, n in zip(centres, acc, bins["count"], strict=True):
                if n:
                    ax.text(x, min(a + 0.02, 0.95), str(n), ha="center", fontsize=5)
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1)
            ax.tick_params(labelsize=6)
            ax.set_xlabel("confidence", fontsize=7)
            ax.set_title(arm_label(g, varying), fontsize=6)
            if k % MAX_COLUMNS == 0:
                ax.set_ylabel("accuracy (pooled)", fontsize=7)
        fig.suptitle(f"{dataset}, {data}: test reliability (bar labels: images per bin)", fontsize=9)
        handles, names = axes[0].get_legend_handles_labels()
        _finish(fig, handles, names, title_in=0.3)
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
    side = min(PAGE_WIDTH_IN, max(4.0, 1.5 + 0.45 * len(matrix)))
    fig, ax = plt.subplots(figsize=(side, side))
    draw_confusion(ax, matrix, classes, fontsize=7)
    ax.set_ylabel("true")
    c = RunConfig.from_dict(run.config)
    lr = learning_rate(c)
    lr_text = "" if lr is None else f" lr {lr:g}"
    where = f"{c.dataset} {data_label(c)}{lr_text} seed {c.seed} (test)"
    ax.set_title(f"{model_label(c)}\n{method_label(c)}\n{where}", fontsize=8)
    lr_part = "" if lr is None else f"_lr{lr:g}"
    name = f"confusion_{c.dataset}_{model_label(c)}_{method_label(c)}_{data_label(c)}{lr_part}_seed{c.seed}"
    fig.tight_layout()
    return _save(fig, out / f"{_safe(name)}.png")


def _save(fig, path: Path) -> Path:
    """Write the laid-out figure at DPI (its size is what the layout made it) and release it."""
    fig.savefig(path, dpi=DPI)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
