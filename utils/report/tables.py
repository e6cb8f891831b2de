"""Tables: per-setting summaries, learning-rate selection on validation, paired comparisons, report.md."""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from engine.config import RunConfig, method_label, model_label
from engine.results import PREDICTIONS_FILE
from evaluation.stats import ROW_METRICS, Summary, paired_bootstrap, summarize, two_level_paired_bootstrap
from utils.report.load import (
    CONTEXT_FIELDS,
    HEADLINE,
    MODEL_FIELDS,
    Group,
    Run,
    _display,
    _freeze,
    _group_order,
    arm_label,
)


def summary_row(group: Group, varying: Sequence[str]) -> dict:
    """One summary.csv row: the setting, its seeds, raw values and statistics of each test metric."""
    c = group.config
    row: dict = {
        "experiment": c.experiment, "method": method_label(c), "dataset": _dataset_name(c), "level": c.level or "",
        "model": model_label(c), "shots": c.shots, "percentage": "" if c.percentage is None else c.percentage,
        "lr": "" if group.lr is None else group.lr,
    }
    for name in varying:
        row[name] = _display(group.key.get(name))
    row["schema_version"] = _display(group.key.get("schema_version"))
    row["n_seeds"] = len(group.runs)
    cut = sum(not r.budget_intended for r in group.runs)
    row["budget"] = f"not intended in {cut} of {len(group.runs)} runs" if cut else "intended"
    row["seeds"] = ";".join(r.replicate_label for r in group.runs)
    for name in group.task.report_metrics:
        values = group.values("test", name)
        s = summarize(values)
        row.update({f"test_{name}_mean": s.mean, f"test_{name}_std": s.std, f"test_{name}_ci_low": s.ci_low,
                    f"test_{name}_ci_high": s.ci_high, f"test_{name}_values": ";".join(map(_num, values))})
    val = group.values("val", HEADLINE)
    row["headline"] = group.runs[0].headline
    row["val_headline_mean"] = summarize(val).mean
    row["val_headline_values"] = ";".join(map(_num, val))
    return row


def _num(x: float) -> str:
    return "nan" if x is None or math.isnan(x) else format(float(x), ".10g")


# ---------------------------------------------------------------- lr selection and pairing


def _without(key: dict, names: Sequence[str]) -> str:
    return _freeze({k: v for k, v in key.items() if k not in names})


def select_lr(groups: Sequence[Group]) -> tuple[list[Group], dict[int, list[float]]]:
    """Per setting, the lr with the best mean VALIDATION headline metric (ties: the smaller lr).

    Returns the chosen groups and, by id of each chosen group, the candidate lrs it was chosen from.
    """
    by_setting: dict[str, list[Group]] = defaultdict(list)
    for group in groups:
        by_setting[_without(group.key, ["lr"])].append(group)
    chosen, candidates = [], {}
    for options in by_setting.values():

        def score(g: Group) -> tuple[float, float]:
            val = summarize(g.values("val", HEADLINE)).mean
            return (-math.inf if math.isnan(val) else val, -(g.lr or 0.0))

        best = max(options, key=score)
        chosen.append(best)
        candidates[id(best)] = sorted(g.lr for g in options if g.lr is not None)
    return sorted(chosen, key=_group_order), candidates


def _arm_rank(group: Group, baseline: str = "linear") -> tuple:
    """Order within a pair so differences read method - baseline and pretrained - random."""
    c = group.config
    return (1 if c.method == baseline else 0, 1 if c.weights == "random" else 0, _group_order(group))


def display_rank(baseline: str = "linear"):
    """The order of arms in tables and figures: the baseline method first, pretrained before random weights."""

    def rank(group: Group) -> tuple:
        c = group.config
        return (0 if c.method == baseline else 1, 1 if c.weights == "random" else 0, _group_order(group))

    return rank


