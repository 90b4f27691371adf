"""train_poly.py and test.py end to end on a tiny synthetic cohort, and the evaluation parts."""
import csv
import importlib.util
import os

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from data.datasets import EvalDataset
from data.preprocessing import preprocess_all
from data.synthetic import make_cohort
from models import build_model, to_reference
from utils.brats import SUBSET_NAMES, SUBSETS, parse_subsets
from utils.checkpoint import load_checkpoint, load_model
from utils.evaluation import evaluate, predict_subsets, summarize, uncrop
from utils.figures import case_figure, tumour_slice
from utils.inference import sliding_window

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
P = 32  # the smallest trainable patch: instance norm needs a bottleneck of 2^3
TINY = ["--patch_size", str(P), "--width", "2", "--dim", "8", "--heads", "1", "--mlp_dim", "16",
        "--interleaved_tokenization", "--mamba_skip"]


def script(name):
    """A top-level script (train_poly.py, test.py) as a module."""
    spec = importlib.util.spec_from_file_location(f"script_{name}", os.path.join(ROOT, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """(raw folder, preprocessed folder) of 6 synthetic 40x36x32 cases (4 train, 1 val, 1 test)."""
    base = tmp_path_factory.mktemp("cohort")
    raw, npy = str(base / "raw"), str(base / "npy")
    make_cohort(raw, 6, seed=3, size=(40, 36, 32), workers=1)
    preprocess_all(raw, npy, min_size=P, progress=False)
    return raw, npy


def train(npy, save, *extra):
    argv = ["--datapath", npy, "--savepath", str(save), "--num_workers", "0", "--no_progress",
            "--lr", "1e-3"] + TINY + list(extra)
    return script("train_poly").main(argv)


def test_two_iterations_write_checkpoints_and_logs(cohort, tmp_path):
    assert train(cohort[1], tmp_path, "--num_epochs", "1", "--iter_per_epoch", "2") == 0
    assert sorted(os.listdir(tmp_path)) == ["best.pth", "model_last.pth", "summary"]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "summary"))
    ckpt = torch.load(tmp_path / "model_last.pth", weights_only=True)
    assert ckpt["model"] == "imfuse" and ckpt["epoch"] == 0 and ckpt["step"] == 2
    assert ckpt["config"] == {"num_classes": 4, "patch_size": P, "interleaved": True, "mamba_skip": True,
                              "width": 2, "dim": 8, "heads": 1, "mlp_dim": 16}
    assert 0 <= ckpt["val_Dice_best"] <= 1 and ckpt["seed"] == 999
    assert len(ckpt["optim_dict"]["state"]) == len(list(build_model("imfuse", **ckpt["config"]).parameters()))
    model, _ = load_model(str(tmp_path / "best.pth"))
    assert model.patch_size == P and model.interleaved and model.mamba_skip and not model.training


def test_resume_continues_at_the_next_epoch_as_the_uninterrupted_run(cohort, tmp_path, capsys):
    args = ["--iter_per_epoch", "2", "--val_file", ""]
    assert train(cohort[1], tmp_path / "straight", "--num_epochs", "2", *args) == 0
    assert train(cohort[1], tmp_path / "split", "--num_epochs", "1", *args) == 0
    first = load_checkpoint(str(tmp_path / "split" / "model_last.pth"))
    capsys.readouterr()
    assert train(cohort[1], tmp_path / "split", "--num_epochs", "2", "--resume",
                 str(tmp_path / "split" / "model_last.pth"), *args) == 0
    out = capsys.readouterr().out
    assert "epoch 2/2" in out and "epoch 1/2" not in out
    a = load_checkpoint(str(tmp_path / "straight" / "model_last.pth"))
    b = load_checkpoint(str(tmp_path / "split" / "model_last.pth"))
    assert a["epoch"] == b["epoch"] == 1 and a["step"] == b["step"] == 4
    assert first["epoch"] == 0 and any(not torch.equal(first["state_dict"][k], b["state_dict"][k])
                                       for k in b["state_dict"])  # the resumed epoch trained
    for k in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][k], b["state_dict"][k], rtol=1e-5, atol=1e-6)
    for i, s in a["optim_dict"]["state"].items():
        torch.testing.assert_close(s["exp_avg_sq"], b["optim_dict"]["state"][i]["exp_avg_sq"],
                                   rtol=1e-4, atol=1e-9)
    assert not os.path.exists(tmp_path / "straight" / "best.pth")  # no validation asked


