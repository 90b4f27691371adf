"""compare.py on hand-made test.py output folders of three fake models."""
import csv
import itertools
import json
import re
import shlex
import zlib

import numpy as np
import pytest
from PIL import Image
from scipy import stats

import engine
from engine.comparison import bootstrap_interval, case_means, holm, signed_rank
from engine.small import small_flags
from helpers import script
from models import list_models
from utils.brats import SUBSET_NAMES

CASES = [f"case{i}" for i in range(6)]
SUBSETS = [SUBSET_NAMES[1], SUBSET_NAMES[9], SUBSET_NAMES[14]]  # T1c, FLAIR+T1c, all
PARAMS = {"imfuse": 44_000_000, "mmformer": 36_000_000, "uhved": 1_250_000}


def dice(model, case, subset):
    """Deterministic fake Dice values; imfuse best on average, mmformer close, uhved worse."""
    rng = np.random.default_rng(zlib.crc32(f"{model} {case} {subset}".encode()))
    base = {"imfuse": 0.80, "mmformer": 0.78, "uhved": 0.60}[model] + 0.05 * SUBSETS.index(subset)
    return {region: float(np.clip(base + rng.normal(0, 0.05) - 0.1 * k, 0, 1))
            for k, region in enumerate(("WT", "TC", "ET", "ETpp"))}


