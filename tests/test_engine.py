"""The engine with any model of the contract: a researcher's own model (tests/own_model.py:
region outputs, anisotropic window, two-part loss, its own recipe) through train_poly.py,
test.py and predict.py; recipes from flags and checkpoints; the region-to-label rule; the
evaluation of models without encode/decode; the package layers."""
import ast
import csv
import glob
import os

import nibabel as nib
import numpy as np
import pytest
import torch

from data.datasets import EvalDataset
from data.preprocessing import read_meta
from engine.checkpoint import load_checkpoint
from engine.evaluation import predict_subsets
from engine.inference import sliding_window
from engine.models import ModelError, model_class
from helpers import ROOT, script
from models import list_models
from own_model import TinyRegionNet
from utils.brats import SUBSETS, to_labels
from utils.metrics import brats_metrics

OWN = os.path.join(ROOT, "tests", "own_model.py") + ":TinyRegionNet"


def train(npy, save, *extra):
    return script("train_poly").main(["--datapath", npy, "--savepath", str(save), "--num_workers", "0",
                                      "--no_progress"] + [str(a) for a in extra])


def one_line(capsys, script_name, *needles):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{script_name}: "), err
    assert all(n in err[0] for n in needles), err[0]


def region_rule(probs):
    """BraTS rule written out with np.select over (3, ...) WT, TC, ET probabilities."""
    wt, tc, et = probs > 0.5
    return np.select([et, tc, wt], [3, 1, 2], 0)


def test_own_model_trains_with_its_recipe_a_flag_overrides_and_the_resume_keeps_it(tiny_cohort, tmp_path, capsys):
    npy = tiny_cohort[1]
    assert train(npy, tmp_path, "--model", OWN, "--num_epochs", "1", "--lr", "2e-3") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("recipe (TinyRegionNet's recipe with --lr, --num_epochs from the command line): "
                             "optimizer=adam optimizer_args={'amsgrad': True} lr=0.002 weight_decay=1e-05 "
                             "schedule=cosine")
    assert "window 32x24x16" in out[1] and "2 iterations per epoch" in out[1]
    assert "bce" in out[2] and "dice" in out[2] and "validation Dice" in out[2]
    ckpt = load_checkpoint(str(tmp_path / "model_last.pth"))
    expected = TinyRegionNet.recipe.replace(lr=2e-3, num_epochs=1)
    assert ckpt["model"] == OWN and ckpt["recipe"] == expected.as_dict()
    assert (ckpt["epoch"], ckpt["step"]) == (0, 2)
    group = ckpt["optim_dict"]["param_groups"][0]
    assert group["amsgrad"] and group["weight_decay"] == 1e-5 and group["lr"] == 2e-3  # cosine at epoch 0
    assert all("max_exp_avg_sq" in s for s in ckpt["optim_dict"]["state"].values())  # Adam with amsgrad

    # the resumed run keeps the recorded recipe (lr 2e-3, not the model's 1e-3); --num_epochs may grow
    last = str(tmp_path / "model_last.pth")
    assert train(npy, tmp_path, "--model", OWN, "--resume", last, "--num_epochs", "2") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"recipe (the recipe of {last}, num_epochs 1 -> 2 by --num_epochs): ")
    ckpt = load_checkpoint(last)
    assert ckpt["recipe"] == expected.replace(num_epochs=2).as_dict() and (ckpt["epoch"], ckpt["step"]) == (1, 4)
    assert ckpt["optim_dict"]["param_groups"][0]["lr"] == pytest.approx(2e-3 * 0.5)  # cosine at epoch 1 of 2

    # a flag that contradicts the recorded recipe, and a checkpoint whose model is not named
    assert train(npy, tmp_path, "--model", OWN, "--resume", last, "--lr", "5e-3") == 1
    one_line(capsys, "train_poly.py", "recipe has lr=0.002", "only --num_epochs and --val_every may change")
    assert train(npy, tmp_path, "--resume", last) == 1
    one_line(capsys, "train_poly.py", "is not part of this project", f"--model {OWN}")
    assert load_checkpoint(last)["step"] == 4  # refused runs wrote nothing


