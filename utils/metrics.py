"""BraTS metrics on label maps (SPEC section 5): Dice of the whole tumour (WT), tumour core
(TC) and enhancing tumour (ET), ET Dice after the 500-voxel post-processing (ETpp), and the
95th-percentile Hausdorff distance (HD95, mm) per region.

Dice = (2 |P & T| + eps) / (|P| + |T| + eps), eps = 1e-8: an empty prediction of an empty
region scores 1, a non-empty prediction of an empty region (or the reverse) about 0.
ETpp: a predicted ET of fewer than 500 voxels is removed before the ET Dice.
HD95 as the BraTS evaluator computes it: surface voxels of each mask (the voxels the 6-connected
erosion removes), the distance (mm, voxel spacing applied) from every surface voxel of one mask
to the nearest surface voxel of the other, in both directions; HD95 is the larger of the two
directions' 95th percentiles. Empty masks follow the BraTS convention: both empty -> 0, one
empty -> 373.13 mm (the diagonal of the 240 x 240 x 155 mm BraTS volume).
"""
import numpy as np
from scipy import ndimage

from .brats import REGIONS

EPS = 1e-8
ET_MIN_VOXELS = 500
HD95_ONE_EMPTY = 373.13


def region_masks(label):
    """{region: bool mask} of a label map."""
    return {name: np.isin(label, labels) for name, labels in REGIONS.items()}


def dice(pred, target, eps=EPS):
    inter = np.logical_and(pred, target).sum()
    return float((2 * inter + eps) / (pred.sum() + target.sum() + eps))


def _surface(mask):
    return mask & ~ndimage.binary_erosion(mask, ndimage.generate_binary_structure(3, 1))


def hd95(pred, target, spacing=(1, 1, 1)):
    """95th-percentile Hausdorff distance (mm) between two bool masks (see module docstring)."""
    if not pred.any() and not target.any():
        return 0.0
    if not pred.any() or not target.any():
        return HD95_ONE_EMPTY
    # both surfaces lie in the union's bounding box; one voxel of margin keeps erosion exact
    idx = np.argwhere(pred | target)
    box = tuple(slice(max(lo - 1, 0), hi + 2) for lo, hi in zip(idx.min(0), idx.max(0)))
    a, b = _surface(pred[box]), _surface(target[box])
    to_b = ndimage.distance_transform_edt(~b, sampling=spacing)[a]
    to_a = ndimage.distance_transform_edt(~a, sampling=spacing)[b]
    return float(max(np.percentile(to_b, 95), np.percentile(to_a, 95)))


def brats_metrics(pred, target, spacing=(1, 1, 1), distances=True):
    """Label maps (X, Y, Z) with labels 0-3 -> {"WT", "TC", "ET", "ETpp", "HD95_WT",
    "HD95_TC", "HD95_ET"} (Dice and mm); the Dice scores only with distances=False."""
    pred, target = np.asarray(pred), np.asarray(target)
    if pred.shape != target.shape:
        raise ValueError(f"prediction {pred.shape} and reference {target.shape} differ in shape")
    p, t = region_masks(pred), region_masks(target)
    out = {name: dice(p[name], t[name]) for name in REGIONS}
    et_pp = p["ET"] if p["ET"].sum() >= ET_MIN_VOXELS else np.zeros_like(p["ET"])
    out["ETpp"] = dice(et_pp, t["ET"])
    for name in REGIONS if distances else ():
        out[f"HD95_{name}"] = hd95(p[name], t[name], spacing)
    return out
