"""BraTS 2023 preprocessing (SPEC section 1), writing what the original scripts write
(`vol/<case>_vol.npy` (X, Y, Z, 4) float32, `seg/<case>_seg.npy` (X, Y, Z) uint8) plus
`meta/<case>.json` with what they lose: crop box, original shape, affine, spacing and the
modalities present.

Steps of one case: stack the four modalities (MODALITIES order) as float32; bounding box of
the voxels where the maximum over modalities is non-zero (last voxel included), widened
symmetrically to at least `min_size` per axis and shifted inward at both borders; crop;
z-score each modality over the brain voxels (sum over modalities > 0); labels 4 -> 3.
"""
import contextlib
import json
import os
import sys
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import nibabel as nib
import numpy as np

from utils.brats import LABELS, LEGACY_LABEL_MAP, MODALITIES, MODALITY_SUFFIXES, SEG_SUFFIX
from utils.errors import first_line
from utils.io import atomic_path
from utils.progress import progress_bar

from .splits import make_split, write_split

VALID_LABELS = set(LABELS) | set(LEGACY_LABEL_MAP)
# more voxels than any MR image has: a header declaring more is refused before any data is read
MAX_VOXELS = 2 ** 30
# metadata fields every reader may rely on (crop_box is optional: models that need it say so)
REQUIRED_META = ("present", "original_shape", "spacing", "affine")


class CaseError(Exception):
    """A faulty case: which case, which file, what is wrong."""

    def __init__(self, case, file, reason):
        super().__init__(f"{case}: {file}: {reason}" if case else f"{file}: {reason}")
        self.case, self.file, self.reason = case, file, reason


@dataclass
class Case:
    name: str
    image: np.ndarray  # (4, X, Y, Z) float32, MODALITIES order
    label: np.ndarray  # (X, Y, Z) uint8, labels 0-3
    affine: np.ndarray  # (4, 4)
    spacing: tuple


def case_files(case_dir):
    """{suffix: path} of the five NIfTI files of a BraTS 2023 case folder."""
    name = os.path.basename(os.path.normpath(case_dir))
    return {s: os.path.join(case_dir, f"{name}-{s}.nii.gz") for s in MODALITY_SUFFIXES + (SEG_SUFFIX,)}


def find_cases(input_path):
    """Sorted case folders under input_path (every sub-folder is a case)."""
    if not os.path.isdir(input_path):
        raise FileNotFoundError(f"{input_path}: no such folder")
    return sorted(os.path.join(input_path, d) for d in os.listdir(input_path)
                  if os.path.isdir(os.path.join(input_path, d)) and not d.startswith("."))


def _name(case, path):
    """How messages name a file: by its name within a case, by its path otherwise."""
    return os.path.basename(path) if case else path


def check_declared_size(case, name, shape):
    """CaseError for an image whose header declares a zero-sized axis or more than MAX_VOXELS."""
    if 0 in shape:
        raise CaseError(case, name, f"an axis of length 0 (shape {tuple(shape)})")
    if np.prod(shape, dtype=np.float64) > MAX_VOXELS:
        raise CaseError(case, name, f"its header declares {'x'.join(map(str, shape))} voxels, more than any MR "
                                    f"image has (limit {MAX_VOXELS:,})")


def read_nifti(case, path, integer=False):
    """(nibabel image, data) of a NIfTI file, checked: readable, 3-D, not too large, finite
    (float32 unless integer); CaseError naming it otherwise."""
    name = _name(case, path)
    if not os.path.isfile(path):
        raise CaseError(case, name, "missing file")
    try:
        img = nib.load(path)
        check_declared_size(case, name, img.shape)
        data = np.asanyarray(img.dataobj)
    except (OSError, EOFError, ValueError, MemoryError, zlib.error, nib.filebasedimages.ImageFileError) as err:
        raise CaseError(case, name, f"unreadable or truncated NIfTI ({type(err).__name__}: "
                                    f"{first_line(err)})")
    if data.ndim != 3:
        raise CaseError(case, name, f"expected a 3-D image, got shape {data.shape}")
    if not integer:
        data = data.astype(np.float32)
        if not np.isfinite(data).all():
            raise CaseError(case, name, "NaN or infinite values")
    return img, data


def read_modalities(case, paths):
    """The images of `paths` (one path per MODALITIES entry, None for an absent modality) ->
    (image (M, X, Y, Z) float32 with zeros for absent modalities, reference nibabel image).
    Raises CaseError for a missing or unreadable file or one whose shape or affine differs
    from the first's. case None: messages name the files by their paths."""
    images, ref = {}, None
    for k, path in enumerate(paths):
        if path is None:
            continue
        img, data = read_nifti(case, path)
        if ref is None:
            ref = (_name(case, path), img)
        elif data.shape != ref[1].shape:
            raise CaseError(case, _name(case, path), f"shape {data.shape} differs from {ref[0]}'s {ref[1].shape}")
        elif not np.allclose(img.affine, ref[1].affine, atol=1e-3):
            raise CaseError(case, _name(case, path), f"affine (position or orientation) differs from {ref[0]}'s")
        images[k] = data
    if ref is None:
        raise ValueError("no modality file given")
    image = np.zeros((len(paths),) + ref[1].shape, dtype=np.float32)
    for k, data in images.items():
        image[k] = data
    return image, ref[1]


