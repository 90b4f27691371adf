"""preprocess.py and data/preprocessing.py: crop box, normalisation, labels, the original's
file layout, metadata, faulty cases, re-runs and splits."""
import gzip
import json
import os

import nibabel as nib
import numpy as np
import pytest

import preprocess
from data.preprocessing import crop_box
from data.splits import make_split, read_split
from raw_cases import AFFINE, BRAIN, SHAPE, make_arrays, save, write_case
from utils.brats import MODALITY_SUFFIXES, SUBSETS

MIN = 16


def run(raw, out, *extra):
    return preprocess.main(["--input-path", str(raw), "--output-path", str(out), "--min-size", str(MIN), *extra])


@pytest.mark.parametrize("lo,hi,dim,want", [
    (10, 19, 40, (7, 23)),    # 10 voxels widened to 16 around the middle, last voxel kept
    (0, 4, 40, (0, 16)),      # shifted inward at the near border
    (35, 39, 40, (24, 40)),   # ... and at the far border
    (3, 30, 40, (3, 31)),     # already wider than min_size: the box itself
    (2, 5, 12, (0, 12)),      # axis shorter than min_size: all of it
])
def test_crop_box_by_hand(lo, hi, dim, want):
    nonzero = np.zeros((dim, 3, 3), bool)
    nonzero[lo:hi + 1, 1, 1] = True
    assert crop_box(nonzero, MIN)[0] == want


def test_outputs_match_the_original_layout_and_statistics(tmp_path, capsys):
    raw, out = tmp_path / "raw", tmp_path / "out"
    write_case(raw, "BraTS-GLI-00000-000")
    assert run(raw, out) == 0
    vol = np.load(out / "vol" / "BraTS-GLI-00000-000_vol.npy")
    seg = np.load(out / "seg" / "BraTS-GLI-00000-000_seg.npy")
    meta = json.loads((out / "meta" / "BraTS-GLI-00000-000.json").read_text())
    box = meta["crop_box"]
    for (lo, hi), b in zip(box, BRAIN):  # every brain voxel inside, at least MIN per axis
        assert lo <= b.start and hi >= b.stop and hi - lo >= MIN
    assert box == [[6, 30], [3, 31], [2, 27]]
    assert vol.dtype == np.float32 and vol.shape == (24, 28, 25, 4)
    assert seg.dtype == np.uint8 and seg.shape == (24, 28, 25)
    images, label = make_arrays()
    sl = tuple(slice(lo, hi) for lo, hi in box)
    expected = label[sl].copy()
    expected[expected == 4] = 3
    assert np.array_equal(seg, expected) and set(np.unique(seg)) == {0, 1, 2, 3}
    brain = np.stack([images[s][sl] for s in MODALITY_SUFFIXES]).sum(0) > 0
    for k, suffix in enumerate(MODALITY_SUFFIXES):  # MODALITIES order: t2f, t1c, t1n, t2w
        values = vol[..., k][brain]
        assert abs(values.mean()) < 1e-5 and abs(values.std() - 1) < 1e-5
        raw_values = images[suffix][sl][brain].astype(np.float64)
        np.testing.assert_allclose(values, (raw_values - raw_values.mean()) / raw_values.std(), atol=1e-5)
    assert meta["original_shape"] == list(SHAPE) and meta["spacing"] == [1.0, 1.0, 1.0]
    assert np.allclose(meta["affine"], AFFINE) and meta["present"] == [True] * 4
    assert "written 1, skipped 0 (already done), failed 0" in capsys.readouterr().out


