"""Augmentations, modality dropout and the datasets."""
import itertools
import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import preprocess
from data.augment import AUGMENTATIONS, random_crop, random_flip, random_intensity, random_rotation
from data.datasets import EvalDataset, TrainDataset
from data.preprocessing import CaseError
from raw_cases import write_case
from scipy import stats
from utils import recipe
from utils.brats import SUBSETS

P = 16


def marker_pair(size=24, seed=0):
    """A label with an off-centre, asymmetric blob and an image whose every channel repeats it."""
    label = np.zeros((size,) * 3, np.uint8)
    label[4:12, 6:10, 3:15] = 2
    label[5:8, 7:9, 4:6] = 1
    label[9:11, 6:8, 10:14] = 3
    image = np.stack([label.astype(np.float32) * (k + 1) for k in range(4)])
    return image, label


def test_rotation_and_flips_keep_image_and_label_aligned():
    image, label = marker_pair()
    rotated = 0
    for seed in range(40):
        rng = np.random.default_rng(seed)
        img, lab = random_rotation(image, label, rng)
        img, lab = random_flip(img, lab, rng)
        assert img.shape == image.shape and lab.shape == label.shape
        for k in range(4):
            assert np.array_equal(img[k], lab.astype(np.float32) * (k + 1))
        assert set(np.unique(lab)) <= {0, 1, 2, 3} and lab.dtype == np.uint8
        rotated += not np.array_equal(np.sort(lab, axis=None), np.sort(label, axis=None))
    assert rotated > 10  # most draws really rotate (voxel counts change under nearest sampling)


def test_flip_flips_each_axis_about_half_the_time():
    image, label = marker_pair()
    combos = [c for c in itertools.product((False, True), repeat=3)]
    flips = np.zeros(3)
    for seed in range(200):
        _, lab = random_flip(image, label, np.random.default_rng(seed))
        axes = [c for c in combos
                if np.array_equal(lab, np.flip(label, [a for a in range(3) if c[a]]) if any(c) else label)]
        assert len(axes) == 1  # the marker is asymmetric: exactly one combination matches
        flips += axes[0]
    assert all(60 < f < 140 for f in flips)


def test_intensity_change_is_one_affine_map_per_modality():
    image = np.random.default_rng(0).normal(size=(4, 8, 8, 8)).astype(np.float32)
    out = random_intensity(image, np.random.default_rng(1))
    scales = []
    for k in range(4):
        a, b = np.polyfit(image[k].ravel(), out[k].ravel(), 1)
        np.testing.assert_allclose(out[k], a * image[k] + b, atol=1e-5)
        assert 0.9 <= a <= 1.1 and -0.1 <= b <= 0.1
        scales.append(a)
    assert len(set(np.round(scales, 6))) == 4


def test_random_crop_pads_short_axes_as_evaluation_does():
    """A volume shorter than the window along an axis: the image is padded by replicating its
    far border (as engine.inference pads), the label with background."""
    image = np.random.default_rng(0).normal(size=(20, 40, 40, 4)).astype(np.float32)
    label = np.ones((20, 40, 40), np.uint8)
    for seed in range(5):
        crop, crop_label = random_crop(image, label, 32, np.random.default_rng(seed), foreground=0.5)
        assert crop.shape == (4, 32, 32, 32) and crop_label.shape == (32, 32, 32)
        assert (crop_label[:20] == 1).all() and (crop_label[20:] == 0).all()
        np.testing.assert_array_equal(crop[:, 20:], np.repeat(crop[:, 19:20], 12, axis=1))
        assert any(np.array_equal(crop[0, :20], image[:, a:a + 32, b:b + 32, 0]) for a in range(9) for b in range(9))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort")
    raw, out = root / "raw", root / "out"
    for i in range(4):
        write_case(raw, f"BraTS-GLI-{i:05d}-000", seed=i)
    assert preprocess.main(["--input-path", str(raw), "--output-path", str(out), "--min-size", str(P)]) == 0
    return out


def names(root):
    return sorted(p.name[:-len("_vol.npy")] for p in (root / "vol").iterdir())


def test_train_samples(cohort):
    ds = TrainDataset(cohort, names(cohort), window=P, seed=5)
    sample = ds[1]
    assert sample["image"].shape == (4, P, P, P) and sample["image"].dtype == torch.float32
    assert sample["label"].shape == (P, P, P) and sample["label"].dtype == torch.int64
    assert sample["mask"].dtype == torch.bool and sample["mask"].shape == (4,)
    assert sample["name"] == "BraTS-GLI-00001-000"
    assert torch.equal(ds[1]["image"], sample["image"])  # same seed, epoch, index: same sample
    ds.set_epoch(1)
    assert not torch.equal(ds[1]["image"], sample["image"])


def test_modality_dropout_draws_every_subset_and_never_none(cohort):
    ds = TrainDataset(cohort, names(cohort), window=P, augmentations=(), seed=0)
    seen = []
    for epoch in range(40):
        ds.set_epoch(epoch)
        seen += [tuple(ds[i]["mask"].tolist()) for i in range(len(ds))]
    assert set(seen) == set(SUBSETS) and all(any(m) for m in seen)