def write_run(folder, model, cases=CASES, subsets=SUBSETS):
    folder.mkdir(parents=True)
    rows = []
    for case in cases:
        for subset in subsets:
            rows.append({"case": case, "subset": subset, "mask": "", **dice(model, case, subset),
                         "HD95_WT": 5.0, "HD95_TC": 6.0, "HD95_ET": 7.0})
    with open(folder / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (folder / "run.json").write_text(json.dumps({"model": model, "config": {}, "parameters": PARAMS[model] + 1000,
                                                 "parameters_in_use": PARAMS[model], "seconds_per_case": 12.5}))
    return {(r["case"], r["subset"]): r for r in rows}


def read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def holm_by_hand(pvalues):
    """Holm's step-down: the i-th smallest of m p-values times (m - i), made monotone, capped at 1."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    adjusted, running = [0.0] * len(pvalues), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def test_tables_tests_and_figures_of_three_models(tmp_path, capsys):
    rows = {m: write_run(tmp_path / m, m) for m in PARAMS}
    out = tmp_path / "cmp"
    assert script("compare").main(["--results", *(str(tmp_path / m) for m in PARAMS), "--savepath", str(out)]) == 0
    table = read(out / "comparison.csv")
    assert [(r["region"], r["subset"]) for r in table] == [(g, s) for g in ("WT", "TC", "ET", "ETpp")
                                                          for s in SUBSETS + ["mean"]]
    for r in table:
        if r["subset"] == "mean":
            continue
        means = {m: np.mean([rows[m][(c, r["subset"])][r["region"]] for c in CASES]) for m in PARAMS}
        for m in PARAMS:
            assert float(r[m]) == pytest.approx(means[m], rel=1e-12)
        assert r["best"] == max(means, key=means.get)
    wt = [r for r in table if r["region"] == "WT"]
    assert float(wt[-1]["imfuse"]) == pytest.approx(np.mean([float(r["imfuse"]) for r in wt[:-1]]), rel=1e-12)
    md = (out / "comparison.md").read_text()
    assert md.count("**") >= 2 * 4 * 4  # one marked value per row: 4 regions x (3 subsets + mean)

    tests = read(out / "significance.csv")
    primary = [t for t in tests if t["family"] == "primary"]
    assert [(t["model"], t["region"], t["subset"]) for t in primary] == [
        (m, g, "mean") for g in ("WT", "TC", "ET") for m in ("mmformer", "uhved")]
    assert [(t["model"], t["region"], t["subset"]) for t in tests[len(primary):]] == [
        (m, g, s) for g in ("WT", "TC", "ET") for m in ("mmformer", "uhved") for s in SUBSETS]
    # by hand: the unit is the case, its Dice averaged over its 3 subsets
    want = []
    for t in primary:
        diff = [np.mean([rows[t["model"]][(c, s)][t["region"]] - rows["imfuse"][(c, s)][t["region"]]
                         for s in SUBSETS]) for c in CASES]
        want.append(stats.wilcoxon(diff, method="exact").pvalue)
        assert int(t["cases"]) == 6 and int(t["zeros"]) == 0 and t["method"] == "exact"
        assert float(t["p"]) == pytest.approx(want[-1], rel=5e-3)  # 3 significant digits
        assert float(t["mean_diff"]) == pytest.approx(np.mean(diff), rel=1e-12)
        assert float(t["median_diff"]) == pytest.approx(np.median(diff), rel=1e-12)
        assert float(t["ci_low"]) <= float(t["mean_diff"]) <= float(t["ci_high"])
        assert int(t["family_size"]) == 6 and t["zero_method"] == "wilcox"
    for t, adjusted in zip(primary, holm_by_hand(want)):
        assert float(t["p_holm"]) == pytest.approx(adjusted, rel=5e-3)
    secondary = tests[len(primary):]
    want = [stats.wilcoxon([rows[t["model"]][(c, t["subset"])][t["region"]]
                            - rows["imfuse"][(c, t["subset"])][t["region"]] for c in CASES]).pvalue for t in secondary]
    for t, p, adjusted in zip(secondary, want, holm_by_hand(want)):
        assert t["family"] == "per-subset" and int(t["family_size"]) == 18
        assert float(t["p"]) == pytest.approx(p, rel=5e-3) and float(t["p_holm"]) == pytest.approx(adjusted, rel=5e-3)
    assert all(re.fullmatch(r"\d\.\d\de[+-]\d\d", t[k]) for t in tests for k in ("p", "p_holm"))
    assert "6 cases no signed-rank p-value can be below 0.0312" in md and "Holm over 6 tests" in md
    assert md.count("(1.00e+00)") + md.count("e-0") >= 18  # the per-subset cells carry their Holm p
    models = read(out / "models.csv")
    assert [int(r["parameters_in_use"]) for r in models] == list(PARAMS.values())
    assert float(models[0]["HD95_ET"]) == 7.0 and float(models[0]["seconds_per_case"]) == 12.5
    assert {r["inference"] for r in models} == {"uniform windows"} and "did not predict alike" not in md
    for name in ("comparison.png", "subsets.png"):
        with Image.open(out / name) as png:
            assert png.format == "PNG" and png.size[0] > 300
    assert "Paired tests against imfuse" in capsys.readouterr().out


def test_differences_that_cancel_case_by_case_are_not_significant(tmp_path):
    """Half the cases +d, half -d, in every subset: each subset alone, and the 90 (case,
    subset) pairs taken as independent, look like no difference, and so must the case test."""
    for model in ("imfuse", "mmformer"):
        rows = write_run(tmp_path / model, model)
    with open(tmp_path / "imfuse" / "results.csv", newline="") as f:
        ref = [{**r, **{g: 0.1 + 0.6 * float(r[g]) for g in ("WT", "TC", "ET", "ETpp")}} for r in csv.DictReader(f)]
    for model, sign in (("imfuse", 0), ("mmformer", 1)):
        with open(tmp_path / model / "results.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, list(rows[CASES[0], SUBSETS[0]]))
            writer.writeheader()
            for r in ref:
                d = sign * (0.03 if CASES.index(r["case"]) % 2 else -0.03)
                writer.writerow({**r, **{g: r[g] + d for g in ("WT", "TC", "ET", "ETpp")}})
    other = tmp_path / "mmformer"
    assert script("compare").main(["--results", str(tmp_path / "imfuse"), str(other),
                                   "--savepath", str(tmp_path / "cmp")]) == 0
    primary = [t for t in read(tmp_path / "cmp" / "significance.csv") if t["family"] == "primary"]
    assert len(primary) == 3 and all(float(t["p"]) > 0.5 and float(t["mean_diff"]) == pytest.approx(0, abs=1e-12)
                                     for t in primary)


def test_runs_that_predicted_differently_are_flagged(tmp_path):
    for model in ("imfuse", "mmformer"):
        write_run(tmp_path / model, model)
    info = json.loads((tmp_path / "mmformer" / "run.json").read_text())
    info.update(checkpoints=["a.pth", "b.pth"], tta="xyz", window_weight="gaussian")
    (tmp_path / "mmformer" / "run.json").write_text(json.dumps(info))
    assert script("compare").main(["--results", str(tmp_path / "imfuse"), str(tmp_path / "mmformer"),
                                   "--savepath", str(tmp_path / "cmp")]) == 0
    models = {r["model"]: r["inference"] for r in read(tmp_path / "cmp" / "models.csv")}
    assert models == {"imfuse": "uniform windows", "mmformer": "ensemble of 2, mirrored over xyz, gaussian windows"}
    assert "did not predict alike" in (tmp_path / "cmp" / "comparison.md").read_text()


def test_holm_and_bootstrap_by_hand():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.001]) == pytest.approx([0.5, 0.002])
    p = np.random.default_rng(3).uniform(0, 0.1, 12)
    assert holm(p) == pytest.approx(holm_by_hand(list(p)))
    values = np.array([0.1, -0.2, 0.3, 0.05])
    a = bootstrap_interval(values, seed=1)
    assert a == bootstrap_interval(values, seed=1)  # seeded
    assert -0.2 <= a[0] < values.mean() < a[1] <= 0.3
    assert bootstrap_interval(np.full(4, 0.05)) == pytest.approx((0.05, 0.05))
    # one resample of 4 cases: the mean of the 4 cases drawn, as numpy draws them
    drawn = np.random.default_rng(2).integers(0, 4, size=(1, 4))
    assert bootstrap_interval(values, resamples=1, seed=2) == pytest.approx((values[drawn].mean(),) * 2)


def signed_rank_by_enumeration(diff):
    """Two-sided p of the signed-rank test from its definition: W+ (midranks of |d|, zeros
    dropped) against its value under each of the 2^n sign patterns."""
    d = np.asarray([x for x in diff if x != 0])
    ranks = stats.rankdata(np.abs(d))
    observed = ranks[d > 0].sum()
    sums = np.array([sum(r for r, s in zip(ranks, signs) if s) for signs in itertools.product((0, 1), repeat=d.size)])
    return min(1.0, 2 * min(np.mean(sums <= observed + 1e-9), np.mean(sums >= observed - 1e-9)))


@pytest.mark.parametrize("diff", [[0.3, -0.1, 0.2, 0.5, 0.4, -0.05],  # no ties
                                  [0.1, 0.1, -0.1, 0.2, 0.2, 0.3, -0.3, 0.05],  # tied magnitudes
                                  [0.0, 0.1, 0.2, 0.0, 0.3, -0.2, 0.4],  # zeros
                                  [0.01] * 7 + [-0.01] * 2,  # every magnitude tied
                                  [0.2, 0.1 + 0.1, -(0.3 - 0.1), 0.1, 1e-17, -1e-17]])  # float noise: ties, zeros
def test_signed_rank_against_its_definition(diff):
    result = signed_rank(diff)
    rounded = [round(x, 10) for x in diff]
    assert result["p"] == pytest.approx(signed_rank_by_enumeration(rounded), rel=1e-9)
    assert result["zeros"] == sum(x == 0 for x in rounded) and result["cases"] == len(diff)
    ranks = stats.rankdata(np.abs([x for x in rounded if x]))
    plus = ranks[np.array([x for x in rounded if x]) > 0].sum()
    assert result["statistic"] == min(plus, ranks.sum() - plus)


def test_signed_rank_is_exact_at_many_cases():
    rng = np.random.default_rng(0)
    for n in (20, 60, 251):
        d = rng.normal(0.2, 1, n)  # no ties: scipy's exact distribution
        assert signed_rank(d)["p"] == pytest.approx(stats.wilcoxon(d, method="exact").pvalue, rel=1e-9)
    d = np.round(rng.normal(0.1, 1, 200), 1)  # many ties: close to the tie-corrected normal approximation
    assert signed_rank(d)["p"] == pytest.approx(stats.wilcoxon(d, method="asymptotic").pvalue, rel=0.05)
    assert signed_rank(np.zeros(5)) == {"cases": 5, "zeros": 5, "method": "exact", "statistic": 0.0, "p": 1.0}


def simulated_grids(rng, reps, cases, subsets=15, shift=0.0):
    """Dice differences (reps, cases, subsets) of two models on the same cases: per case each
    model's own offset (sd 0.05, so the difference is shared by the case's subsets; mean
    `shift` for the model), per pair independent noise (sd 0.01-0.02), a case lacking a
    subset now and then (NaN)."""
    offset = rng.normal(shift, 0.05, (reps, cases, 1)) - rng.normal(0, 0.05, (reps, cases, 1))
    noise = rng.normal(0, 1, (reps, cases, subsets)) * rng.uniform(0.01, 0.02, (reps, 1, subsets))
    grid = offset + noise
    grid[rng.random(grid.shape) < 0.05] = np.nan
    grid[:, :, 0] = offset[:, :, 0]  # every case keeps one subset
    return grid


@pytest.mark.parametrize("cases", [6, 25, 251])
def test_the_case_test_holds_its_level_under_the_null(cases):
    """Unit: cases. Null: both models' per-case means equal in distribution; within a case the
    15 subsets' differences are strongly correlated. Rejections at alpha 0.05 over 800 seeded
    runs, 300 at 251 cases (standard errors of the rate 0.008 and 0.013)."""
    grids = simulated_grids(np.random.default_rng(cases), 300 if cases > 100 else 800, cases)
    p = np.array([signed_rank(case_means(g))["p"] for g in grids])
    assert np.mean(p < 0.05) <= 0.08
    if cases > 6:  # with 6 cases only an all-one-sign run (2 / 64) rejects
        assert np.mean(p < 0.05) >= 0.02
        assert np.mean(p < 0.5) == pytest.approx(0.5, abs=0.1)  # p roughly uniform
    # the (case, subset) pairs taken as independent samples reject far too often
    pairs = np.array([stats.wilcoxon(g[~np.isnan(g)]).pvalue for g in grids[:100]])
    assert np.mean(pairs < 0.05) > 0.4


def test_the_case_test_detects_a_true_per_case_difference():
    grids = simulated_grids(np.random.default_rng(7), 200, 25, shift=0.04)
    p = np.array([signed_rank(case_means(g))["p"] for g in grids])
    assert np.mean(p < 0.05) > 0.7


def test_holm_over_models_and_regions_holds_the_familywise_level():
    """Family: 4 models x 3 regions against one reference, none truly different; the regions
    of a case correlated (ET within TC within WT) and the models sharing the reference. The
    family-wise error rate with Holm stays at 0.05; without it, it is several times that."""
    rng = np.random.default_rng(11)
    reps, cases, models = 300, 25, 4
    case = rng.normal(0, 0.05, (reps, 1, cases, 1))  # one offset per case, shared by its regions
    reference = case + rng.normal(0, 0.03, (reps, 1, cases, 3))
    others = case + rng.normal(0, 0.03, (reps, models, cases, 3))
    p = np.array([[signed_rank(others[r, m, :, g] - reference[r, 0, :, g])["p"] for m in range(models)
                   for g in range(3)] for r in range(reps)])
    assert np.mean([min(holm(row)) < 0.05 for row in p]) <= 0.08
    assert np.mean(p.min(1) < 0.05) > 0.2


def test_pairs_not_every_run_has_are_left_out_and_counted(tmp_path, capsys):
    write_run(tmp_path / "imfuse", "imfuse")
    write_run(tmp_path / "mmformer", "mmformer", cases=CASES[:4])
    write_run(tmp_path / "uhved", "uhved", subsets=SUBSETS[1:])
    out = tmp_path / "cmp"
    assert script("compare").main(["--results", *(str(tmp_path / m) for m in PARAMS), "--savepath", str(out)]) == 0
    err = capsys.readouterr().err
    assert "left out 18 (case, subset) pairs" in err  # imfuse 18 - 8 = 10, uhved 12 - 8 = 4, mmformer 12 - 8 = 4
    md = (out / "comparison.md").read_text()
    assert "imfuse: 10 pairs (6 cases" in md and "case4" in md and "uhved: 4 pairs" in md
    assert {r["subset"] for r in read(out / "comparison.csv")} == set(SUBSETS[1:]) | {"mean"}
    tests = read(out / "significance.csv")
    assert {t["cases"] for t in tests} == {"4"}  # the cases of the 8 common pairs
    assert [(t["subset"], t["family_size"]) for t in tests if t["model"] == "uhved" and t["region"] == "ET"] == [
        ("mean", "6"), (SUBSETS[1], "12"), (SUBSETS[2], "12")]


def test_bad_folders_and_disjoint_runs_are_one_line(tmp_path, capsys):
    write_run(tmp_path / "imfuse", "imfuse")
    (tmp_path / "empty").mkdir()
    write_run(tmp_path / "other", "uhved", cases=["x1", "x2"])
    compare = script("compare").main
    assert compare(["--results", str(tmp_path / "imfuse"), str(tmp_path / "empty"), "--savepath", str(tmp_path / "o")]) == 1
    assert compare(["--results", str(tmp_path / "imfuse"), str(tmp_path / "other"), "--savepath", str(tmp_path / "o")]) == 1
    assert compare(["--results", str(tmp_path / "imfuse"), "--savepath", str(tmp_path / "o"), "--reference", "sfusion"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("compare.py: ") for line in err)
    assert "empty: not a test.py output (no run.json and results.csv" in err[0]
    assert "no (case, subset) pair in common" in err[1] and "imfuse: 6 cases" in err[1] and "uhved: 2 cases" in err[1]
    assert "reference 'sfusion' is none of the runs" in err[2]
    assert not (tmp_path / "o").exists()


def test_every_registered_model_has_a_small_configuration_the_cli_accepts():
    train_poly = script("train_poly")
    for name in list_models():
        flags = small_flags(name)
        assert shlex.split(shlex.join(flags)) == flags
        args = train_poly.parser().parse_args(["--datapath", "d", "--savepath", "s", *flags])
        config = json.loads(flags[flags.index("--model_args") + 1])
        assert args.model == name and args.model_args == config and args.batch_size == 2
        model = engine.build_model(name, **config)
        # no larger than the synthetic cases of make compare (64 x 64 x 48 before the brain crop)
        assert all(w <= size for w, size in zip(model.window, (64, 64, 48)))
