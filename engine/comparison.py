"""Comparing models evaluated by test.py (the paper's comparison): per-region tables of the
per-subset Dice of every model, a summary per model (parameters in use, seconds per case,
HD95), and paired tests of every model against a reference model over the same (case,
subset) pairs: Wilcoxon signed-rank per region, Holm-corrected across the models, with the
median difference and a case-level bootstrap 95 % interval of the mean difference.

A run is a test.py output folder: run.json (model, configuration, parameters, cases, seconds
per case) and results.csv (one row per case and subset).
"""
import csv
import json
import os

import numpy as np
from scipy import stats

from utils.brats import SUBSET_NAMES
from utils.errors import first_line

REGIONS = ("WT", "TC", "ET", "ETpp")
TESTED = ("WT", "TC", "ET")  # the regions of the paired tests
HD95 = ("HD95_WT", "HD95_TC", "HD95_ET")
INFO_FIELDS = {"model": str, "parameters": int, "parameters_in_use": int, "seconds_per_case": (int, float)}  # of run.json


class ComparisonError(Exception):
    """Runs that cannot be compared; the message is one line."""


def load_run(folder):
    """{"label", "folder", "info" (run.json), "rows" {(case, subset): {metric: float}}}."""
    info_path, rows_path = os.path.join(folder, "run.json"), os.path.join(folder, "results.csv")
    if not (os.path.isfile(info_path) and os.path.isfile(rows_path)):
        missing = " and ".join(os.path.basename(p) for p in (info_path, rows_path) if not os.path.isfile(p))
        raise ComparisonError(f"{folder}: not a test.py output (no {missing}; run test.py with --savepath {folder})")
    try:
        with open(info_path) as f:
            info = json.load(f)
        with open(rows_path, newline="") as f:
            rows = {(r["case"], r["subset"]): {k: float(r[k]) for k in REGIONS + HD95 if r.get(k) not in (None, "")}
                    for r in csv.DictReader(f)}
    except (ValueError, KeyError, TypeError) as err:
        raise ComparisonError(f"{folder}: unreadable run.json or results.csv ({type(err).__name__}: "
                              f"{first_line(err)})")
    if not isinstance(info, dict):
        raise ComparisonError(f"{info_path}: expected a JSON object, got {type(info).__name__}")
    wrong = [k for k, kinds in INFO_FIELDS.items() if info.get(k) is not None
             and (not isinstance(info[k], kinds) or isinstance(info[k], bool))]
    if wrong:
        raise ComparisonError(f"{info_path}: {', '.join(wrong)} of the wrong type")
    bad = next(((key, k) for key, row in rows.items() for k in REGIONS if k in row and not 0 <= row[k] <= 1), None)
    if bad:
        raise ComparisonError(f"{rows_path}: {bad[1]} Dice of {bad[0][0]} ({bad[0][1]}) is "
                              f"{rows[bad[0]][bad[1]]}, not in [0, 1]")
    if not rows:
        raise ComparisonError(f"{folder}: results.csv has no rows")
    return {"label": str(info.get("model", os.path.basename(folder))), "folder": folder, "info": info, "rows": rows}


def label_runs(runs):
    """Model names as labels; runs of the same model are told apart by their folder names."""
    names = [r["label"] for r in runs]
    for run in runs:
        if names.count(run["label"]) > 1:
            run["label"] = os.path.basename(os.path.normpath(run["folder"]))
    labels = [r["label"] for r in runs]
    if len(set(labels)) < len(labels):
        raise ComparisonError(f"two runs share the label {max(labels, key=labels.count)!r}; give their folders "
                              "different names")
    return runs


