"""Compare models evaluated by test.py: the paper's table per region, a summary per model,
paired significance tests against a reference model, and the paper's figure.

    python compare.py --results results/imfuse results/mmformer results/robustseg --savepath comparison

Each --results folder is a test.py output (run.json + results.csv). Only the (case, subset)
pairs every run has are compared; the others are counted in the output. Writes to --savepath:
comparison.md (everything below, readable), comparison.csv (per region, one row per subset
and a column per model, the mean over subsets last, the best model(s) of each row named),
models.csv (parameters, parameters in use, seconds per case, mean HD95), significance.csv
(per model and region against the reference: pairs, mean and median difference, bootstrap
95 % interval, Wilcoxon signed-rank p and Holm-adjusted p), comparison.png (mean Dice against
parameters in use) and subsets.png (Dice per subset and model).
"""
import sys

from engine.comparison import (HD95, REGIONS, TESTED, ComparisonError, best, common_pairs, label_runs, load_run,
                               model_summary, paired_tests, region_tables)
from utils.io import write_csv, write_text
from utils.parser import ArgumentParser
from utils.plots import dice_vs_parameters, subset_heatmaps


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


def markdown(runs, keys, extra, tables, summary, tests, reference):
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
    lines += ["## Models", "", "| Model | Parameters | In use | s / case | " + " | ".join(f"{k[5:]} HD95 mm" for k in HD95)
              + " |", "|---|---|---|---|" + "---|" * len(HD95)]
    for s in summary:
        params = [f"{s[k]:,}" if s[k] is not None else "" for k in ("parameters", "parameters_in_use")]
        lines.append(f"| {s['model']} | {params[0]} | {params[1]} | {_number(s['seconds_per_case'], 1)} | "
                     + " | ".join(_number(s.get(k)) for k in HD95) + " |")
    lines += ["", f"## Paired tests against {reference} (model - {reference}, Dice points)", "",
              "| Model | Region | Pairs | Mean diff | Median diff | 95 % CI (bootstrap over cases) | Wilcoxon p | Holm p |",
              "|---|---|---|---|---|---|---|---|"]
    for t in tests:
        lines.append(f"| {t['model']} | {t['region']} | {t['pairs']} | {100 * t['mean_diff']:+.2f} | "
                     f"{100 * t['median_diff']:+.2f} | [{100 * t['ci_low']:+.2f}, {100 * t['ci_high']:+.2f}] | "
                     f"{t['p']:.3g} | {t['p_holm']:.3g} |")
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
                  ["model", "parameters", "parameters_in_use", "seconds_per_case", *HD95])
        write_csv(f"{out}/significance.csv", tests,
                  ["model", "region", "pairs", "mean_diff", "median_diff", "ci_low", "ci_high", "p", "p_holm"])
        text = markdown(runs, keys, extra, tables, summary, tests, args.reference)
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