def test_dropout_keeps_to_the_modalities_a_case_has(cohort):
    meta_path = cohort / "meta" / "BraTS-GLI-00002-000.json"
    meta = json.loads(meta_path.read_text())
    meta["present"] = [True, False, True, True]  # T1c absent
    meta_path.write_text(json.dumps(meta))
    try:
        ds = TrainDataset(cohort, ["BraTS-GLI-00002-000"], window=P, augmentations=(), seed=0)
        seen = set()
        for epoch in range(60):
            ds.set_epoch(epoch)
            seen.add(tuple(ds[0]["mask"].tolist()))
        assert seen == {s for s in SUBSETS if not s[1]} and ds[0]["available"].tolist() == [True, False, True, True]
    finally:
        meta["present"] = [True] * 4
        meta_path.write_text(json.dumps(meta))


def test_subset_frequencies_follow_the_weights(cohort):
    """ShaSpec's law (P(all four) 1/4, each triple and single 1/16, each pair 1/24), with T1
    alone excluded: chi-square of 4,000 seeded draws against it, and far from uniform."""
    law = {4: 1 / 4, 3: 1 / 16, 2: 1 / 24, 1: 1 / 16}
    weights = [0.0 if s == SUBSETS[2] else law[sum(s)] for s in SUBSETS]
    ds = TrainDataset(cohort, names(cohort), window=4, augmentations=(), subset_weights=weights, seed=7)
    counts = dict.fromkeys(SUBSETS, 0)
    for epoch in range(1000):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            counts[tuple(ds[i]["mask"].tolist())] += 1
    n = sum(counts.values())
    assert counts[SUBSETS[2]] == 0
    observed = np.array([counts[s] for s in SUBSETS if s != SUBSETS[2]])
    p = np.array([w for s, w in zip(SUBSETS, weights) if s != SUBSETS[2]])
    chi2 = (((observed - n * p / p.sum()) ** 2) / (n * p / p.sum())).sum()
    assert chi2 < stats.chi2.ppf(0.999, len(observed) - 1)
    uniform = n / len(observed)
    assert ((observed - uniform) ** 2 / uniform).sum() > 10 * stats.chi2.ppf(0.999, len(observed) - 1)


def test_foreground_oversampling_puts_tumour_in_every_crop(cohort):
    def tumour_fraction(p):
        ds = TrainDataset(cohort, names(cohort), window=6, augmentations=(), foreground=p, seed=3)
        hits = []
        for epoch in range(25):
            ds.set_epoch(epoch)
            hits += [bool(ds[i]["label"].any()) for i in range(len(ds))]
        return np.mean(hits)
    assert tumour_fraction(1.0) == 1.0
    assert tumour_fraction(0.0) < 0.6  # uniform crops of this size often miss the 6^3 tumour


def test_anisotropic_crops(cohort):
    sample = TrainDataset(cohort, names(cohort), window=(16, 8, 12), seed=1)[0]
    assert sample["image"].shape == (4, 16, 8, 12) and sample["label"].shape == (16, 8, 12)
    assert TrainDataset(cohort, names(cohort), window=(64, 8, 8), seed=1)[0]["image"].shape == (4, 64, 8, 8)


def test_the_recipe_names_every_augmentation_there_is():
    assert tuple(AUGMENTATIONS) == recipe.AUGMENTATIONS


def test_workers_do_not_change_the_samples(cohort):
    def batches(workers):
        ds = TrainDataset(cohort, names(cohort), window=P, seed=11)
        ds.set_epoch(3)
        loader = DataLoader(ds, batch_size=2, num_workers=workers)
        return [(b["image"], b["label"], b["mask"]) for b in loader]
    for a, b in zip(batches(0), batches(2)):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_eval_dataset_gives_whole_volumes_with_their_subsets(cohort, tmp_path):
    split = tmp_path / "val15splits.csv"
    split.write_text('case,mask\nBraTS-GLI-00003-000,"[False, True, False, True]"\n'
                     'BraTS-GLI-00000-000,"[True, True, True, True]"\n')
    ds = EvalDataset(cohort, split)
    sample = ds[0]
    vol = np.load(cohort / "vol" / "BraTS-GLI-00003-000_vol.npy")
    assert sample["name"] == "BraTS-GLI-00003-000"
    assert torch.equal(sample["image"], torch.from_numpy(vol.transpose(3, 0, 1, 2).copy()))
    assert sample["label"].shape == vol.shape[:3]
    assert sample["mask"].tolist() == [False, True, False, True]
    plain = EvalDataset(cohort, names(cohort))  # no masks: the subsets in turn
    assert [tuple(plain[i]["mask"].tolist()) for i in range(4)] == list(SUBSETS[:4])
    with pytest.raises(CaseError, match="BraTS-GLI-09999-000_vol.npy: missing"):
        EvalDataset(cohort, ["BraTS-GLI-09999-000"])[0]
