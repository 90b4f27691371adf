"""nnU-Net-style (batchgeneratorsv2) augmentation: determinism, isolation of the global random
states, shapes and label sets, image-label alignment, mirroring, firing frequencies."""
import itertools

import numpy as np
import pytest
import torch

from batchgeneratorsv2.transforms.intensity.contrast import BGContrast

from data.augment_nnunet import _transforms, apply_transforms, build_transforms, nnunet_shaspec

WINDOW = (32, 32, 16)
SPATIAL = ("p_elastic", "p_rotation", "p_scaling")
INTENSITY = ("p_noise", "p_blur", "p_brightness", "p_additive", "p_contrast", "p_lowres", "p_gamma")
OFF = dict.fromkeys(SPATIAL + INTENSITY, 0.)


def crop(seed=0):
    """A random 4-channel image and a label with nested blocks of 1, 2, 3 on background 0."""
    image = np.random.default_rng(seed).normal(size=(4, *WINDOW)).astype(np.float32)
    label = np.zeros(WINDOW, np.uint8)
    label[6:26, 8:24, 3:13] = 2
    label[10:20, 11:21, 5:11] = 3
    label[12:16, 13:17, 6:9] = 1
    return image, label


def transforms(**on):
    """All probabilities 0 and no mirroring, except those given."""
    return build_transforms(WINDOW, **{**OFF, "mirror_axes": (), **on})


EVERYTHING = dict.fromkeys(SPATIAL + INTENSITY, 1.)


def test_same_seed_same_output_different_seeds_differ():
    image, label = crop()
    pipeline = transforms(**EVERYTHING, mirror_axes=(0, 1, 2))
    a = apply_transforms(pipeline, image, label, np.random.default_rng(5))
    b = apply_transforms(pipeline, image, label, np.random.default_rng(5))
    c = apply_transforms(pipeline, image, label, np.random.default_rng(6))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    outs = [nnunet_shaspec(image, label, np.random.default_rng(s))[0] for s in range(8)]
    assert len({o.tobytes() for o in outs}) > 1


def test_global_random_states_untouched_and_irrelevant():
    image, label = crop()
    pipeline = transforms(**EVERYTHING, mirror_axes=(0, 1, 2))
    outs = []
    for global_seed in (1, 2):
        np.random.seed(global_seed)
        torch.manual_seed(global_seed)
        np_before, torch_before = np.random.get_state(), torch.get_rng_state()
        outs.append(apply_transforms(pipeline, image, label, np.random.default_rng(3)))
        np_after = np.random.get_state()
        assert np_after[0] == np_before[0] and np.array_equal(np_after[1], np_before[1])
        assert np_after[2:] == np_before[2:]
        assert torch.equal(torch.get_rng_state(), torch_before)
    assert np.array_equal(outs[0][0], outs[1][0]) and np.array_equal(outs[0][1], outs[1][1])


@pytest.mark.parametrize("dtype", [np.uint8, np.int64])
def test_shapes_dtypes_label_set_and_inputs_kept(dtype):
    image, label = crop()
    label = label.astype(dtype)
    image_copy, label_copy = image.copy(), label.copy()
    pipeline = transforms(**EVERYTHING, mirror_axes=(0, 1, 2))
    for seed in range(4):
        for img, lab in (apply_transforms(pipeline, image, label, np.random.default_rng(seed)),
                         nnunet_shaspec(image, label, np.random.default_rng(seed))):
            assert img.shape == image.shape and img.dtype == np.float32
            assert lab.shape == label.shape and lab.dtype == dtype
            assert set(np.unique(lab)) <= set(np.unique(label))
    assert np.array_equal(image, image_copy) and np.array_equal(label, label_copy)


def test_spatial_transform_keeps_image_and_label_aligned():
    """Image = label: a binary label's output is where the output image exceeds 1/2 (ties aside),
    and inside a multi-label one the image carries the label's value."""
    spatial = transforms(**dict.fromkeys(SPATIAL, 1.))
    _, label = crop()
    for labels in (np.minimum(label, 1), label):
        image = np.repeat(labels[None].astype(np.float32), 4, axis=0)
        for seed in range(3):
            img, lab = apply_transforms(spatial, image, labels, np.random.default_rng(seed))
            assert not np.array_equal(lab, labels)
            assert np.array_equal(img[0], img[3])
            if labels.max() == 1:
                disagree = (lab == 1) != (img[0] > 0.5)
                assert not np.any(disagree & (np.abs(img[0] - 0.5) > 1e-3))
            else:
                padded = np.pad(lab, 1, mode="edge")
                shifts = itertools.product(range(3), repeat=3)
                interior = np.all([padded[i:i + WINDOW[0], j:j + WINDOW[1], k:k + WINDOW[2]] == lab
                                   for i, j, k in shifts], axis=0) & (lab > 0)
                assert interior.sum() > 100
                assert np.abs(img[0] - lab)[interior].max() < 1e-3


def flipped_axes(out, image):
    """The subsets of spatial axes along which `image` flipped equals `out`."""
    subsets = [s for r in range(4) for s in itertools.combinations(range(3), r)]
    return [s for s in subsets if np.array_equal(out, np.flip(image, tuple(a + 1 for a in s)))]