def _factors(group: Group) -> dict[str, str]:
    """An arm's three comparable factors: the model, its weights, and the method (every other setting)."""
    model = {k: group.key.get(k) for k in MODEL_FIELDS}
    method = {k: v for k, v in group.key.items()
              if k not in MODEL_FIELDS and k != "weights" and k != "lr" and k not in CONTEXT_FIELDS}
    weights = {"weights": group.key.get("weights")}
    return {"model": _freeze(model), "weights": _freeze(weights), "method": _freeze(method)}


def _pair_kind(a: Group, b: Group, baseline: str) -> str | None:
    """What a pair compares, or None when it differs in more than one factor (a confounded comparison).

    Two different methods are compared only when one of them is the baseline.
    """
    fa, fb = _factors(a), _factors(b)
    differ = [name for name in fa if fa[name] != fb[name]]
    if len(differ) != 1:
        return None
    ca, cb = a.config, b.config
    if differ == ["method"]:
        if ca.method == cb.method:
            return "settings"
        return f"{ca.method} - {cb.method}" if cb.method == baseline else None
    if differ == ["weights"]:
        pretrained_vs_random = {ca.weights, cb.weights} == {None, "random"}
        return "pretrained - random" if pretrained_vs_random else "weights"
    return "models"


def _pair_values(a: Group, b: Group) -> tuple[list[int], list[float], list[float], int]:
    """The test headline metric of a and b on their common seeds whose splits match."""
    runs_b = {r.replicate: r for r in b.runs}
    seeds, va, vb, mismatched = [], [], [], 0
    for run in a.runs:
        other = runs_b.get(run.replicate)
        if other is None:
            continue
        sha_a, sha_b = run.data.get("split_sha256"), other.data.get("split_sha256")
        if sha_a and sha_b and sha_a != sha_b:
            mismatched += 1  # same seed but different data: not a pair
            continue
        seeds.append(run.replicate)
        va.append(run.metric("test", HEADLINE))
        vb.append(other.metric("test", HEADLINE))
    return seeds, va, vb, mismatched


def _test_predictions(run: Run) -> tuple[list[str], np.ndarray, np.ndarray] | None:
    """(paths, labels, predictions) of a run's test images from its predictions.csv, sorted by path."""
    path = run.path.parent / PREDICTIONS_FILE
    if not path.is_file():
        return None
    with open(path, newline="", encoding="utf-8") as handle:
        rows = sorted((r["path"], int(r["label"]), int(r["pred"])) for r in csv.DictReader(handle)
                      if r.get("split") == "test")
    if not rows:
        return None
    return [r[0] for r in rows], np.array([r[1] for r in rows]), np.array([r[2] for r in rows])


def case_bootstrap(a: Group, b: Group, seeds: Sequence[int], n_resamples: int, seed: int):
    """The two-level (seeds, then test images) paired bootstrap of the test headline metric, from the runs'
    predictions.csv; None when a run has none, the two arms were not scored on the same images, or the
    headline is not a metric of one predicted class per image (evaluation.stats.ROW_METRICS)."""
    runs_a, runs_b = {r.replicate: r for r in a.runs}, {r.replicate: r for r in b.runs}
    preds_a, preds_b, labels = [], [], []
    first = runs_a[seeds[0]]
    if not first.task.exclusive or first.headline not in ROW_METRICS:
        return None  # recomputed from one predicted class per image and its label
    for s in seeds:
        pa, pb = _test_predictions(runs_a[s]), _test_predictions(runs_b[s])
        if pa is None or pb is None or pa[0] != pb[0] or not np.array_equal(pa[1], pb[1]):
            return None
        preds_a.append(pa[2])
        preds_b.append(pb[2])
        labels.append(pa[1])
    return two_level_paired_bootstrap(preds_a, preds_b, n_resamples=n_resamples, seed=seed,
                                      metric=first.headline, labels=labels)


