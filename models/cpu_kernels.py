"""Fused CPU inference kernels (numba) for the layers where PyTorch's CPU operators make
several passes over a large volume, and the switch that turns them off (the reference path).

    norm_act_pad(x, ...)  instance norm (affine or not) -> leaky ReLU -> reflect or zero padding,
                          in one pass after the statistics, written channels-last
                          (the layout in which oneDNN's 3-D convolutions with few channels
                          are fastest on the CPU)
    conv_silu(x, w, b)    silu(causal depthwise conv1d) of a time-major (b, l, d) tensor

They run only on float32 CPU tensors that need no gradient (training keeps PyTorch's
operators), and give the operators' results up to float32 rounding. Their users: the pre-norm
convs of IM-Fuse and mmFormer (models/blocks.py, which on the same condition also runs the
four level-1 entry convs as one grouped conv), the Mamba block's conv, and the competitors'
norm-activation pairs (competitors/layers.py:norm_leaky, content_style.ConvUnit).
`predict.py --reference_path` and `test.py --reference_path` run reference_path().
"""
import contextlib
import math

import numpy as np
import torch
from numba import njit, prange

from .scan.cpu_numba import _FASTMATH, _torch_threads

_enabled = True


@contextlib.contextmanager
def reference_path():
    """Within it, the layers use PyTorch's operators only (the float32 reference path)."""
    global _enabled
    before, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = before


# Below these sizes PyTorch's operators are as fast or faster (numba's thread start, oneDNN's
# channels-last convolutions of 4 channels): measured per sample, e.g. 8 x 32^3 fused 8.3 ms
# against 12.7 ms, 4 x 32^3 4.4 ms against 2.8 ms (norm + 3^3 conv, 2 threads).
MIN_ELEMENTS = 2 ** 20
MIN_CHANNELS = 8


def applies(x, *params, min_channels=None):
    """Whether the fused kernels take the data tensor x (a volume (B, C, X, Y, Z) or tokens
    (B, L, D)) with the parameters `params`: float32 CPU tensors of which none needs a
    gradient, outside reference_path(), x large enough to gain (MIN_ELEMENTS per sample; a
    volume also min_channels channels, default MIN_CHANNELS)."""
    grad = torch.is_grad_enabled()
    channels = MIN_CHANNELS if min_channels is None else min_channels
    return (_enabled and x[0].numel() >= MIN_ELEMENTS and (x.dim() != 5 or x.shape[1] >= channels)
            and all(t.device.type == "cpu" and t.dtype == torch.float32 and not (grad and t.requires_grad)
                    for t in (x, *params)))


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _channel_stats(x, eps, mean, rstd):
    """x (B, X, Y, Z, C), any strides -> mean, 1 / sqrt(var + eps) per (b, c) (biased
    variance, as instance norm); sums in float64, shifted by each channel's first value."""
    nb, X, Y, Z, C = x.shape
    s1 = np.zeros((nb * X, C))
    s2 = np.zeros((nb * X, C))
    for p in prange(nb * X):
        b, i = p // X, p % X
        a1 = np.zeros(C)
        a2 = np.zeros(C)
        for j in range(Y):
            for k in range(Z):
                for c in range(C):
                    v = np.float64(x[b, i, j, k, c]) - x[b, 0, 0, 0, c]
                    a1[c] += v
                    a2[c] += v * v
        s1[p] = a1
        s2[p] = a2
    n = X * Y * Z
    for b in range(nb):
        for c in range(C):
            m = s1[b * X:(b + 1) * X, c].sum() / n
            var = max(s2[b * X:(b + 1) * X, c].sum() / n - m * m, 0.0)
            mean[b, c] = m + x[b, 0, 0, 0, c]
            rstd[b, c] = 1.0 / math.sqrt(var + eps)


