"""The report's figures with many arms: page-width images, grids of at most 4 columns, legends off the data,
arrows on clipped intervals, a dot-and-interval plot for a single data size, and the task's metric named.

Layout is read from matplotlib's artists (window extents) of every figure the report saves.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from tasks import get_task
from tests.test_report import patch_results, read_csv, write_run
from utils.report import build_report, plots

TEN_METHODS = ("linear", "lora", "knn", "simpleshot", "bitfit", "adapter", "dora", "prototype", "logreg", "full")
MAX_WIDTH_PX = plots.PAGE_WIDTH_IN * plots.DPI


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's header."""
    return struct.unpack(">II", path.read_bytes()[16:24])


def report_with_figures(source: Path, out: Path, **options) -> tuple[list[Path], dict[str, object]]:
    """build_report, and every figure it saved by file name (kept alive after saving, to read its artists)."""
    saved: dict[str, object] = {}
    original = plots._save

    def keep(fig, path):
        saved[Path(path).name] = fig
        return original(fig, path)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(plots, "_save", keep)
        files = build_report(source, out=out, n_resamples=100, **options)
    return files, saved


def _reliability(data: dict, i: int) -> None:
    data.update(test_reliability={"edges": [0, 0.5, 1], "count": [2, 6 + i % 2], "confidence": [0.4, 0.8],
                                  "accuracy": [0.5, 0.75]})


@pytest.fixture(scope="module")
def ten_arms(tmp_path_factory) -> tuple[Path, list[Path], dict[str, object]]:
    """The report of ten methods at K=4 on three seeds (its folder, files and figures); `full` is near 1.0 with a
    spread that pushes its interval past 100%."""
    runs = tmp_path_factory.mktemp("ten")
    for seed in (1, 2, 3):
        for i, method in enumerate(TEN_METHODS):
            test = (0.90, 0.99, 1.0)[seed - 1] if method == "full" else 0.40 + 0.04 * i + 0.01 * seed
            folder = write_run(runs, seed, test, method=method, shots=4)
            data = patch_results(folder)
            _reliability(data, i)
            patch_results(folder, **data)
    out = runs / "report"
    return (out, *report_with_figures(runs, out))


def _overlaps(fig) -> list[str]:
    """Legends that overlap an axes' data area, or leave the figure."""
    renderer = FigureCanvasAgg(fig).get_renderer()  # the saved figure was closed: draw it on a fresh canvas
    legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
    page = fig.bbox
    problems = []
    for legend in legends:
        box = legend.get_window_extent(renderer)
        if box.x0 < page.x0 - 1 or box.x1 > page.x1 + 1 or box.y0 < page.y0 - 1:
            problems.append(f"legend {box} leaves the figure {page}")
        for ax in fig.axes:
            if ax.get_visible() and box.overlaps(ax.get_window_extent(renderer)):
                problems.append(f"legend {box} overlaps axes {ax.get_title()!r}")
    return problems


def test_ten_methods_fit_a_page_with_legends_off_the_data(ten_arms):
    _, files, figures = ten_arms
    pngs = [f for f in files if f.suffix == ".png"]
    names = {f.name for f in pngs}
    assert {"methods_demo.png", "reliability_demo_K_4.png", "confusion_sum_demo_K_4.png",
            "balanced_accuracy_demo_K_4.png"} <= names
    for png in pngs:
        width, height = png_size(png)
        assert width <= MAX_WIDTH_PX, (png.name, width, height)
        assert not _overlaps(figures[png.name]), png.name
        assert all(leg is None for leg in (ax.get_legend() for ax in figures[png.name].axes)), png.name
    # facets wrap: ten panels in rows of at most four
    for name in ("reliability_demo_K_4.png", "confusion_sum_demo_K_4.png"):
        panels = [ax for ax in figures[name].axes if ax.get_visible()]
        assert len(panels) == 10
        columns = {round(ax.get_position().x0, 3) for ax in panels}
        rows = {round(ax.get_position().y0, 3) for ax in panels}
        assert (len(columns), len(rows)) == (4, 3), name