def load_case(case_dir):
    """Read and check a raw case; raises CaseError for a faulty one."""
    case = os.path.basename(os.path.normpath(case_dir))
    files = case_files(case_dir)
    image, ref = read_modalities(case, [files[s] for s in MODALITY_SUFFIXES])
    seg_img, seg = read_nifti(case, files[SEG_SUFFIX], integer=True)
    seg_name = os.path.basename(files[SEG_SUFFIX])
    if seg.shape != ref.shape:
        raise CaseError(case, seg_name, f"shape {seg.shape} differs from the images' {ref.shape}")
    if not np.allclose(seg_img.affine, ref.affine, atol=1e-3):
        raise CaseError(case, seg_name, "affine differs from the images'")
    if not np.isfinite(seg).all() or not np.array_equal(seg, np.round(seg)):
        raise CaseError(case, seg_name, "labels are not whole numbers")
    values = set(np.unique(seg).astype(int).tolist())
    if values - VALID_LABELS:
        raise CaseError(case, seg_name, f"unknown labels {sorted(values - VALID_LABELS)} "
                                        f"(expected {sorted(VALID_LABELS)})")
    label = seg.astype(np.uint8)
    for old, new in LEGACY_LABEL_MAP.items():
        label[label == old] = new
    if not image.any():
        raise CaseError(case, os.path.basename(files[MODALITY_SUFFIXES[0]]), "empty image: every modality is zero")
    spacing = tuple(float(z) for z in ref.header.get_zooms()[:3])
    if not min(spacing) > 0:
        raise CaseError(case, os.path.basename(files[MODALITY_SUFFIXES[0]]), f"voxel sizes {spacing} in its header")
    return Case(case, image, label, ref.affine, spacing)


def crop_box(nonzero, min_size):
    """[(lo, hi), ...] (hi exclusive) per axis: the bounding box of `nonzero`, widened
    symmetrically to at least min_size (an int, or one per axis) and shifted inward at
    either border."""
    box = []
    least = (min_size,) * nonzero.ndim if isinstance(min_size, int) else tuple(min_size)
    for axis, (dim, smallest) in enumerate(zip(nonzero.shape, least)):
        other = tuple(a for a in range(nonzero.ndim) if a != axis)
        idx = np.flatnonzero(nonzero.any(axis=other))
        lo, hi = int(idx[0]), int(idx[-1]) + 1
        size = min(max(hi - lo, smallest), dim)
        lo -= (size - (hi - lo)) // 2
        lo = min(max(lo, 0), dim - size)
        box.append((lo, lo + size))
    return box


def normalize(image):
    """Z-score each modality over the brain voxels (sum over modalities > 0), in place.
    A modality that is zero (or constant) over the brain stays zero and is reported absent.
    Returns the list of present flags."""
    brain = image.sum(0) > 0
    present = []
    for k in range(image.shape[0]):
        values = image[k][brain].astype(np.float64)
        std = values.std() if values.size else 0.0
        if std == 0:
            image[k] = 0
            present.append(False)
        else:
            image[k] = ((image[k] - values.mean()) / std).astype(np.float32)
            present.append(True)
    return present


def crop_and_normalize(image, min_size):
    """image (M, X, Y, Z) -> (cropped and z-scored copy, crop box, present flags): the steps
    every case goes through, for training and for prediction alike."""
    box = crop_box(image.max(0) != 0, min_size)
    cropped = np.ascontiguousarray(image[(slice(None),) + tuple(slice(lo, hi) for lo, hi in box)])
    return cropped, box, normalize(cropped)


def uncrop(cropped, shape, box):
    """The inverse of the crop of crop_and_normalize: cropped (..., x, y, z) placed back at
    the crop box `box` of the native grid `shape` (X, Y, Z) -> (..., X, Y, Z), zeros outside."""
    full = np.zeros(cropped.shape[:-3] + tuple(shape), dtype=cropped.dtype)
    full[(...,) + tuple(slice(lo, hi) for lo, hi in box)] = cropped
    return full


def output_paths(out_dir, case):
    return {"vol": os.path.join(out_dir, "vol", f"{case}_vol.npy"),
            "seg": os.path.join(out_dir, "seg", f"{case}_seg.npy"),
            "meta": os.path.join(out_dir, "meta", f"{case}.json")}


