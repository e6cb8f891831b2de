"""Turn a folder of runs into the paper's tables and plots, with honest statistics.

``python -m utils.report OUTPUT_DIR [--out DIR] [--confusion RUN_DIR] [--skip_invalid]`` reads every
``results.json`` below OUTPUT_DIR (folders named ``checkpoints`` and hidden folders are ignored) and
writes, into ``OUTPUT_DIR/report`` unless ``--out`` says otherwise:

- ``summary.csv``: one row per setting (every config field that changes results, except the seed)
  with the seeds, the raw per-seed test metrics and their mean, std and 95% t-interval;
- ``summary_lr_selected.csv`` (when a setting was run with several learning rates): the lr chosen
  per setting on mean validation balanced accuracy, never on test;
- ``paired.csv``: every two methods/models/weights on the same data and seeds, the mean difference
  of test balanced accuracy with a seeded paired bootstrap 95% interval (and a paired t-interval);
- PNG plots and ``report.md`` with the tables laid out like the paper's.

Runs whose settings or schema versions differ are never averaged together. An unreadable or
incomplete results.json is an error naming the file (exit 2); with ``--skip_invalid`` it is a
warning and the file is left out.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import UserError, exit_status
from utils.config import RESULTS_FILE, RunConfig, data_label, method_label, model_label
from utils.stats import Summary, paired_bootstrap, summarize

METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "auroc", "ece")
# Fields that say where or how a run was executed, not what it computed.
RUNTIME_FIELDS = frozenset({"output_dir", "device", "num_workers", "wandb", "overwrite", "root_path",
                            "eval_only", "lora_path", "checkpoint_every"})
LORA_FIELDS = ("params", "r", "alpha", "dropout_rate", "scaling", "position", "encoder")
CONTEXT_FIELDS = ("dataset", "level", "shots", "percentage")  # what two arms must share to be paired
MODEL_FIELDS = ("model_name", "backbone")
SHOWN_FIELDS = ("experiment", "dataset", "level", "shots", "percentage", "lr")
# Already visible in the model and method labels, so not repeated in an arm's name.
LABELLED_FIELDS = frozenset({"experiment", "model_name", "textual", "params", "r", "position", "encoder"})
SKIPPED_DIRS = frozenset({"checkpoints", "checkpoint"})
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
LINESTYLES = ("-", "--", ":", "-.")
HATCHES = ("", "//", "xx", "..", "\\\\", "++", "oo", "--")


class ReportError(UserError):
    """A folder or results file the report cannot use."""


@dataclass
class Run:
    """One finished run: where its results.json is and what it says."""

    path: Path
    data: dict
    config: dict

    @property
    def seed(self) -> int:
        return int(self.config["seed"])

    @property
    def schema(self) -> object:
        return self.data.get("schema_version")

    def metric(self, split: str, name: str) -> float:
        value = self.data["metrics"][split].get(name)
        return math.nan if value is None else float(value)


@dataclass
class Group:
    """Runs that share every result-changing setting except the seed."""

    key: dict
    runs: list[Run] = field(default_factory=list)

    @property
    def config(self) -> RunConfig:
        return RunConfig.from_dict(self.runs[0].config)

    def values(self, split: str, name: str) -> list[float]:
        return [run.metric(split, name) for run in self.runs]


# ---------------------------------------------------------------- reading


def find_results(root: Path) -> list[Path]:
    """Every results.json below root, skipping checkpoint and hidden folders."""
    found = []
    for path in sorted(root.rglob(RESULTS_FILE)):
        parts = path.relative_to(root).parts[:-1]
        if any(p in SKIPPED_DIRS or p.startswith(".") for p in parts):
            continue
        if path.is_file():
            found.append(path)
    return found


def _problem(data: object) -> str | None:
    """Why a parsed results.json cannot be used, or None."""
    if not isinstance(data, dict):
        return "is not a JSON object"
    for key in ("schema_version", "config", "metrics"):
        if key not in data:
            return f"has no {key!r} field"
    if not isinstance(data["config"], dict) or "seed" not in data["config"]:
        return "has no config with a seed"
    for split in ("val", "test"):
        metrics = data["metrics"].get(split) if isinstance(data["metrics"], dict) else None
        if not isinstance(metrics, dict) or not isinstance(metrics.get("balanced_accuracy"), (int, float)):
            return f"has no metrics.{split}.balanced_accuracy"
    return None


def _read_one(path: Path) -> Run:
    """Parse and check one results.json; ReportError naming the file otherwise."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ReportError(f"{path} is not readable JSON ({type(exc).__name__}); delete it and rerun that "
                          "run, or pass --skip_invalid") from None
    why = _problem(data)
    if why:
        raise ReportError(f"{path} {why}; delete it and rerun that run, or pass --skip_invalid")
    return Run(path, data, dict(data["config"]))


