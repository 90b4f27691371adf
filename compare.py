"""Compare models evaluated by test.py: the paper's table per region, a summary per model,
paired significance tests against a reference model, and the paper's figure.

    python compare.py --results results/imfuse results/mmformer results/robustseg --savepath comparison

Each --results folder is a test.py output (run.json + results.csv). Only the (case, subset)
pairs every run has are compared; the others are counted in the output. Writes to --savepath:
comparison.md (everything below, readable), comparison.csv (per region, one row per subset
and a column per model, the mean over subsets last, the best model(s) of each row named),
models.csv (parameters, parameters in use, seconds per case, mean HD95), significance.csv
(per model and region against the reference, the case as the unit: first the primary tests,
subset "mean", of each case's Dice averaged over its subsets, then one test per subset; for
each the cases, zero differences, mean and median difference, case bootstrap 95 % interval,
Wilcoxon signed-rank statistic and p, the Holm-adjusted p, the family it was adjusted in and
its size, the method and zero_method), comparison.png (mean Dice against parameters in use)
and subsets.png (Dice per subset and model). p-values are written with 3 significant digits.
"""
import sys

from engine.comparison import (HD95, REGIONS, TESTED, ZERO_METHOD, ComparisonError, best, common_pairs,
                               label_runs, load_run, model_summary, paired_tests, region_tables, smallest_p)
from utils.io import write_csv, write_text
from utils.parser import ArgumentParser
from utils.plots import dice_vs_parameters, subset_heatmaps

ALPHA = 0.05  # the level the Markdown's note on few cases refers to
TEST_FIELDS = ["model", "region", "subset", "cases", "zeros", "mean_diff", "median_diff", "ci_low", "ci_high",
               "statistic", "p", "p_holm", "family", "family_size", "method", "zero_method"]


def parser():
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", nargs="+", required=True, help="test.py output folders, one per model")
    p.add_argument("--savepath", required=True, help="output folder")
    p.add_argument("--reference", default="imfuse", help="the model the others are tested against (a run's "
                                                         "model name, or its folder name when two runs share one)")
    p.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    return p


def _number(value, digits=2):
    return "" if value is None else f"{value:.{digits}f}"


