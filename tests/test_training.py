"""train_poly.py and test.py end to end on a tiny synthetic cohort, and the evaluation parts."""
import csv
import os
import shutil
import signal
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from data.datasets import EvalDataset
from data.preprocessing import uncrop
from engine import build_model, training
from engine.checkpoint import load_checkpoint, load_model, save_checkpoint
from engine.evaluation import evaluate, predict_subsets, summarize
from engine.inference import sliding_window
from helpers import P, ROOT, TINY, TINY_CONFIG, script
from models import to_reference
from models.blocks import MultiEncoderNet
from utils.brats import SUBSET_NAMES, SUBSETS, parse_subsets
from utils.figures import case_figure, tumour_slice


def train(npy, save, *extra):
    argv = ["--datapath", npy, "--savepath", str(save), "--num_workers", "0", "--no_progress",
            "--lr", "1e-3"] + TINY + list(extra)
    return script("train_poly").main(argv)


def test_two_iterations_write_checkpoints_and_logs(tiny_cohort, tmp_path):
    assert train(tiny_cohort[1], tmp_path, "--num_epochs", "1", "--iter_per_epoch", "2") == 0
    assert sorted(os.listdir(tmp_path)) == ["best.pth", "model_last.pth", "summary"]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "summary"))
    ckpt = torch.load(tmp_path / "model_last.pth", weights_only=True)
    assert ckpt["model"] == "imfuse" and ckpt["epoch"] == 0 and ckpt["step"] == 2
    assert ckpt["config"] == {"num_classes": 4, "first_skip": False, "num_modalities": 4, "dropout": 0.1,
                              "backend": None, **TINY_CONFIG}  # every constructor argument
    assert ckpt["recipe"]["optimizer"] == "radam" and ckpt["recipe"]["lr"] == 1e-3  # --lr 1e-3
    assert 0 <= ckpt["val_Dice_best"] <= 1 and ckpt["seed"] == 999
    assert len(ckpt["optim_dict"]["state"]) == len(list(build_model("imfuse", **ckpt["config"]).parameters()))
    model, _ = load_model(str(tmp_path / "best.pth"))
    assert model.patch_size == P and model.interleaved and model.mamba_skip and not model.training


def test_resume_continues_at_the_next_epoch_as_the_uninterrupted_run(tiny_cohort, tmp_path, capsys):
    args = ["--iter_per_epoch", "2", "--val_file", ""]
    assert train(tiny_cohort[1], tmp_path / "straight", "--num_epochs", "2", *args) == 0
    assert train(tiny_cohort[1], tmp_path / "split", "--num_epochs", "1", *args) == 0
    first = load_checkpoint(str(tmp_path / "split" / "model_last.pth"))
    capsys.readouterr()
    assert train(tiny_cohort[1], tmp_path / "split", "--num_epochs", "2", "--resume",
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


def test_training_refuses_bad_input_in_one_line(tiny_cohort, tmp_path, capsys):
    assert train(tiny_cohort[1], tmp_path, "--resume", str(tmp_path / "nothing.pth")) == 1
    assert train(str(tmp_path / "missing"), tmp_path) == 1
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    assert train(tiny_cohort[1], tmp_path, "--resume", str(junk)) == 1
    # each flag is valid alone; together the optimiser refuses them (Recipe.check, before any step)
    assert train(tiny_cohort[1], tmp_path, "--optimizer", "sgd", "--optimizer_args", '{"momentum": -1.0}') == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("train_poly.py: ") for line in err)
    assert "nothing.pth: no such checkpoint" in err[0] and "junk.pth" in err[2]
    assert "sgd with {'momentum': -1.0}: Invalid momentum" in err[3]
    with pytest.raises(SystemExit):
        script("train_poly").main(["--datapath", tiny_cohort[1], "--savepath", str(tmp_path), "--model",
                                   "mmformer", "--mamba_skip"])


def run_test(npy, ckpt, out, *extra):
    return script("test").main(["--datapath", npy, "--resume", str(ckpt), "--savepath", str(out),
                                "--no_progress"] + list(extra))


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_test_script_writes_the_tables_figures_and_native_label_maps(tiny_cohort, tmp_path):
    raw, npy = tiny_cohort
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
    assert float(summary[-1]["WT"]) == pytest.approx(mean_wt, rel=1e-12)
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


