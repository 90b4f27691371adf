"""predict.py: one patient's scans with sequences missing, in and out of the native grid,
and its refusals."""
import os
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

from data.datasets import case_arrays
from data.patient import load_patient, modality_files, modality_of
from data.preprocessing import CaseError, preprocess_case, read_meta, uncrop
from data.synthetic import make_cohort
from engine.checkpoint import save_checkpoint
from engine.evaluation import predict_subsets
from helpers import TINY_CONFIG as CONFIG
from helpers import P, script
from models import build_model
from utils.brats import MODALITY_SUFFIXES


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """(case folder of one synthetic 40x36x32 case, checkpoint of a tiny random IM-Fuse)."""
    base = tmp_path_factory.mktemp("patient")
    make_cohort(str(base / "raw"), 1, seed=5, size=(40, 36, 32), workers=1)
    torch.manual_seed(0)
    model = build_model("imfuse", **CONFIG)
    ckpt = str(base / "model.pth")
    save_checkpoint(ckpt, {"model": "imfuse", "config": CONFIG, "state_dict": model.state_dict(), "epoch": 0})
    return str(base / "raw" / os.listdir(base / "raw")[0]), ckpt


def patient_folder(case_dir, dest, keep):
    """A copy of the case folder with only the modality files of the suffixes in `keep`."""
    os.makedirs(dest)
    for name in os.listdir(case_dir):
        if any(name.endswith(f"-{s}.nii.gz") for s in keep):
            shutil.copy(os.path.join(case_dir, name), dest)
    return str(dest)


def predict(*argv):
    return script("predict").main(["--no_progress"] + [str(a) for a in argv])


@pytest.mark.parametrize("keep", [("t2f", "t1c", "t2w"), ("t1n",)])
def test_missing_sequences_give_the_training_pipeline_result_in_the_native_grid(case, tmp_path, keep, capsys):
    case_dir, ckpt = case
    folder = patient_folder(case_dir, tmp_path / "in", keep)
    out = tmp_path / "out" / "seg.nii.gz"
    assert predict("--resume", ckpt, "--input", folder, "--output", out, "--probabilities") == 0
    first = capsys.readouterr().err.splitlines()[0]
    assert first.endswith("missing T1" if len(keep) == 3 else "missing FLAIR, T1c, T2")
    seg, ref = nib.load(out), nib.load(os.path.join(folder, os.listdir(folder)[0]))
    assert seg.shape == ref.shape and np.allclose(seg.affine, ref.affine)
    assert nib.aff2axcodes(seg.affine) == nib.aff2axcodes(ref.affine)
    assert seg.get_data_dtype() == np.uint8
    labels = np.asarray(seg.dataobj)
    # independently: the training preprocessing of the full case, the subset's mask, uncrop
    npy = str(tmp_path / "npy")
    preprocess_case(case_dir, npy, min_size=P)
    name = os.path.basename(case_dir)
    vol, _ = case_arrays(npy, name, mmap=False)
    mask = tuple(s in keep for s in MODALITY_SUFFIXES)
    volume = torch.from_numpy(vol.transpose(3, 0, 1, 2).copy())
    volume[[not m for m in mask]] = 0
    model = build_model("imfuse", **CONFIG)
    model.load_state_dict(torch.load(ckpt, weights_only=True)["state_dict"])
    probs = predict_subsets(model.eval(), volume, [mask])[0].numpy()
    meta = read_meta(npy, name)
    expected = uncrop(probs.argmax(0).astype(np.uint8), meta["original_shape"], meta["crop_box"])
    assert np.array_equal(labels, expected) and len(np.unique(labels)) > 1
    prob = nib.load(tmp_path / "out" / "seg_probabilities.nii.gz")
    p = np.asarray(prob.dataobj)
    assert p.shape == ref.shape + (4,) and p.dtype == np.float32 and np.allclose(prob.affine, ref.affine)
    assert np.allclose(p.sum(-1), 1, atol=1e-5) and np.array_equal(p.argmax(-1), labels)


