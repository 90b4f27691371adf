"""nnU-Net-style training augmentation from batchgeneratorsv2 (the library nnU-Net v2 uses), with
two parameter sets: ShaSpec's (build_transforms' defaults: its training script, billhhh/ShaSpec
BraTSDataSet.get_train_transform on batchgenerators 0.21, run through the v2 transforms) and
nnU-Net 2.2.1's default 3-D augmentation (NNUNET_221, the nnU-Net version Missing as Masking's
code is built on, whose get_training_transforms uses batchgenerators v1), composed as nnU-Net
composes them.

Images are (M, X, Y, Z) float32 crops already of the model's window, labels (X, Y, Z) integer
maps; a transform pipeline is built once per window (and per parameter set) and reused.

batchgeneratorsv2 draws from numpy's global RandomState (np.random.uniform / random, through
sample_scalar, BGContrast and SpatialTransform) and from torch's global CPU generator
(torch.rand / normal_ in RandomTransform, the per-channel choices, mirroring, the noise fields).
apply_transforms seeds both from one number drawn from the Generator it is given and restores
them afterwards, so a sample is a pure function of that Generator and nothing outside changes.
Not for concurrent use from several threads of one process (the global states are shared);
DataLoader workers are processes and are fine.
"""
import contextlib
import functools

import numpy as np
import torch
from batchgeneratorsv2.transforms.intensity.brightness import (BrightnessAdditiveTransform,
                                                                MultiplicativeBrightnessTransform)
from batchgeneratorsv2.transforms.intensity.contrast import BGContrast, ContrastTransform
from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.random import RandomTransform


class V1Elastic:
    """batchgenerators v1's elastic deformation parameters (alpha ~ U(alpha), sigma ~ U(sigma),
    one pair per sample, sigma in voxels) as the two callables v2's SpatialTransform samples.

    v2 takes a per-axis scale (the smoothing sigma as a fraction of the patch edge) and a per-axis
    magnitude (the largest displacement in voxels: the smoothed noise is normalised to it). `scale`
    returns sigma / edge for each axis, so every axis is smoothed with the same sigma in voxels.
    v1 displaces by gaussian_filter(U(-1, 1) noise, sigma) * alpha, whose standard deviation is
    alpha / (sqrt(3) (2 sqrt(pi) sigma)^(3/2)) = 0.0865 alpha sigma^-1.5 (the noise variance 1/3
    times the sum of the squared 3-D kernel). Its largest absolute value over a 160x160x80 window
    is 3.34 such deviations on average (measured: 45 fields, sigma 9-13, scipy's gaussian_filter
    with v1's zero border; the product is flat in sigma, 0.289 +- 0.005), so `magnitude` returns
    peak * alpha * sigma^-1.5 with peak = 0.29; alpha = 900, sigma = 11 gives 7 voxels. The ratio
    grows slowly with the window (more independent maxima) and is smaller in tiny windows.

    SpatialTransform calls `scale` for axes 0, 1, 2 and then `magnitude` for axes 0, 1, 2; the pair
    is drawn (from numpy's global state, as v2 does) at the call for axis 0.
    """

    def __init__(self, alpha, sigma, peak):
        self.alpha, self.sigma, self.peak = alpha, sigma, peak
        self._drawn = None

    def scale(self, image, dim, patch_size):
        if dim == 0:
            self._drawn = np.random.uniform(*self.alpha), np.random.uniform(*self.sigma)
        return self._drawn[1] / patch_size[dim]

    def magnitude(self, image, patch_size, dim, deformation_scale):
        alpha, sigma = self._drawn
        return self.peak * alpha * sigma ** -1.5