def test_an_original_checkpoint_goes_through_test_py(tiny_cohort, tmp_path, capsys):
    npy = tiny_cohort[1]
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
        # written at full precision: the same floats read back (rounding would make ties for the rank tests)
        assert float(row["WT"]) == pytest.approx(exp["WT"], rel=1e-12)
        assert float(row["HD95_ET"]) == pytest.approx(exp["HD95_ET"], rel=1e-12)
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
    full = uncrop(cropped, meta["original_shape"], meta["crop_box"])
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


def assert_same_run(a, b):
    """Two checkpoints hold the same weights, optimizer state, place and best score."""
    assert (a["epoch"], a["iteration"], a["step"]) == (b["epoch"], b["iteration"], b["step"])
    assert a["val_Dice_best"] == pytest.approx(b["val_Dice_best"], abs=1e-6)
    for k in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][k], b["state_dict"][k], rtol=1e-5, atol=1e-6)
    for i, s in a["optim_dict"]["state"].items():
        assert int(s["step"]) == int(b["optim_dict"]["state"][i]["step"])
        torch.testing.assert_close(s["exp_avg_sq"], b["optim_dict"]["state"][i]["exp_avg_sq"], rtol=1e-4, atol=1e-9)


def last(folder):
    return load_checkpoint(str(folder / "model_last.pth"))


@pytest.mark.parametrize("signal_in", [3, 4])  # iteration 1 of epoch 2; its last one (validation pending)
def test_a_signal_saves_after_the_iteration_and_the_resumed_run_is_the_uninterrupted_one(
        tiny_cohort, tmp_path, monkeypatch, capsys, signal_in):
    args = ["--num_epochs", "3", "--iter_per_epoch", "2"]
    assert train(tiny_cohort[1], tmp_path / "straight", *args) == 0
    calls, loss = [], MultiEncoderNet.loss

    def loss_then_signal(*a):
        calls.append(1)
        if len(calls) == signal_in:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss(*a)

    monkeypatch.setattr(MultiEncoderNet, "loss", loss_then_signal)
    assert train(tiny_cohort[1], tmp_path / "split", *args) == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handler removed
    ckpt = last(tmp_path / "split")
    assert (ckpt["epoch"], ckpt["iteration"], ckpt["step"]) == (0, signal_in - 2, signal_in)
    assert f"stopped by signal {int(signal.SIGTERM)} in epoch 2 after iteration {signal_in - 2}" in capsys.readouterr().out
    monkeypatch.undo()
    assert train(tiny_cohort[1], tmp_path / "split", *args, "--resume", str(tmp_path / "split" / "model_last.pth")) == 0
    assert_same_run(last(tmp_path / "straight"), last(tmp_path / "split"))
    assert_same_run(load_checkpoint(str(tmp_path / "straight" / "best.pth")),
                    load_checkpoint(str(tmp_path / "split" / "best.pth")))


@pytest.mark.parametrize("recipe", [
    ["--schedule", "poly_iteration", "--optimizer", "sgd", "--optimizer_args", '{"momentum": 0.9, "nesterov": true}',
     "--subset_weights", ",".join(["1"] * 14 + ["5"]), "--augmentations", "flip,rotation"],
    ["--schedule", "plateau", "--schedule_args", '{"patience": 0, "factor": 0.5}', "--optimizer", "adam",
     "--optimizer_args", '{"amsgrad": true}', "--foreground_oversampling", "0.5"]], ids=["poly_iteration", "plateau"])