def test_the_encoders_of_absent_sequences_do_not_run(case):
    case_dir, ckpt = case
    paths = modality_files(case_dir)
    paths[1] = paths[3] = None  # T1c and T2 absent
    patient = load_patient(paths, P)
    assert patient.mask == (True, False, True, False)
    model = build_model("imfuse", **CONFIG).eval()
    calls = [0] * 4
    for k, encoder in enumerate(model.encoders):
        encoder.register_forward_hook(lambda *a, k=k: calls.__setitem__(k, calls[k] + 1))
    labels, _ = script("predict").segment([model], patient, patient.reference.shape)
    assert calls[0] > 0 and calls[2] > 0 and calls[1] == calls[3] == 0
    assert labels.shape == patient.reference.shape


def test_brats_file_names_of_every_edition_are_recognised(tmp_path):
    assert [modality_of(n) for n in ("BraTS-GLI-00000-000-t2f.nii.gz", "BraTS-GLI-00000-000-t1c.nii.gz",
                                     "BraTS-GLI-00000-000-t1n.nii.gz", "BraTS-GLI-00000-000-t2w.nii.gz")] == [0, 1, 2, 3]
    assert [modality_of(n) for n in ("BraTS2021_00000_flair.nii.gz", "BraTS20_Training_001_t1ce.nii",
                                     "x_T1.nii.gz", "x_t2.nii.gz")] == [0, 1, 2, 3]
    assert modality_of("x-seg.nii.gz") is None and modality_of("x_t1.txt") is None
    for name in ("a_flair.nii.gz", "b-t2f.nii.gz"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(CaseError, match="a second FLAIR file"):
        modality_files(str(tmp_path))


def assert_refused(capsys, out, *needles):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("predict.py: "), err
    assert all(n in err[0] for n in needles), err[0]
    assert not os.path.exists(out.parent) or os.listdir(out.parent) == []  # nothing written, no temporary file


def test_a_corrupt_file_is_refused_by_name_with_no_output(case, tmp_path, capsys):
    case_dir, ckpt = case
    folder = patient_folder(case_dir, tmp_path / "in", MODALITY_SUFFIXES)
    t1c = [n for n in os.listdir(folder) if n.endswith("t1c.nii.gz")][0]
    with open(os.path.join(folder, t1c), "r+b") as f:  # truncate the gzip stream
        f.truncate(os.path.getsize(os.path.join(folder, t1c)) // 2)
    out = tmp_path / "out" / "seg.nii.gz"
    assert predict("--resume", ckpt, "--input", folder, "--output", out) == 1
    assert_refused(capsys, out, t1c, "unreadable")


@pytest.mark.parametrize("change", ["affine", "shape"])
def test_a_sequence_on_another_grid_is_resampled_into_the_reference(case, tmp_path, capsys, change):
    case_dir, ckpt = case
    files = modality_files(case_dir)
    img = nib.load(files[3])
    data, affine = np.asarray(img.dataobj), img.affine.copy()
    if change == "affine":
        affine[0, 3] += 5  # shifted 5 mm
    else:
        data = data[:, :, :-1]
    t2 = tmp_path / "t2.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), t2)
    out = tmp_path / "out" / "seg.nii.gz"
    assert predict("--resume", ckpt, "--flair", files[0], "--t2", t2, "--output", out) == 0
    assert "reference FLAIR" in capsys.readouterr().err  # the smallest voxels, the first of equals
    flair = nib.load(files[0])
    seg = nib.load(out)
    assert seg.shape == flair.shape and np.allclose(seg.affine, flair.affine, atol=1e-4)


def test_no_usable_sequence_and_empty_images_are_refused(case, tmp_path, capsys):
    case_dir, ckpt = case
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out" / "seg.nii.gz"
    assert predict("--resume", ckpt, "--input", empty, "--output", out) == 1
    assert_refused(capsys, out, "no FLAIR, T1c, T1 or T2")
    img = nib.load(modality_files(case_dir)[0])
    blank = tmp_path / "blank_flair.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(img.shape, np.float32), img.affine), blank)
    assert predict("--resume", ckpt, "--flair", blank, "--output", out) == 1
    assert_refused(capsys, out, str(blank), "no image content")
    assert predict("--resume", tmp_path / "none.pth", "--input", case_dir, "--output", out) == 1
    assert_refused(capsys, out, "none.pth")
    for argv in (["--input", case_dir, "--flair", "x.nii.gz"], ["--input", case_dir, "--output", "seg.png"]):
        with pytest.raises(SystemExit):
            script("predict").main(["--resume", ckpt, "--output", str(out)] + argv)
