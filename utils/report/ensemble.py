"""Ensembles: the per-image probabilities of runs on the same test images, averaged, scored like a run.

``python -m utils.report RESULTS --ensemble seeds|models|methods``:

- ``seeds``: the seeds of one setting (its few-shot draws and training randomness) make one ensemble;
- ``models``: per seed, the arms that differ only in the model (and its weights) on the same split;
- ``methods``: per seed, the arms of one model that differ in method or method settings on the same split.

Each run's predictions.csv (written by engine.results.write_predictions: split, path, label, pred and one
``p_<class>`` column per class) gives its test probabilities; the ensemble's probability of each class (or
label) is their mean, and its metrics are the task's own, computed from those probabilities exactly as the
members' are. The ensemble is compared with its best member, the one with the highest mean validation
headline (never chosen on test), by the two-level paired bootstrap of evaluation.stats (seeds, then the same
test images) where the headline is a metric of one predicted class per image.

Only runs on identical test images (same paths, same labels, same classes; for models and methods also the
same split hash) are ensembled; any other set is refused with a one-line reason, as are tasks whose runs
have no probabilities (image-text pairs).
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.results import PREDICTIONS_FILE
from evaluation.metrics import compute_metrics, multilabel_metrics
from evaluation.stats import ROW_METRICS, summarize, two_level_paired_bootstrap
from tasks import Task
from utils.report.load import CONTEXT_FIELDS, MODEL_FIELDS, Group, ReportError, Run, _freeze, arm_label
from utils.report.tables import _column_label, _dataset_name, _pp, display_rank, interval_text, write_csv

KINDS = ("seeds", "models", "methods")
TEST = "test"


class EnsembleRefused(Exception):
    """A set of runs that cannot be ensembled; the message is the one-line reason."""


@dataclass
class Predictions:
    """One run's test images (sorted by path), labels and class probabilities."""

    paths: list[str]
    labels: np.ndarray  # (n,) class indices, or (n, L) 0/1 for multi-label runs
    probs: np.ndarray  # (n, C)


@dataclass
class Outcome:
    """An ensemble set, scored: per replicate the ensemble's and each member's metrics, and the comparison."""

    kind: str
    dataset: str
    data: str
    title: str
    task: Task
    members: list[str]  # member labels (seeds for kind "seeds", arm labels otherwise)
    replicates: list[str]
    ensemble: list[dict]  # per replicate: the ensemble's metrics
    member_metrics: dict[str, list[dict]]  # per member label: its metrics per replicate
    member_val: dict[str, float]  # per member label: mean validation headline (how the best is chosen)
    best: str
    difference: dict = field(default_factory=dict)


# ---------------------------------------------------------------- reading


def read_predictions(run: Run) -> Predictions:
    """A run's test rows from its predictions.csv, sorted by path; EnsembleRefused when it cannot be used."""
    path = run.path.parent / PREDICTIONS_FILE
    classes = [str(c) for c in (run.data.get("classes") or [])]
    if not path.is_file():
        raise EnsembleRefused(f"{run.path.parent} has no {PREDICTIONS_FILE}; evaluate it again (--eval_only)")
    columns = [f"p_{c}" for c in classes]
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in ["path", "label", *columns] if c not in (reader.fieldnames or [])]
        if not classes or missing:
            raise EnsembleRefused(f"{path} has no class probabilities ({', '.join(missing) or 'no classes'}): "
                                  "its runs cannot be averaged")
        part = "split" if "split" in reader.fieldnames else "part"
        rows = sorted((r for r in reader if r.get(part) == TEST), key=lambda r: r["path"])
    if not rows:
        raise EnsembleRefused(f"{path} has no test rows")
    try:
        labels = np.array([_label(r["label"], run.task) for r in rows])
        probs = np.array([[float(r[c]) for c in columns] for r in rows], dtype=np.float64)
    except ValueError:
        raise EnsembleRefused(f"{path} has a label or probability that is not a number; evaluate the run again") \
            from None
    return Predictions([r["path"] for r in rows], labels, probs)


def _label(text: str, task: Task) -> int | list[int]:
    """A predictions.csv label: a class index, or ';'-joined 0/1 per label where a task allows several."""
    return int(text) if task.exclusive else [int(v) for v in text.split(";")]