def build_transforms(patch_size, *,
                     p_elastic=0.2, elastic_alpha=(0., 900.), elastic_sigma=(9., 13.), elastic_peak=0.29,
                     p_rotation=0.2, max_rotation_deg=15., p_scaling=0.2, scaling=BGContrast((0.85, 1.25)),
                     p_noise=0.1, noise_std=(0., 0.1),
                     p_blur=0.2, blur_sigma=(0.5, 1.), p_blur_channel=0.5,
                     p_brightness=0.15, brightness=(0.75, 1.25),
                     p_additive=0.15, additive_std=0.1, p_additive_channel=0.5,
                     p_contrast=0.15, contrast=BGContrast((0.75, 1.25)),
                     p_lowres=0.25, lowres_zoom=(0.5, 1.), p_lowres_channel=0.5,
                     p_gamma=0.15, gamma=BGContrast((0.7, 1.5)), p_gamma_inverted=0.,
                     synchronize_blur_axes=True, mirror_axes=(0, 1, 2)):
    """The augmentation pipeline for crops of `patch_size` (X, Y, Z): a ComposeTransforms.
    The defaults are ShaSpec's; p_* are per-sample probabilities, p_*_channel per-channel ones.
    Ranges are batchgeneratorsv2 RandomScalars: a tuple is uniform, BGContrast((lo, hi)) is v1's
    draw (below or above 1 with probability 1/2 each, then uniform), as v1 drew scaling,
    contrast and gamma. Each transform, in ShaSpec's order:

    - spatial (SpatialTransform, no crop): elastic deformation (V1Elastic), rotation about every
      axis by U(+-max_rotation_deg), one scaling factor for all axes (> 1 shrinks the content);
      images trilinear (v2's 'bilinear'; grid_sample has no cubic mode in 3-D), labels as
      interpolated one-hot channels settled by argmax (hard labels); outside the crop the
      image repeats its border (the project's z-scored background is not 0, the original's
      was) and the label is background;
    - Gaussian noise, one standard deviation for all channels (v1 and v2 call it variance);
    - Gaussian blur, one sigma per channel (per axis unless synchronize_blur_axes), each channel
      with p_blur_channel (direct convolution: nnU-Net's benchmark=True picks FFT or convolution
      by timing, machine-dependent);
    - multiplicative brightness, one factor per channel;
    - additive brightness N(0, additive_std), per channel, each with p_additive_channel;
    - contrast per channel, range preserved;
    - low resolution: each channel with p_lowres_channel zoomed by one factor for all axes
      (nearest down, trilinear up; v1 upsampled cubically);
    - gamma of the inverted image per channel, statistics retained (nnU-Net v2; off for ShaSpec);
    - gamma per channel, statistics retained, not inverted;
    - mirroring of each of `mirror_axes` with probability 1/2 (MirrorTransform's own).
    """
    elastic = V1Elastic(elastic_alpha, elastic_sigma, elastic_peak)
    rotation = np.deg2rad(max_rotation_deg)
    spatial = SpatialTransform(
        tuple(patch_size), patch_center_dist_from_border=0, random_crop=False,
        p_elastic_deform=p_elastic, elastic_deform_scale=elastic.scale,
        elastic_deform_magnitude=elastic.magnitude, p_synchronize_def_scale_across_axes=0,
        p_rotation=p_rotation, rotation=(-rotation, rotation), p_rot_per_axis=1,
        p_scaling=p_scaling, scaling=scaling, p_synchronize_scaling_across_axes=1,
        mode_image='bilinear', padding_mode_image='border', mode_seg='bilinear', border_mode_seg='zeros',
        bg_style_seg_sampling=False)
    intensity = [
        (p_noise, GaussianNoiseTransform(noise_variance=noise_std, p_per_channel=1, synchronize_channels=True)),
        (p_blur, GaussianBlurTransform(blur_sigma=blur_sigma, synchronize_channels=False,
                                       synchronize_axes=synchronize_blur_axes,
                                       p_per_channel=p_blur_channel)),
        (p_brightness, MultiplicativeBrightnessTransform(multiplier_range=brightness, synchronize_channels=False,
                                                         p_per_channel=1)),
        (p_additive, BrightnessAdditiveTransform(mu=0., sigma=additive_std, synchronize_channels=False,
                                                 p_per_channel=p_additive_channel)),
        (p_contrast, ContrastTransform(contrast_range=contrast, preserve_range=True, synchronize_channels=False,
                                       p_per_channel=1)),
        (p_lowres, SimulateLowResolutionTransform(scale=lowres_zoom, synchronize_channels=False,
                                                  synchronize_axes=True, ignore_axes=None,
                                                  p_per_channel=p_lowres_channel)),
        (p_gamma_inverted, GammaTransform(gamma=gamma, p_invert_image=1, synchronize_channels=False,
                                          p_per_channel=1, p_retain_stats=1)),
        (p_gamma, GammaTransform(gamma=gamma, p_invert_image=0, synchronize_channels=False, p_per_channel=1,
                                 p_retain_stats=1)),
    ]
    transforms = [spatial] + [RandomTransform(t, apply_probability=p) for p, t in intensity if p > 0]
    if mirror_axes:
        transforms.append(MirrorTransform(allowed_axes=tuple(mirror_axes)))
    return ComposeTransforms(transforms)