def test_mirroring_flips_image_and_label_along_the_same_axes():
    image, label = crop()
    mirror = transforms(mirror_axes=(0, 1, 2))
    seen = set()
    for seed in range(16):
        img, lab = apply_transforms(mirror, image, label, np.random.default_rng(seed))
        (axes,) = flipped_axes(img, image)
        assert np.array_equal(lab, np.flip(label, axes))
        seen.add(axes)
    assert len(seen) > 4


def test_all_probabilities_zero_is_the_identity():
    image, label = crop()
    for seed in range(10):
        img, lab = apply_transforms(transforms(), image, label, np.random.default_rng(seed))
        assert np.array_equal(img, image) and np.array_equal(lab, label)


def within(count, n, p, sds=4.5):
    return abs(count - n * p) <= sds * np.sqrt(n * p * (1 - p)) + 1


def test_mirror_frequency_per_axis():
    image, label = crop()
    mirror = transforms(mirror_axes=(0, 1, 2))
    n, flips = 200, np.zeros(3)
    for seed in range(n):
        (axes,) = flipped_axes(apply_transforms(mirror, image, label, np.random.default_rng(seed))[0], image)
        flips[list(axes)] += 1
    assert all(within(k, n, 0.5) for k in flips), flips


# the default probability of each transform, times the chance that at least one of the 4
# channels is picked where it picks channels with probability 1/2
FIRING = {"p_elastic": 0.2, "p_rotation": 0.2, "p_scaling": 0.2, "p_noise": 0.1,
          "p_blur": 0.2 * (1 - 0.5 ** 4), "p_brightness": 0.15, "p_additive": 0.15 * (1 - 0.5 ** 4),
          "p_contrast": 0.15, "p_lowres": 0.25 * (1 - 0.5 ** 4), "p_gamma": 0.15}


def test_each_transform_fires_at_its_default_probability():
    image, label = crop()
    defaults = build_transforms.__kwdefaults__
    n = 120
    for name, p in FIRING.items():
        alone = transforms(**{name: defaults[name]})
        changed = sum(not np.array_equal(apply_transforms(alone, image, label, np.random.default_rng(s))[0], image)
                      for s in range(n))
        assert within(changed, n, p), (name, changed / n, p)


def test_the_nnunet_pipeline_has_nnunet_2_2_1_s_parameters():
    """nnU-Net 2.2.1's get_training_transforms (batchgenerators v1), written out independently:
    rotation +-30 degrees p 0.2 about every axis, one scaling factor in (0.7, 1.4) drawn below or
    above 1 with probability 1/2 each, p 0.2, no elastic deformation; noise p 0.1 (0-0.1); blur
    p 0.2, sigma 0.5-1 per channel (p 0.5 each), one sigma for all axes; brightness uniform
    0.75-1.25 p 0.15; contrast p 0.15; low resolution p 0.25, zoom 0.5-1, per channel p 0.5;
    gamma 0.7-1.5 of the inverted image p 0.1 and of the image p 0.3, statistics kept; mirroring."""
    spatial, *rest = _transforms((32, 32, 32), "nnunet").transforms
    assert spatial.p_elastic_deform == 0 and spatial.p_rotation == 0.2 and spatial.p_rot_per_axis == 1
    assert np.allclose(spatial.rotation, (-np.pi / 6, np.pi / 6))
    assert spatial.p_scaling == 0.2 and spatial.p_synchronize_scaling_across_axes == 1
    assert isinstance(spatial.scaling, BGContrast) and spatial.scaling.contrast_range == (0.7, 1.4)
    probabilities = {type(t.transform).__name__ + ("_inverted" if getattr(t.transform, "p_invert_image", 0) else ""):
                     t.apply_probability for t in rest[:-1]}
    assert probabilities == {"GaussianNoiseTransform": 0.1, "GaussianBlurTransform": 0.2,
                             "MultiplicativeBrightnessTransform": 0.15, "ContrastTransform": 0.15,
                             "SimulateLowResolutionTransform": 0.25, "GammaTransform_inverted": 0.1,
                             "GammaTransform": 0.3}
    noise, blur, brightness, contrast, lowres, inverted, gamma = (t.transform for t in rest[:-1])
    assert noise.noise_variance == (0., 0.1)
    assert blur.blur_sigma == (0.5, 1.) and blur.synchronize_axes and not blur.synchronize_channels
    assert blur.p_per_channel == 0.5
    assert brightness.multiplier_range == (0.75, 1.25)  # v1 draws it uniformly
    assert isinstance(contrast.contrast_range, BGContrast) and contrast.contrast_range.contrast_range == (0.75, 1.25)
    assert lowres.scale == (0.5, 1.) and lowres.p_per_channel == 0.5 and lowres.synchronize_axes
    for g in (inverted, gamma):
        assert isinstance(g.gamma, BGContrast) and g.gamma.contrast_range == (0.7, 1.5) and g.p_retain_stats == 1
    assert type(rest[-1]).__name__ == "MirrorTransform" and rest[-1].allowed_axes == (0, 1, 2)