def tests_markdown(tests, keys, reference, resamples, seed):
    """The paired tests: what is tested, the primary table, then the per-subset tables."""
    primary = [t for t in tests if t["family"] == "primary"]
    secondary = [t for t in tests if t["family"] == "per-subset"]
    if not primary:
        return []
    cases = primary[0]["cases"]
    subsets = list(dict.fromkeys(s for _, s in keys))
    lines = ["", f"## Paired tests against {reference} (model - {reference}, Dice points)", "",
             f"The unit is the case ({cases} cases). Primary test: each case's Dice averaged over its "
             f"subsets ({len(subsets)} here), the difference to {reference} per case, the two-sided Wilcoxon "
             f"signed-rank test of those {cases} differences (zero differences dropped, zero_method "
             f"'{ZERO_METHOD}'; exact p-values: the distribution over every sign flip, midranks for ties), "
             f"Holm-adjusted over the primary family: all "
             f"{len(primary)} tests of the table (models x regions). The interval is a percentile bootstrap "
             f"of the mean difference over cases ({resamples} resamples, seed {seed}).", ""]
    floor = smallest_p(cases)
    if len(primary) * floor > ALPHA:
        lines += [f"With {cases} cases no signed-rank p-value can be below {floor:.3g}, and after Holm over "
                  f"{len(primary)} tests none below {min(1, len(primary) * floor):.3g}: no difference can "
                  f"reach {ALPHA} here. Read the intervals.", ""]
    lines += ["| Model | Region | Cases (zero) | Mean diff | Median diff | 95 % CI (bootstrap over cases) | "
              f"W | p | Holm p ({len(primary)} tests) |", "|---|---|---|---|---|---|---|---|---|"]
    for t in primary:
        lines.append(f"| {t['model']} | {t['region']} | {t['cases']} ({t['zeros']}) | {100 * t['mean_diff']:+.2f} | "
                     f"{100 * t['median_diff']:+.2f} | [{100 * t['ci_low']:+.2f}, {100 * t['ci_high']:+.2f}] | "
                     f"{t['statistic']:g} | {t['p']:.2e} | {t['p_holm']:.2e} |")
    if not secondary:
        return lines
    models = list(dict.fromkeys(t["model"] for t in secondary))
    lines += ["", "### Per subset", "",
              f"The same test on each subset's per-case differences; Holm over all {len(secondary)} tests of "
              f"these tables (models x regions x subsets). Cells: mean difference (Holm p).", ""]
    cell = {(t["model"], t["region"], t["subset"]): t for t in secondary}
    for region in dict.fromkeys(t["region"] for t in secondary):
        lines += [f"{region}:", "", "| Subset | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
        for subset in subsets:
            lines.append(f"| {subset} | " + " | ".join(
                f"{100 * cell[m, region, subset]['mean_diff']:+.2f} ({cell[m, region, subset]['p_holm']:.2e})"
                for m in models) + " |")
        lines.append("")
    return lines[:-1]


def markdown(runs, keys, extra, tables, summary, tests, reference, resamples=2000, seed=0):
    labels = [r["label"] for r in runs]
    lines = [f"# Comparison of {len(runs)} models on {len({c for c, _ in keys})} cases, "
             f"{len(dict.fromkeys(s for _, s in keys))} subsets ({len(keys)} pairs)", ""]
    left_out = {label: pairs for label, pairs in extra.items() if pairs}
    if left_out:
        lines += ["Left out (not in every run): " + "; ".join(
            f"{label}: {len(pairs)} pairs ({len({c for c, _ in pairs})} cases: {', '.join(sorted({c for c, _ in pairs}))})"
            for label, pairs in left_out.items()), ""]
    for region in REGIONS:
        lines += [f"## {region} Dice (%)", "", "| Subset | " + " | ".join(labels) + " |",
                  "|---|" + "---|" * len(labels)]
        for row in tables[region]:
            top = best(row, labels)
            cells = [f"**{100 * row[l]:.2f}**" if l in top else f"{100 * row[l]:.2f}" for l in labels]
            lines.append(f"| {row['subset']} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Models", "", "| Model | Parameters | In use | s / case | Inference | "
              + " | ".join(f"{k[5:]} HD95 mm" for k in HD95) + " |", "|---|---|---|---|---|" + "---|" * len(HD95)]
    for s in summary:
        params = [f"{s[k]:,}" if s[k] is not None else "" for k in ("parameters", "parameters_in_use")]
        lines.append(f"| {s['model']} | {params[0]} | {params[1]} | {_number(s['seconds_per_case'], 1)} | "
                     f"{s['inference']} | " + " | ".join(_number(s.get(k)) for k in HD95) + " |")
    if len({s["inference"] for s in summary}) > 1:
        lines += ["", "The runs did not predict alike (see Inference): mirroring, window weights and ensembles "
                      "change the Dice, so these differences are not the models' alone."]
    lines += tests_markdown(tests, keys, reference, resamples, seed)
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = parser()
    args = p.parse_args(argv)
    p.check_writable("--savepath", args.savepath)
    if args.resamples < 1:
        p.error("--resamples must be positive")
    try:
        runs = label_runs([load_run(folder) for folder in args.results])
        keys, extra = common_pairs(runs)
        tables = region_tables(runs, keys)
        summary = model_summary(runs, keys)
        tests = paired_tests(runs, keys, args.reference, args.resamples, args.seed)
        labels = [r["label"] for r in runs]
        out = args.savepath.rstrip("/")
        write_csv(f"{out}/comparison.csv",
                  [{"region": region, **row, "best": "+".join(best(row, labels))}
                   for region in REGIONS for row in tables[region]], ["region", "subset", *labels, "best"])
        write_csv(f"{out}/models.csv", summary,
                  ["model", "parameters", "parameters_in_use", "seconds_per_case", "inference", *HD95])
        write_csv(f"{out}/significance.csv", tests, TEST_FIELDS, formats={"p": ".2e", "p_holm": ".2e"})
        text = markdown(runs, keys, extra, tables, summary, tests, args.reference, args.resamples, args.seed)
        write_text(f"{out}/comparison.md", text)
        means = {label: 100 * sum(tables[r][-1][label] for r in TESTED) / len(TESTED) for label in labels}
        dice_vs_parameters(f"{out}/comparison.png", labels,
                           [r["info"].get("parameters_in_use") or r["info"].get("parameters") or 1 for r in runs],
                           [means[label] for label in labels])
        subset_heatmaps(f"{out}/subsets.png", TESTED, [row["subset"] for row in tables["WT"][:-1]], labels,
                        {region: [[100 * row[label] for label in labels] for row in tables[region][:-1]]
                         for region in TESTED})
    except (ComparisonError, OSError) as err:
        print(f"compare.py: {err}", file=sys.stderr)
        return 1
    left_out = sum(len(pairs) for pairs in extra.values())
    if left_out:
        print(f"compare.py: left out {left_out} (case, subset) pairs that not every run has "
              f"(listed per model in comparison.md)", file=sys.stderr)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
