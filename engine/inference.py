"""Sliding-window inference (SPEC section 5, for any window): windows of the model's size with
stride half the window per axis (starts 0, s, 2s, ... and a last window flush with the far
end), outputs averaged where windows overlap, uniformly (the paper's protocol) or with
nnU-Net's Gaussian importance weights; and test-time mirroring over the spatial axes."""
import itertools

import torch
import torch.nn.functional as F

from utils.progress import progress_bar

WINDOW_WEIGHTS = ("uniform", "gaussian")
AXES = "xyz"  # the voxel axes, as --tta names them


def select_device(name=None):
    """torch.device(name), by default CUDA when available. On CUDA, cuDNN benchmarks its
    convolution algorithms once per shape: every window has the model's fixed size."""
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return device


def window_starts(dim, size, stride):
    """Window starts along an axis of length dim >= size."""
    starts = list(range(0, dim - size + 1, stride))
    if starts[-1] != dim - size:
        starts.append(dim - size)
    return starts


def gaussian_weights(window, sigma_scale=1 / 8):
    """(X, Y, Z) float64 importance map of a window: the product over axes of
    exp(-(i - c)^2 / (2 sigma^2)), c = (w - 1) / 2 the window's centre, sigma = w * sigma_scale
    (nnU-Net's 1/8), scaled to a maximum of 1."""
    axes = []
    for w in window:
        i = torch.arange(w, dtype=torch.float64)
        axes.append(torch.exp(-(i - (w - 1) / 2) ** 2 / (2 * (w * sigma_scale) ** 2)))
    weights = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    return weights / weights.max()


def sliding_window(volume, window, predict, stride=None, batch_size=1, progress=False, with_starts=False,
                   weight="uniform"):
    """volume (M, X, Y, Z) -> averaged outputs (S, K, X, Y, Z), where predict maps a batch of
    windows (B, M, *window) to (B, S, K, *window) (S outputs per window, e.g. one per modality
    subset); B <= batch_size. with_starts: predict also takes the windows' starts in the volume
    (B, 3) int64. window: 3-tuple, or an int for a cube; stride: default half the
    window per axis. Axes shorter than the window are padded by replicating the border, and
    cropped back afterwards. weight: "uniform" (each window counts 1) or "gaussian"
    (gaussian_weights). progress: a progress bar over the windows."""
    if weight not in WINDOW_WEIGHTS:
        raise ValueError(f"window weight {weight!r}: use one of {', '.join(WINDOW_WEIGHTS)}")
    window = (window,) * 3 if isinstance(window, int) else tuple(window)
    stride = (stride,) * 3 if isinstance(stride, int) else tuple(stride or (max(w // 2, 1) for w in window))
    dims = volume.shape[1:]
    pad = [max(w - d, 0) for w, d in zip(window, dims)]
    if any(pad):
        volume = F.pad(volume[None], [0, pad[2], 0, pad[1], 0, pad[0]], mode="replicate")[0]
    starts = list(itertools.product(*(window_starts(d, w, s) for d, w, s in zip(volume.shape[1:], window, stride))))
    total = None
    count = torch.zeros(volume.shape[1:], dtype=volume.dtype, device=volume.device)
    weights = (gaussian_weights(window) if weight == "gaussian" else torch.ones(window)).to(volume)
    bar = progress_bar(total=len(starts), desc="sliding window", unit="window", enabled=progress, leave=False)
    for i in range(0, len(starts), batch_size):
        boxes = [tuple(slice(s, s + w) for s, w in zip(start, window)) for start in starts[i:i + batch_size]]
        windows = torch.stack([volume[(slice(None),) + box] for box in boxes])
        out = predict(windows, torch.tensor(starts[i:i + batch_size])) if with_starts else predict(windows)
        if total is None:
            total = out.new_zeros(out.shape[1:3] + volume.shape[1:])
        for box, o in zip(boxes, out):
            total[(slice(None), slice(None)) + box] += o * weights.to(o.dtype)
            count[box] += weights
        bar.update(len(boxes))
    bar.close()
    return (total / count.to(total.dtype))[:, :, :dims[0], :dims[1], :dims[2]]


def mirror_flips(axes):
    """The flips of test-time mirroring over `axes` (a string of x, y, z; "" for none): every
    subset of them, each a tuple of axis indices (0 x, 1 y, 2 z), the identity first."""
    if any(a not in AXES for a in axes) or len(set(axes)) != len(axes):
        raise ValueError(f"mirroring axes {axes!r}: give distinct letters of {AXES!r}, e.g. xyz or xy")
    chosen = sorted(AXES.index(a) for a in axes)
    return [flip for n in range(len(chosen) + 1) for flip in itertools.combinations(chosen, n)]


def flip_spatial(tensor, flip):
    """tensor (..., X, Y, Z) flipped along the spatial axes of `flip` (indices 0-2)."""
    return tensor.flip([tensor.dim() - 3 + a for a in flip]) if flip else tensor
