"""The fused CPU inference kernels against PyTorch's operators, and the models' fused path
against the reference path (same probabilities to float32 rounding, same labels but at near-ties)."""
import pytest
import torch
import torch.nn.functional as F

import models
from engine import build_model
from engine.models import model_class
from engine.evaluation import predict_subsets
from models import cpu_kernels
from models.cpu_kernels import conv_silu, norm_act_pad
from models.mamba import Mamba
from utils.brats import REGION_THRESHOLD, to_labels


def assert_same_labels_but_near_ties(fused, reference, kind, margin=1e-4, most=2):
    """Labels of (subset, channel, ...) outputs equal, but at most `most` voxels where the
    reference is within `margin` of a decision (the two likeliest classes, or a region's 0.5
    threshold): float rounding there differs from one CPU to another."""
    differ = to_labels(fused, kind, axis=1) != to_labels(reference, kind, axis=1)
    if kind == "classes":
        top2 = reference.topk(2, dim=1).values
        closeness = top2[:, 0] - top2[:, 1]
    else:
        closeness = (reference - REGION_THRESHOLD).abs().min(dim=1).values
    assert (closeness[differ] < margin).all() and differ.sum() <= most


@pytest.fixture(autouse=True)
def small_inputs_fused(monkeypatch):
    """The models' layers take the fused kernels at any size here (by default only large ones)."""
    monkeypatch.setattr(cpu_kernels, "MIN_ELEMENTS", 0)
    monkeypatch.setattr(cpu_kernels, "MIN_CHANNELS", 1)


def plain_norm_act_pad(x, eps, slope, pad, mode):
    y = F.leaky_relu(F.instance_norm(x, eps=eps), slope)
    return F.pad(y, [pad] * 6, mode="reflect" if mode == "reflect" else "constant")


@pytest.mark.parametrize("pad, mode", [(0, "reflect"), (1, "reflect"), (2, "reflect"), (1, "zeros")])
@pytest.mark.parametrize("channels_last", [False, True])
def test_norm_act_pad_matches_torch(pad, mode, channels_last):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 6, 7, 9, generator=g) * 3 + 40  # an offset: the statistics must not cancel
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    out = norm_act_pad(x, 1e-5, 0.2, pad, mode)
    assert out.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(out, plain_norm_act_pad(x, 1e-5, 0.2, pad, mode), rtol=1e-5, atol=1e-5)


def test_norm_act_pad_constant_channel_and_nan():
    x = torch.randn(1, 3, 4, 4, 4)
    x[0, 1] = 7.0  # zero variance: (x - mean) = 0, as instance norm gives
    x[0, 2, 1, 2, 3] = float("nan")
    out = norm_act_pad(x, 1e-5, 0.2, 1, "reflect")
    ref = plain_norm_act_pad(x, 1e-5, 0.2, 1, "reflect")
    torch.testing.assert_close(out[:, :1], ref[:, :1], rtol=1e-5, atol=1e-5)
    # exactly 0 here (shifted sums); PyTorch's float32 mean leaves ~1e-7 x 1 / sqrt(eps)
    assert out[0, 1].abs().max() == 0 and ref[0, 1].abs().max() < 1e-4
    assert torch.isnan(out[0, 2]).all() and torch.isnan(ref[0, 2]).all()


def test_norm_act_pad_refuses_what_it_cannot_pad():
    with pytest.raises(ValueError, match="reflect padding 2"):
        norm_act_pad(torch.randn(1, 1, 2, 5, 5), pad=2)
    with pytest.raises(ValueError, match="replicate"):
        norm_act_pad(torch.randn(1, 1, 4, 4, 4), pad=1, mode="replicate")


def test_conv_silu_matches_conv1d():
    """Against PyTorch's causal depthwise conv1d, from a strided time-major view."""
    g = torch.Generator().manual_seed(1)
    xz = torch.randn(2, 2500, 12, generator=g)
    x = xz[..., :6]  # (b, l, d) view, row stride 12
    w, b = torch.randn(6, 4, generator=g), torch.randn(6, generator=g)
    ref = F.silu(F.conv1d(x.transpose(1, 2), w[:, None], b, padding=3, groups=6)[..., :2500]).transpose(1, 2)
    torch.testing.assert_close(conv_silu(x, w, b), ref, rtol=1e-5, atol=1e-5)
    ref0 = F.silu(F.conv1d(x.transpose(1, 2), w[:, None], None, padding=3, groups=6)[..., :2500]).transpose(1, 2)
    torch.testing.assert_close(conv_silu(x, w), ref0, rtol=1e-5, atol=1e-5)