def test_a_single_shot_count_is_a_dot_and_interval_plot_with_the_baseline_first(ten_arms):
    out, _, figures = ten_arms
    assert not any(name.startswith("balanced_accuracy_vs_shots") for name in figures)  # no line plot of one K
    (ax,) = figures["balanced_accuracy_demo_K_4.png"].axes
    rows = [t.get_text() for t in ax.get_yticklabels()]
    assert len(rows) == 10 and rows[-1] == "tiny_clip linear"  # the top row is the baseline
    drawn = [line for line in ax.get_lines() if line.get_gid() != plots.CLIPPED and len(line.get_xdata()) > 1]
    assert all(line.get_linestyle() == ":" for line in drawn)  # the only line is chance, not a curve
    md = (out / "report.md").read_text()
    side = next(line for line in md.splitlines() if line.startswith("| | "))
    assert side.split(" | ")[1] == "tiny_clip linear"  # tables list the baseline first too


def test_clipped_intervals_end_in_an_arrow_and_tables_clip_them_alike(ten_arms):
    out, _, figures = ten_arms
    for name in ("balanced_accuracy_demo_K_4.png", "methods_demo.png"):
        arrows = [line for ax in figures[name].axes for line in ax.get_lines() if line.get_gid() == plots.CLIPPED]
        assert len(arrows) == 1, name  # only `full` (96.3 ± 13.0) leaves [0, 100]
        x, y = arrows[0].get_xdata()[0], arrows[0].get_ydata()[0]
        assert (x, arrows[0].get_marker()) == (1.0, ">") or (y, arrows[0].get_marker()) == (1.0, "^")
    md = (out / "report.md").read_text()
    assert "96.3 [82.7, 100.0]" in md  # 0.9633 ± t(0.975, 2) x 0.05508 / sqrt(3) = ± 13.68: [82.65, 110.0] clipped
    assert "96.3 ±" not in md
    assert md.count("96.3 [82.7, 100.0]") == 3  # the methods table, the every-metric table and the paper's table


def test_methods_that_train_nothing_show_no_learning_rate(ten_arms):
    out, _, _ = ten_arms
    lrs = {r["method"].split("-")[0]: r["lr"] for r in read_csv(out / "summary.csv")}
    assert lrs["knn"] == lrs["simpleshot"] == lrs["logreg"] == "" and float(lrs["lora"]) > 0
    md = (out / "report.md").read_text()
    knn = next(line for line in md.splitlines() if line.startswith("| tiny_clip knn"))
    assert knn.rstrip().endswith("| – | 3 |")


def test_a_multilabel_report_names_its_metric_includes_all_images_and_prints_chance_in_percent(tmp_path):
    task = get_task("multilabel")
    for seed in (1, 2):
        for shots in (4, 8, -1):
            for method in ("linear", "lora"):
                auroc = 0.6 + 0.02 * seed + (0.05 if method == "lora" else 0) + (0.1 if shots == -1 else 0.0)
                folder = write_run(tmp_path / "runs", seed, 0.5, method=method, shots=shots)
                block = {"macro_auroc": auroc, "mAP": auroc - 0.1, "macro_f1": 0.4, "exact_match": 0.2, "n": 8}
                patch_results(folder, task=task.name, headline=task.headline, classes=["a", "b", "c"],
                              metrics={"val": block, "test": block})
    _, figures = report_with_figures(tmp_path / "runs", tmp_path / "rep")
    name = f"{task.headline}_vs_shots_demo.png"
    assert name in figures and not any(n.startswith("balanced_accuracy") for n in figures)
    (ax,) = figures[name].axes
    assert task.headline_name in ax.get_title() and task.headline_name in ax.get_ylabel()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["4", "8", "all"]
    md = (tmp_path / "rep" / "report.md").read_text()
    assert f"(chance level of the headline metric: {100 * task.chance(3):.1f})" in md  # 50.0 in a % table
    assert f"| {' | '.join(task.report_metrics)} | lr | seeds |" in md
    assert "| Model | Method | K=4 | K=8 | all |" in md
    assert not _overlaps(figures[name])
