"""One patient's scans for prediction: whichever of the four sequences are present, found by
their BraTS file names in a folder or given one by one, read, checked and preprocessed exactly
as training cases are (preprocessing.crop_and_normalize)."""
import os
import re
from dataclasses import dataclass

import nibabel as nib
import numpy as np

from utils.brats import MODALITIES, MODALITY_ALIASES, MODALITY_NAMES

from .preprocessing import CaseError, crop_and_normalize, read_modalities


@dataclass
class Patient:
    volume: np.ndarray  # (M, x, y, z) float32, cropped and z-scored; zeros for absent modalities
    mask: tuple  # (M,) bool: the modalities present
    box: list  # crop box [(lo, hi)] per axis in the native grid
    reference: nib.Nifti1Image  # the first present modality's image: native shape and affine


def modality_of(filename):
    """The MODALITIES index a NIfTI file name stands for ('...-t2f.nii.gz', '..._flair.nii'),
    or None."""
    stem, n = re.subn(r"\.nii(\.gz)?$", "", filename.lower())
    if not n:
        return None
    suffix = re.split(r"[-_.]", stem)[-1]
    return next((k for k, aliases in enumerate(MODALITY_ALIASES) if suffix in aliases), None)


def modality_files(folder):
    """[path or None] per modality: the NIfTI files of `folder` named like a BraTS case's
    (other files, the segmentation included, are ignored)."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: no such folder")
    paths = [None] * len(MODALITIES)
    for name in sorted(os.listdir(folder)):
        k = modality_of(name)
        if k is None or name.startswith("."):
            continue
        if paths[k]:
            raise CaseError(None, os.path.join(folder, name), f"a second {MODALITY_NAMES[k]} file "
                                                             f"besides {os.path.basename(paths[k])}")
        paths[k] = os.path.join(folder, name)
    return paths


def one_grid_1mm(paths, tolerance=1e-3):
    """Whether the given paths are NIfTI files of one grid (shape and affine) of 1 mm voxels, as
    BraTS cases are; also True when a header cannot be read (load_patient then names the file)."""
    headers = []
    for path in filter(None, paths):
        if os.path.isdir(path):
            return False
        try:
            headers.append(nib.load(path))
        except Exception:
            return True
    if not headers:
        return True
    first = headers[0]
    return all(h.shape == first.shape and np.allclose(h.affine, first.affine, atol=tolerance)
               and np.allclose(h.header.get_zooms()[:3], 1, atol=tolerance) for h in headers)


def load_patient(paths, min_size):
    """paths: [path or None] per modality -> Patient, cropped to at least min_size (an int, or
    one per axis: the model's window). Every given file must be readable, have image content
    and share the others' grid (shape and affine); otherwise CaseError naming it."""
    if not any(paths):
        raise CaseError(None, "input", "no FLAIR, T1c, T1 or T2 image given")
    image, reference = read_modalities(None, paths)
    for k, path in enumerate(paths):
        if path and image[k].min() == image[k].max():
            raise CaseError(None, path, f"no image content (every voxel is {image[k].flat[0]:g})")
    volume, box, present = crop_and_normalize(image, min_size)
    for k, path in enumerate(paths):
        if path and not present[k]:
            raise CaseError(None, path, "constant over the brain: no image content")
    return Patient(volume, tuple(p is not None for p in paths), box, reference)