def test_other_recipes_resume_as_the_uninterrupted_run(tiny_cohort, tmp_path, monkeypatch, recipe):
    """Stopped in the last iteration of epoch 2 (its validation, and the plateau step, wait for
    the resume); the resumed run takes the recipe from the checkpoint, no recipe flag given."""
    args = ["--num_epochs", "3", "--iter_per_epoch", "2"]
    assert train(tiny_cohort[1], tmp_path / "straight", *args, *recipe) == 0
    calls, loss = [], MultiEncoderNet.loss

    def loss_then_signal(*a):
        calls.append(1)
        if len(calls) == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss(*a)

    monkeypatch.setattr(MultiEncoderNet, "loss", loss_then_signal)
    assert train(tiny_cohort[1], tmp_path / "split", *args, *recipe) == 128 + signal.SIGTERM
    monkeypatch.undo()
    assert train(tiny_cohort[1], tmp_path / "split", "--resume", str(tmp_path / "split" / "model_last.pth")) == 0
    a, b = last(tmp_path / "straight"), last(tmp_path / "split")
    assert a["recipe"] == b["recipe"] and a["schedule"] == b["schedule"] and a["recipe"]["lr"] == 1e-3
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"]) == (2, 6)
    assert a["optim_dict"]["param_groups"] == b["optim_dict"]["param_groups"]
    for k in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][k], b["state_dict"][k], rtol=1e-5, atol=1e-6)
    for i, state in a["optim_dict"]["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(value, b["optim_dict"]["state"][i][key], rtol=1e-4, atol=1e-9)


def test_a_checkpoint_without_a_recipe_resumes_with_the_models_and_the_flags(tiny_cohort, tmp_path):
    """Checkpoints written before recipes were recorded: the model's recipe with the flags
    given, as then."""
    args = ["--num_epochs", "2", "--iter_per_epoch", "2", "--val_file", ""]
    assert train(tiny_cohort[1], tmp_path / "straight", *args) == 0
    assert train(tiny_cohort[1], tmp_path / "split", "--num_epochs", "1", *args[2:]) == 0
    ckpt = last(tmp_path / "split")
    del ckpt["recipe"], ckpt["schedule"]
    for group in ckpt["optim_dict"]["param_groups"]:
        del group["initial_lr"]
    save_checkpoint(str(tmp_path / "split" / "model_last.pth"), ckpt)
    assert train(tiny_cohort[1], tmp_path / "split", "--resume", str(tmp_path / "split" / "model_last.pth"), *args) == 0
    a, b = last(tmp_path / "straight"), last(tmp_path / "split")
    assert a["recipe"] == b["recipe"]
    for k in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][k], b["state_dict"][k], rtol=1e-5, atol=1e-6)


def test_sigterm_to_a_training_process_and_its_loader_workers(tiny_cohort, tmp_path):
    """The real thing: SIGTERM to the process group of train_poly.py (loader workers included)
    while it trains; it exits 143 with a checkpoint, and the resumed run finishes as the
    uninterrupted one."""
    args = ["--num_epochs", "4", "--iter_per_epoch", "2", "--val_file", ""]
    argv = [sys.executable, os.path.join(ROOT, "train_poly.py"), "--datapath", tiny_cohort[1], "--savepath",
            str(tmp_path / "split"), "--num_workers", "1", "--no_progress", "--lr", "1e-3"] + TINY + args
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "split" / "model_last.pth").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and "stopped by signal 15" in out
    stopped = last(tmp_path / "split")
    assert 0 <= stopped["epoch"] < 3 and stopped["step"] == 2 * (stopped["epoch"] + 1) + stopped["iteration"]
    assert train(tiny_cohort[1], tmp_path / "straight", *args) == 0
    assert train(tiny_cohort[1], tmp_path / "split", *args, "--resume", str(tmp_path / "split" / "model_last.pth")) == 0
    assert_same_run(last(tmp_path / "straight"), last(tmp_path / "split"))


def test_torchrun_trains_with_two_cpu_processes(tiny_cohort, tmp_path):
    save = tmp_path / "ddp"
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            os.path.join(ROOT, "train_poly.py"), "--datapath", tiny_cohort[1], "--savepath", str(save), "--device", "cpu",
            "--num_workers", "0", "--no_progress", "--num_epochs", "1", "--iter_per_epoch", "2"] + TINY
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "GLOO_SOCKET_IFNAME": "lo"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("epoch 1/1") == 1 and "on each of 2 processes" in proc.stdout  # rank 0 logs
    assert sorted(os.listdir(save)) == ["best.pth", "model_last.pth", "summary"]
    ckpt = last(save)
    assert (ckpt["epoch"], ckpt["step"]) == (0, 2) and not any(k.startswith("module.") for k in ckpt["state_dict"])
    # the validation Dice gathered over the two ranks equals one process's
    model, _ = load_model(str(save / "best.pth"))
    dice = training.validate(model, EvalDataset(tiny_cohort[1], os.path.join(tiny_cohort[1], "splits", "val15splits.csv")))
    assert ckpt["val_Dice_best"] == pytest.approx(sum(dice.values()) / 3, abs=1e-6)