def budget_note(group: Group, replicates: Sequence[tuple[int, int]], varying: Sequence[str]) -> str:
    """Why the runs of `group` on these replicates did not all train for their method's intended step budget
    (results.json ``budget``), or "" when they did."""
    cut = [r for r in group.runs if r.replicate in replicates and not r.budget_intended]
    if not cut:
        return ""
    budget = cut[0].data.get("budget") or {}
    what = f"n_iters {budget['n_iters']} ({budget.get('kind', '?')})" if budget.get("n_iters") is not None \
        else "a budget"
    origin = f" from {budget['from']}" if budget.get("from") else ""
    steps = f", {budget['steps']} steps" if isinstance(budget.get("steps"), int) else ""
    return f"{arm_label(group, varying)} trained {what}{origin}{steps}, not its method's intended budget"


def paired_rows(groups: Sequence[Group], varying: Sequence[str], n_resamples: int = 10_000,
                seed: int = 0, baseline: str = "linear", cut_budgets: bool = False) -> list[dict]:
    """Arms on the same data (dataset, level, shots or percentage) and seeds, compared two by two.

    Only pairs that differ in one factor are compared: every method against the baseline method
    (or two settings of one method), one model against another, or pretrained against random
    weights; a pair differing in several at once would confound them. The headline interval is
    the paired t-interval over seeds (t_low, t_high). boot_low and boot_high come from the
    two-level bootstrap (seeds, then the same test images for both arms; needs predictions.csv),
    which adds the uncertainty of the finite test set. The seed-only bootstrap (seed_boot_*) is
    kept for reference only: it is not valid below about 10 seeds (at 3 it is close to [min, max]).

    Budgets: a difference between two methods is not computed when a run of either arm did not train for
    its method's intended step budget (e.g. a sweep's --n_iters that shortened another method's heads);
    its row says why in ``budget``. With cut_budgets it is computed and the row is marked instead. Arms of
    one method share the budget's meaning, so their differences are computed and marked.
    """
    by_context: dict[tuple, list[Group]] = defaultdict(list)
    for group in groups:
        by_context[tuple(_display(group.key.get(k)) for k in CONTEXT_FIELDS)].append(group)
    rows = []
    for context, arms in by_context.items():
        arms = sorted(arms, key=lambda g: _arm_rank(g, baseline))
        for i, a in enumerate(arms):
            for b in arms[i + 1:]:
                kind = _pair_kind(a, b, baseline)
                seeds, va, vb, mismatched = _pair_values(a, b)
                if kind is None or not seeds:
                    continue
                notes = [n for n in (budget_note(a, seeds, varying), budget_note(b, seeds, varying)) if n]
                refused = bool(notes) and not cut_budgets and a.config.method != b.config.method
                if refused:
                    d = paired_bootstrap([], [])  # every field NaN: no difference is printed
                    cases = None
                else:
                    d = paired_bootstrap(va, vb, n_resamples=n_resamples, seed=seed)
                    cases = case_bootstrap(a, b, seeds, n_resamples, seed)
                rows.append({
                    "dataset": context[4] or context[0], "level": context[1], "shots": context[2],
                    "percentage": context[3],
                    "comparison": kind, "a": arm_label(a, varying), "b": arm_label(b, varying),
                    "lr_a": "" if a.lr is None else a.lr, "lr_b": "" if b.lr is None else b.lr,
                    "metric": f"test {a.headline}",
                    "n_seeds": len(seeds), "seeds": ";".join(f"{s}" if f < 0 else f"{s}/fold{f}" for s, f in seeds),
                    "a_mean": summarize(va).mean, "b_mean": summarize(vb).mean, "mean_diff": d.mean,
                    "t_low": d.t_low, "t_high": d.t_high,
                    "boot_low": cases.boot_low if cases else math.nan,
                    "boot_high": cases.boot_high if cases else math.nan,
                    "n_cases": cases.n_cases if cases else "",
                    "seed_boot_low": d.boot_low, "seed_boot_high": d.boot_high,
                    "n_split_mismatch": mismatched,
                    "n_resamples": n_resamples,
                    "budget": ("not compared: " if refused else "marked: ") + "; ".join(notes) if notes
                    else "intended",
                })
    return rows