def test_when_the_kernels_apply(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "MIN_ELEMENTS", 2 ** 20)
    monkeypatch.setattr(cpu_kernels, "MIN_CHANNELS", 8)
    with torch.no_grad():  # sizes: large enough, and volumes of enough channels
        assert cpu_kernels.applies(torch.empty(1, 8, 128, 32, 32))
        assert not cpu_kernels.applies(torch.empty(2, 8, 32, 32, 32))  # 2^18 per sample
        assert not cpu_kernels.applies(torch.empty(1, 4, 128, 64, 64))
        assert cpu_kernels.applies(torch.empty(1, 4, 128, 64, 64), min_channels=1)
        assert cpu_kernels.applies(torch.empty(1, 2 ** 16, 16))  # tokens
    monkeypatch.setattr(cpu_kernels, "MIN_ELEMENTS", 0)
    x, w = torch.randn(3), torch.randn(3, requires_grad=True)
    assert cpu_kernels.applies(x)
    assert not cpu_kernels.applies(x, w)  # a gradient is needed: PyTorch's operators
    with torch.no_grad():
        assert cpu_kernels.applies(x, w)
        assert not cpu_kernels.applies(x.double())
        with cpu_kernels.reference_path():
            assert not cpu_kernels.applies(x)
        assert cpu_kernels.applies(x)


def test_mamba_fused_conv_equals_its_torch_path():
    torch.manual_seed(0)
    mamba = Mamba(16).eval()
    x = torch.randn(2, 300, 16)
    with torch.no_grad():
        fused = mamba(x)
        with cpu_kernels.reference_path():
            plain = mamba(x)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    # with gradients the torch path runs and the conv weights get theirs
    mamba(x).sum().backward()
    assert mamba.conv1d.weight.grad is not None and mamba.conv1d.weight.grad.abs().sum() > 0


TINY = dict(patch_size=32, width=2, dim=16, heads=2, mlp_dim=32, dropout=0.0)


@pytest.mark.parametrize("name, cfg", [("imfuse", dict(TINY, interleaved=True, mamba_skip=True)),
                                       ("imfuse", dict(TINY, mamba_skip=True, first_skip=True)),
                                       ("mmformer", TINY)], ids=["imfuse-paper", "imfuse-firstskip", "mmformer"])
def test_fused_path_gives_the_reference_labels(name, cfg):
    """Sliding-window outputs of a whole volume for full and partial subsets: the fused path
    (fused kernels, grouped entry convs, channels-last convs) against the reference path."""
    torch.manual_seed(0)
    model = build_model(name, **cfg).eval()
    volume = torch.randn(4, 40, 34, 36)
    subsets = [(True, True, True, True), (False, True, False, True), (True, False, False, False)]
    fused = predict_subsets(model, volume, subsets)
    reference = predict_subsets(model, volume, subsets, reference_path=True)
    torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-5)
    assert_same_labels_but_near_ties(fused, reference, "classes")


@pytest.mark.parametrize("slope", [0.01, 0.0, 1.0])
def test_norm_act_pad_affine_and_activations(slope):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 5, 6, 7, generator=g)
    weight, bias = torch.randn(4, generator=g), torch.randn(4, generator=g)
    ref = F.pad(F.leaky_relu(F.instance_norm(x, weight=weight, bias=bias, eps=1e-6), slope), [1] * 6)
    torch.testing.assert_close(norm_act_pad(x, 1e-6, slope, 1, "zeros", weight, bias), ref, rtol=1e-5, atol=1e-5)
    assert cpu_kernels.activation_slope(torch.nn.LeakyReLU(0.3)) == 0.3
    assert cpu_kernels.activation_slope(torch.nn.ReLU()) == 0.0 and cpu_kernels.activation_slope(None) == 1.0
    assert cpu_kernels.activation_slope(torch.nn.GELU()) is None


@pytest.mark.parametrize("name", models.list_models())
def test_every_model_fused_path_gives_the_reference_labels(name):
    """Each registered model in its small configuration: the fused path (whatever of it its
    layers use) against the reference path, over a whole volume, full and partial subsets."""
    torch.manual_seed(0)
    model = build_model(name, **model_class(name).small_config).eval()
    volume = torch.randn(4, *(w + 6 for w in model.window))
    subsets = [(True, True, True, True), (False, True, False, True)]
    fused = predict_subsets(model, volume, subsets, origin=(0, 0, 0))
    reference = predict_subsets(model, volume, subsets, origin=(0, 0, 0), reference_path=True)
    torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-5)
    assert_same_labels_but_near_ties(fused, reference, model.output_kind)
