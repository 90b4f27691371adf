"""DICOM-SEG output: the label map on a DICOM series' grid, read back voxel for voxel by pydicom
(frames, their referenced slices and positions) and by highdicom; predict.py --output seg.dcm
agrees with its NIfTI output; the refusals."""
import os

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch

import clinical_inputs as C
from data.clinical import read_dicom_series
from data.synthetic import make_cohort
from engine.checkpoint import save_checkpoint
from helpers import TINY_CONFIG as CONFIG
from helpers import script
from models import build_model
from utils.dicom_seg import read_dicom_seg, write_dicom_seg

SOURCE_IMAGE = (0x0008, 0x2112)  # Source Image Sequence


def oblique_series(folder, size=(16, 20, 12)):
    """A DICOM series of a rotated, anisotropic grid -> (its image, its files in slice order)."""
    image = sitk.GetImageFromArray(np.random.default_rng(0).normal(100, 20, size[::-1]).astype(np.float32))
    image.SetSpacing((0.9, 1.2, 2.5))
    image.SetOrigin((10.0, -5.0, 3.0))
    angle = np.deg2rad(20)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    image.SetDirection(rotation.ravel().tolist())
    C.write_dicom_series(image, str(folder))
    return read_dicom_series(str(folder))


def labels_by_pydicom(path, image, files):
    """The label map of a DICOM-SEG from its own frames: each frame's referenced slice, segment
    number and plane position (checked against the slice's), independently of highdicom."""
    seg = pydicom.dcmread(path)
    slice_of = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID: k for k, f in enumerate(files)}
    frames = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    labels = np.zeros(image.GetSize(), np.uint8)
    for frame, group in zip(frames, seg.PerFrameFunctionalGroupsSequence):
        uid = group.DerivationImageSequence[0][SOURCE_IMAGE][0].ReferencedSOPInstanceUID
        k = slice_of[uid]
        position = group.PlanePositionSequence[0].ImagePositionPatient
        np.testing.assert_allclose([float(v) for v in position], image.TransformIndexToPhysicalPoint((0, 0, k)),
                                   atol=1e-3)
        segment = group.SegmentIdentificationSequence[0].ReferencedSegmentNumber
        assert not (labels[:, :, k][frame.T > 0]).any(), "segments overlap"
        labels[:, :, k][frame.T > 0] = segment
    return labels


def test_a_label_map_comes_back_voxel_for_voxel(tmp_path):
    image, files = oblique_series(tmp_path / "series")
    labels = np.random.default_rng(1).integers(0, 4, image.GetSize()).astype(np.uint8)
    labels[:, :, 3] = 0  # an empty slice
    write_dicom_seg(str(tmp_path / "seg.dcm"), labels, files, "imfuse")
    np.testing.assert_array_equal(labels_by_pydicom(str(tmp_path / "seg.dcm"), image, files), labels)
    np.testing.assert_array_equal(read_dicom_seg(str(tmp_path / "seg.dcm"), files), labels)
    seg = pydicom.dcmread(tmp_path / "seg.dcm")
    source = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == source.StudyInstanceUID and seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    segments = {s.SegmentNumber: (s.SegmentLabel, s.SegmentedPropertyTypeCodeSequence[0].CodeValue,
                                  s.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator)
                for s in seg.SegmentSequence}
    assert segments == {1: ("NCR", "6574001", "SCT"), 2: ("ED", "79654002", "SCT"), 3: ("ET", "C113842", "NCIt")}
    assert all(s.SegmentAlgorithmType == "AUTOMATIC" and s.SegmentAlgorithmName == "imfuse" for s in seg.SegmentSequence)


def test_labels_that_do_not_fit_the_series_are_refused(tmp_path):
    image, files = oblique_series(tmp_path / "series")
    labels = np.zeros(image.GetSize(), np.uint8)
    with pytest.raises(ValueError, match="do not lie on a series of 12 files"):
        write_dicom_seg(str(tmp_path / "seg.dcm"), labels[:, :, :-1], files, "imfuse")
    with pytest.raises(ValueError, match="not a single 16x20 frame"):  # x and y swapped
        write_dicom_seg(str(tmp_path / "seg.dcm"), np.zeros((20, 16, 12), np.uint8), files, "imfuse")
    labels[0, 0, 0] = 4
    with pytest.raises(ValueError, match=r"label values \[4\] are not BraTS labels"):
        write_dicom_seg(str(tmp_path / "seg.dcm"), labels, files, "imfuse")
    assert not os.path.exists(tmp_path / "seg.dcm")


@pytest.fixture(scope="module")
def dicom_case(tmp_path_factory):
    """A synthetic case with T1c and T2 as DICOM series, FLAIR as NIfTI; a tiny IM-Fuse."""
    base = tmp_path_factory.mktemp("dicom_case")
    make_cohort(str(base / "raw"), 1, seed=3, size=(48, 48, 40), workers=1)
    raw = base / "raw" / os.listdir(base / "raw")[0]
    files = {name.rsplit("-", 1)[1].split(".")[0]: str(raw / name) for name in os.listdir(raw)}
    for key in ("t1c", "t2w"):
        C.write_dicom_series(C.read(files[key]), str(base / key))
    torch.manual_seed(0)
    ckpt = str(base / "model.pth")
    save_checkpoint(ckpt, {"model": "imfuse", "config": CONFIG, "epoch": 0,
                           "state_dict": build_model("imfuse", **CONFIG).state_dict()})
    return {"flair": files["t2f"], "t1c": str(base / "t1c"), "t2": str(base / "t2w"), "ckpt": ckpt}


def predict(*argv):
    return script("predict").main(["--no_progress"] + [str(a) for a in argv])


@pytest.mark.parametrize("reference", ["t1c", "t2"])
def test_predict_writes_the_nifti_labels_as_dicom_seg(dicom_case, tmp_path, reference):
    inputs = ["--resume", dicom_case["ckpt"], "--flair", dicom_case["flair"], "--t1c", dicom_case["t1c"],
              "--t2", dicom_case["t2"], "--reference", reference]
    assert predict(*inputs, "--output", tmp_path / "nii" / "seg.nii.gz") == 0
    assert predict(*inputs, "--output", tmp_path / "dcm" / "seg.dcm") == 0
    assert sorted(os.listdir(tmp_path / "dcm")) == ["seg.dcm", "seg.json", "seg.png"]
    nifti = np.asarray(nib.load(tmp_path / "nii" / "seg.nii.gz").dataobj)
    assert {1, 2, 3} & set(np.unique(nifti).tolist()), "the random model predicts no tumour: nothing checked"
    image, files = read_dicom_series(dicom_case[reference])
    np.testing.assert_array_equal(labels_by_pydicom(str(tmp_path / "dcm" / "seg.dcm"), image, files), nifti)


def test_dicom_seg_needs_a_dicom_reference(dicom_case, tmp_path, capsys):
    out = tmp_path / "out" / "seg.dcm"
    with pytest.raises(SystemExit):
        predict("--resume", dicom_case["ckpt"], "--flair", dicom_case["flair"], "--output", out)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a DICOM-SEG needs the reference sequence as a folder of a DICOM series" in err[0]
    assert predict("--resume", dicom_case["ckpt"], "--flair", dicom_case["flair"], "--t2", dicom_case["t2"],
                   "--reference", "flair", "--output", out) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and dicom_case["flair"] in err[0] and "is not a DICOM series" in err[0], err
    assert not os.path.exists(out.parent) or os.listdir(out.parent) == []
