"""Training crops and augmentations (SPEC section 4, with the original's defects fixed: one
intensity factor per modality, labels never filled with -1). Images are (M, X, Y, Z), labels
(X, Y, Z); every function draws from the numpy Generator it is given."""
import numpy as np
from scipy import ndimage

PLANES = ((0, 1), (1, 2), (0, 2))  # spatial axis pairs a rotation may turn


def random_crop(image, label, window, rng, foreground=0.0):
    """A random window (3-tuple, or an int for a cube) of image (X, Y, Z, M) (as stored, may
    be a memory map) -> (M, *window) float32 array and its label. With probability
    `foreground` the window is centred (as far as the borders allow) on a tumour voxel drawn
    uniformly; otherwise, and for a case without tumour, its start is uniform."""
    window = (window,) * 3 if isinstance(window, int) else tuple(window)
    dims = image.shape[:3]
    if any(d < w for d, w in zip(dims, window)):
        raise ValueError(f"volume {dims} is smaller than the window {window}; "
                         f"preprocess with --min-size {max(window)}")
    centre = None
    if foreground and rng.random() < foreground:
        tumour = np.flatnonzero(np.asarray(label))
        if tumour.size:
            centre = np.unravel_index(tumour[int(rng.integers(tumour.size))], dims)
    if centre is None:
        start = [int(rng.integers(0, d - w + 1)) for d, w in zip(dims, window)]
    else:
        start = [min(max(int(c) - w // 2, 0), d - w) for c, d, w in zip(centre, dims, window)]
    sl = tuple(slice(s, s + w) for s, w in zip(start, window))
    return (np.ascontiguousarray(np.asarray(image[sl], dtype=np.float32).transpose(3, 0, 1, 2)),
            np.ascontiguousarray(label[sl]))


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


def random_flip(image, label, rng, p=0.5):
    """Flip each spatial axis with probability p (image and label together)."""
    for axis in range(3):
        if rng.random() < p:
            image, label = np.flip(image, axis + 1), np.flip(label, axis)
    return np.ascontiguousarray(image), np.ascontiguousarray(label)


# The augmentations a recipe can name (utils.recipe.AUGMENTATIONS): (image, label, rng) -> (image, label)
AUGMENTATIONS = {"rotation": random_rotation,
                 "intensity": lambda image, label, rng: (random_intensity(image, rng), label),
                 "flip": random_flip}


def augment(image, label, rng, names=tuple(AUGMENTATIONS)):
    """The named augmentations in the order given (default IM-Fuse's: rotation, intensity
    change, flips)."""
    for name in names:
        image, label = AUGMENTATIONS[name](image, label, rng)
    return image, label
