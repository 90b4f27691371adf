"""Datasets over a preprocessed folder (`vol/`, `seg/`, optional `meta/`), written by
preprocess.py or by the original IM-Fuse scripts.

Training samples: a random crop of the model's window (read through a memory map), augmented,
with a modality subset drawn from the recipe's distribution over the 15 (uniform unless
weights are given; restricted to the subsets a case has when its metadata marks a modality
absent). Evaluation samples: the whole cropped volume, its label, its assigned
subset and its name. Randomness comes from numpy Generators seeded by (seed, epoch, index),
so a run gives the same samples whatever the number of DataLoader workers.
"""
import os

import numpy as np
import torch
from torch.utils.data import Dataset

from utils.brats import MODALITIES, SUBSETS
from utils.errors import first_line

from .augment import AUGMENTATIONS, DEFAULT, POSITION_SAFE, random_crop, random_flip
from .preprocessing import CaseError, output_paths, read_meta
from .splits import read_split


def case_arrays(root, case, mmap=True):
    """(volume (X, Y, Z, M) float32, label (X, Y, Z) uint8) of a preprocessed case; CaseError
    for a missing or unreadable file or arrays that do not fit together."""
    paths = output_paths(root, case)
    arrays = []
    for key in ("vol", "seg"):
        if not os.path.isfile(paths[key]):
            raise CaseError(case, paths[key], "missing (the case is not preprocessed)")
        try:
            arrays.append(np.load(paths[key], mmap_mode="r" if mmap else None))
        except (ValueError, OSError, EOFError) as err:
            raise CaseError(case, paths[key], f"unreadable or truncated .npy ({first_line(err)})")
    vol, seg = arrays
    for key, array, kinds in (("vol", vol, "fiu"), ("seg", seg, "iub")):
        if array.dtype.kind not in kinds:
            what = "real numbers" if key == "vol" else "integer labels"
            raise CaseError(case, paths[key], f"values of type {array.dtype}, not {what}")
    if vol.ndim != 4 or vol.shape[-1] != len(MODALITIES) or seg.shape != vol.shape[:3]:
        raise CaseError(case, paths["vol"], f"shapes {vol.shape} (volume) and {seg.shape} (labels) do not "
                                            f"fit (X, Y, Z, {len(MODALITIES)}) and (X, Y, Z)")
    return vol, seg


def check_case(root, case, cases):
    """Read a case's arrays and metadata: their CaseError, naming the split file that lists
    the case when there is one."""
    try:
        case_arrays(root, case)
        read_meta(root, case)
    except CaseError as err:
        if _split_path(cases):
            raise CaseError(case, err.file, f"{err.reason} (listed in {_split_path(cases)})")
        raise


def draw_subset(rng, subsets, weights=None):
    """One of `subsets` (masks): uniformly, or with probabilities proportional to `weights`
    (one per subset)."""
    if weights is None:
        return subsets[int(rng.integers(len(subsets)))]
    p = np.asarray(weights, dtype=np.float64)
    return subsets[int(rng.choice(len(subsets), p=p / p.sum()))]


def available_subsets(meta):
    """The subsets (of SUBSETS) whose modalities the case has, per its metadata."""
    if meta is None:
        return list(SUBSETS)
    present = meta["present"]
    subsets = [s for s in SUBSETS if all(p or not m for p, m in zip(present, s))]
    if not subsets:
        raise ValueError(f"case {meta['case']}: no modality present")
    return subsets


def crop_origin(root, case, required=True):
    """The native-grid (X, Y, Z) index of a preprocessed case's voxel (0, 0, 0): the low corner
    of its crop box (meta/<case>.json). A case without one: CaseError, or None if not required."""
    meta = read_meta(root, case)
    if meta is None or "crop_box" not in meta:
        if not required:
            return None
        raise CaseError(case, output_paths(root, case)["meta"], "no crop box (the model places every window in "
                        "the native grid: preprocess the case with preprocess.py)")
    return [lo for lo, _ in meta["crop_box"]]


def _split_path(cases):
    """The split file `cases` names, or None for a list of cases."""
    return os.fspath(cases) if isinstance(cases, (str, os.PathLike)) else None


def _cases(cases):
    """A split file path or a list of names / (name, mask) pairs -> [(name, mask or None)]."""
    if _split_path(cases):
        return read_split(cases)
    return [c if isinstance(c, tuple) else (c, None) for c in cases]


def _sample(image, label, mask, name):
    return {"image": torch.from_numpy(image), "label": torch.from_numpy(label.astype(np.int64)),
            "mask": torch.tensor(mask, dtype=torch.bool), "name": name}