def test_all_zero_modality_is_absent_not_nan(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    images, label = make_arrays()
    images["t1n"][:] = 0
    write_case(raw, "BraTS-GLI-00001-000", images=images, label=label)
    assert run(raw, out) == 0
    vol = np.load(out / "vol" / "BraTS-GLI-00001-000_vol.npy")
    meta = json.loads((out / "meta" / "BraTS-GLI-00001-000.json").read_text())
    assert meta["present"] == [True, True, False, True]
    assert np.isfinite(vol).all() and not vol[..., 2].any()


def corrupt(kind, raw, name):
    """Write case `name` with one defect of the given kind; returns the file the report names."""
    images, label = make_arrays(seed=3)
    folder = write_case(raw, name, images=images, label=label)
    path = lambda s: os.path.join(folder, f"{name}-{s}.nii.gz")  # noqa: E731
    if kind == "missing":
        os.remove(path("t1c"))
        return "t1c", "missing file"
    if kind == "truncated":
        data = open(path("t2w"), "rb").read()
        open(path("t2w"), "wb").write(data[: len(data) // 2])
        return "t2w", "unreadable or truncated"
    if kind == "not-nifti":
        with gzip.open(path("t1n"), "wb") as f:
            f.write(b"this is not an image" * 50)
        return "t1n", "unreadable or truncated"
    if kind == "shape":
        save(path("t1n"), np.zeros((SHAPE[0], SHAPE[1], SHAPE[2] + 1), np.int16))
        return "t1n", "shape"
    if kind == "affine":
        shifted = AFFINE.copy()
        shifted[0, 3] += 5
        save(path("t2f"), images["t2f"], shifted)  # the first modality read: the others differ
        return "t1c", "affine"
    if kind == "nan":
        data = images["t1c"].astype(np.float32)
        data[20, 20, 20] = np.nan
        save(path("t1c"), data)
        return "t1c", "NaN or infinite"
    if kind == "labels":
        label[20, 20, 20] = 7
        save(path("seg"), label)
        return "seg", "unknown labels [7]"
    if kind == "empty":
        for s in MODALITY_SUFFIXES:
            save(path(s), np.zeros(SHAPE, np.int16))
        return "t2f", "empty image"
    raise ValueError(kind)


KINDS = ["missing", "truncated", "not-nifti", "shape", "affine", "nan", "labels", "empty"]


def test_every_faulty_case_kind_gets_one_line_and_no_output(tmp_path, capsys):
    raw, out = tmp_path / "raw", tmp_path / "out"
    write_case(raw, "BraTS-GLI-00000-000")
    write_case(raw, "BraTS-GLI-00099-000", seed=5)
    expected = {}
    for i, kind in enumerate(KINDS):
        name = f"BraTS-GLI-{i + 1:05d}-000"
        expected[name] = corrupt(kind, raw, name)
    assert run(raw, out, "--workers", "2") == 1
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("BraTS-GLI-")]
    assert len(lines) == len(KINDS)
    for name, (suffix, reason) in expected.items():
        line = next(line for line in lines if line.startswith(name + ":"))
        assert f"{name}-{suffix}.nii.gz" in line and reason in line, line
        assert not any(name in f for d in ("vol", "seg", "meta") for f in os.listdir(out / d))
    assert "Traceback" not in captured.err
    assert sorted(os.listdir(out / "vol")) == ["BraTS-GLI-00000-000_vol.npy", "BraTS-GLI-00099-000_vol.npy"]
    assert f"written 2, skipped 0 (already done), failed {len(KINDS)}" in captured.out
    assert not [f for d in ("vol", "seg", "meta") for f in os.listdir(out / d) if ".tmp" in f]


def test_rerun_skips_done_cases_and_overwrite_redoes_them(tmp_path, capsys):
    raw, out = tmp_path / "raw", tmp_path / "out"
    for i in range(3):
        write_case(raw, f"BraTS-GLI-{i:05d}-000", seed=i)
    assert run(raw, out) == 0
    vol = out / "vol" / "BraTS-GLI-00001-000_vol.npy"
    before = vol.stat().st_mtime_ns
    capsys.readouterr()
    assert run(raw, out) == 0
    assert "written 0, skipped 3" in capsys.readouterr().out and vol.stat().st_mtime_ns == before
    assert run(raw, out, "--overwrite") == 0
    assert "written 3, skipped 0" in capsys.readouterr().out


def test_missing_input_folder_is_one_line(tmp_path, capsys):
    assert run(tmp_path / "nowhere", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "nowhere: no such folder" in err and len(err.strip().splitlines()) == 1


def test_splits_are_seeded_disjoint_and_in_the_original_formats(tmp_path):
    cases = [f"BraTS-GLI-{i:05d}-000" for i in range(40)]
    a, b, c = make_split(cases, seed=7), make_split(cases, seed=7), make_split(cases, seed=8)
    assert a == b and a != c
    assert (len(a["train"]), len(a["val"]), len(a["test"])) == (28, 4, 8)
    assert sorted(a["train"] + a["val"] + a["test"]) == cases
    raw, out = tmp_path / "raw", tmp_path / "out"
    for i in range(10):
        write_case(raw, f"BraTS-GLI-{i:05d}-000", seed=i)
    assert run(raw, out, "--seed", "3") == 0
    split = make_split([f"BraTS-GLI-{i:05d}-000" for i in range(10)], seed=3)
    train = read_split(out / "splits" / "train.txt")
    test = read_split(out / "splits" / "test15splits.csv")
    assert [c for c, _ in train] == split["train"] and all(m is None for _, m in train)
    assert [c for c, _ in test] == split["test"]
    assert [m for _, m in test] == list(SUBSETS[:len(test)])
    text = (out / "splits" / "val15splits.csv").read_text()
    assert text.startswith("case,mask\n") and '"[False, False, False, True]"' in text


def test_read_split_accepts_the_original_files_and_plain_lists(tmp_path):
    original = tmp_path / "val15splits.csv"  # as the original writes it: CRLF, quoted masks
    original.write_bytes(b'case,mask\r\nBraTS-GLI-00006-000,"[False, False, False, True]"\r\n'
                         b'BraTS-GLI-00028-000,"[True, False, True, False]"\r\n')
    assert read_split(original) == [("BraTS-GLI-00006-000", (False, False, False, True)),
                                    ("BraTS-GLI-00028-000", (True, False, True, False))]
    plain = tmp_path / "cases.txt"
    plain.write_text("BraTS-GLI-00002-000\r\n\n# a comment\nBraTS-GLI-00003-000\n")
    assert read_split(plain) == [("BraTS-GLI-00002-000", None), ("BraTS-GLI-00003-000", None)]
    bad = tmp_path / "bad.csv"
    bad.write_text("case,mask\nBraTS-GLI-00002-000,[False, False, False, False]\n")
    with pytest.raises(ValueError, match="has no modality"):
        read_split(bad)


def test_seg_stored_as_float_is_accepted(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    images, label = make_arrays()
    folder = write_case(raw, "BraTS-GLI-00000-000", images=images, label=label)
    save(os.path.join(folder, "BraTS-GLI-00000-000-seg.nii.gz"), label.astype(np.float32))
    assert run(raw, out) == 0
    assert nib.load(os.path.join(folder, "BraTS-GLI-00000-000-seg.nii.gz")).get_data_dtype() == np.float32
    seg = np.load(out / "seg" / "BraTS-GLI-00000-000_seg.npy")
    assert seg.dtype == np.uint8 and set(np.unique(seg)) == {0, 1, 2, 3}


def test_synthetic_cohort_end_to_end(tmp_path):
    from data.synthetic import make_cohort
    from data.datasets import TrainDataset

    raw, out = tmp_path / "raw", tmp_path / "out"
    make_cohort(raw, 3, seed=4, size=(64, 64, 48))
    assert run(raw, out, "--min-size", "32") == 0
    for folder in sorted(raw.iterdir()):
        name = folder.name
        images = np.stack([np.asanyarray(nib.load(folder / f"{name}-{s}.nii.gz").dataobj)
                           for s in MODALITY_SUFFIXES]).astype(np.float32)
        meta = json.loads((out / "meta" / f"{name}.json").read_text())
        box = meta["crop_box"]
        brain = images.max(0) != 0
        inside = np.zeros_like(brain)
        inside[tuple(slice(lo, hi) for lo, hi in box)] = True
        assert brain.any() and not (brain & ~inside).any()  # every brain voxel in the crop
        assert all(hi - lo >= 32 for lo, hi in box)
        vol = np.load(out / "vol" / f"{name}_vol.npy")
        crop_brain = images[(slice(None),) + tuple(slice(lo, hi) for lo, hi in box)].sum(0) > 0
        for k in range(4):
            assert abs(vol[..., k][crop_brain].mean()) < 1e-4 and abs(vol[..., k][crop_brain].std() - 1) < 1e-4
    sample = TrainDataset(out, out / "splits" / "train.txt", window=32, seed=0)[0]
    assert sample["image"].shape == (4, 32, 32, 32)
