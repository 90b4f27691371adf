"""Losses, poly schedule, BraTS metrics and sliding-window inference against hand-computed
values and independent definitions."""
import itertools
import math

import numpy as np
import pytest
import torch

from utils.inference import sliding_window, window_starts
from utils.losses import segmentation_loss, soft_dice_loss, total_loss, weighted_cross_entropy, one_hot
from utils.metrics import HD95_ONE_EMPTY, brats_metrics, hd95
from utils.schedule import poly_lr, set_lr


def probs(*columns):
    """(1, K, N, 1, 1) probabilities from per-voxel class columns."""
    return torch.tensor(columns, dtype=torch.float64).t()[None, :, :, None, None]


def test_weighted_cross_entropy_by_hand():
    p = probs([0.8, 0.2], [0.3, 0.7], [0.999, 0.001])  # 3 voxels, 2 classes
    label = torch.tensor([0, 1, 1])[None, :, None, None]
    t = one_hot(label, 2).double()
    w0, w1 = 1 - 1 / 3, 1 - 2 / 3  # class 0 has 1 of 3 voxels, class 1 has 2
    want = (-w0 * math.log(0.8) - w1 * math.log(0.7) - w1 * math.log(0.005)) / 3  # 0.001 clamped
    assert weighted_cross_entropy(p, t).item() == pytest.approx(want, rel=1e-12)


def test_soft_dice_by_hand_sums_over_the_batch():
    p = torch.tensor([[[0.8, 0.3]], [[0.4, 0.9]]], dtype=torch.float64)  # (B=2, 1, 2) class 1
    p = torch.cat([1 - p, p], dim=1)[..., None, None]  # (2, 2, 2, 1, 1)
    label = torch.tensor([[0, 1], [1, 1]])[..., None, None]
    t = one_hot(label, 2).double()
    inter1 = 0.3 + 0.4 + 0.9
    inter0 = 0.2
    d1 = 2 * inter1 / (0.8 + 0.3 + 0.4 + 0.9 + 3 + 1e-7)
    d0 = 2 * inter0 / (0.2 + 0.7 + 0.6 + 0.1 + 1 + 1e-7)
    assert soft_dice_loss(p, t).item() == pytest.approx(1 - (d0 + d1) / 2, rel=1e-12)
    assert segmentation_loss(p, label).item() == pytest.approx(
        weighted_cross_entropy(p, t).item() + soft_dice_loss(p, t).item(), rel=1e-12)


def test_total_loss_sums_every_output():
    gen = torch.Generator().manual_seed(0)
    outs = [torch.rand(1, 4, 4, 4, 4, generator=gen).softmax(1) for _ in range(9)]
    label = torch.randint(0, 4, (1, 4, 4, 4), generator=gen)
    total, parts = total_loss((outs[0], outs[1:5], outs[5:]), label)
    want = sum(segmentation_loss(o, label) for o in outs)
    assert total.item() == pytest.approx(want.item(), rel=1e-6)
    assert parts["fused"].item() == pytest.approx(segmentation_loss(outs[0], label).item())


def test_poly_schedule_values():
    assert poly_lr(2e-4, 0, 1000) == 2e-4
    assert poly_lr(2e-4, 500, 1000) == pytest.approx(2e-4 * 0.5 ** 0.9)
    assert poly_lr(2e-4, 999, 1000) == pytest.approx(2e-4 * 0.001 ** 0.9)
    opt = torch.optim.RAdam([torch.zeros(1, requires_grad=True)], lr=1.0)
    set_lr(opt, poly_lr(2e-4, 100, 1000))
    assert opt.param_groups[0]["lr"] == pytest.approx(2e-4 * 0.9 ** 0.9)


def surface_points(mask):
    """Voxels of mask with a 6-neighbour outside it (outside the array counts as outside)."""
    padded = np.pad(mask, 1)
    inner = np.ones_like(mask)
    for axis, shift in itertools.product(range(3), (-1, 1)):
        inner &= np.roll(padded, shift, axis)[1:-1, 1:-1, 1:-1]
    return np.argwhere(mask & ~inner)


def brute_hd95(a, b, spacing):
    pa, pb = surface_points(a) * spacing, surface_points(b) * spacing
    d = np.sqrt(((pa[:, None] - pb[None]) ** 2).sum(-1))
    return max(np.percentile(d.min(1), 95), np.percentile(d.min(0), 95))


def test_hd95_single_voxels_and_spacing():
    a = np.zeros((12, 12, 12), bool)
    b = a.copy()
    a[2, 5, 5] = b[5, 5, 5] = True
    assert hd95(a, b) == 3.0
    assert hd95(a, b, spacing=(2, 1, 1)) == 6.0


