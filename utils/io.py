"""Writing outputs safely: every file is written under a temporary name in its folder and
renamed when complete, so an interrupted run never leaves a half-written file."""
import contextlib
import csv
import os

import nibabel as nib
import numpy as np


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary path next to `path` (same extension, e.g. .nii.gz) to write to;
    renamed to `path` when the block succeeds, removed when it fails."""
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{name}.tmp{os.getpid()}.{name.split('.', 1)[-1]}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_csv(path, rows, fields, formats=None):
    """rows (dicts) -> CSV with the given columns. Floats are written at full precision (the
    shortest text that reads back as the same float), or with the format spec that `formats`
    gives their column (e.g. {"p": ".2e"})."""
    formats = formats or {}

    def cell(key, value):
        if not isinstance(value, (float, np.floating)):
            return value
        return format(float(value), formats[key]) if key in formats else repr(float(value))

    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fields, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: cell(k, v) for k, v in row.items()})


def write_text(path, text):
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def nifti_image(data, affine):
    """data (X, Y, Z[, C]) with the given 4x4 affine -> Nifti1Image, qform and sform set."""
    img = nib.Nifti1Image(data, np.asarray(affine, dtype=np.float64))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    return img


def save_nifti(path, data, affine):
    """data with the given 4x4 affine -> NIfTI (.nii or .nii.gz) at path."""
    with atomic_path(path) as tmp:
        nib.save(nifti_image(data, affine), tmp)


def write_problem(path):
    """Why nothing can be written at `path` (a file to write or replace, or a folder to write
    in), in words, or None: the folder it goes in, or its nearest existing ancestor, is a file
    or a folder this process may not write to."""
    parent = os.path.abspath(path)
    if os.path.isfile(parent):  # replaced in its folder
        parent = os.path.dirname(parent)
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{parent} is a file, not a folder"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"the folder {parent} is not writable"
    return None
