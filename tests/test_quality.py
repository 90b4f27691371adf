"""The expected-quality line of predict.py: the test-set Dice of the model's test.py results
for the subset of sequences a patient has (mean and 10th percentile per region, by hand), the
warning for a region that is unreliable without a missing sequence, and where the results are
looked for."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

from data.synthetic import make_cohort
from engine.checkpoint import save_checkpoint
from engine.comparison import ComparisonError
from engine.evaluation import RESULT_FIELDS
from engine.quality import expected_quality, find_results, quality_line
from helpers import TINY_CONFIG, script
from models import build_model
from utils.brats import SUBSETS, subset_name
from utils.io import write_csv

FLAIR, FLAIR_T1C, FLAIR_T2 = SUBSETS[3], SUBSETS[9], SUBSETS[8]
T2, T1C_T2 = SUBSETS[0], SUBSETS[4]
ET_FLAIR = [0.10, 0.20, 0.30, 0.25, 0.40]  # ET is poor from FLAIR alone ...
ET_FLAIR_T1C = [0.80, 0.70, 0.90, 0.85, 0.75]  # ... and good once T1c is there
ET_FLAIR_T2 = [0.15, 0.22, 0.31, 0.30, 0.42]  # T2 adds little


def write_run(folder, model, subsets):
    """A test.py output: run.json and results.csv with {subset mask: ET Dice per case} (WT
    0.9 and TC 0.6 + ET / 10 everywhere)."""
    os.makedirs(folder, exist_ok=True)
    rows = [{"case": f"case{c}", "subset": subset_name(mask), "mask": "", "WT": 0.9, "TC": 0.6 + et / 10,
             "ET": et, "ETpp": et, "HD95_WT": 1.0, "HD95_TC": 2.0, "HD95_ET": 3.0}
            for mask, values in subsets.items() for c, et in enumerate(values)]
    write_csv(os.path.join(folder, "results.csv"), rows, RESULT_FIELDS)
    with open(os.path.join(folder, "run.json"), "w") as f:
        json.dump({"model": model, "checkpoint": os.path.join(folder, "best.pth"), "parameters": 1}, f)
    return str(folder)


def p10_by_hand(values):
    """The 10th percentile by linear interpolation between order statistics: position 0.1 (n - 1)."""
    v = sorted(values)
    position = 0.1 * (len(v) - 1)
    low = int(position)
    return v[low] + (position - low) * (v[low + 1] - v[low])


def test_dice_for_the_subset_and_the_warning_without_t1c(tmp_path):
    run = find_results(write_run(tmp_path / "r", "imfuse", {FLAIR: ET_FLAIR, FLAIR_T1C: ET_FLAIR_T1C,
                                                           FLAIR_T2: ET_FLAIR_T2}), "imfuse")
    q = expected_quality(run, FLAIR, checkpoints=[str(tmp_path / "r" / "best.pth")])
    assert q["subset"] == "FLAIR" and q["cases"] == 5 and q["same_checkpoints"]
    assert q["dice"]["ET"]["mean"] == pytest.approx(sum(ET_FLAIR) / 5)
    assert q["dice"]["ET"]["p10"] == pytest.approx(0.10 + 0.4 * (0.20 - 0.10))
    assert q["dice"]["ET"]["p10"] == pytest.approx(p10_by_hand(ET_FLAIR))
    assert q["dice"]["WT"] == pytest.approx({"mean": 0.9, "p10": 0.9})
    # ET: 0.25 from FLAIR against 0.80 with T1c: warned; T2 (+0.02) and T1 (no results) are not;
    # TC moves by a tenth of ET's change (0.055 < 0.10): not warned
    assert len(q["warnings"]) == 1
    assert q["warnings"][0].startswith("ET is unreliable without T1c: test-set Dice 0.25 from FLAIR against 0.80")
    line = quality_line(q)
    assert "expected quality from FLAIR" in line and "ET 0.25 (10th percentile 0.14)" in line and "5 cases" in line
    with_t1c = expected_quality(run, FLAIR_T1C)
    assert with_t1c["warnings"] == [] and with_t1c["dice"]["ET"]["mean"] == pytest.approx(0.80)
    assert not with_t1c["same_checkpoints"] and "not of the checkpoint used" in quality_line(with_t1c)


def test_the_warning_compares_the_cases_both_subsets_have(tmp_path):
    """The fuller subset evaluated on the first two cases only: the comparison uses those two."""
    run = find_results(write_run(tmp_path / "r", "imfuse", {FLAIR: ET_FLAIR}), "imfuse")
    run["rows"] = {k: v for k, v in run["rows"].items()}
    for c, et in enumerate([0.25, 0.30]):  # +0.10 and +0.10 on case0 and case1
        run["rows"][(f"case{c}", "FLAIR+T1c")] = {"WT": 0.9, "TC": 0.6, "ET": et, "ETpp": et}
    q = expected_quality(run, FLAIR)
    assert q["warnings"] == ["ET is unreliable without T1c: test-set Dice 0.15 from FLAIR against 0.28 with T1c "
                             "added (2 cases)"]


def test_a_subset_without_results_and_results_of_another_model(tmp_path):
    folder = write_run(tmp_path / "r", "mmformer", {FLAIR: ET_FLAIR})
    assert find_results(folder, "imfuse") is None
    with pytest.raises(ComparisonError, match="results of a mmformer model, not of imfuse"):
        find_results(folder, "imfuse", required=True)
    assert find_results(str(tmp_path / "nothing"), "imfuse") is None
    q = expected_quality(find_results(folder, "mmformer"), T2)
    assert q["cases"] == 0 and q["dice"] == {} and "no T2 results" in quality_line(q)


@pytest.fixture(scope="module")
def patient(tmp_path_factory):
    """(folder with the T2 of one synthetic 40x36x32 case, tiny IM-Fuse checkpoint in a folder
    with test.py results that make ET unreliable without T1c)."""
    base = tmp_path_factory.mktemp("quality")
    make_cohort(str(base / "raw"), 1, seed=7, size=(40, 36, 32), workers=1)
    case = base / "raw" / os.listdir(base / "raw")[0]
    folder = base / "t2"
    folder.mkdir()
    for name in os.listdir(case):
        if name.endswith("-t2w.nii.gz"):
            shutil.copy(case / name, folder)
    torch.manual_seed(0)
    run = write_run(base / "run", "imfuse", {T2: ET_FLAIR, T1C_T2: ET_FLAIR_T1C})
    ckpt = os.path.join(run, "best.pth")
    save_checkpoint(ckpt, {"model": "imfuse", "config": TINY_CONFIG,
                           "state_dict": build_model("imfuse", **TINY_CONFIG).state_dict(), "epoch": 0})
    return str(folder), ckpt, write_run(base / "other", "mmformer", {T2: ET_FLAIR})


def test_predict_reports_the_expected_quality_of_the_checkpoints_results(patient, tmp_path, capsys):
    folder, ckpt, _ = patient
    out = tmp_path / "seg.nii.gz"
    assert script("predict").main(["--no_progress", "--resume", ckpt, "--input", folder, "--output", str(out)]) == 0
    err = capsys.readouterr().err.splitlines()
    line = next(x for x in err if "expected quality" in x)
    assert "expected quality from T2: test-set Dice WT 0.90" in line and "ET 0.25" in line
    assert any(x.startswith("predict.py: warning: ET is unreliable without T1c") for x in err)
    report = json.load(open(tmp_path / "seg.json"))
    q = report["expected_quality"]
    assert q["subset"] == "T2" and q["same_checkpoints"] and q["dice"]["ET"]["mean"] == pytest.approx(0.25)
    assert any("without T1c" in w for w in q["warnings"])


def test_predict_refuses_reference_results_of_another_model_in_one_line(patient, tmp_path, capsys):
    folder, ckpt, other = patient
    code = script("predict").main(["--no_progress", "--resume", ckpt, "--input", folder,
                                   "--output", str(tmp_path / "seg.nii.gz"), "--reference_results", other])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "--reference_results" in err[0] and "mmformer" in err[0]
    assert not os.path.exists(tmp_path / "seg.nii.gz")