def load_runs(root: str | Path, skip_invalid: bool = False) -> list[Run]:
    """All usable runs below root; invalid files raise, or are skipped with a warning."""
    root = Path(root)
    if not root.exists():
        raise ReportError(f"{root} does not exist; give the --output_dir of your runs")
    if not root.is_dir():
        raise ReportError(f"{root} is not a folder; give the --output_dir of your runs")
    paths = find_results(root)
    if not paths:
        raise ReportError(f"no {RESULTS_FILE} below {root}; run experiments first (bash launch_run.sh ...)")
    runs = []
    for path in paths:
        try:
            runs.append(_read_one(path))
        except ReportError as exc:
            if not skip_invalid:
                raise
            print(f"warning: skipping {exc}", file=sys.stderr)
    if not runs:
        raise ReportError(f"no usable {RESULTS_FILE} below {root} (all were skipped as invalid)")
    return runs


# ---------------------------------------------------------------- grouping


def settings_key(run: Run) -> dict:
    """Every config field that can change results (all but the seed and runtime fields), plus the schema."""
    key = {k: v for k, v in run.config.items() if k not in RUNTIME_FIELDS and k != "seed"}
    key["schema_version"] = run.schema
    env = run.data.get("env")
    if isinstance(env, dict) and env.get("precision"):
        # "auto" precision resolves per device (fp32 on CPU, bf16 on GPUs): keep what was really used.
        key["resolved_precision"] = env["precision"]
    return key


def _freeze(key: dict) -> str:
    return json.dumps(key, sort_keys=True, default=str)


def group_runs(runs: Sequence[Run]) -> list[Group]:
    """Group runs by settings; two runs of one setting and seed are an error naming both files."""
    groups: dict[str, Group] = {}
    for run in runs:
        key = settings_key(run)
        group = groups.setdefault(_freeze(key), Group(key))
        twin = next((r for r in group.runs if r.seed == run.seed), None)
        if twin is not None:
            raise ReportError(f"{run.path} and {twin.path} are the same settings and seed {run.seed}; "
                              "remove one of them")
        group.runs.append(run)
    for group in groups.values():
        group.runs.sort(key=lambda r: r.seed)
    return sorted(groups.values(), key=_group_order)


def _group_order(group: Group) -> tuple:
    c = group.config
    data = (0, c.shots if c.shots >= 0 else 10**9) if c.percentage is None else (1, c.percentage)
    return (c.experiment, c.dataset, c.level or "", model_label(c), method_label(c), data, c.lr,
            _freeze(group.key))


def varying_fields(groups: Sequence[Group]) -> list[str]:
    """Setting fields (besides the shown ones) that differ between groups: they get their own columns."""
    names = sorted({k for g in groups for k in g.key})
    out = []
    for name in names:
        if name in SHOWN_FIELDS:
            continue
        if len({json.dumps(g.key.get(name), sort_keys=True, default=str) for g in groups}) > 1:
            out.append(name)
    return out


def _display(value: object) -> object:
    if value is None:
        return ""
    if isinstance(value, list):
        return " ".join(map(str, value))
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return value


def arm_label(group: Group, varying: Sequence[str]) -> str:
    """Model and method, plus any varying setting that these two labels do not show."""
    c = group.config
    extras = []
    for name in varying:
        if name in LABELLED_FIELDS or name in CONTEXT_FIELDS or name == "lr":
            continue
        if c.experiment == 1 and name in LORA_FIELDS:
            continue
        value = group.key.get(name)
        if name == "backbone" and c.model_name == "clip":
            continue
        if name == "weights" and value in (None, "random"):
            continue
        if name == "weights":
            value = Path(str(value)).name
        extras.append(f"{name}={_display(value)}")
    label = f"{model_label(c)} {method_label(c)}"
    return label + (f" [{', '.join(extras)}]" if extras else "")