class TrainDataset(Dataset):
    """Random crops of the listed cases, augmented, with modality dropout.

    cases: a split file or a list of case names; window: crop size (3-tuple, or an int for a
    cube); augmentations: names of data.augment.AUGMENTATIONS, applied in that order;
    subset_weights: None (uniform) or one weight per subset of SUBSETS; foreground: the
    probability of a crop centred on a tumour voxel; warmup_epochs: in epochs before it every
    sample has all the modalities its case has; positions: each sample also has "grid" (3, 2)
    int64, per axis the native-grid index of the crop's first voxel and the step (+1, or -1
    along a flipped axis), which needs the cases' crop boxes and augmentations that keep the
    voxels on the grid (POSITION_SAFE). seed: base of the per-sample random state
    (default: derived from torch's global seed when the dataset is built). Call set_epoch(e)
    before each epoch for fresh draws.
    """

    def __init__(self, root, cases, window=128, augmentations=DEFAULT, subset_weights=None,
                 foreground=0.0, seed=None, warmup_epochs=0, positions=False):
        self.root, self.window, self.augmentations = root, window, tuple(augmentations)
        self.foreground, self.warmup_epochs = foreground, warmup_epochs
        self.cases = [name for name, _ in _cases(cases)]
        self.seed = int(torch.initial_seed() % 2 ** 63) if seed is None else seed
        self.epoch = 0
        for name in self.cases:
            check_case(root, name, cases)  # faulty files fail here, in one line, not in a worker
        self.origins = [crop_origin(root, name) for name in self.cases] if positions else None
        moving = [a for a in self.augmentations if a not in POSITION_SAFE]
        if positions and moving:
            raise ValueError(f"augmentation {moving[0]!r} moves voxels off the native grid; a model that uses "
                             f"positions takes only {', '.join(POSITION_SAFE)}")
        if subset_weights is not None and len(subset_weights) != len(SUBSETS):
            raise ValueError(f"subset_weights: one weight per subset ({len(SUBSETS)}), got {len(subset_weights)}")
        self.subsets, self.weights = [], []
        weight_of = dict(zip(SUBSETS, subset_weights)) if subset_weights is not None else None
        for name in self.cases:
            subsets = available_subsets(read_meta(root, name))
            weights = None if weight_of is None else [weight_of[s] for s in subsets]
            if weights is not None and not sum(weights):
                raise ValueError(f"case {name}: no subset of the modalities it has gets a positive weight")
            self.subsets.append(subsets)
            self.weights.append(weights)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.cases)

    def __getitem__(self, index):
        rng = np.random.default_rng([self.seed, self.epoch, index])
        name = self.cases[index]
        vol, seg = case_arrays(self.root, name)
        image, label, start = random_crop(vol, seg, self.window, rng, self.foreground, return_start=True)
        flipped = np.zeros(3, bool)  # flips tracked for the grid
        for aug in self.augmentations:
            if aug == "flip":
                image, label, axes = random_flip(image, label, rng, return_axes=True)
                flipped ^= np.array(axes)
            else:
                image, label = AUGMENTATIONS[aug](image, label, rng)
        subsets = self.subsets[index]
        if self.epoch < self.warmup_epochs:
            mask = max(subsets, key=sum)
        else:
            mask = draw_subset(rng, subsets, self.weights[index])
        sample = _sample(image.astype(np.float32), label, mask, name)
        sample["available"] = torch.tensor(max(subsets, key=sum), dtype=torch.bool)  # what the case has
        if self.origins is not None:  # a flipped axis starts at the crop's last voxel
            first = [o + s + (w - 1 if f else 0)
                     for o, s, w, f in zip(self.origins[index], start, image.shape[1:], flipped)]
            sample["grid"] = torch.tensor([[a, -1 if f else 1] for a, f in zip(first, flipped)], dtype=torch.int64)
        return sample


class EvalDataset(Dataset):
    """Whole cropped volumes (M, X, Y, Z) with label, assigned subset and name, and "origin"
    (the native-grid index of the volume's first voxel) where the case has its crop box. A case
    without a mask in its split file gets SUBSETS[index % 15]; `subset` forces one for every
    case."""

    def __init__(self, root, cases, subset=None):
        self.root = root
        self.entries = _cases(cases)
        self.subset = subset
        for name, _ in self.entries:
            check_case(root, name, cases)

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, index):
        name, mask = self.entries[index]
        mask = self.subset or mask or SUBSETS[index % len(SUBSETS)]
        vol, seg = case_arrays(self.root, name, mmap=False)
        sample = _sample(np.ascontiguousarray(vol.transpose(3, 0, 1, 2), dtype=np.float32), seg, mask, name)
        origin = crop_origin(self.root, name, required=False)
        if origin is not None:
            sample["origin"] = origin
        return sample