@pytest.mark.parametrize("seed", range(4))
def test_hd95_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    shape = (20, 18, 16)
    a = np.zeros(shape, bool)
    b = np.zeros(shape, bool)
    a[3:12, 4:10, 2:9] = True
    b[5:15, 3:12, 4:14] = True
    a ^= rng.random(shape) < 0.05
    spacing = np.array([1.0, 1.5, 2.0])
    assert hd95(a, b, spacing) == pytest.approx(brute_hd95(a, b, spacing), rel=1e-9)


def test_brats_metrics_by_hand():
    target = np.zeros((30, 30, 30), np.uint8)
    target[5:15, 5:15, 5:15] = 2          # 1000 voxels oedema
    target[8:12, 8:12, 8:12] = 3          # 64 ET
    target[9:11, 9:11, 9:11] = 1          # 8 NCR (inside ET block)
    pred = np.zeros_like(target)
    pred[5:15, 5:15, 5:10] = 2            # 500 voxels of WT
    pred[8:12, 8:12, 8:10] = 3            # 32 voxels of ET
    m = brats_metrics(pred, target)
    assert m["WT"] == pytest.approx(2 * 500 / (500 + 1000))
    tc_t = 64  # NCR voxels replaced ET voxels: TC = ET block
    assert m["TC"] == pytest.approx(2 * 32 / (32 + tc_t))
    et_t = 64 - 8
    inter = 32 - 4  # predicted ET z 8-9 meets NCR at [9:11, 9:11, 9]: 4 voxels
    assert m["ET"] == pytest.approx(2 * inter / (32 + et_t))
    assert m["ETpp"] == pytest.approx(0.0, abs=1e-9)  # 32 < 500 predicted ET voxels: removed
    assert set(m) == {"WT", "TC", "ET", "ETpp", "HD95_WT", "HD95_TC", "HD95_ET"}
    assert brats_metrics(pred, target, distances=False) == {k: m[k] for k in ("WT", "TC", "ET", "ETpp")}


def test_brats_metrics_empty_regions():
    empty = np.zeros((20, 20, 20), np.uint8)
    m = brats_metrics(empty, empty)
    assert m["WT"] == m["TC"] == m["ET"] == m["ETpp"] == 1.0
    assert m["HD95_WT"] == m["HD95_ET"] == 0.0
    target = empty.copy()
    target[5:9, 5:9, 5:9] = 2
    m = brats_metrics(empty, target)
    assert m["WT"] == pytest.approx(0.0, abs=1e-9) and m["HD95_WT"] == HD95_ONE_EMPTY
    assert m["ET"] == 1.0 and m["HD95_ET"] == 0.0  # no ET anywhere
    small_et = empty.copy()
    small_et[2:4, 2:4, 2:4] = 3  # an ET false positive under 500 voxels
    m = brats_metrics(small_et, empty)
    assert m["ET"] == pytest.approx(1e-8 / 8, rel=1e-6) and m["ETpp"] == 1.0
    with pytest.raises(ValueError, match="differ in shape"):
        brats_metrics(empty, empty[:10])


def test_window_starts_by_hand():
    assert window_starts(40, 16, 8) == [0, 8, 16, 24]
    assert window_starts(37, 16, 8) == [0, 8, 16, 21]
    assert window_starts(16, 16, 8) == [0]


@pytest.mark.parametrize("dims", [(40, 37, 33), (16, 16, 16), (10, 20, 17)])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_sliding_window_reproduces_the_identity_and_covers_every_voxel(dims, batch_size):
    volume = torch.randn(4, *dims, dtype=torch.float64)
    calls = []

    def identity(windows):  # (B, M, P, P, P) -> (B, S=2, K=M, P, P, P)
        calls.append(windows.shape)
        return torch.stack([windows, 2 * windows], dim=1)

    out = sliding_window(volume, 16, identity, batch_size=batch_size)
    assert out.shape == (2, 4, *dims)
    torch.testing.assert_close(out[0], volume, rtol=0, atol=1e-12)
    torch.testing.assert_close(out[1], 2 * volume, rtol=0, atol=1e-12)
    n_windows = 1
    for d in dims:
        n_windows *= len(window_starts(max(d, 16), 16, 8))
    assert sum(shape[0] for shape in calls) == n_windows
    assert all(shape[1:] == (4, 16, 16, 16) and shape[0] <= batch_size for shape in calls)
    ones = sliding_window(torch.ones(1, *dims), 16, lambda w: torch.ones_like(w)[:, None],
                          batch_size=batch_size)
    assert torch.equal(ones, torch.ones(1, 1, *dims))  # uniform average: the weights sum to 1
