"""Comparing models evaluated by test.py (the paper's comparison): per-region tables of the
per-subset Dice of every model, a summary per model (parameters in use, seconds per case,
HD95), and paired tests of every model against a reference model with the case as the unit:
the Wilcoxon signed-rank test of each case's Dice difference averaged over its subsets
(primary; Holm over models x regions), and per subset (Holm over models x regions x subsets),
each with the mean and median difference and a case bootstrap 95 % interval of the mean.

A run is a test.py output folder: run.json (model, configuration, parameters, cases, seconds
per case) and results.csv (one row per case and subset).
"""
import csv
import json
import os

import numpy as np

from utils.brats import SUBSET_NAMES
from utils.errors import first_line

REGIONS = ("WT", "TC", "ET", "ETpp")
TESTED = ("WT", "TC", "ET")  # the regions of the paired tests
HD95 = ("HD95_WT", "HD95_TC", "HD95_ET")
ZERO_METHOD = "wilcox"  # zero differences are dropped before ranking (scipy.stats.wilcoxon's zero_method)
DECIMALS = 10  # differences are rounded to this many decimals before ranking: float noise makes no rank
INFO_FIELDS = {"model": str, "parameters": int, "parameters_in_use": int, "seconds_per_case": (int, float),
               "checkpoints": list, "tta": str, "window_weight": str}  # of run.json


class ComparisonError(Exception):
    """Runs that cannot be compared; the message is one line."""