# ---------------------------------------------------------------- writing


def write_csv(path: Path, rows: Sequence[dict]) -> Path:
    """Rows to CSV with the union of their columns in first-seen order; NaN as an empty cell."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(v) for k, v in row.items()})
    return path


def _csv_value(value: object) -> object:
    """Floats with 10 significant digits (no binary noise), NaN as an empty cell."""
    if isinstance(value, float):
        return "" if math.isnan(value) else format(value, ".10g")
    return value


def interval_text(s: Summary) -> str:
    """A mean and its 95% t-interval in percent, written the same way in every table: 'mean ± half-width' when
    the interval lies in [0, 100], else 'mean [low, high]' with the interval clipped to [0, 100]."""
    if math.isnan(s.mean):
        return "–"
    text = f"{100 * s.mean:.1f}"
    if math.isnan(s.ci_low):
        return text
    if s.ci_low >= 0.0 and s.ci_high <= 1.0:
        return f"{text} ± {100 * (s.ci_high - s.ci_low) / 2:.1f}"
    return f"{text} [{100 * max(0.0, s.ci_low):.1f}, {100 * min(1.0, s.ci_high):.1f}]"


def _cell(group: Group, metric: str, n_max: int) -> str:
    """interval_text of a test metric, with (n=k) when fewer seeds than elsewhere in the table."""
    text = interval_text(summarize(group.values("test", metric)))
    if text != "–" and len(group.runs) != n_max:
        text += f" (n={len(group.runs)})"
    return text


def _column_label(c: RunConfig) -> str:
    if c.shots == 0 and c.percentage is not None:
        return f"{c.percentage:g}%"
    return "all" if c.shots == -1 else f"K={c.shots}"


def _column_order(c: RunConfig) -> tuple:
    if c.shots == 0 and c.percentage is not None:
        return (1, c.percentage)
    return (0, c.shots if c.shots > 0 else math.inf)


def _dataset_name(c: RunConfig) -> str:
    name = c.dataset_name or c.dataset
    return f"{name} ({c.level})" if c.level else name


def by_dataset(groups: Sequence[Group]) -> list[tuple[str, list[Group]]]:
    """Groups gathered per dataset (with its label level), datasets in sorted order."""
    out: dict[str, list[Group]] = defaultdict(list)
    for g in groups:
        out[_dataset_name(g.config)].append(g)
    return sorted(out.items())


def by_slot(groups: Sequence[Group]) -> list[tuple[tuple[str, tuple, str], list[Group]]]:
    """Groups gathered per (dataset, data size): key (dataset name, column order, column label), sorted."""
    out: dict[tuple, list[Group]] = defaultdict(list)
    for g in groups:
        out[(_dataset_name(g.config), _column_order(g.config), _column_label(g.config))].append(g)
    return sorted(out.items())


def markdown_tables(groups: Sequence[Group], varying: Sequence[str], metric: str,
                    baseline: str = "linear") -> list[str]:
    """Per dataset: rows = model and method, columns = shots or percentages, cells = mean ± CI half-width."""
    lines: list[str] = []
    for dataset, members in by_dataset(groups):
        columns = sorted({_column_label(g.config): _column_order(g.config) for g in members}.items(),
                         key=lambda kv: kv[1])
        arms: dict[str, dict[str, Group]] = defaultdict(dict)
        for g in sorted(members, key=display_rank(baseline)):
            arms[arm_label(g, varying)][_column_label(g.config)] = g
        n_max = max(len(g.runs) for g in members)
        lines += [f"### {dataset}", "", "| Model | Method | " + " | ".join(c for c, _ in columns) + " |",
                  "|---|---|" + "---|" * len(columns)]
        for label, cells in arms.items():
            model, method = label.split(" ", 1)
            row = [_cell(cells[c], metric, n_max) if c in cells else "" for c, _ in columns]
            lines.append(f"| {model} | {method} | " + " | ".join(row) + " |")
        lines.append("")
    return lines


def method_tables(groups: Sequence[Group], varying: Sequence[str], baseline: str = "linear") -> list[str]:
    """Per dataset and data size: one column per arm (model and method), with balanced accuracy (mean and
    95% t-interval), trainable parameters and mean train seconds."""
    lines: list[str] = []
    for (dataset, _, data), members in by_slot(groups):
        members = sorted(members, key=display_rank(baseline))
        labels = [arm_label(g, varying) for g in members]
        lines += [f"### {dataset}, {data}", "", "| | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
        rows = {f"test {members[0].headline} (%)": [_interval(g) for g in members],
                "trainable parameters": [_int_text(_mean_of(g, "trainable_params")) for g in members],
                "train seconds (mean)": [_float_text(_mean_of(g, ("timing", "train_seconds"))) for g in members],
                "seeds": [str(len(g.runs)) for g in members]}
        lines += [f"| {name} | " + " | ".join(cells) + " |" for name, cells in rows.items()] + [""]
    return lines


def setting_table(groups: Sequence[Group], varying: Sequence[str], baseline: str = "linear") -> list[str]:
    """One row per setting: every test metric as mean ± t half-width, the lr, the seeds and the chance level."""
    lines: list[str] = []
    for dataset, members in by_dataset(groups):
        metrics = members[0].task.report_metrics
        lines += [f"### {dataset} (chance level of the headline metric: {_chance(members[0])})", "",
                  "| Arm | Data | " + " | ".join(metrics) + " | lr | seeds |",
                  "|---|---|" + "---|" * len(metrics) + "---|---|"]
        for g in sorted(members, key=lambda g: (_column_order(g.config), display_rank(baseline)(g))):
            cells = [_cell(g, m, len(g.runs)) for m in metrics]
            lines.append(f"| {arm_label(g, varying)} | {_column_label(g.config)} | " + " | ".join(cells)
                         + f" | {_lr_text(g)} | {len(g.runs)} |")
        lines.append("")
    return lines


def recall_table(groups: Sequence[Group], varying: Sequence[str], baseline: str = "linear") -> list[str]:
    """Mean test recall of each class per setting (single-label data)."""
    lines: list[str] = []
    for dataset, members in by_dataset(groups):
        members = [g for g in members if g.runs[0].data["metrics"]["test"].get("per_class_recall")]
        if not members:
            continue
        classes = list(members[0].runs[0].data["metrics"]["test"]["per_class_recall"])
        lines += [f"### {dataset}", "", "| Arm | Data | " + " | ".join(classes) + " |",
                  "|---|---|" + "---|" * len(classes)]
        for g in sorted(members, key=lambda g: (_column_order(g.config), display_rank(baseline)(g))):
            cells = []
            for name in classes:
                values = [r.data["metrics"]["test"]["per_class_recall"].get(name) for r in g.runs]
                cells.append(_pct([v for v in values if v is not None]))
            lines.append(f"| {arm_label(g, varying)} | {_column_label(g.config)} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def chance_level(group: Group) -> float | None:
    """The headline metric of a random guess as a fraction, from the task (None when it has none)."""
    return group.task.chance(_chance_n(group))


def _chance(group: Group) -> str:
    """The chance level in the tables' units (percent), or "none" when the task's headline has none."""
    chance = chance_level(group)
    if chance is None:
        return "none"
    counts = group.task.chance_counts
    return f"{100 * chance:.1f}" + ("" if counts == "classes" else f" (1 / {_chance_n(group)} {counts})")


def _lr_text(group: Group) -> str:
    """The learning rate as tables show it; a dash for methods that train nothing."""
    return "–" if group.lr is None else f"{group.lr:g}"


def before_after_table(groups: Sequence[Group], varying: Sequence[str], baseline: str = "linear") -> list[str]:
    """Image-text runs: test retrieval and zero-shot accuracy before fine-tuning (adapters off) and after, mean
    over seeds."""
    rows, shown = [], []
    for g in sorted(groups, key=display_rank(baseline)):
        if not all("before_finetuning" in r.data for r in g.runs):
            continue
        shown = shown or [m for m in g.task.report_metrics if m != g.runs[0].headline]
        cells = []
        for name in shown:
            before = [r.data["before_finetuning"].get("test", {}).get(name) for r in g.runs]
            after = [r.data["metrics"]["test"].get(name) for r in g.runs]
            cells.append(f"{_pct(before)} → {_pct(after)}")
        rows.append(f"| {_dataset_name(g.config)} | {_column_label(g.config)} | {arm_label(g, varying)} | "
                    + " | ".join(cells) + f" | {len(g.runs)} |")
    if not rows:
        return []
    return ["| Dataset | Data | Arm | " + " | ".join(shown) + " | seeds |", "|---|---|---|" + "---|" * (len(shown) + 1),
            *rows, ""]


def _chance_n(group: Group) -> int:
    """What the task's chance level is a function of: the number of classes, or of test items."""
    data = group.runs[0].data
    return len(data.get("classes") or []) if group.task.chance_counts == "classes" else int(data.get("n_test") or 0)


