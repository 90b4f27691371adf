"""Small hand-made raw cases in the BraTS 2023 layout, with a known brain box, for the
preprocessing tests."""
import os

import nibabel as nib
import numpy as np

from utils.brats import MODALITY_SUFFIXES, SEG_SUFFIX

SHAPE = (40, 36, 30)
BRAIN = (slice(6, 30), slice(3, 31), slice(2, 27))  # voxels [6, 29] x [3, 30] x [2, 26]
AFFINE = np.array([[-1.0, 0, 0, 0], [0, -1.0, 0, SHAPE[1] - 1], [0, 0, 1.0, 0], [0, 0, 0, 1]])


def save(path, data, affine=AFFINE):
    img = nib.Nifti1Image(data, affine)
    img.header.set_zooms((1.0, 1.0, 1.0))
    nib.save(img, path)


def make_arrays(seed=0):
    """(images {suffix: int16 array}, label uint8 with labels 1, 2 and legacy 4)."""
    rng = np.random.default_rng(seed)
    images = {}
    for k, suffix in enumerate(MODALITY_SUFFIXES):
        data = np.zeros(SHAPE, np.int16)
        data[BRAIN] = rng.integers(100 * (k + 1), 300 * (k + 1), size=data[BRAIN].shape)
        images[suffix] = data
    label = np.zeros(SHAPE, np.uint8)
    label[14:20, 12:18, 10:16] = 2
    label[15:19, 13:17, 11:15] = 4  # BraTS before 2023: ET is 4
    label[16:18, 14:16, 12:14] = 1
    return images, label


def write_case(root, name, seed=0, images=None, label=None, affine=AFFINE, skip=()):
    """Write one case folder; arrays default to make_arrays(seed). Returns its path."""
    default_images, default_label = make_arrays(seed)
    images = images or default_images
    label = default_label if label is None else label
    folder = os.path.join(root, name)
    os.makedirs(folder, exist_ok=True)
    for suffix in MODALITY_SUFFIXES:
        if suffix not in skip:
            save(os.path.join(folder, f"{name}-{suffix}.nii.gz"), images[suffix], affine)
    if SEG_SUFFIX not in skip:
        save(os.path.join(folder, f"{name}-{SEG_SUFFIX}.nii.gz"), label, affine)
    return folder
