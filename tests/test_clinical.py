"""predict.py on clinical scans (data/clinical.py): sequences on other grids and orientations,
DICOM series, rigid registration, the way back into the reference's grid, the report, and the
refusals. The inputs are made from a synthetic case by tests/clinical_inputs.py."""
import json
import math
import os

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

import clinical_inputs as C
from data.clinical import from_array, load_clinical, motion, register, resample, to_array, working_grid
from data.patient import load_patient, modality_files
from data.preprocessing import uncrop
from data.synthetic import make_cohort
from engine.checkpoint import save_checkpoint
from helpers import TINY_CONFIG as CONFIG
from helpers import P, script
from models import build_model


@pytest.fixture(scope="module")
def clinical(tmp_path_factory):
    """{"case": the synthetic case's files (FLAIR, T1c, T1, T2, seg), "paths": the clinical
    inputs (FLAIR 1x1x4 mm flipped left-right, T1c at 0.8 mm, T1 as it is, T2 as a DICOM series),
    "ckpt": a tiny random IM-Fuse}."""
    base = tmp_path_factory.mktemp("clinical")
    make_cohort(str(base / "raw"), 1, seed=5, size=(64, 64, 48), workers=1)
    raw = str(base / "raw" / os.listdir(base / "raw")[0])
    # band-limited like an MR image: the synthetic white noise, which no resampling keeps, smoothed
    # away inside the brain (sigma 1.5 mm), the background left at 0
    case_dir = base / "case"
    case_dir.mkdir()
    for name in sorted(os.listdir(raw)):
        image = C.read(os.path.join(raw, name))
        if not name.endswith("-seg.nii.gz"):
            image = sitk.Cast(image, sitk.sitkFloat32)
            image = sitk.SmoothingRecursiveGaussian(image, 1.5) * sitk.Cast(image > 0, sitk.sitkFloat32)
        sitk.WriteImage(image, str(case_dir / name))
    case = modality_files(str(case_dir)) + [next(str(case_dir / f) for f in os.listdir(case_dir)
                                                 if f.endswith("-seg.nii.gz"))]
    inputs = base / "inputs"
    inputs.mkdir()
    flair = str(inputs / "flair_thick.nii.gz")
    sitk.WriteImage(C.resample_to_spacing(C.read(case[0]), (1, 1, 4), flip_axes=(0,)), flair)
    t1c = str(inputs / "t1c_fine.nii.gz")
    sitk.WriteImage(C.resample_to_spacing(C.read(case[1]), (0.8, 0.8, 0.8)), t1c)
    C.write_dicom_series(C.read(case[3]), str(inputs / "t2_dicom"))
    torch.manual_seed(0)
    ckpt = str(base / "model.pth")
    save_checkpoint(ckpt, {"model": "imfuse", "config": CONFIG, "epoch": 0,
                           "state_dict": build_model("imfuse", **CONFIG).state_dict()})
    return {"case": case, "paths": [flair, t1c, case[2], str(inputs / "t2_dicom")], "ckpt": ckpt}


def predict(*argv):
    return script("predict").main(["--no_progress"] + [str(a) for a in argv])


def flags(paths):
    return [a for flag, path in zip(("--flair", "--t1c", "--t1", "--t2"), paths) if path for a in (flag, path)]


def test_the_model_sees_the_original_images_within_interpolation_error(clinical):
    patient = load_clinical(clinical["paths"], P)
    assert patient.reference.name == "T1c" and patient.grid.GetSize() == (64, 64, 48)  # 0.8 mm -> 1 mm
    assert [s.kind for s in patient.sequences] == ["nifti", "nifti", "nifti", "dicom"]
    original = load_patient(clinical["case"][:4], P)
    shape = original.reference.shape
    seen, truth = (np.stack([uncrop(v, shape, p.box) for v in p.volume]) for p in (patient, original))
    brain = np.stack([np.asarray(nib.load(path).dataobj) for path in clinical["case"][:4]]).sum(0) > 0
    for k in range(4):
        assert np.corrcoef(seen[k][brain], truth[k][brain])[0, 1] >= 0.98, k


def test_a_label_map_sent_back_lands_in_the_reference_grid(clinical):
    patient = load_clinical(clinical["paths"], P, reference="flair")  # 1 x 1 x 4 mm, flipped
    assert patient.reference.name == "FLAIR" and patient.reference.image.GetDirection()[0] == -1
    assert patient.grid.GetDirection() == (1, 0, 0, 0, 1, 0, 0, 0, 1)  # BraTS's axes, not flipped
    assert patient.grid.GetSize() == (64, 64, 48)
    seg = C.read(clinical["case"][4])
    in_grid = to_array(resample(seg, patient.grid, nearest=True))  # the true map as the model's output
    back = patient.to_reference(in_grid, nearest=True)
    expected = to_array(resample(seg, patient.reference.image, nearest=True))
    assert back.shape == tuple(patient.reference.image.GetSize())
    for labels in ((1, 2, 3), (1, 3), (3,)):
        a, b = np.isin(back, labels), np.isin(expected, labels)
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) >= 0.95, labels