def is_done(out_dir, case):
    return all(os.path.isfile(p) for p in output_paths(out_dir, case).values())


def preprocess_case(case_dir, out_dir, min_size=128, overwrite=False):
    """Preprocess one case folder into out_dir; returns "written" or "skipped".
    A faulty case raises CaseError and leaves no output (earlier outputs removed)."""
    case = os.path.basename(os.path.normpath(case_dir))
    paths = output_paths(out_dir, case)
    if not overwrite and is_done(out_dir, case):
        return "skipped"
    try:
        c = load_case(case_dir)
    except CaseError:
        for p in paths.values():
            if os.path.exists(p):
                os.remove(p)
        raise
    image, box, present = crop_and_normalize(c.image, min_size)
    sl = tuple(slice(lo, hi) for lo, hi in box)
    meta = {"case": case, "modalities": list(MODALITIES), "present": present,
            "original_shape": list(c.label.shape), "crop_box": [list(b) for b in box],
            "affine": np.asarray(c.affine, dtype=float).tolist(), "spacing": list(c.spacing),
            "min_size": min_size}
    # an ExitStack renames in reverse order of entry: meta last, its presence marks the case done
    with contextlib.ExitStack() as stack:
        tmp = {k: stack.enter_context(atomic_path(paths[k])) for k in ("meta", "seg", "vol")}
        np.save(tmp["vol"], image.transpose(1, 2, 3, 0))
        np.save(tmp["seg"], np.ascontiguousarray(c.label[sl]))
        with open(tmp["meta"], "w") as f:
            json.dump(meta, f, indent=1)
    return "written"


def read_meta(root, case):
    """The metadata of a preprocessed case, or None (data preprocessed by the original)."""
    path = output_paths(root, case)["meta"]
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            meta = json.load(f)
    except (ValueError, OSError) as err:
        raise CaseError(case, path, f"unreadable metadata ({first_line(err)})")
    problem = meta_problem(meta)
    if problem:
        raise CaseError(case, path, f"malformed metadata: {problem}")
    return meta


def _numbers(value, count, kind=(int, float)):
    return (isinstance(value, list) and len(value) == count
            and all(isinstance(v, kind) and not isinstance(v, bool) for v in value))


def meta_problem(meta):
    """What is wrong with the fields of a metadata dict that are there, in words, or None."""
    if not isinstance(meta, dict):
        return f"expected a JSON object, got {type(meta).__name__}"
    checks = {"present": lambda v: isinstance(v, list) and len(v) == len(MODALITIES)
              and all(isinstance(p, bool) for p in v),
              "crop_box": lambda v: isinstance(v, list) and len(v) == 3
              and all(_numbers(b, 2, int) and 0 <= b[0] < b[1] for b in v),
              "original_shape": lambda v: _numbers(v, 3, int) and min(v) > 0,
              "spacing": lambda v: _numbers(v, 3) and min(v) > 0,
              "affine": lambda v: isinstance(v, list) and len(v) == 4 and all(_numbers(row, 4) for row in v)}
    missing = [key for key in REQUIRED_META if key not in meta]
    if missing:
        return f"no {', '.join(missing)}"
    wrong = [key for key, ok in checks.items() if key in meta and not ok(meta[key])]
    return f"{', '.join(wrong)} of the wrong type or size" if wrong else None


def _run_one(args):
    case_dir, out_dir, min_size, overwrite = args
    try:
        return os.path.basename(case_dir), preprocess_case(case_dir, out_dir, min_size, overwrite), None
    except CaseError as err:
        return err.case, "failed", str(err)


def preprocess_all(input_path, output_path, workers=1, min_size=128, overwrite=False, seed=999,
                   progress=True, report=lambda line: print(line, file=sys.stderr)):
    """Preprocess every case folder of input_path and write the seeded split of the good
    cases to output_path/splits. Faulty cases are reported (one line each through `report`)
    and skipped. Returns {"written": [...], "skipped": [...], "failed": [...]}."""
    jobs = [(case_dir, output_path, min_size, overwrite) for case_dir in find_cases(input_path)]
    result = {"written": [], "skipped": [], "failed": []}
    bar = progress_bar(total=len(jobs), desc="preprocess", unit="case", enabled=progress)
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            outcomes = pool.map(_run_one, jobs)
            for outcome in outcomes:
                _record(outcome, result, report, bar)
    else:
        for job in jobs:
            _record(_run_one(job), result, report, bar)
    bar.close()
    good = result["written"] + result["skipped"]
    if good:
        write_split(os.path.join(output_path, "splits"), make_split(good, seed))
    return result


def _record(outcome, result, report, bar):
    case, status, message = outcome
    result[status].append(case)
    if message:
        with bar.external_write_mode(file=sys.stderr):
            report(message)
    bar.update()
