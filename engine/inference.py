"""Sliding-window inference (SPEC section 5, for any window): windows of the model's size with
stride half the window per axis (starts 0, s, 2s, ... and a last window flush with the far
end), outputs averaged uniformly where windows overlap."""
import itertools

import torch
import torch.nn.functional as F

from utils.progress import progress_bar


def window_starts(dim, size, stride):
    """Window starts along an axis of length dim >= size."""
    starts = list(range(0, dim - size + 1, stride))
    if starts[-1] != dim - size:
        starts.append(dim - size)
    return starts


def sliding_window(volume, window, predict, stride=None, batch_size=1, progress=False, with_starts=False):
    """volume (M, X, Y, Z) -> averaged outputs (S, K, X, Y, Z), where predict maps a batch of
    windows (B, M, *window) to (B, S, K, *window) (S outputs per window, e.g. one per modality
    subset); B <= batch_size. with_starts: predict also takes the windows' starts in the volume
    (B, 3) int64. window: 3-tuple, or an int for a cube; stride: default half the
    window per axis. Axes shorter than the window are padded by replicating the border, and
    cropped back afterwards. progress: a progress bar over the windows."""
    window = (window,) * 3 if isinstance(window, int) else tuple(window)
    stride = (stride,) * 3 if isinstance(stride, int) else tuple(stride or (max(w // 2, 1) for w in window))
    dims = volume.shape[1:]
    pad = [max(w - d, 0) for w, d in zip(window, dims)]
    if any(pad):
        volume = F.pad(volume[None], [0, pad[2], 0, pad[1], 0, pad[0]], mode="replicate")[0]
    starts = list(itertools.product(*(window_starts(d, w, s) for d, w, s in zip(volume.shape[1:], window, stride))))
    total = None
    count = torch.zeros(volume.shape[1:], dtype=volume.dtype, device=volume.device)
    bar = progress_bar(total=len(starts), desc="sliding window", unit="window", enabled=progress, leave=False)
    for i in range(0, len(starts), batch_size):
        boxes = [tuple(slice(s, s + w) for s, w in zip(start, window)) for start in starts[i:i + batch_size]]
        windows = torch.stack([volume[(slice(None),) + box] for box in boxes])
        out = predict(windows, torch.tensor(starts[i:i + batch_size])) if with_starts else predict(windows)
        if total is None:
            total = out.new_zeros(out.shape[1:3] + volume.shape[1:])
        for box, o in zip(boxes, out):
            total[(slice(None), slice(None)) + box] += o
            count[box] += 1
        bar.update(len(boxes))
    bar.close()
    return (total / count.to(total.dtype))[:, :, :dims[0], :dims[1], :dims[2]]