def summary_row(group: Group, varying: Sequence[str]) -> dict:
    """One summary.csv row: the setting, its seeds, raw values and statistics of each test metric."""
    c = group.config
    row: dict = {
        "experiment": c.experiment, "method": method_label(c), "dataset": c.dataset, "level": c.level or "",
        "model": model_label(c), "shots": c.shots, "percentage": "" if c.percentage is None else c.percentage,
        "lr": c.lr,
    }
    for name in varying:
        row[name] = "" if (c.experiment == 1 and name in LORA_FIELDS) else _display(group.key.get(name))
    row["schema_version"] = _display(group.key.get("schema_version"))
    row["n_seeds"] = len(group.runs)
    row["seeds"] = ";".join(str(r.seed) for r in group.runs)
    for name in METRICS:
        values = group.values("test", name)
        s = summarize(values)
        row.update({f"test_{name}_mean": s.mean, f"test_{name}_std": s.std, f"test_{name}_ci_low": s.ci_low,
                    f"test_{name}_ci_high": s.ci_high, f"test_{name}_values": ";".join(map(_num, values))})
    val = group.values("val", "balanced_accuracy")
    row["val_balanced_accuracy_mean"] = summarize(val).mean
    row["val_balanced_accuracy_values"] = ";".join(map(_num, val))
    return row


def _num(x: float) -> str:
    return "nan" if x is None or math.isnan(x) else format(float(x), ".10g")


# ---------------------------------------------------------------- lr selection and pairing


def _without(key: dict, names: Sequence[str]) -> str:
    return _freeze({k: v for k, v in key.items() if k not in names})


def select_lr(groups: Sequence[Group]) -> tuple[list[Group], dict[int, list[float]]]:
    """Per setting, the lr with the best mean VALIDATION balanced accuracy (ties: the smaller lr).

    Returns the chosen groups and, by id of each chosen group, the candidate lrs it was chosen from.
    """
    by_setting: dict[str, list[Group]] = defaultdict(list)
    for group in groups:
        by_setting[_without(group.key, ["lr"])].append(group)
    chosen, candidates = [], {}
    for options in by_setting.values():

        def score(g: Group) -> tuple[float, float]:
            val = summarize(g.values("val", "balanced_accuracy")).mean
            return (-math.inf if math.isnan(val) else val, -g.config.lr)

        best = max(options, key=score)
        chosen.append(best)
        candidates[id(best)] = sorted(g.config.lr for g in options)
    return sorted(chosen, key=_group_order), candidates


def _arm_rank(group: Group) -> tuple:
    """Order within a pair so differences read LoRA - linear and pretrained - random."""
    c = group.config
    return (0 if c.method == "lora" else 1, 1 if c.weights == "random" else 0, _group_order(group))


def _factors(group: Group) -> dict[str, str]:
    """An arm's three comparable factors: the model, its weights, and the method (every other setting)."""
    model = {k: group.key.get(k) for k in MODEL_FIELDS}
    method = {k: v for k, v in group.key.items()
              if k not in MODEL_FIELDS and k != "weights" and k != "lr" and k not in CONTEXT_FIELDS}
    weights = {"weights": group.key.get("weights")}
    return {"model": _freeze(model), "weights": _freeze(weights), "method": _freeze(method)}


def _pair_kind(a: Group, b: Group) -> str | None:
    """What a pair compares, or None when it differs in more than one factor (a confounded comparison)."""
    fa, fb = _factors(a), _factors(b)
    differ = [name for name in fa if fa[name] != fb[name]]
    if len(differ) != 1:
        return None
    ca, cb = a.config, b.config
    if differ == ["method"]:
        return f"{ca.method} - {cb.method}" if ca.method != cb.method else "settings"
    if differ == ["weights"]:
        pretrained_vs_random = {ca.weights, cb.weights} == {None, "random"}
        return "pretrained - random" if pretrained_vs_random else "weights"
    return "models"