def test_amp_trains_in_bf16_autocast_with_float32_weights(tiny_cohort, tmp_path):
    assert train(tiny_cohort[1], tmp_path, "--num_epochs", "1", "--iter_per_epoch", "1", "--val_file", "", "--amp") == 0
    ckpt = last(tmp_path)
    torch.manual_seed(999)
    initial = build_model("imfuse", **ckpt["config"]).state_dict()
    assert all(v.dtype == initial[k].dtype for k, v in ckpt["state_dict"].items())
    assert any(not torch.equal(v, initial[k]) for k, v in ckpt["state_dict"].items())


def test_the_validation_schedule_is_the_recipe_s_recorded_and_may_change_on_resume(tiny_cohort, tmp_path, capsys):
    args = ["--iter_per_epoch", "1", "--val_every", "2,3,5"]
    assert train(tiny_cohort[1], tmp_path, "--num_epochs", "4", *args) == 0
    out = capsys.readouterr().out.splitlines()
    validated = [line.split(":")[0] for line in out if line.startswith("epoch") and "validation Dice" in line]
    assert validated == ["epoch 2/4", "epoch 3/4", "epoch 4/4"]  # listed, and the last
    ckpt = last(tmp_path)
    assert ckpt["recipe"]["val_every"] == (2, 3, 5)
    assert train(tiny_cohort[1], tmp_path, "--num_epochs", "6", "--iter_per_epoch", "1", "--val_every", "6",
                 "--resume", str(tmp_path / "model_last.pth")) == 0
    out = capsys.readouterr().out
    assert "val_every 2,3,5 -> 6 by --val_every" in out and out.count("; validation Dice") == 1
    assert last(tmp_path)["recipe"]["val_every"] == 6


def test_a_step_with_non_finite_gradients_is_refused_in_one_line(tiny_cohort, tmp_path, monkeypatch, capsys):
    build = training.build_model

    def poisoned(spec, **config):  # one parameter's gradient turns NaN, the loss stays finite
        model = build(spec, **config)
        model.decoder.seg.bias.register_hook(lambda g: g * float("nan"))
        return model
    monkeypatch.setattr(training, "build_model", poisoned)
    assert train(tiny_cohort[1], tmp_path, "--num_epochs", "1", "--iter_per_epoch", "1", "--val_file", "") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "epoch 1, iteration 1: the gradient of decoder.seg.bias is not finite" in err[0]
    assert not (tmp_path / "model_last.pth").exists()


def test_finite_gradients_are_clipped_as_clip_grad_norm_clips_them():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 5)
    for net in (a, b):
        (net(x) ** 2).sum().backward()
    norm = torch.cat([p.grad.flatten() for p in a.parameters()]).norm()
    assert norm > 0.5
    training._finite_gradients(a, 0.5, "here", ["case"])
    torch.nn.utils.clip_grad_norm_(b.parameters(), 0.5)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    assert torch.cat([p.grad.flatten() for p in a.parameters()]).norm() == pytest.approx(0.5, rel=1e-5)


def test_a_truncated_case_file_is_one_line_in_train_and_test(tiny_cohort, tmp_path, capsys):
    npy = tmp_path / "npy"
    shutil.copytree(tiny_cohort[1], npy)
    case = EvalDataset(str(npy), os.path.join(npy, "splits", "test15splits.csv")).entries[0][0]
    vol = npy / "vol" / f"{case}_vol.npy"
    with open(vol, "r+b") as f:
        f.truncate(os.path.getsize(vol) // 2)
    assert train(str(npy), tmp_path / "run", "--num_epochs", "1", "--iter_per_epoch", "1", "--val_file", "",
                 "--train_file", os.path.join(npy, "splits", "test15splits.csv")) == 1
    save_checkpoint(str(tmp_path / "model.pth"), {"model": "imfuse", "config": TINY_CONFIG,
                                                  "state_dict": build_model("imfuse", **TINY_CONFIG).state_dict()})
    assert run_test(str(npy), tmp_path / "model.pth", tmp_path / "out") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(f"{case}_vol.npy: unreadable" in line for line in err)
    assert err[0].startswith("train_poly.py: ") and err[1].startswith("test.py: ")
    assert not (tmp_path / "out").exists()