def read_results(path):
    """results.csv -> {(case, subset): {metric: float}}: the Dice of REGIONS and any HD95
    column, every cell a finite number; refusals name the file, the row (the header is row 1)
    and the column."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [k for k in ("case", "subset") + REGIONS if k not in header]
        if missing:
            raise ComparisonError(f"{path}: no column {', '.join(missing)} (a test.py results.csv has "
                                  f"{', '.join(('case', 'subset') + REGIONS + HD95)})")
        metrics = REGIONS + tuple(k for k in HD95 if k in header)
        rows, first = {}, {}
        for number, r in enumerate(reader, start=2):
            key = (r["case"], r["subset"])
            where = f"{path}: row {number}"
            if not key[0] or not key[1]:
                raise ComparisonError(f"{where}: empty {'case' if not key[0] else 'subset'}")
            where += f" (case {key[0]}, subset {key[1]})"
            if key in rows:
                raise ComparisonError(f"{where} repeats row {first[key]}")
            values = {}
            for k in metrics:
                cell = (r[k] or "").strip()
                if not cell:
                    raise ComparisonError(f"{where}, column {k}: empty")
                try:
                    values[k] = float(cell)
                except ValueError:
                    raise ComparisonError(f"{where}, column {k}: {cell[:40]!r} is not a number") from None
                if not np.isfinite(values[k]) or (k in REGIONS and not 0 <= values[k] <= 1):
                    raise ComparisonError(f"{where}, column {k}: {cell[:40]} is not "
                                          + ("a Dice in [0, 1]" if k in REGIONS else "a finite distance"))
            rows[key], first[key] = values, number
    if not rows:
        raise ComparisonError(f"{path}: no rows")
    return rows


def load_run(folder):
    """{"label", "folder", "info" (run.json), "rows" {(case, subset): {metric: float}}}."""
    info_path, rows_path = os.path.join(folder, "run.json"), os.path.join(folder, "results.csv")
    if not (os.path.isfile(info_path) and os.path.isfile(rows_path)):
        missing = " and ".join(os.path.basename(p) for p in (info_path, rows_path) if not os.path.isfile(p))
        raise ComparisonError(f"{folder}: not a test.py output (no {missing}; run test.py with --savepath {folder})")
    try:
        with open(info_path) as f:
            info = json.load(f)
    except ValueError as err:
        raise ComparisonError(f"{info_path}: not readable JSON ({first_line(err)})")
    if not isinstance(info, dict):
        raise ComparisonError(f"{info_path}: expected a JSON object, got {type(info).__name__}")
    wrong = [k for k, kinds in INFO_FIELDS.items() if info.get(k) is not None
             and (not isinstance(info[k], kinds) or isinstance(info[k], bool))]
    if wrong:
        raise ComparisonError(f"{info_path}: {', '.join(wrong)} of the wrong type")
    try:
        rows = read_results(rows_path)
    except (ValueError, csv.Error) as err:  # ValueError: also text that is not UTF-8
        raise ComparisonError(f"{rows_path}: unreadable ({type(err).__name__}: {first_line(err)})")
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
    """Holm-Bonferroni adjusted p-values, in the order given (valid under any dependence
    between the tests)."""
    p = np.asarray(pvalues, dtype=float)
    order = np.argsort(p, kind="stable")
    adjusted = np.empty_like(p)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p) - rank) * p[i]))
        adjusted[i] = running
    return adjusted.tolist()


def signed_rank_null(ranks):
    """The null distribution of the signed-rank sum W+ for the given ranks (midranks where
    magnitudes tie): each difference's sign a fair coin, independently -> probabilities of
    2 W+ = 0, 1, ..., 2 sum(ranks) (doubled, so that midranks are integers)."""
    doubled = np.rint(2 * np.asarray(ranks, dtype=float)).astype(np.int64)
    dist = np.zeros(int(doubled.sum()) + 1)
    dist[0], top = 1.0, 0
    for r in doubled:  # add the rank with probability 1/2 (numpy buffers the overlapping slices)
        dist[:top + 1] *= 0.5
        dist[r:top + r + 1] += dist[:top + 1]
        top += r
    return dist


def signed_rank(diff):
    """Two-sided Wilcoxon signed-rank test that paired differences, one per case, are centred
    on zero -> {"cases", "zeros", "statistic" (the smaller signed-rank sum), "p", "method"}.
    The differences are rounded to DECIMALS (differences of 1e-16 are float noise: they must not
    break ties or zeros) and zero ones dropped (ZERO_METHOD). The p-value is exact for any number
    of cases: the distribution of W+ over the 2^n sign flips of the n non-zero differences, with
    midranks for tied magnitudes (scipy.stats.wilcoxon's exact method only without ties, its
    permutation method takes seconds from n = 15). No non-zero difference: p = 1."""
    diff = np.round(np.asarray(diff, dtype=float), DECIMALS)
    nonzero = diff[diff != 0]
    out = {"cases": int(diff.size), "zeros": int(diff.size - nonzero.size), "method": "exact"}
    if nonzero.size == 0:
        return {**out, "statistic": 0.0, "p": 1.0}
    from scipy.stats import rankdata  # imported here: scipy.stats takes ~0.4 s, predict.py never needs it
    ranks = rankdata(np.abs(nonzero))
    plus = float(ranks[nonzero > 0].sum())
    dist = signed_rank_null(ranks)
    w = int(round(2 * plus))
    p = 2 * min(dist[:w + 1].sum(), dist[w:].sum())
    return {**out, "statistic": min(plus, float(ranks.sum()) - plus), "p": float(min(1.0, p))}


def smallest_p(cases):
    """The smallest two-sided p-value a signed-rank test of `cases` differences can give."""
    return min(1.0, 2.0 / 2 ** cases)


def bootstrap_interval(values, resamples=2000, seed=0):
    """95 % percentile interval of the mean of `values` (one per case), resampling the cases
    with replacement."""
    values = np.asarray(values, dtype=float)
    draws = np.random.default_rng(seed).integers(0, values.size, size=(resamples, values.size))
    means = values[draws].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def difference_grid(runs, keys, reference, region):
    """{model: (cases, subsets) Dice differences model - reference in `region`, NaN where a
    case lacks a subset} (cases sorted by name) and the subset names (in the order of keys)."""
    cases = sorted({c for c, _ in keys})
    subsets = list(dict.fromkeys(s for _, s in keys))
    case_index = {c: i for i, c in enumerate(cases)}
    subset_index = {s: j for j, s in enumerate(subsets)}
    row = np.array([case_index[c] for c, _ in keys])
    col = np.array([subset_index[s] for _, s in keys])
    ref = np.array([reference["rows"][k][region] for k in keys])
    grids = {}
    for run in runs:
        if run is reference:
            continue
        grid = np.full((len(cases), len(subsets)), np.nan)
        grid[row, col] = np.array([run["rows"][k][region] for k in keys]) - ref
        grids[run["label"]] = grid
    return grids, subsets


def case_means(grid):
    """Per-case means over the subsets a case has: (cases, subsets) with NaN -> (cases,)."""
    return np.nanmean(grid, axis=1)


def paired_test(diff, resamples=2000, seed=0):
    """The signed-rank test of per-case differences with their mean, median and bootstrap
    interval of the mean."""
    low, high = bootstrap_interval(diff, resamples, seed)
    return {"mean_diff": float(np.mean(diff)), "median_diff": float(np.median(diff)), "ci_low": low,
            "ci_high": high, **signed_rank(diff)}


def paired_tests(runs, keys, reference, resamples=2000, seed=0):
    """Paired tests of every model against the reference, the case as the unit.

    Primary (subset "mean"): per (model, region of TESTED) the signed-rank test of each
    case's mean difference over its subsets; Holm over every test of this family (models x
    regions). Per subset: the same test on one subset's per-case differences; Holm over every
    test of that family (models x regions x subsets). Rows: model, region, subset, cases,
    zeros, mean and median difference (model - reference), bootstrap interval, statistic, p,
    method, p_holm, family, family_size."""
    by_label = {r["label"]: r for r in runs}
    if reference not in by_label:
        raise ComparisonError(f"reference {reference!r} is none of the runs ({', '.join(by_label)}); "
                              "give --reference one of them")
    primary, per_subset = [], []
    for region in TESTED:
        grids, subsets = difference_grid(runs, keys, by_label[reference], region)
        for model, grid in grids.items():
            head = {"model": model, "region": region}
            primary.append({**head, "subset": "mean", **paired_test(case_means(grid), resamples, seed)})
            for j, subset in enumerate(subsets):
                column = grid[:, j][~np.isnan(grid[:, j])]
                per_subset.append({**head, "subset": subset, **paired_test(column, resamples, seed)})
    for family, rows in (("primary", primary), ("per-subset", per_subset)):
        for row, adjusted in zip(rows, holm([r["p"] for r in rows])):
            row.update(p_holm=adjusted, family=family, family_size=len(rows), zero_method=ZERO_METHOD)
    return primary + per_subset


def inference(info):
    """How a run predicted, from its run.json: 'uniform windows' (the paper's protocol), or
    e.g. 'ensemble of 2, mirrored over xyz, gaussian windows'."""
    count = len(info.get("checkpoints") or [None])
    parts = ([f"ensemble of {count}"] if count > 1 else []) + (
        [f"mirrored over {info['tta']}"] if info.get("tta") else [])
    return ", ".join(parts + [f"{info.get('window_weight') or 'uniform'} windows"])


def model_summary(runs, keys):
    """Per model: parameters (in use), seconds per case, how it predicted (inference), mean
    HD95 per region over the pairs."""
    return [{"model": r["label"], "parameters": r["info"].get("parameters"),
             "parameters_in_use": r["info"].get("parameters_in_use"),
             "seconds_per_case": r["info"].get("seconds_per_case"), "inference": inference(r["info"]),
             **{k: float(np.mean([r["rows"][key][k] for key in keys])) for k in HD95
                if all(k in r["rows"][key] for key in keys)}} for r in runs]


def best(row, labels):
    """The labels with the highest value in a table row."""
    top = max(row[label] for label in labels)
    return [label for label in labels if row[label] == top]
