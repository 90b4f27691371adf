"""Synthetic brain-tumour cohort in the BraTS 2023 GLI layout, for demos and tests.

    python -m data.synthetic --out DIR --cases N [--seed S] [--size X Y Z] [--workers W]

writes DIR/BraTS-GLI-XXXXX-000/BraTS-GLI-XXXXX-000-{t1n,t1c,t2w,t2f,seg}.nii.gz: four
skull-stripped int16 images (exactly 0 outside the brain) and a uint8 segmentation
(0 background, 1 NCR, 2 ED, 3 ET), all with BraTS's affine diag(-1, -1, 1) (1 mm voxels).

Anatomy (arrays are indexed (x, y, z) = (left-right, anterior-posterior, inferior-superior)):
an ellipsoidal brain with an irregular surface; a thin outer CSF layer with sulci; a cortical
grey-matter shell; white matter; deep grey nuclei; two lateral ventricles; one tumour of random
position, size and shape: necrotic core inside an enhancing rim inside oedema. Each tissue has a
mean intensity per modality (CONTRAST), then partial-volume smoothing, a multiplicative bias
field, Gaussian noise and a random global scale per case and modality.

Every geometric constant below is in mm at the default 240 x 240 x 155 grid; for a smaller
--size they are scaled by the size ratio, so the brain and the tumour shrink with the grid.
"""

import argparse
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from scipy import ndimage

from utils.brats import MODALITY_SUFFIXES, SEG_SUFFIX
from utils.io import save_nifti
from utils.parser import ArgumentParser
from utils.progress import progress_bar

# ---- Sizes and geometry (mm at DEFAULT_SIZE; see _scale) -----------------------------------
DEFAULT_SIZE = (240, 240, 155)  # BraTS grid (x, y, z), 1 mm isotropic
MIN_SIZE = 32  # smallest accepted grid edge (voxels)
MARGIN = 4  # voxels always left between the brain and the grid border
BRAIN_FILL = (0.62, 0.80, 0.84)  # brain diameter / grid edge per axis, before the margin cap
BRAIN_JITTER = 0.06  # relative random shrink of each brain semi-axis
SURFACE_BUMP = 0.05  # relative radial irregularity of the brain surface
SURFACE_CELL_MM = 40.0  # correlation length of the surface irregularity
CSF_MM = 1.5  # outer CSF layer
CORTEX_MM = 3.0  # cortical grey-matter shell under the CSF
GYRUS_MM = 8.0  # correlation length of the folding pattern
SULCUS_DEPTH_MM = 20.0  # how deep sulci (CSF lined with grey matter) reach
SULCUS_WIDTH = 0.10  # |folding field| below this is sulcal CSF ...
SULCAL_GM_WIDTH = 0.60  # ... and below this, grey matter lining the sulcus
# Ellipsoids in units of the brain semi-axes: (centre x (mirrored), y, z), (semi-axes x, y, z)
VENTRICLE = ((0.10, 0.02, 0.15), (0.06, 0.30, 0.13))
DEEP_GREY = ((0.22, 0.04, -0.02), (0.13, 0.22, 0.18))
VENTRICLE_SCALE = (0.7, 1.3)  # random ventricle enlargement
TUMOUR_RHO = (0.2, 0.6)  # tumour centre: normalised radius inside the brain ellipsoid
OEDEMA_MM = (12.0, 35.0)  # oedema radius range
CORE_FRACTION = (0.5, 0.75)  # tumour-core radius / oedema radius
NECROSIS_FRACTION = (0.45, 0.75)  # necrosis radius / core radius
SMALL_CORE_MM = 9.0  # cores smaller than this have no necrosis half of the time
RIM_MM = 2.0  # minimum enhancing-rim thickness
OEDEMA_BUMP, CORE_BUMP = 0.35, 0.2  # relative radial irregularity of oedema and core
TEXTURE = 0.10  # relative intensity heterogeneity inside the tumour

# ---- Appearance ---------------------------------------------------------------------------
BG, CSF, GM, WM, DGM, NCR, ET, ED = range(8)  # tissue codes
SEG_OF_TISSUE = np.array([0, 0, 0, 0, 0, 1, 3, 2], np.uint8)  # tissue code -> BraTS label
# Mean intensity per tissue       BG   CSF   GM    WM    DGM   NCR   ET    ED
CONTRAST = {"t1n": np.array([0.0, 0.30, 0.72, 1.00, 0.80, 0.45, 0.68, 0.62], np.float32),
            "t1c": np.array([0.0, 0.32, 0.75, 1.00, 0.83, 0.38, 1.70, 0.64], np.float32),
            "t2w": np.array([0.0, 1.60, 0.68, 0.45, 0.58, 1.40, 0.95, 1.20], np.float32),
            "t2f": np.array([0.0, 0.20, 0.92, 0.72, 0.85, 0.90, 1.10, 1.35], np.float32)}