def calibration_tables(groups: Sequence[Group], varying: Sequence[str], baseline: str = "linear") -> list[str]:
    """Test ECE before and after temperature scaling (fitted on validation), mean over seeds, per arm."""
    lines: list[str] = []
    rows = []
    for g in sorted(groups, key=display_rank(baseline)):
        before = [r.data.get("test_before", {}).get("ece") for r in g.runs]
        after = [(r.data.get("test_after") or {}).get("ece") for r in g.runs]
        temps = [r.data.get("calibration", {}).get("temperature") for r in g.runs]
        skipped = sum(1 for r in g.runs if "skipped" in r.data.get("calibration", {}))
        if all(v is None for v in before):
            continue
        rows.append(f"| {_dataset_name(g.config)} | {_column_label(g.config)} | {arm_label(g, varying)} | "
                    f"{_pct(before)} | {_pct(after)} | {_float_text(summarize([t for t in temps if t]).mean)} | "
                    f"{len(g.runs) - skipped}/{len(g.runs)} |")
    if rows:
        lines += ["| Dataset | Data | Arm | ECE before (%) | ECE after (%) | temperature | fitted |",
                  "|---|---|---|---|---|---|---|", *rows, ""]
    return lines


def _pct(values) -> str:
    s = summarize([v for v in values if v is not None])
    return "–" if math.isnan(s.mean) else f"{100 * s.mean:.1f}"