@njit(inline="always")
def _source(i, n, reflect):
    """Index into an axis of length n for padded position i - pad (-1: a zero)."""
    if 0 <= i < n:
        return i
    if not reflect:
        return -1
    return -i if i < 0 else 2 * (n - 1) - i


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _norm_act_pad(x, mean, scale, shift, slope, pad, reflect, out):
    """out (B, X + 2 pad, Y + 2 pad, Z + 2 pad, C) = act((x - mean) * scale + shift) padded,
    act(v) = v for v >= 0, else slope * v."""
    nb, X, Y, Z, C = x.shape
    Xo, Yo, Zo = X + 2 * pad, Y + 2 * pad, Z + 2 * pad
    for q in prange(nb * Xo):
        b, io = q // Xo, q % Xo
        i = _source(io - pad, X, reflect)
        m, a, t = mean[b], scale[b], shift[b]
        for jo in range(Yo):
            j = _source(jo - pad, Y, reflect)
            for ko in range(Zo):
                k = _source(ko - pad, Z, reflect)
                row = out[b, io, jo, ko]
                if i < 0 or j < 0 or k < 0:
                    for c in range(C):
                        row[c] = 0.0
                else:
                    for c in range(C):
                        v = (x[b, i, j, k, c] - m[c]) * a[c] + t[c]
                        row[c] = v if v >= 0 else v * slope


def norm_act_pad(x, eps=1e-5, negative_slope=0.2, pad=0, mode="reflect", weight=None, bias=None):
    """leaky_relu(instance_norm(x, weight, bias), negative_slope) padded by `pad` voxels per
    side ("reflect" or "zeros"): (B, C, X, Y, Z) float32 -> (B, C, X + 2 pad, ...) in
    channels_last_3d memory. negative_slope 1: no activation, 0: ReLU; weight, bias: the
    norm's affine parameters (C,) or None."""
    if mode not in ("reflect", "zeros"):
        raise ValueError(f"padding mode {mode!r}: the fused kernel takes reflect or zeros")
    B, C, X, Y, Z = x.shape
    if mode == "reflect" and pad >= min(X, Y, Z):
        raise ValueError(f"reflect padding {pad} needs every axis longer than it, got {(X, Y, Z)}")
    src = x.detach().permute(0, 2, 3, 4, 1).numpy()  # (B, X, Y, Z, C) view
    mean, rstd = np.empty((B, C), np.float32), np.empty((B, C), np.float32)
    out = torch.empty(B, C, X + 2 * pad, Y + 2 * pad, Z + 2 * pad, memory_format=torch.channels_last_3d)
    with _torch_threads():
        _channel_stats(src, eps, mean, rstd)
        scale = rstd if weight is None else rstd * weight.detach().numpy()
        shift = np.zeros_like(mean) if bias is None else np.broadcast_to(bias.detach().numpy(), mean.shape).copy()
        _norm_act_pad(src, mean, np.ascontiguousarray(scale, np.float32), shift, np.float32(negative_slope), pad,
                      mode == "reflect", out.permute(0, 2, 3, 4, 1).numpy())
    return out


def activation_slope(act):
    """The negative slope that stands for an activation module in norm_act_pad (LeakyReLU: its
    own, ReLU 0, None 1), or None for another activation."""
    if act is None:
        return 1.0
    if isinstance(act, torch.nn.LeakyReLU):
        return act.negative_slope
    return 0.0 if isinstance(act, torch.nn.ReLU) else None


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _conv_silu(x, w, bias, out):
    """x (b, l, d) any strides, w (d, k), bias (d,) -> out (b, l, d):
    silu(bias + sum_j w[:, j] x[t - k + 1 + j]), zeros before the first step."""
    nb, L, nd = x.shape
    K = w.shape[1]
    block = 1024
    nblocks = (L + block - 1) // block
    for q in prange(nb * nblocks):
        b, t0 = q // nblocks, (q % nblocks) * block
        acc = np.empty(nd, np.float32)
        for t in range(t0, min(t0 + block, L)):
            for c in range(nd):
                acc[c] = bias[c]
            for j in range(K):
                s = t - K + 1 + j
                if s >= 0:
                    for c in range(nd):
                        acc[c] += w[c, j] * x[b, s, c]
            for c in range(nd):
                v = acc[c]
                out[b, t, c] = v / (1.0 + math.exp(-v))


def conv_silu(x, weight, bias=None):
    """silu(causal depthwise conv1d) of a time-major x (b, l, d) float32: weight (d, k), bias
    (d,) or None -> (b, l, d) contiguous."""
    d = x.shape[-1]
    out = torch.empty(x.shape, dtype=torch.float32)
    b = torch.zeros(d) if bias is None else bias.detach()
    with _torch_threads():
        _conv_silu(x.detach().numpy(), weight.detach().contiguous().numpy(), b.contiguous().numpy(), out.numpy())
    return out