CONTRAST_JITTER = 0.03  # relative random change of each mean per case
PARTIAL_VOLUME_SIGMA = 0.6  # Gaussian smoothing (voxels)
BIAS_STRENGTH = 0.12  # log-amplitude (per unit std) of the bias field
BIAS_CELL_MM = 120.0  # correlation length of the bias field
NOISE_SD = 0.03  # Gaussian noise, in CONTRAST units
CASE_SCALE = (500.0, 2000.0)  # global intensity scale per case (log-uniform) ...
MODALITY_SCALE = (0.7, 1.4)  # ... times a uniform factor per modality


def _scale(size):
    """Length factor of a grid relative to DEFAULT_SIZE (geometric mean over axes)."""
    return float(np.prod(np.divide(size, DEFAULT_SIZE)) ** (1 / 3))


def affine(size):
    """BraTS-like voxel-to-world matrix: diag(-1, -1, 1), 1 mm, y offset size[1] - 1."""
    a = np.diag([-1.0, -1.0, 1.0, 1.0])
    a[1, 3] = size[1] - 1
    return a


def _smooth_field(rng, shape, cell):
    """Gaussian random field of zero mean and unit variance, smooth over `cell` voxels.

    Separable: white noise on a control grid of spacing `cell` (one extra point beyond each
    border), interpolated with Gaussian weights whose rows have unit norm."""
    counts = [int(np.ceil((n - 1) / cell)) + 3 for n in shape]
    field = rng.standard_normal(counts, dtype=np.float32)  # (kx, ky, kz)
    for axis in reversed(range(len(shape))):  # axis 0 last: the result comes out contiguous
        knots = (np.arange(counts[axis]) - 1) * cell
        w = np.exp(-0.5 * ((np.arange(shape[axis])[:, None] - knots) / cell) ** 2)  # (n, k)
        w = (w / np.linalg.norm(w, axis=1, keepdims=True)).astype(np.float32)
        field = np.moveaxis(np.tensordot(w, field, axes=(1, axis)), 0, axis)
    return field  # shape


def _ellipsoid(shape, centre, semi):
    """Boolean mask (shape) of an axis-aligned ellipsoid (voxel units)."""
    u = [((np.arange(n) - c) / s) ** 2 for n, c, s in zip(shape, centre, semi)]
    return u[0][:, None, None] + u[1][None, :, None] + u[2][None, None, :] < 1


def _anatomy(rng, size, s):
    """Healthy tissue codes (size, uint8) plus the brain centre and semi-axes (voxels)."""
    centre = (np.asarray(size) - 1) / 2
    semi = np.minimum(np.multiply(BRAIN_FILL, size) / 2, (centre - MARGIN) / (1 + SURFACE_BUMP))
    semi *= 1 - BRAIN_JITTER * rng.random(3)
    u = [(np.arange(n) - c) / a for n, c, a in zip(size, centre, semi)]  # 3 x (n,)
    rho = np.sqrt(u[0][:, None, None] ** 2 + u[1][None, :, None] ** 2 + u[2][None, None, :] ** 2)
    grad = np.sqrt((u[0] / semi[0])[:, None, None] ** 2 + (u[1] / semi[1])[None, :, None] ** 2
                   + (u[2] / semi[2])[None, None, :] ** 2)  # |grad rho| * rho
    surface = 1 + SURFACE_BUMP * np.tanh(_smooth_field(rng, size, max(SURFACE_CELL_MM * s, 3)))
    depth = (surface - rho) * rho / np.maximum(grad, 1e-6)  # ~ distance to the surface (voxels)
    folds = np.abs(_smooth_field(rng, size, max(GYRUS_MM * s, 3)))
    csf, cortex, sulcus = max(CSF_MM * s, 1), max(CORTEX_MM * s, 1), SULCUS_DEPTH_MM * s

    tissue = np.where(depth > 0, WM, BG).astype(np.uint8)  # size
    ventricle = np.multiply(VENTRICLE[1], semi) * rng.uniform(*VENTRICLE_SCALE)
    for side in (-1, 1):
        for (offset, extent), code, radii in ((DEEP_GREY, DGM, None), (VENTRICLE, CSF, ventricle)):
            at = centre + np.multiply(offset, semi) * (side, 1, 1)
            tissue[_ellipsoid(size, at, np.multiply(extent, semi) if radii is None else radii)] = code
    cortical = (depth < csf + cortex) | ((depth < sulcus + cortex) & (folds < SULCAL_GM_WIDTH))
    tissue[(depth > 0) & cortical] = GM
    tissue[(depth > 0) & ((depth < csf) | ((depth < sulcus) & (folds < SULCUS_WIDTH)))] = CSF
    return tissue, centre, semi


