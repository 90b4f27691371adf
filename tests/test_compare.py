"""compare.py on hand-made test.py output folders of three fake models."""
import csv
import json
import shlex
import zlib

import numpy as np
import pytest
from PIL import Image
from scipy import stats

import engine
from engine.comparison import bootstrap_interval, holm
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
    return {region: round(float(np.clip(base + rng.normal(0, 0.05) - 0.1 * k, 0, 1)), 4)
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
            assert float(r[m]) == pytest.approx(means[m], abs=1e-4)
        assert r["best"] == max(means, key=means.get)
    wt = [r for r in table if r["region"] == "WT"]
    assert float(wt[-1]["imfuse"]) == pytest.approx(np.mean([float(r["imfuse"]) for r in wt[:-1]]), abs=1e-4)
    md = (out / "comparison.md").read_text()
    assert md.count("**") >= 2 * 4 * 4  # one marked value per row: 4 regions x (3 subsets + mean)

    tests = read(out / "significance.csv")
    assert [(t["model"], t["region"]) for t in tests] == [(m, g) for g in ("WT", "TC", "ET") for m in ("mmformer", "uhved")]
    keys = [(c, s) for s in SUBSETS for c in CASES]
    for region in ("WT", "TC", "ET"):
        ref = np.array([rows["imfuse"][k][region] for k in keys])
        ps = []
        for m in ("mmformer", "uhved"):
            diff = np.array([rows[m][k][region] for k in keys]) - ref
            row = next(t for t in tests if t["model"] == m and t["region"] == region)
            assert float(row["p"]) == pytest.approx(stats.wilcoxon(diff).pvalue, rel=1e-3, abs=1e-4)
            assert float(row["median_diff"]) == pytest.approx(np.median(diff), abs=1e-4)
            assert float(row["ci_low"]) <= float(row["mean_diff"]) <= float(row["ci_high"])
            ps.append(stats.wilcoxon(diff).pvalue)
        small, large = sorted(ps)  # Holm by hand for two p-values
        want = {small: min(1, 2 * small), large: max(min(1, 2 * small), min(1, large))}
        for m, p in zip(("mmformer", "uhved"), ps):
            row = next(t for t in tests if t["model"] == m and t["region"] == region)
            assert float(row["p_holm"]) == pytest.approx(want[p], rel=1e-3, abs=1e-4)
    models = read(out / "models.csv")
    assert [int(r["parameters_in_use"]) for r in models] == list(PARAMS.values())
    assert float(models[0]["HD95_ET"]) == 7.0 and float(models[0]["seconds_per_case"]) == 12.5
    for name in ("comparison.png", "subsets.png"):
        with Image.open(out / name) as png:
            assert png.format == "PNG" and png.size[0] > 300
    assert "Paired tests against imfuse" in capsys.readouterr().out


def test_holm_and_bootstrap_by_hand():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.001]) == pytest.approx([0.5, 0.002])
    diff = np.array([0.1, 0.1, -0.2, 0.3])
    a = bootstrap_interval(diff, ["a", "a", "b", "c"], seed=1)
    assert a == bootstrap_interval(diff, ["a", "a", "b", "c"], seed=1)  # seeded
    assert -0.2 - 1e-9 <= a[0] <= a[1] <= 0.3 + 1e-9
    assert bootstrap_interval(np.full(4, 0.05), ["a", "b", "c", "d"]) == pytest.approx((0.05, 0.05))


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
    assert {r["pairs"] for r in read(out / "significance.csv")} == {"8"}


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