def common_pairs(runs):
    """(case, subset) pairs every run has, in the paper's subset order, and per run the
    pairs it has that others lack."""
    keys = set.intersection(*(set(r["rows"]) for r in runs))
    if not keys:
        raise ComparisonError("the runs have no (case, subset) pair in common: "
                              + "; ".join(f"{r['label']}: {len({c for c, _ in r['rows']})} cases" for r in runs))
    order = {name: i for i, name in enumerate(SUBSET_NAMES)}
    keys = sorted(keys, key=lambda k: (order.get(k[1], len(order)), k[1], k[0]))
    extra = {r["label"]: sorted(set(r["rows"]) - set(keys)) for r in runs}
    return keys, extra


def region_tables(runs, keys):
    """{region: [{"subset", label: mean Dice, ...}, ..., {"subset": "mean", ...}]}: the mean
    over the cases per subset, then the mean over the subsets."""
    by_subset = {}
    for key in keys:
        by_subset.setdefault(key[1], []).append(key)
    tables = {}
    for region in REGIONS:
        rows = []
        for subset, cases in by_subset.items():
            rows.append({"subset": subset, **{r["label"]: float(np.mean([r["rows"][k][region] for k in cases]))
                                              for r in runs}})
        rows.append({"subset": "mean", **{r["label"]: float(np.mean([row[r["label"]] for row in rows])) for r in runs}})
        tables[region] = rows
    return tables


def holm(pvalues):
    """Holm-Bonferroni adjusted p-values, in the order given."""
    p = np.asarray(pvalues, dtype=float)
    order = np.argsort(p)
    adjusted = np.empty_like(p)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p) - rank) * p[i]))
        adjusted[i] = running
    return adjusted.tolist()


def bootstrap_interval(diff, cases, resamples=2000, seed=0):
    """95 % percentile interval of the mean difference, resampling cases (with all their
    subsets) with replacement."""
    names = sorted(set(cases))
    index = {name: i for i, name in enumerate(names)}
    case_of = np.array([index[c] for c in cases])
    sums = np.bincount(case_of, weights=diff, minlength=len(names))
    counts = np.bincount(case_of, minlength=len(names))
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(names), size=(resamples, len(names)))
    means = sums[draws].sum(1) / counts[draws].sum(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def paired_tests(runs, keys, reference, resamples=2000, seed=0):
    """One row per (model other than the reference, region of TESTED): pairs, mean and median
    difference (model - reference), bootstrap interval, Wilcoxon p and Holm-adjusted p (over
    the models, per region)."""
    by_label = {r["label"]: r for r in runs}
    if reference not in by_label:
        raise ComparisonError(f"reference {reference!r} is none of the runs ({', '.join(by_label)}); "
                              "give --reference one of them")
    cases = [c for c, _ in keys]
    out = []
    for region in TESTED:
        ref = np.array([by_label[reference]["rows"][k][region] for k in keys])
        rows = []
        for run in runs:
            if run["label"] == reference:
                continue
            diff = np.array([run["rows"][k][region] for k in keys]) - ref
            p = float(stats.wilcoxon(diff).pvalue) if np.any(diff != 0) else 1.0
            low, high = bootstrap_interval(diff, cases, resamples, seed)
            rows.append({"model": run["label"], "region": region, "pairs": len(keys), "mean_diff": float(diff.mean()),
                         "median_diff": float(np.median(diff)), "ci_low": low, "ci_high": high, "p": p})
        for row, adjusted in zip(rows, holm([r["p"] for r in rows])):
            row["p_holm"] = adjusted
        out += rows
    return out


def model_summary(runs, keys):
    """Per model: parameters (in use), seconds per case, mean HD95 per region over the pairs."""
    return [{"model": r["label"], "parameters": r["info"].get("parameters"),
             "parameters_in_use": r["info"].get("parameters_in_use"),
             "seconds_per_case": r["info"].get("seconds_per_case"),
             **{k: float(np.mean([r["rows"][key][k] for key in keys])) for k in HD95
                if all(k in r["rows"][key] for key in keys)}} for r in runs]


def best(row, labels):
    """The labels with the highest value in a table row."""
    top = max(row[label] for label in labels)
    return [label for label in labels if row[label] == top]