def _pair_values(a: Group, b: Group) -> tuple[list[int], list[float], list[float], int]:
    """Test balanced accuracy of a and b on their common seeds whose splits match."""
    runs_b = {r.seed: r for r in b.runs}
    seeds, va, vb, mismatched = [], [], [], 0
    for run in a.runs:
        other = runs_b.get(run.seed)
        if other is None:
            continue
        sha_a, sha_b = run.data.get("split_sha256"), other.data.get("split_sha256")
        if sha_a and sha_b and sha_a != sha_b:
            mismatched += 1  # same seed but different data: not a pair
            continue
        seeds.append(run.seed)
        va.append(run.metric("test", "balanced_accuracy"))
        vb.append(other.metric("test", "balanced_accuracy"))
    return seeds, va, vb, mismatched


def paired_rows(groups: Sequence[Group], varying: Sequence[str], n_resamples: int = 10_000,
                seed: int = 0) -> list[dict]:
    """Arms on the same data (dataset, level, shots or percentage) and seeds, compared two by two.

    Only pairs that differ in one factor are compared: the method (linear head vs LoRA, or LoRA
    settings), the model, or the weights (pretrained vs random); a pair differing in several at
    once would confound them.
    """
    by_context: dict[tuple, list[Group]] = defaultdict(list)
    for group in groups:
        by_context[tuple(_display(group.key.get(k)) for k in CONTEXT_FIELDS)].append(group)
    rows = []
    for context, arms in by_context.items():
        arms = sorted(arms, key=_arm_rank)
        for i, a in enumerate(arms):
            for b in arms[i + 1:]:
                kind = _pair_kind(a, b)
                seeds, va, vb, mismatched = _pair_values(a, b)
                if kind is None or not seeds:
                    continue
                d = paired_bootstrap(va, vb, n_resamples=n_resamples, seed=seed)
                rows.append({
                    "dataset": context[0], "level": context[1], "shots": context[2], "percentage": context[3],
                    "comparison": kind, "a": arm_label(a, varying), "b": arm_label(b, varying),
                    "lr_a": a.config.lr, "lr_b": b.config.lr, "metric": "test_balanced_accuracy",
                    "n_pairs": d.n, "seeds": ";".join(map(str, seeds)),
                    "a_mean": summarize(va).mean, "b_mean": summarize(vb).mean, "diff_mean": d.mean,
                    "boot_ci_low": d.boot_low, "boot_ci_high": d.boot_high,
                    "t_ci_low": d.t_low, "t_ci_high": d.t_high, "n_split_mismatch": mismatched,
                    "n_resamples": n_resamples,
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


def _cell(group: Group, metric: str, n_max: int) -> str:
    """'mean ± half-width' in percent, with (n=k) when fewer seeds than elsewhere in the table."""
    s = summarize(group.values("test", metric))
    if math.isnan(s.mean):
        return "–"
    text = f"{100 * s.mean:.1f}"
    if not math.isnan(s.ci_low):
        text += f" ± {100 * (s.ci_high - s.ci_low) / 2:.1f}"
    if len(group.runs) != n_max:
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
    return f"{c.dataset} ({c.level})" if c.level and c.dataset == "hicervix" else c.dataset


def markdown_tables(groups: Sequence[Group], varying: Sequence[str], metric: str) -> list[str]:
    """Per dataset: rows = model and method, columns = shots or percentages, cells = mean ± CI half-width."""
    lines: list[str] = []
    by_dataset: dict[str, list[Group]] = defaultdict(list)
    for group in groups:
        by_dataset[_dataset_name(group.config)].append(group)
    for dataset, members in sorted(by_dataset.items()):
        columns = sorted({_column_label(g.config): _column_order(g.config) for g in members}.items(),
                         key=lambda kv: kv[1])
        arms: dict[str, dict[str, Group]] = defaultdict(dict)
        for g in sorted(members, key=_arm_rank):
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


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _pp(x: float) -> str:
    return "–" if math.isnan(x) else f"{100 * x:+.1f}"


def markdown_report(source: Path, runs: Sequence[Run], groups: Sequence[Group], chosen: Sequence[Group],
                    several_lrs: bool, varying: Sequence[str], pairs: Sequence[dict],
                    figures: Sequence[Path]) -> str:
    """report.md: the paper-style tables, the paired comparisons and the figures."""
    lr_note = ("the learning rate is chosen per setting on mean validation balanced accuracy (never on test)"
               if several_lrs else "one learning rate per setting")
    lines = ["# Results", "",
             (f"Source: `{source}`: {_count(len(runs), 'run')} in {_count(len(groups), 'setting')}; "
              f"{lr_note}."),
             ("Cells: test metric in %, mean ± half-width of the 95% t-interval over seeds; "
              "(n=k) marks a cell with fewer seeds than the rest of its table."), ""]
    for metric, title in (("balanced_accuracy", "Balanced accuracy"), ("accuracy", "Accuracy")):
        lines += [f"## {title} (test)", ""] + markdown_tables(chosen, varying, metric)
    if pairs:
        lines += ["## Paired comparisons (test balanced accuracy, a − b, percentage points)", "",
                  ("Same data and seeds; 95% intervals from a seeded paired bootstrap over seeds "
                   f"({pairs[0]['n_resamples']} resamples) and a paired t-interval."), "",
                  "| Dataset | Data | Comparison | a | b | n | a − b | bootstrap 95% CI | t 95% CI |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for p in pairs:
            data = f"{p['percentage']:g}%" if p["percentage"] != "" else (
                "all" if p["shots"] == -1 else f"K={p['shots']}")
            dataset = p["dataset"] + (f" ({p['level']})" if p["level"] else "")
            lines.append(f"| {dataset} | {data} | {p['comparison']} | {p['a']} | {p['b']} | {p['n_pairs']} | "
                         f"{_pp(p['diff_mean'])} | [{_pp(p['boot_ci_low'])}, {_pp(p['boot_ci_high'])}] | "
                         f"[{_pp(p['t_ci_low'])}, {_pp(p['t_ci_high'])}] |")
        lines.append("")
    if figures:
        lines += ["## Figures", ""] + [f"![{f.stem}]({f.name})" for f in figures] + [""]
    return "\n".join(lines)


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
        curves[arm_label(g, varying)].append((x, summarize(g.values("test", "balanced_accuracy"))))
    return {k: sorted(v, key=lambda p: p[0]) for k, v in curves.items()}


def _by_dataset(groups: Sequence[Group]) -> list[tuple[str, list[Group]]]:
    """Groups gathered per dataset (with its label level), datasets in sorted order."""
    by_dataset: dict[str, list[Group]] = defaultdict(list)
    for g in groups:
        by_dataset[_dataset_name(g.config)].append(g)
    return sorted(by_dataset.items())


def plot_curves(groups: Sequence[Group], varying: Sequence[str], out: Path) -> list[Path]:
    """Test balanced accuracy vs shots (and vs percentage) per dataset, one styled line per arm, CI bands."""
    plt = _pyplot()
    written = []
    for dataset, members in _by_dataset(groups):
        for percentage, axis in ((False, "shots per class (K)"), (True, "% of training data")):
            curves = _curve_points(members, varying, percentage)
            if not curves:
                continue
            fig, ax = plt.subplots(figsize=(6.4, 4.4))
            for i, (label, points) in enumerate(curves.items()):
                xs = [p[0] for p in points]
                line = ax.plot(xs, [p[1].mean for p in points], marker=MARKERS[i % len(MARKERS)],
                               linestyle=LINESTYLES[i % len(LINESTYLES)], label=label)[0]
                ax.fill_between(xs, [p[1].ci_low for p in points], [p[1].ci_high for p in points],
                                color=line.get_color(), alpha=0.15, linewidth=0)
            ax.set_xscale("log", base=2 if not percentage else 10)
            ticks = sorted({x for pts in curves.values() for x, _ in pts})
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
            ax.minorticks_off()  # only the measured shots/percentages are labelled
            ax.set_xlabel(axis)
            ax.set_ylabel("test balanced accuracy")
            ax.set_title(f"{dataset}: mean and 95% CI over seeds")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            name = f"balanced_accuracy_vs_{'percentage' if percentage else 'shots'}_{_safe(dataset)}.png"
            written.append(_save(fig, out / name))
    return written


def plot_linear_vs_lora(groups: Sequence[Group], out: Path) -> list[Path]:
    """Bars of test balanced accuracy per model and data size, one hatched bar per method, CI error bars."""
    plt = _pyplot()
    written = []
    for dataset, members in _by_dataset(groups):
        if {g.config.method for g in members} != {"linear", "lora"}:
            continue
        slots = sorted({(model_label(g.config), _column_label(g.config), _column_order(g.config))
                        for g in members}, key=lambda s: (s[0], s[2]))
        methods = sorted({method_label(g.config) for g in members},
                         key=lambda m: (not m.startswith("linear"), m))
        width = 0.8 / len(methods)
        fig, ax = plt.subplots(figsize=(max(6.4, 1.1 * len(slots) * len(methods)), 4.4))
        for j, method in enumerate(methods):
            xs, means, errs = [], [], [[], []]
            for i, slot in enumerate(slots):
                g = next((g for g in members if (model_label(g.config), _column_label(g.config)) == slot[:2]
                          and method_label(g.config) == method), None)
                if g is None:
                    continue
                s = summarize(g.values("test", "balanced_accuracy"))
                xs.append(i + (j - (len(methods) - 1) / 2) * width)
                means.append(s.mean)
                errs[0].append(0 if math.isnan(s.ci_low) else s.mean - s.ci_low)
                errs[1].append(0 if math.isnan(s.ci_high) else s.ci_high - s.mean)
            ax.bar(xs, means, width, yerr=errs, capsize=3, label=method, hatch=HATCHES[j % len(HATCHES)],
                   edgecolor="black", alpha=0.8)
        ax.set_xticks(range(len(slots)), [f"{m}\n{d}" for m, d, _ in slots], fontsize=7)
        ax.set_ylabel("test balanced accuracy")
        ax.set_title(f"{dataset}: linear head vs LoRA (mean, 95% CI)")
        ax.legend(fontsize=7)
        written.append(_save(fig, out / f"linear_vs_lora_{_safe(dataset)}.png"))
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
    n = len(matrix)
    fractions = [[v / max(1, sum(row)) for v in row] for row in matrix]
    side = max(4.0, 1.5 + 0.6 * n)
    fig, ax = plt.subplots(figsize=(side, side))
    ax.imshow(fractions, cmap="Greys", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(matrix[i][j]), ha="center", va="center", fontsize=8,
                    color="white" if fractions[i][j] > 0.5 else "black")
    ax.set_xticks(range(n), classes, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(n), classes, fontsize=7)
    ax.set_xlabel("predicted")
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


# ---------------------------------------------------------------- entry


def build_report(output_dir: str | Path, out: str | Path | None = None, confusion: str | Path | None = None,
                 skip_invalid: bool = False, n_resamples: int = 10_000, seed: int = 0,
                 plots: bool = True) -> list[Path]:
    """Read every run below output_dir and write the CSV tables, plots and report.md; returns the files."""
    source = Path(output_dir)
    runs = load_runs(source, skip_invalid)
    out_dir = Path(out) if out else source / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    groups = group_runs(runs)
    varying = varying_fields(groups)
    written = [write_csv(out_dir / "summary.csv", [summary_row(g, varying) for g in groups])]
    chosen, candidates = select_lr(groups)
    several = any(len(v) > 1 for v in candidates.values())
    if several:
        rows = []
        for g in chosen:
            row = summary_row(g, varying)
            row["lr_candidates"] = ";".join(map(repr, candidates[id(g)]))
            row["lr_selected_by"] = "mean val balanced_accuracy"
            rows.append(row)
        written.append(write_csv(out_dir / "summary_lr_selected.csv", rows))
    pairs = paired_rows(chosen, varying, n_resamples, seed)
    if pairs:
        written.append(write_csv(out_dir / "paired.csv", pairs))
    figures: list[Path] = []
    if plots:
        figures += plot_curves(chosen, varying, out_dir) + plot_linear_vs_lora(chosen, out_dir)
        if confusion:
            figures.append(plot_confusion(confusion, out_dir))
    report = out_dir / "report.md"
    report.write_text(markdown_report(source, runs, groups, chosen, several, varying, pairs, figures))
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
    args = parser.parse_args(argv)
    return exit_status(lambda: _write(args))


def _write(args: argparse.Namespace) -> int:
    files = build_report(args.output_dir, args.out, args.confusion, args.skip_invalid,
                         args.n_resamples, args.bootstrap_seed, not args.no_plots)
    print(f"report written to {files[-1].parent}:")
    for path in files:
        print(f"  {path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