def test_own_model_evaluates_through_test_py(tiny_cohort, tmp_path, capsys):
    npy = tiny_cohort[1]
    assert train(npy, tmp_path / "run", "--model", OWN, "--num_epochs", "1", "--val_file", "") == 0
    ckpt = str(tmp_path / "run" / "model_last.pth")
    argv = ["--datapath", npy, "--resume", ckpt, "--savepath", str(tmp_path / "out"), "--no_progress",
            "--subsets", "T1c,FLAIR+T1c+T1+T2"]
    assert script("test").main(argv) == 1  # the checkpoint does not import code on its own
    one_line(capsys, "test.py", "model_last.pth", f"--model {OWN}")
    assert not (tmp_path / "out").exists()
    assert script("test").main(argv + ["--model", OWN]) == 0
    with open(tmp_path / "out" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    # independently: the network on the zeroed absent modalities, window by window, the BraTS rule
    model = TinyRegionNet()
    model.load_state_dict(load_checkpoint(ckpt)["state_dict"])
    model.eval()
    sample = EvalDataset(npy, os.path.join(npy, "splits", "test15splits.csv"))[0]
    spacing = read_meta(npy, sample["name"])["spacing"]
    for row, mask in zip(rows, (SUBSETS[1], SUBSETS[14])):
        m = torch.tensor([mask])
        image = sample["image"] * m[0, :, None, None, None]
        with torch.no_grad():
            probs = sliding_window(image, (32, 24, 16), lambda w: model(w, m.expand(len(w), -1))[:, None])[0]
        want = brats_metrics(region_rule(probs.numpy()), sample["label"].numpy(), spacing)
        for key in ("WT", "TC", "ET", "HD95_WT"):
            assert float(row[key]) == pytest.approx(want[key], abs=1e-4)


def test_own_model_predicts_through_predict_py(tiny_cohort, tmp_path, capsys):
    raw, npy = tiny_cohort
    assert train(npy, tmp_path / "run", "--model", OWN, "--num_epochs", "1", "--val_file", "") == 0
    case = sorted(glob.glob(os.path.join(raw, "*")))[0]
    t1 = glob.glob(os.path.join(case, "*-t1n.nii.gz"))[0]
    out = tmp_path / "seg.nii.gz"
    argv = ["--resume", str(tmp_path / "run" / "model_last.pth"), "--flair", glob.glob(os.path.join(case, "*-t2f.nii.gz"))[0],
            "--t1", t1, "--output", str(out), "--probabilities", "--no_progress", "--model", OWN]
    capsys.readouterr()
    assert script("predict").main(argv) == 0
    err = capsys.readouterr().err
    assert "missing T1c, T2" in err and "seg_probabilities.nii.gz holds WT, TC, ET (sigmoid)" in err
    ref, seg = nib.load(t1), nib.load(out)
    prob = nib.load(tmp_path / "seg_probabilities.nii.gz")
    assert seg.shape == ref.shape and prob.shape == ref.shape + (3,) and np.allclose(prob.affine, ref.affine)
    assert b"WT, TC, ET (sigmoid)" in prob.header["descrip"].item()
    p = np.moveaxis(np.asarray(prob.dataobj), -1, 0)
    assert np.array_equal(np.asarray(seg.dataobj), region_rule(p))
    assert 0 <= p.min() and p.max() <= 1


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_region_to_label_rule_against_hand_made_maps(lib):
    #          WT    TC    ET    -> label
    voxels = [(0.6, 0.2, 0.1, 2),  # ED: whole tumour only
              (0.9, 0.7, 0.2, 1),  # NCR: core without enhancement
              (0.9, 0.8, 0.6, 3),  # ET
              (0.4, 0.3, 0.2, 0),  # background
              (0.4, 0.6, 0.1, 1),  # core above 0.5 is NCR even where WT is not
              (0.2, 0.1, 0.9, 3),  # ET wins whatever the others say
              (0.5, 0.5, 0.5, 0)]  # exactly 0.5 is not above the threshold
    probs = np.array([v[:3] for v in voxels], np.float32).T.reshape(3, 7, 1, 1)
    want = np.array([v[3] for v in voxels]).reshape(7, 1, 1)
    batched = np.stack([probs, probs[:, ::-1]])  # (2, 3, 7, 1, 1): channels on axis 1
    if lib == "torch":
        probs, batched = torch.from_numpy(probs), torch.from_numpy(batched.copy())
    assert np.array_equal(np.asarray(to_labels(probs, "regions")), want)
    assert np.array_equal(np.asarray(to_labels(batched, "regions", axis=1)), np.stack([want, want[::-1]]))
    classes = np.zeros((4, 3)) + np.eye(4)[:, [2, 0, 3]]
    assert np.asarray(to_labels(classes if lib == "numpy" else torch.from_numpy(classes), "classes")).tolist() == [2, 0, 3]


def test_a_model_without_encode_gets_one_forward_per_subset_with_absent_images_zeroed():
    torch.manual_seed(0)
    model = TinyRegionNet(window=(16, 8, 12)).eval()
    volume = torch.randn(4, 20, 10, 13)
    subsets = [SUBSETS[1], SUBSETS[6], SUBSETS[14]]
    out = predict_subsets(model, volume, subsets, batch_size=3)
    assert out.shape == (3, 3, 20, 10, 13)
    with torch.no_grad():
        for s, mask in enumerate(subsets):
            m = torch.tensor([mask])
            want = sliding_window(volume * m[0, :, None, None, None], (16, 8, 12),
                                  lambda w: model(w, m.expand(len(w), -1))[:, None])[0]
            torch.testing.assert_close(out[s], want)

    class Peeking(TinyRegionNet):  # ignores the mask: only the engine's zeroing hides absent images
        def forward(self, x, mask):
            return super().forward(x, torch.ones_like(mask))

    peeking = Peeking(window=(16, 8, 12)).eval()
    peeking.load_state_dict(model.state_dict())
    torch.testing.assert_close(predict_subsets(peeking, volume, subsets), out)

    class WrongChannels(TinyRegionNet):
        output_kind = "classes"

    with pytest.raises(ValueError, match="outputs 3 channels; its output kind 'classes' has 4"):
        predict_subsets(WrongChannels(window=(16, 8, 12)).eval(), volume, subsets)


def test_help_lists_every_registered_model(capsys):
    with pytest.raises(SystemExit):
        script("train_poly").main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert list_models() and f"registered model ({', '.join(list_models())};" in text
    assert "path/to/file.py:ClassName" in text


def test_a_model_outside_the_contract_is_one_line(tiny_cohort, tmp_path, capsys):
    (tmp_path / "bad_model.py").write_text(
        "import torch.nn as nn\n"
        "from utils.recipe import Recipe\n"
        "class NoLoss(nn.Module):\n"
        "    window, output_kind, recipe = (32, 32, 32), 'regions', Recipe()\n"
        "class BadWindow(NoLoss):\n"
        "    window = 32\n"
        "    def loss(self, outputs, batch):\n"
        "        return 0, {}\n")
    for cls, needle in (("NoLoss", "no `loss(outputs, batch)` method"), ("BadWindow", "`window` must be a 3-tuple")):
        assert train(tiny_cohort[1], tmp_path / "run", "--model", f"{tmp_path}/bad_model.py:{cls}") == 1
        one_line(capsys, "train_poly.py", f"bad_model.py:{cls} does not follow the model contract", needle)
    for spec in (f"{tmp_path}/bad_model.py:Missing", f"{tmp_path}/none.py:X", "no_such_module:X", "unet3000"):
        with pytest.raises(SystemExit):
            train(tiny_cohort[1], tmp_path / "run", "--model", spec)
        assert spec.split(":")[0].split("/")[-1] in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_models_by_module_name_and_their_failures():
    assert model_class("own_model:TinyRegionNet") is TinyRegionNet  # tests/ is on sys.path here
    with pytest.raises(ModelError, match="importing own_model_nowhere failed"):
        model_class("own_model_nowhere:X")
    with pytest.raises(ModelError, match="defines no nn.Module subclass SUBSET_WEIGHTS"):
        model_class("own_model:SUBSET_WEIGHTS")


def test_a_loss_outside_the_contract_and_a_window_flag(tiny_cohort, tmp_path, capsys):
    (tmp_path / "float_loss.py").write_text(
        "from own_model import TinyRegionNet\n"
        "class FloatLoss(TinyRegionNet):\n"
        "    def loss(self, logits, batch):\n"
        "        return logits.mean().item(), {}\n")
    assert train(tiny_cohort[1], tmp_path / "run", "--model", f"{tmp_path}/float_loss.py:FloatLoss") == 1
    one_line(capsys, "train_poly.py", "float_loss.py:FloatLoss: loss(outputs, batch) must return")
    assert train(tiny_cohort[1], tmp_path / "ok", "--model", OWN, "--window", "16", "16", "8", "--num_epochs", "1",
                 "--val_file", "") == 0
    assert "window 16x16x8" in capsys.readouterr().out
    assert load_checkpoint(str(tmp_path / "ok" / "model_last.pth"))["config"] == {"window": (16, 16, 8), "width": 4}


# package -> packages it must not import (utils/ nothing of the project; models/ and data/ only
# utils/; competitors/ models/ and utils/; the engine no script)
FORBIDDEN = {"utils": {"data", "models", "competitors", "engine"}, "models": {"data", "competitors", "engine"},
             "data": {"models", "competitors", "engine"}, "competitors": {"data", "engine"},
             "engine": {"train_poly", "test", "predict", "preprocess"}}


def test_lower_layers_never_import_upper_ones():
    for package, forbidden in FORBIDDEN.items():
        for path in glob.glob(os.path.join(ROOT, package, "**", "*.py"), recursive=True):
            tree = ast.parse(open(path).read())
            for node in ast.walk(tree):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
                for name in names:
                    assert name.split(".")[0] not in forbidden, f"{os.path.relpath(path, ROOT)} imports {name}"