def _tumour(rng, tissue, centre, semi, s):
    """Paint a tumour into `tissue` (in place); returns its bounding-box slices and an
    intensity texture field over that box."""
    direction = rng.standard_normal(3)
    at = centre + rng.uniform(*TUMOUR_RHO) * direction / np.linalg.norm(direction) * semi
    r_ed = rng.uniform(*OEDEMA_MM) * s
    r_core = r_ed * rng.uniform(*CORE_FRACTION)
    r_nec = min(r_core * rng.uniform(*NECROSIS_FRACTION), r_core - max(RIM_MM * s, 1.5))
    if r_core < SMALL_CORE_MM * s and rng.random() < 0.5:
        r_nec = 0.0
    reach = r_ed * (1 + OEDEMA_BUMP) + 1
    box = tuple(slice(max(int(c - reach), 0), min(int(c + reach) + 2, n))
                for c, n in zip(at, tissue.shape))
    shape = tuple(b.stop - b.start for b in box)
    d = [(np.arange(b.start, b.stop) - c) ** 2 for b, c in zip(box, at)]
    r = np.sqrt(d[0][:, None, None] + d[1][None, :, None] + d[2][None, None, :])  # box shape
    core_r = r * (1 - CORE_BUMP * np.tanh(_smooth_field(rng, shape, max(0.6 * r_core, 2))))
    oedema = r * (1 - OEDEMA_BUMP * np.tanh(_smooth_field(rng, shape, max(0.4 * r_ed, 2)))) < r_ed

    region = tissue[box]  # view
    brain = region != BG
    region[oedema & ((region == WM) | (region == DGM) | (core_r < 1.3 * r_core)) & brain] = ED
    region[(core_r < r_core) & brain] = ET
    region[(core_r < r_nec) & brain] = NCR
    return box, _smooth_field(rng, shape, max(0.2 * r_core, 1.5))


def _render(rng, tissue, box, texture, suffix):
    """int16 image (tissue shape) of one modality: 0 outside the brain, >= 1 inside."""
    means = CONTRAST[suffix] * (1 + CONTRAST_JITTER * rng.uniform(-1, 1, len(CONTRAST[suffix])))
    image = means.astype(np.float32)[tissue]  # size
    tumour = tissue[box] >= NCR
    image[box][tumour] *= 1 + TEXTURE * texture[tumour]
    image = ndimage.gaussian_filter(image, PARTIAL_VOLUME_SIGMA)
    image *= np.exp(BIAS_STRENGTH * _smooth_field(rng, tissue.shape, BIAS_CELL_MM * _scale(tissue.shape)))
    image += NOISE_SD * rng.standard_normal(tissue.shape, dtype=np.float32)
    image *= np.exp(rng.uniform(*np.log(CASE_SCALE))) * rng.uniform(*MODALITY_SCALE)
    brain = tissue != BG
    return np.where(brain, np.clip(np.rint(image), 1, np.iinfo(np.int16).max), 0).astype(np.int16)


def case_name(index):
    """BraTS 2023 GLI case name, e.g. BraTS-GLI-00007-000."""
    return f"BraTS-GLI-{index:05d}-000"


def make_case(out_dir, index, seed, size=DEFAULT_SIZE):
    """Write case `index` under out_dir; deterministic for (seed, index). Returns its folder."""
    size = tuple(int(n) for n in size)
    rng = np.random.default_rng([seed, index])
    s = _scale(size)
    tissue, centre, semi = _anatomy(rng, size, s)
    box, texture = _tumour(rng, tissue, centre, semi, s)
    folder = Path(out_dir) / case_name(index)
    folder.mkdir(parents=True, exist_ok=True)
    matrix = affine(size)
    for suffix in MODALITY_SUFFIXES:
        save_nifti(folder / f"{folder.name}-{suffix}.nii.gz", _render(rng, tissue, box, texture, suffix), matrix)
    save_nifti(folder / f"{folder.name}-{SEG_SUFFIX}.nii.gz", SEG_OF_TISSUE[tissue], matrix)
    return folder


def _make_case_job(job):
    """make_case on an (out_dir, index, seed, size) tuple, for the process pool."""
    return make_case(*job)


def make_cohort(out_dir, cases, seed=0, size=DEFAULT_SIZE, workers=1):
    """Write cases 0 .. cases-1 under out_dir (workers > 1: parallel processes).
    Returns the case folders in order."""
    jobs = [(out_dir, index, seed, size) for index in range(cases)]
    bar = dict(total=cases, desc="synthetic cases", unit="case")
    if workers <= 1:
        return [make_case(*job) for job in progress_bar(jobs, **bar)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(progress_bar(pool.map(_make_case_job, jobs), **bar))


def _at_least(minimum):
    """argparse type: an int >= minimum."""
    def parse(text):
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


def main(argv=None):
    """Command line (module docstring); bad arguments exit through argparse."""
    parser = ArgumentParser(prog="python -m data.synthetic", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder (created if missing; cases overwritten)")
    parser.add_argument("--cases", required=True, type=_at_least(1), help="number of cases")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--size", nargs=3, type=_at_least(MIN_SIZE), default=list(DEFAULT_SIZE),
                        metavar=("X", "Y", "Z"), help="grid size in voxels (default 240 240 155)")
    parser.add_argument("--workers", type=_at_least(1), default=1, help="parallel processes (default 1)")
    args = parser.parse_args(argv)
    parser.check_writable("--out", args.out)
    if args.seed < 0:
        parser.error("--seed must be >= 0")
    make_cohort(args.out, args.cases, args.seed, tuple(args.size), args.workers)


if __name__ == "__main__":
    main()
