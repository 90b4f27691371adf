"""Training augmentations (SPEC section 4, with the original's defects fixed: one intensity
factor per modality, labels never filled with -1). Images are (M, X, Y, Z), labels (X, Y, Z);
every function draws from the numpy Generator it is given."""
import numpy as np
from scipy import ndimage

PLANES = ((0, 1), (1, 2), (0, 2))  # spatial axis pairs a rotation may turn


def random_crop(image, label, size, rng):
    """Random size^3 window; image (X, Y, Z, M) (as stored, may be a memory map) ->
    (M, size, size, size) float32 array and its (size, size, size) label."""
    dims = image.shape[:3]
    if any(d < size for d in dims):
        raise ValueError(f"volume {dims} is smaller than the patch size {size}; "
                         f"preprocess with --min-size {size}")
    start = [int(rng.integers(0, d - size + 1)) for d in dims]
    sl = tuple(slice(s, s + size) for s in start)
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


def augment(image, label, rng):
    """The training augmentation: rotation, intensity change, flips."""
    image, label = random_rotation(image, label, rng)
    image = random_intensity(image, rng)
    return random_flip(image, label, rng)
