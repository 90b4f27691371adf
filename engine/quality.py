"""What a prediction from the sequences a patient has is worth, read off the model's test.py
results (results.csv + run.json): the test-set Dice per region for that subset of sequences
(mean over the test cases and their 10th percentile), and a warning for each region whose
Dice drops by at least `gap` when a sequence the patient lacks is missing (e.g. ET without
T1c), both computed over the cases the two subsets share."""
import os

import numpy as np

from utils.brats import MODALITY_NAMES, subset_name

from .comparison import TESTED, ComparisonError, load_run


def find_results(folder, model_name, required=False):
    """The test.py run in `folder` (engine.comparison.load_run) when it holds results of the
    model `model_name`; else None, or with required=True a ComparisonError saying why."""
    try:
        run = load_run(folder)
    except ComparisonError:
        if required:
            raise
        return None
    recorded = run["info"].get("model")
    if recorded != model_name:
        if required:
            raise ComparisonError(f"{folder}: test.py results of a {recorded} model, not of {model_name}")
        return None
    return run


def expected_quality(run, mask, gap=0.10, checkpoints=()):
    """{"results", "checkpoints", "same_checkpoints", "subset", "cases", "dice" {region: {mean,
    p10}}, "warnings"} for the subset `mask` (M bools) from a test.py run (find_results);
    without results for that subset, "cases" is 0 and "dice" empty. checkpoints: the ones
    predicting now, to say whether the results are theirs."""
    name = subset_name(mask)
    evaluated = run["info"].get("checkpoints") or [run["info"].get("checkpoint")]
    used = [os.path.abspath(p) for p in checkpoints]
    quality = {"results": os.path.abspath(run["folder"]), "checkpoints": evaluated,
               "same_checkpoints": sorted(map(str, evaluated)) == sorted(used), "subset": name,
               "cases": 0, "dice": {}, "warnings": []}
    by_subset = {}
    for (case, subset), values in run["rows"].items():
        by_subset.setdefault(subset, {})[case] = values
    own = by_subset.get(name, {})
    if not own:
        return quality
    quality["cases"] = len(own)
    for region in TESTED:
        values = np.array([v[region] for v in own.values()])
        quality["dice"][region] = {"mean": float(values.mean()), "p10": float(np.percentile(values, 10))}
    for k, present in enumerate(mask):
        if present:
            continue
        fuller = by_subset.get(subset_name([p or j == k for j, p in enumerate(mask)]), {})
        cases = sorted(set(own) & set(fuller))
        for region in TESTED if cases else ():
            without = float(np.mean([own[c][region] for c in cases]))
            with_it = float(np.mean([fuller[c][region] for c in cases]))
            if with_it - without >= gap:
                quality["warnings"].append(
                    f"{region} is unreliable without {MODALITY_NAMES[k]}: test-set Dice {without:.2f} from "
                    f"{name} against {with_it:.2f} with {MODALITY_NAMES[k]} added ({len(cases)} cases)")
    return quality


def quality_line(quality):
    """The expected-quality line for the log."""
    source = f"test.py results in {quality['results']}"
    if not quality["same_checkpoints"]:
        names = ", ".join(os.path.basename(str(p)) for p in quality["checkpoints"])
        source += f", of {names}, not of the checkpoint used"
    if not quality["cases"]:
        return f"expected quality: no {quality['subset']} results in the {source}"
    dice = ", ".join(f"{region} {d['mean']:.2f} (10th percentile {d['p10']:.2f})"
                     for region, d in quality["dice"].items())
    return f"expected quality from {quality['subset']}: test-set Dice {dice} over {quality['cases']} cases ({source})"