@contextlib.contextmanager
def seeded_global_rngs(seed):
    """numpy's global RandomState and torch's CPU generator seeded with `seed` (< 2**32) inside the
    block, and both put back as they were after it. Only the CPU generator is touched:
    torch.manual_seed would also (lazily) reseed CUDA's."""
    state = np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            np.random.seed(seed)
            torch.default_generator.manual_seed(seed)
            yield
    finally:
        np.random.set_state(state)


def apply_transforms(transforms, image, label, rng):
    """Run a batchgeneratorsv2 pipeline on image (M, X, Y, Z) and label (X, Y, Z) with its
    randomness seeded from the numpy Generator `rng` (one draw). The inputs are not modified.
    Returns (image float32, label of the input's dtype), same shapes; label values come from the
    input's, plus 0 where the spatial transform reaches outside the crop."""
    seed = int(rng.integers(2 ** 32))
    data = {"image": torch.from_numpy(np.array(image, dtype=np.float32)),
            "segmentation": torch.from_numpy(np.array(label)[None])}
    with seeded_global_rngs(seed):
        data = transforms(**data)
    return (np.ascontiguousarray(data["image"].numpy()),
            np.ascontiguousarray(data["segmentation"][0].numpy()))


# nnU-Net 2.2.1's default 3-D augmentation (nnUNetTrainer.get_training_transforms on
# batchgenerators v1, isotropic patch): no elastic deformation, rotation +-30 degrees, scaling in
# (0.7, 1.4) drawn below or above 1 with probability 1/2 each (v1's draw), one blur sigma for all
# axes, brightness uniform in (0.75, 1.25), no additive brightness, gamma of the inverted image
# (p 0.1) and of the image (p 0.3). Not matched: v1 resamples the image and the low-resolution
# channels cubically (grid_sample has no cubic 3-D mode: trilinear here) and fills rotated-in
# voxels with 0 (the border here).
NNUNET_221 = dict(p_elastic=0., max_rotation_deg=30., scaling=BGContrast((0.7, 1.4)), synchronize_blur_axes=True,
                  brightness=(0.75, 1.25), p_additive=0., p_gamma_inverted=0.1, p_gamma=0.3)


@functools.cache
def _transforms(patch_size, name):
    return build_transforms(patch_size, **(NNUNET_221 if name == "nnunet" else {}))


def nnunet_shaspec(image, label, rng):
    """ShaSpec's nnU-Net-style augmentation (build_transforms' defaults) of one crop:
    (image (M, X, Y, Z), label (X, Y, Z), numpy Generator) -> (image, label)."""
    return apply_transforms(_transforms(tuple(image.shape[1:]), "shaspec"), image, label, rng)


def nnunet_default(image, label, rng):
    """nnU-Net 2.2.1's default 3-D augmentation (NNUNET_221) of one crop, as nnunet_shaspec."""
    return apply_transforms(_transforms(tuple(image.shape[1:]), "nnunet"), image, label, rng)