# ---------------------------------------------------------------- scoring


def score(task: Task, probs: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict:
    """The task's metrics of averaged probabilities (the metric functions the task's own evaluation uses)."""
    if task.contrastive:
        raise EnsembleRefused(f"{task.name} runs ({task.description}) have no class probabilities to average")
    if task.exclusive:
        return compute_metrics(probs, labels, classes)
    if task.activation == "sigmoid":
        return multilabel_metrics(probs, labels, classes)
    raise EnsembleRefused(f"{task.name} runs have no rule for scoring averaged probabilities")


def _check_same_images(runs: Sequence[Run], preds: Sequence[Predictions], split_hash: bool) -> None:
    """EnsembleRefused unless every run was tested on the same images, labels and classes (and split)."""
    first, reference = runs[0], preds[0]
    for run, p in zip(runs[1:], preds[1:], strict=True):
        where = f"{first.path.parent} and {run.path.parent}"
        if run.task.name != first.task.name:
            raise EnsembleRefused(f"{where} are different kinds of task ({first.task.name}, {run.task.name})")
        if list(run.data.get("classes") or []) != list(first.data.get("classes") or []):
            raise EnsembleRefused(f"{where} have different classes")
        if p.paths != reference.paths:
            raise EnsembleRefused(f"{where} were tested on different images ({len(reference.paths)} and "
                                  f"{len(p.paths)} test rows, {len(set(reference.paths) ^ set(p.paths))} paths differ)")
        if not np.array_equal(p.labels, reference.labels):
            raise EnsembleRefused(f"{where} give different labels to the same test images")
        sha_a, sha_b = first.data.get("split_sha256"), run.data.get("split_sha256")
        if split_hash and sha_a != sha_b:
            raise EnsembleRefused(f"{where} were run on different splits (split hash {sha_a} and {sha_b})")


def _headline_value(metrics: dict, headline: str) -> float:
    value = metrics.get(headline)
    return math.nan if not isinstance(value, (int, float)) else float(value)


# ---------------------------------------------------------------- sets


def ensemble_sets(groups: Sequence[Group], kind: str, varying: Sequence[str],
                  baseline: str = "linear") -> list[tuple[str, list[Group]]]:
    """The sets of settings to ensemble, each with a title: one setting's seeds, or the arms that differ only in
    the model (models) or only in the method and its settings (methods), on the same data."""
    if kind not in KINDS:
        raise ReportError(f"--ensemble {kind}: choose one of {', '.join(KINDS)}")
    if kind == "seeds":
        return [(arm_label(g, varying), [g]) for g in groups if len(g.runs) >= 2]
    varies = (*MODEL_FIELDS, "weights", "lr") if kind == "models" else None
    sets: dict[str, list[Group]] = defaultdict(list)
    for g in sorted(groups, key=display_rank(baseline)):
        if varies is not None:
            key = {k: v for k, v in g.key.items() if k not in varies}
        else:  # methods: the data and the model are shared, everything else may differ
            key = {k: g.key.get(k) for k in (*CONTEXT_FIELDS, *MODEL_FIELDS, "weights", "schema_version")}
        sets[_freeze(key)].append(g)
    out = []
    for members in sets.values():
        if len(members) < 2:
            continue
        labels = [arm_label(g, varying) for g in members]
        title = " + ".join(labels)
        out.append((title, members))
    return out


def _instances(kind: str, members: Sequence[Group]) -> list[tuple[str, list[tuple[str, Run]]]]:
    """Per replicate, the (member label, run) pairs to average: all seeds at once for kind "seeds", else the runs
    of each arm on that replicate (replicates every arm has)."""
    if kind == "seeds":
        (group,) = members
        return [("seeds " + ";".join(r.replicate_label for r in group.runs),
                 [(f"seed {r.replicate_label}", r) for r in group.runs])]
    common = set.intersection(*({r.replicate for r in g.runs} for g in members))
    out = []
    for replicate in sorted(common):
        runs = [next(r for r in g.runs if r.replicate == replicate) for g in members]
        out.append((runs[0].replicate_label, [(f"#{i}", r) for i, r in enumerate(runs)]))
    return out


def evaluate_set(kind: str, title: str, members: Sequence[Group], varying: Sequence[str], n_resamples: int,
                 seed: int) -> Outcome:
    """Average, score and compare one set; EnsembleRefused with the reason when it cannot be ensembled."""
    instances = _instances(kind, members)
    if not instances:
        raise EnsembleRefused("its arms share no seed")
    first = members[0]
    task, headline = first.task, first.runs[0].headline
    if task.contrastive:
        raise EnsembleRefused(f"{task.name} runs ({task.description}) have no class probabilities to average")
    labels_of = (lambda i, r: f"seed {r.replicate_label}") if kind == "seeds" else \
        (lambda i, r: arm_label(members[i], varying))
    ensemble, member_metrics, val = [], defaultdict(list), defaultdict(list)
    per_instance = []  # (labels, ensemble probs, {member: probs}) for the bootstrap
    for _, pairs in instances:
        runs = [r for _, r in pairs]
        preds = [read_predictions(r) for r in runs]
        _check_same_images(runs, preds, split_hash=kind != "seeds")
        classes = [str(c) for c in runs[0].data.get("classes")]
        mean = np.mean([p.probs for p in preds], axis=0)
        ensemble.append(score(task, mean, preds[0].labels, classes))
        probs = {}
        for i, (run, p) in enumerate(zip(runs, preds, strict=True)):
            name = labels_of(i, run)
            member_metrics[name].append(score(task, p.probs, p.labels, classes))
            val[name].append(run.metric("val", headline))
            probs[name] = p.probs
        per_instance.append((preds[0].labels, mean, probs))
    member_val = {name: summarize(v).mean for name, v in val.items()}
    best = max(member_val, key=lambda n: (-math.inf if math.isnan(member_val[n]) else member_val[n]))
    c = first.config
    outcome = Outcome(kind, _dataset_name(c), _column_label(c), title, task, list(member_metrics),
                      [label for label, _ in instances], ensemble, dict(member_metrics), member_val, best)
    outcome.difference = _difference(outcome, headline, per_instance, n_resamples, seed)
    return outcome


def _difference(outcome: Outcome, headline: str, per_instance: list, n_resamples: int, seed: int) -> dict:
    """Ensemble minus best member on the test headline: the mean over replicates, and the two-level paired
    bootstrap interval where the headline is a metric of one predicted class per image."""
    task = outcome.task
    diffs = [_headline_value(e, headline) - _headline_value(b, headline)
             for e, b in zip(outcome.ensemble, outcome.member_metrics[outcome.best], strict=True)]
    out = {"mean_diff": float(np.mean(diffs)), "boot_low": math.nan, "boot_high": math.nan, "n_cases": "",
           "interval": ""}
    if not task.exclusive or headline not in ROW_METRICS:
        out["interval"] = f"no per-image bootstrap for {headline}"
        return out
    labels = [lab for lab, _, _ in per_instance]
    ens = [probs.argmax(axis=1) for _, probs, _ in per_instance]
    best = [members[outcome.best].argmax(axis=1) for _, _, members in per_instance]
    result = two_level_paired_bootstrap(ens, best, n_resamples=n_resamples, seed=seed, metric=headline,
                                        labels=labels)
    out.update(boot_low=result.boot_low, boot_high=result.boot_high, n_cases=result.n_cases,
               interval="test images only (one ensemble of these seeds)" if outcome.kind == "seeds"
               else "seeds, then test images")
    return out


def build_ensembles(groups: Sequence[Group], kind: str, varying: Sequence[str], n_resamples: int = 10_000,
                    seed: int = 0, baseline: str = "linear") -> tuple[list[Outcome], list[str]]:
    """Every ensemble of `kind` among the groups, and the one-line reasons of the sets that were refused.

    ReportError when no set of runs could be ensembled at all."""
    sets = ensemble_sets(groups, kind, varying, baseline)
    if not sets:
        what = {"seeds": "a setting with two or more seeds", "models": "two models run with the same method and data",
                "methods": "two methods run on the same model and data"}[kind]
        raise ReportError(f"--ensemble {kind}: nothing to ensemble (needs {what})")
    outcomes, refused = [], []
    for title, members in sets:
        try:
            outcomes.append(evaluate_set(kind, title, members, varying, n_resamples, seed))
        except EnsembleRefused as exc:
            refused.append(f"{_dataset_name(members[0].config)}, {_column_label(members[0].config)}: {title}: {exc}")
    if not outcomes:
        raise ReportError(f"--ensemble {kind}: no set could be ensembled; first reason: {refused[0]}")
    return outcomes, refused


# ---------------------------------------------------------------- writing


def _mean_metric(metrics: Sequence[dict], name: str) -> float:
    return summarize([m.get(name) if isinstance(m.get(name), (int, float)) else None for m in metrics]).mean


def ensemble_rows(outcomes: Sequence[Outcome]) -> list[dict]:
    """ensembles.csv: per set, one row for the ensemble and one per member (means over replicates)."""
    rows = []
    for o in outcomes:
        metrics = o.task.report_metrics
        entries = [("ensemble", "ensemble", o.ensemble)] + [
            (name, "best member" if name == o.best else "member", o.member_metrics[name]) for name in o.members]
        for entry, role, values in entries:
            row = {"kind": o.kind, "dataset": o.dataset, "data": o.data, "set": o.title, "entry": entry, "role": role,
                   "replicates": ";".join(o.replicates),
                   "val_headline_mean": o.member_val.get(entry, math.nan)}
            row.update({f"test_{m}_mean": _mean_metric(values, m) for m in metrics})
            if role == "ensemble":
                row.update({"best_member": o.best, "diff_vs_best": o.difference["mean_diff"],
                            "boot_low": o.difference["boot_low"], "boot_high": o.difference["boot_high"],
                            "n_cases": o.difference["n_cases"], "interval_resamples": o.difference["interval"]})
            rows.append(row)
    return rows


MEANING = {
    "seeds": ("One ensemble of all the seeds of a setting against its best seed (highest validation headline). "
              "The interval resamples the test images only: it says how far the gain could move on another test "
              "set of this size from the same population, for these trained seeds; it does not include the "
              "variation from training another set of seeds."),
    "models": ("Per seed, the models' probabilities averaged, against the best model (highest mean validation "
               "headline); the interval resamples seeds, then the same test images for both (two-level paired "
               "bootstrap)."),
    "methods": ("Per seed, the methods' probabilities averaged, against the best method (highest mean validation "
                "headline); the interval resamples seeds, then the same test images for both (two-level paired "
                "bootstrap)."),
}


def ensemble_markdown(kind: str, outcomes: Sequence[Outcome], refused: Sequence[str]) -> list[str]:
    """report.md's ensemble section: per set, the ensemble beside its members, and the paired difference."""
    lines = [f"## Ensembles over {kind} (mean of per-image test probabilities)", "", MEANING[kind], ""]
    for o in outcomes:
        metrics = o.task.report_metrics
        lines += [f"### {o.dataset}, {o.data}: {o.title}", "",
                  f"Replicates: {', '.join(o.replicates)}. Test metrics in %, mean over replicates.", "",
                  "| | val headline | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
        entries = [("ensemble", o.ensemble)] + [(name, o.member_metrics[name]) for name in o.members]
        for name, values in entries:
            shown = f"{name} (best on val)" if name == o.best else name
            val = "" if name == "ensemble" else _percent(o.member_val[name])
            lines.append(f"| {shown} | {val} | " + " | ".join(_cell(values, m) for m in metrics) + " |")
        d = o.difference
        interval = (f"95% CI [{_pp(d['boot_low'])}, {_pp(d['boot_high'])}] ({d['interval']}, {d['n_cases']} images)"
                    if not math.isnan(d["boot_low"]) else f"no interval ({d['interval']})")
        lines += ["", f"Ensemble − best member ({o.best}): {_pp(d['mean_diff'])} points of test "
                      f"{o.task.headline_name}; {interval}.", ""]
    if refused:
        lines += ["Not ensembled:", "", *[f"- {r}" for r in refused], ""]
    return lines


def _cell(values: Sequence[dict], name: str) -> str:
    numbers = [m.get(name) if isinstance(m.get(name), (int, float)) else None for m in values]
    return interval_text(summarize(numbers))


def _percent(x: float) -> str:
    return "–" if math.isnan(x) else f"{100 * x:.1f}"


def write_ensembles(out_dir: Path, outcomes: Sequence[Outcome]) -> Path:
    """ensembles.csv in the report folder."""
    return write_csv(out_dir / "ensembles.csv", ensemble_rows(outcomes))
