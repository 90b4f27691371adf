"""Training crops and augmentations (SPEC section 4, with the original's defects fixed: one
intensity factor per modality, labels never filled with -1). Images are (M, X, Y, Z), labels
(X, Y, Z); every function draws from the numpy Generator it is given."""
import numpy as np
from scipy import ndimage

from utils.brats import REGIONS

PLANES = ((0, 1), (1, 2), (0, 2))  # spatial axis pairs a rotation may turn


def random_crop(image, label, window, rng, foreground=0.0, return_start=False):
    """A random window (3-tuple, or an int for a cube) of image (X, Y, Z, M) (as stored, may
    be a memory map) -> (M, *window) float32 array and its label. With probability
    `foreground` the window is centred (as far as the borders allow) on a tumour voxel: one of
    the regions (WT, TC, ET) the case has, drawn uniformly (as nnU-Net's oversampling draws a
    region, and ShaSpec's a region channel), then one of its voxels; otherwise, and for a case
    without tumour, its start is uniform. An axis
    shorter than the window is padded at its far end, as evaluation pads it: the image by
    replicating the border, the label with background. return_start: also the window's start
    in the volume (3 ints)."""
    window = (window,) * 3 if isinstance(window, int) else tuple(window)
    dims = image.shape[:3]
    padded = [max(d, w) for d, w in zip(dims, window)]
    centre = None
    if foreground and rng.random() < foreground:
        label = np.asarray(label)
        present = [labels for labels in REGIONS.values() if np.isin(label, labels).any()]
        if present:
            voxels = np.flatnonzero(np.isin(label, present[int(rng.integers(len(present)))]))
            centre = np.unravel_index(voxels[int(rng.integers(voxels.size))], dims)
    if centre is None:
        start = [int(rng.integers(0, p - w + 1)) for p, w in zip(padded, window)]
    else:
        start = [min(max(int(c) - w // 2, 0), p - w) for c, p, w in zip(centre, padded, window)]
    sl = tuple(slice(s, min(s + w, d)) for s, w, d in zip(start, window, dims))
    crop, crop_label = np.asarray(image[sl], dtype=np.float32), np.asarray(label[sl])
    pad = [(0, w - (s.stop - s.start)) for s, w in zip(sl, window)]
    if any(p for _, p in pad):
        crop = np.pad(crop, pad + [(0, 0)], mode="edge")
        crop_label = np.pad(crop_label, pad)
    out = np.ascontiguousarray(crop.transpose(3, 0, 1, 2)), np.ascontiguousarray(crop_label)
    return out + (tuple(start),) if return_start else out


def random_rotation(image, label, rng, max_angle=10):
    """Rotate image and label together by an integer angle in [-max_angle, max_angle) degrees
    in one of the three axis planes; nearest-neighbour, borders filled from the nearest voxel."""
    angle = int(rng.integers(-max_angle, max_angle))
    axes = PLANES[int(rng.integers(len(PLANES)))]
    if angle == 0:
        return image, label
    image = ndimage.rotate(image, angle, axes=(axes[0] + 1, axes[1] + 1), reshape=False, order=0,
                           mode="nearest")
    label = ndimage.rotate(label, angle, axes=axes, reshape=False, order=0, mode="nearest")
    return image, label


def random_intensity(image, rng, scale=0.1, shift=0.1):
    """x * U(1 - scale, 1 + scale) + U(-shift, shift), one factor pair per modality."""
    M = image.shape[0]
    factor = rng.uniform(1 - scale, 1 + scale, size=(M, 1, 1, 1)).astype(image.dtype)
    offset = rng.uniform(-shift, shift, size=(M, 1, 1, 1)).astype(image.dtype)
    return image * factor + offset


def random_flip(image, label, rng, p=0.5, return_axes=False):
    """Flip each spatial axis with probability p (image and label together). return_axes:
    also which axes were flipped (3 bools)."""
    flipped = [bool(rng.random() < p) for _ in range(3)]
    for axis in np.flatnonzero(flipped):
        image, label = np.flip(image, axis + 1), np.flip(label, axis)
    out = np.ascontiguousarray(image), np.ascontiguousarray(label)
    return out + (flipped,) if return_axes else out


def _nnunet(name):
    """data.augment_nnunet's `name`, imported at the first call (batchgeneratorsv2 and what it
    imports load only for the models that use it)."""
    def run(image, label, rng):
        from . import augment_nnunet
        return getattr(augment_nnunet, name)(image, label, rng)
    return run


# The augmentations a recipe can name (utils.recipe.AUGMENTATIONS): (image, label, rng) -> (image, label)
AUGMENTATIONS = {"rotation": random_rotation,
                 "intensity": lambda image, label, rng: (random_intensity(image, rng), label),
                 "flip": random_flip,
                 "nnunet": _nnunet("nnunet_default"),
                 "nnunet_shaspec": _nnunet("nnunet_shaspec")}
DEFAULT = ("rotation", "intensity", "flip")  # IM-Fuse's
# those that keep every voxel on the native grid (flips are tracked): for models that use positions
POSITION_SAFE = ("intensity", "flip")