@pytest.mark.parametrize("reference", [None, "flair"])
def test_predict_writes_the_reference_grid_and_the_report(clinical, tmp_path, capsys, reference):
    out = tmp_path / "out" / "seg.nii.gz"
    argv = ["--resume", clinical["ckpt"], *flags(clinical["paths"]), "--output", out, "--probabilities"]
    assert predict(*argv, *(["--reference", reference] if reference else [])) == 0
    err = capsys.readouterr().err
    ref_path = clinical["paths"][0 if reference else 1]
    seg, ref = nib.load(out), nib.load(ref_path)
    assert seg.shape == ref.shape and np.allclose(seg.affine, ref.affine, atol=1e-4)
    assert nib.aff2axcodes(seg.affine) == nib.aff2axcodes(ref.affine)
    assert nib.load(tmp_path / "out" / "seg_probabilities.nii.gz").shape == ref.shape + (4,)
    report = json.loads((tmp_path / "out" / "seg.json").read_text())
    labels = np.asarray(seg.dataobj)
    voxel = np.prod(ref.header.get_zooms()[:3]) / 1000
    counts = {"NCR": (labels == 1).sum(), "ED": (labels == 2).sum(), "ET": (labels == 3).sum(),
              "TC": np.isin(labels, (1, 3)).sum(), "WT": (labels > 0).sum()}
    assert report["volumes_cm3"] == pytest.approx({k: v * voxel for k, v in counts.items()}, abs=1e-4)
    assert report["reference"] == ("FLAIR" if reference else "T1c") and report["model"] == "imfuse"
    assert report["checkpoint"] == os.path.abspath(clinical["ckpt"]) and report["missing"] == []
    grids = report["sequences"]
    assert grids["FLAIR"]["spacing_mm"] == [1, 1, 4] and grids["FLAIR"]["orientation"] == "RPS"
    assert grids["T1c"]["spacing_mm"] == [0.8, 0.8, 0.8] and grids["T2"]["format"] == "dicom"
    png = sitk.ReadImage(str(tmp_path / "out" / "seg.png"))
    assert png.GetSize()[1] > 3 * 32  # a row per sequence
    assert "volumes NCR" in err and "WT" in err


def test_the_working_grid_has_brats_axes_whatever_the_reference_orientation(clinical):
    image = C.read(clinical["case"][2])
    sagittal = sitk.Flip(sitk.PermuteAxes(image, [2, 0, 1]), [True, False, False])  # the same voxels
    for reference in (image, sagittal):
        grid = working_grid(reference)
        assert grid.GetDirection() == (1, 0, 0, 0, 1, 0, 0, 0, 1) and grid.GetSize() == image.GetSize()
        assert np.allclose(grid.GetOrigin(), image.GetOrigin())
    np.testing.assert_array_equal(to_array(resample(sagittal, working_grid(sagittal), nearest=True)),
                                  to_array(image))


def test_registration_recovers_a_known_motion(clinical):
    t1c = sitk.Cast(C.read(clinical["paths"][1]), sitk.sitkFloat32)
    moved, T = C.rigidly_moved(C.read(clinical["case"][3]), 5, 2, (4, 0, 0))  # T2 moved 5 degrees, 4 mm
    R = register(t1c, sitk.Cast(moved, sitk.sitkFloat32))  # reference point -> moved point
    rotation = np.array(T.GetMatrix()).reshape(3, 3) @ np.array(sitk.Euler3DTransform(R).GetMatrix()).reshape(3, 3)
    assert math.degrees(math.acos(min(1, (np.trace(rotation) - 1) / 2))) < 1
    seg = C.read(clinical["case"][4])
    for index in np.argwhere(sitk.GetArrayFromImage(seg) > 0)[::500]:  # tumour voxels (z, y, x)
        q = seg.TransformIndexToPhysicalPoint([int(i) for i in index[::-1]])
        assert np.linalg.norm(np.array(T.TransformPoint(R.TransformPoint(q))) - q) < 1
    angles, shift = motion(R)
    assert angles[2] == pytest.approx(5, abs=1) and shift[0] == pytest.approx(4, abs=1)