def _interval(g: Group) -> str:
    return interval_text(summarize(g.values("test", HEADLINE)))


def _mean_of(g: Group, key) -> float:
    values = []
    for run in g.runs:
        value = run.data
        for k in (key if isinstance(key, tuple) else (key,)):
            value = value.get(k) if isinstance(value, dict) else None
        values.append(value)
    return summarize([v for v in values if isinstance(v, (int, float))]).mean


def _int_text(x: float) -> str:
    return "–" if math.isnan(x) else f"{int(round(x)):,}"


def _float_text(x: float) -> str:
    return "–" if math.isnan(x) else f"{x:.1f}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _pp(x: float) -> str:
    return "–" if math.isnan(x) else f"{100 * x:+.1f}"


def markdown_report(source: Path, runs: Sequence[Run], groups: Sequence[Group], chosen: Sequence[Group],
                    several_lrs: bool, varying: Sequence[str], pairs: Sequence[dict],
                    figures: Sequence[Path], baseline: str = "linear", extra: Sequence[str] = ()) -> str:
    """report.md: the paper-style tables, the paired comparisons and the figures."""
    lr_note = ("the learning rate is chosen per setting on the mean validation headline metric (never on test)"
               if several_lrs else "one learning rate per setting")
    lines = ["# Results", "",
             (f"Source: `{source}`: {_count(len(runs), 'run')} in {_count(len(groups), 'setting')}; "
              f"{lr_note}."),
             ("Cells: test metric in %, mean ± half-width of the 95% t-interval over seeds; where that interval "
              "leaves [0, 100] it is written [low, high], clipped to [0, 100]; (n=k) marks a cell with fewer seeds "
              f"than the rest of its table. The baseline method ({baseline}) comes first."), ""]
    lines += ["## Methods side by side (test)", "",
              "Headline metric: mean and 95% t-interval over seeds; trainable parameters are "
              "those that received a gradient.", ""] + method_tables(chosen, varying, baseline)
    lines += ["## Every metric per setting (test, %, mean and 95% t-interval over seeds)", ""]
    lines += setting_table(chosen, varying, baseline)
    recall = recall_table(chosen, varying, baseline)
    if recall:
        lines += ["## Recall of each class (test, %, mean over seeds)", ""] + recall
    before_after = before_after_table(chosen, varying, baseline)
    if before_after:
        lines += ["## Image-text pairs before and after fine-tuning (test, %, mean over seeds)", "",
                  "Before: the same model with its adapters switched off. Retrieval ranks each image's own "
                  "caption among all test captions (and back); zero-shot accuracy classifies from the class "
                  "prompts.", ""] + before_after
    headlines = "; ".join(dict.fromkeys(g.headline for g in chosen))
    for metric, title in ((HEADLINE, f"Headline metric ({headlines})"), ("accuracy", "Accuracy")):
        shown = [g for g in chosen if metric == HEADLINE or metric in g.task.report_metrics]
        if shown:
            lines += [f"## {title} (test)", ""] + markdown_tables(shown, varying, metric, baseline)
    calibration = calibration_tables(chosen, varying, baseline)
    if calibration:
        lines += ["## Calibration (test)", "",
                  "Temperature scaling fitted on validation (one scalar, NLL); predictions do not change, "
                  "so accuracies are the same before and after. Mean over seeds; a seed whose validation "
                  "set has fewer than 2 images of some class is not fitted.", ""] + calibration
    if pairs:
        lines += ["## Paired comparisons (test headline metric, a − b, percentage points)", "",
                  ("Same data and seeds; 95% paired t-interval over seeds. With few seeds these intervals are "
                   "wide by necessity: they say how much the seed (the few-shot draw and the training "
                   "randomness) moves the difference."), "",
                  "| Dataset | Data | Comparison | a | b | seeds | a − b | t 95% CI | seeds + images 95% CI |",
                  "|---|---|---|---|---|---|---|---|---|"]
        notes = []
        for p in pairs:
            data = f"{p['percentage']:g}%" if p["percentage"] != "" else (
                "all" if p["shots"] == -1 else f"K={p['shots']}")
            dataset = p["dataset"] + (f" ({p['level']})" if p["level"] else "")
            diff = _pp(p["mean_diff"])
            if p["budget"] != "intended":
                notes.append(f"{len(notes) + 1}. {p['comparison']} ({p['a']} vs {p['b']}): {p['budget']}")
                refused = p["budget"].startswith("not compared")
                mark = f"budget, note {len(notes)}"
                diff = f"not compared ({mark})" if refused else f"{diff} ⚠ ({mark})"
            lines.append(f"| {dataset} | {data} | {p['comparison']} | {p['a']} | {p['b']} | {p['n_seeds']} | "
                         f"{diff} | [{_pp(p['t_low'])}, {_pp(p['t_high'])}] | "
                         f"[{_pp(p['boot_low'])}, {_pp(p['boot_high'])}] |")
        lines.append("")
        if notes:
            lines += ["Budgets: a run that did not train for its method's intended step budget (a flag such as a "
                      "sweep's --n_iters changed it) makes a comparison between methods meaningless; such "
                      "differences are not computed (--compare_cut_budgets prints them, marked).", "", *notes, ""]
    lines += list(extra)
    if figures:
        lines += ["## Figures", ""] + [f"![{f.stem}]({f.name})" for f in figures] + [""]
    return "\n".join(lines)