def test_training_refuses_bad_input_in_one_line(cohort, tmp_path, capsys):
    assert train(cohort[1], tmp_path, "--resume", str(tmp_path / "nothing.pth")) == 1
    assert train(str(tmp_path / "missing"), tmp_path) == 1
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    assert train(cohort[1], tmp_path, "--resume", str(junk)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("train_poly.py: ") for line in err)
    assert "nothing.pth: no such checkpoint" in err[0] and "junk.pth" in err[2]
    with pytest.raises(SystemExit):
        script("train_poly").main(["--datapath", cohort[1], "--savepath", str(tmp_path), "--model",
                                   "mmformer", "--mamba_skip"])


def run_test(npy, ckpt, out, *extra):
    return script("test").main(["--datapath", npy, "--resume", str(ckpt), "--savepath", str(out),
                                "--no_progress"] + list(extra))


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_test_script_writes_the_tables_figures_and_native_label_maps(cohort, tmp_path):
    raw, npy = cohort
    assert train(npy, tmp_path / "run", "--num_epochs", "1", "--iter_per_epoch", "1") == 0
    out = tmp_path / "eval"
    assert run_test(npy, tmp_path / "run" / "best.pth", out, "--save_nifti", "--batch_size", "3") == 0
    case = read_csv(os.path.join(npy, "splits", "test15splits.csv"))[0]["case"]
    rows = read_csv(out / "results.csv")
    assert [r["subset"] for r in rows] == list(SUBSET_NAMES) and {r["case"] for r in rows} == {case}
    assert list(rows[0]) == ["case", "subset", "mask", "WT", "TC", "ET", "ETpp", "HD95_WT", "HD95_TC", "HD95_ET"]
    summary = read_csv(out / "summary.csv")
    assert [s["subset"] for s in summary] == list(SUBSET_NAMES) + ["mean"]
    mean_wt = np.mean([float(r["WT"]) for r in rows])
    assert float(summary[-1]["WT"]) == pytest.approx(mean_wt, abs=1e-4)
    md = (out / "summary.md").read_text()
    assert md.count("\n| ") == 17 and "FLAIR+T1c+T1+T2" in md
    png = Image.open(out / "figures" / f"{case}.png")
    vol = np.load(os.path.join(npy, "vol", f"{case}_vol.npy"), mmap_mode="r")
    scale = -(-160 // vol.shape[0])  # panels at least 160 pixels wide, 4 x 4 of them
    assert png.format == "PNG" and png.size == (4 * scale * vol.shape[0], 4 * (scale * vol.shape[1] + 14))
    ref = nib.load(os.path.join(raw, case, f"{case}-seg.nii.gz"))
    for name in SUBSET_NAMES:
        img = nib.load(out / "predictions" / name / f"{case}.nii.gz")
        assert img.shape == ref.shape and np.allclose(img.affine, ref.affine)
        assert img.get_data_dtype() == np.uint8 and set(np.unique(img.dataobj)) <= {0, 1, 2, 3}
    assert not [f for _, _, files in os.walk(out) for f in files if ".tmp" in f]


def test_an_original_checkpoint_goes_through_test_py(cohort, tmp_path, capsys):
    npy = cohort[1]
    torch.manual_seed(0)
    model = build_model("imfuse", patch_size=P, interleaved=True, mamba_skip=True).eval()
    to_reference(model, str(tmp_path / "model_best.pth"))
    flags = ["--patch_size", str(P), "--interleaved_tokenization", "--mamba_skip", "--subsets", "T1c,FLAIR+T2"]
    assert run_test(npy, tmp_path / "model_best.pth", tmp_path / "out", *flags) == 0
    rows = read_csv(tmp_path / "out" / "results.csv")
    expected = evaluate(model, EvalDataset(npy, os.path.join(npy, "splits", "test15splits.csv")),
                        [SUBSETS[1], SUBSETS[8]], progress=False)
    assert [r["subset"] for r in rows] == ["T1c", "FLAIR+T2"]
    for row, exp in zip(rows, expected):
        assert float(row["WT"]) == pytest.approx(exp["WT"], abs=1e-4)
        assert float(row["HD95_ET"]) == pytest.approx(exp["HD95_ET"], abs=1e-4)
    capsys.readouterr()
    assert run_test(npy, tmp_path / "model_best.pth", tmp_path / "bad", "--patch_size", str(P)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model_best.pth" in err[0] and "mamba_skip=True" in err[0]
    assert not os.path.exists(tmp_path / "bad" / "results.csv")


def test_predict_subsets_equals_a_full_forward_per_subset():
    torch.manual_seed(1)
    model = build_model("imfuse", patch_size=P, width=2, dim=8, heads=1, mlp_dim=16, mamba_skip=True).eval()
    volume = torch.randn(4, 36, 32, 40)  # 2 x 1 x 2 windows
    subsets = [SUBSETS[0], SUBSETS[9], SUBSETS[14]]
    shared = predict_subsets(model, volume, subsets, batch_size=2)
    with torch.no_grad():
        for s, mask in enumerate(subsets):
            m = torch.tensor([mask])
            full = sliding_window(volume, P, lambda w: model(w, m.expand(len(w), -1))[:, None])
            torch.testing.assert_close(shared[s], full[0], rtol=1e-4, atol=1e-5)


def test_summary_means_by_hand():
    rows = [{"case": c, "subset": s, "mask": s, "WT": wt, "ET": et}
            for c, s, wt, et in [("a", "T1", 0.2, 0.0), ("b", "T1", 0.4, 1.0), ("a", "T2", 0.9, 0.5),
                                 ("b", "T2", 0.7, 0.5)]]
    summary = summarize(rows)
    assert [s["subset"] for s in summary] == ["T1", "T2", "mean"]
    assert summary[0]["WT"] == pytest.approx(0.3) and summary[1]["WT"] == pytest.approx(0.8)
    assert summary[2]["WT"] == pytest.approx(0.55) and summary[2]["ET"] == pytest.approx(0.5)
    assert summary[2]["cases"] == 2 and summary[0]["cases"] == 2


def test_uncrop_puts_the_label_back_at_the_crop_box():
    meta = {"original_shape": [10, 12, 8], "crop_box": [[2, 6], [3, 12], [0, 5]]}
    cropped = np.arange(4 * 9 * 5).reshape(4, 9, 5).astype(np.uint8)
    full = uncrop(cropped, meta)
    assert full.shape == (10, 12, 8) and np.array_equal(full[2:6, 3:12, 0:5], cropped)
    assert full.sum() == cropped.sum()


def test_parse_subsets():
    assert parse_subsets("all") == list(SUBSETS)
    assert parse_subsets("t2+flair, T1c") == [SUBSETS[8], SUBSETS[1]]
    for bad in ("T1c+PD", "", ","):
        with pytest.raises(ValueError):
            parse_subsets(bad)


def test_case_figure_uses_the_largest_tumour_slice(tmp_path):
    target = np.zeros((20, 20, 10), np.uint8)
    target[5:10, 5:10, 3] = 2
    target[4:12, 4:12, 7] = 1
    labels = np.stack([target, np.zeros_like(target)])
    assert tumour_slice(target, labels) == 7
    assert tumour_slice(np.zeros_like(target), labels[::-1]) == 7
    z = case_figure(str(tmp_path / "c.png"), np.random.rand(20, 20, 10), target, labels, ["A", "B"])
    img = Image.open(tmp_path / "c.png")
    assert z == 7 and img.size == (3 * 160, 160 + 14)