def test_register_flag_reports_each_estimate_and_uses_it(clinical, tmp_path, capsys):
    moved, _ = C.rigidly_moved(C.read(clinical["case"][3]), 5, 2, (4, 0, 0))
    t2 = str(tmp_path / "t2_moved.nii.gz")
    sitk.WriteImage(moved, t2)
    truth = load_patient([None, clinical["case"][1], None, clinical["case"][3]], P)
    brain = np.asarray(nib.load(clinical["case"][3]).dataobj) > 0
    correlation = {}
    for registration in (False, True):  # the moved T2 as the model sees it, against the original T2
        seen = load_clinical([None, clinical["case"][1], None, t2], P, registration=registration)
        t2_seen, t2_truth = (uncrop(p.volume[3], brain.shape, p.box)[brain] for p in (seen, truth))
        correlation[registration] = np.corrcoef(t2_seen, t2_truth)[0, 1]
    assert correlation[False] < 0.5 and correlation[True] > 0.95  # measured 0.31 and 0.979
    out = tmp_path / "out" / "seg.nii.gz"
    paths = [None, clinical["paths"][1], None, t2]
    assert predict("--resume", clinical["ckpt"], *flags(paths), "--output", out, "--register") == 0
    line = next(line for line in capsys.readouterr().err.splitlines() if "registered T2 to T1c" in line)
    assert "degrees" in line and "mm" in line
    entry = json.loads((tmp_path / "out" / "seg.json").read_text())["sequences"]["T2"]["registration"]
    assert entry["rotation_deg_xyz"][2] == pytest.approx(5, abs=1)
    assert entry["translation_mm"][0] == pytest.approx(4, abs=1)


def test_brats_like_inputs_keep_their_grid_and_get_a_report(clinical, tmp_path, capsys):
    out = tmp_path / "out" / "seg.nii.gz"
    assert predict("--resume", clinical["ckpt"], *flags(clinical["case"][:4]), "--output", out) == 0
    err = capsys.readouterr().err
    assert "working grid" not in err and "warning" not in err  # the training pipeline, skull-stripped
    assert sorted(os.listdir(out.parent)) == ["seg.json", "seg.nii.gz", "seg.png"]
    assert json.loads((out.parent / "seg.json").read_text())["reference"] == "FLAIR"
    first = out.read_bytes()
    assert predict("--resume", clinical["ckpt"], *flags(clinical["case"][:4]), "--output", out) == 0  # replaced
    assert out.read_bytes() == first and sorted(os.listdir(out.parent)) == ["seg.json", "seg.nii.gz", "seg.png"]


def test_an_image_that_is_not_skull_stripped_gets_a_warning(clinical, tmp_path, capsys):
    image = C.read(clinical["case"][1])
    array = sitk.GetArrayFromImage(image)
    air = np.random.default_rng(0).normal(60, 20, array.shape).clip(5)  # an unstripped head's noisy surroundings
    noisy = from_array(np.swapaxes(np.where(array > 0, array, air), 0, 2).astype(np.float32), image)
    t1c = str(tmp_path / "t1c_head.nii.gz")
    sitk.WriteImage(noisy, t1c)
    out = tmp_path / "out" / "seg.nii.gz"
    assert predict("--resume", clinical["ckpt"], "--t1c", t1c, "--output", out) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "T1c" in warnings[0] and "skull-stripped" in warnings[0]


def assert_refused(capsys, out, *needles):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("predict.py: "), err
    assert all(n in err[0] for n in needles), err[0]
    assert not os.path.exists(out.parent) or os.listdir(out.parent) == []


def test_refusals_name_the_input(clinical, tmp_path, capfd):
    capsys = capfd  # also what native code (ITK) would print
    out = tmp_path / "out" / "seg.nii.gz"
    far = C.read(clinical["case"][2])
    far.SetOrigin([o + 500 for o in far.GetOrigin()])
    t1 = str(tmp_path / "t1_elsewhere.nii.gz")
    sitk.WriteImage(far, t1)
    paths = clinical["paths"][:2] + [t1, None]
    assert predict("--resume", clinical["ckpt"], *flags(paths), "--output", out) == 1
    assert_refused(capsys, out, t1, "does not overlap the reference T1c")

    two = tmp_path / "two_series"
    C.write_dicom_series(C.read(clinical["case"][3]), str(two / "a"), description="T2 AX")
    C.write_dicom_series(C.read(clinical["case"][0]), str(two / "b"), description="FLAIR SAG")
    for sub in ("a", "b"):
        for name in os.listdir(two / sub):
            os.rename(two / sub / name, two / f"{sub}{name}")
    assert predict("--resume", clinical["ckpt"], "--t2", two, "--output", out) == 1
    assert_refused(capsys, out, str(two), "2 DICOM series", "'T2 AX' (48 files", "'FLAIR SAG' (48 files")

    broken = tmp_path / "broken"
    files = C.write_dicom_series(C.read(clinical["case"][3]), str(broken))
    C.corrupt(files[10])
    assert predict("--resume", clinical["ckpt"], "--t2", broken, "--output", out) == 1
    assert_refused(capsys, out, files[10], "unreadable DICOM file")
    os.remove(files[10])  # now a slice is missing
    assert predict("--resume", clinical["ckpt"], "--t2", broken, "--output", out) == 1
    assert_refused(capsys, out, str(broken), "slices unevenly spaced (1 to 2 mm apart)")

    assert predict("--resume", clinical["ckpt"], "--t1", clinical["paths"][2], "--reference", "t1c",
                   "--output", out) == 1
    assert_refused(capsys, out, "--reference t1c: no T1c sequence given")
