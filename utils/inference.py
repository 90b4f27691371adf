"""Sliding-window inference (SPEC section 5): P^3 windows with stride P/2 (starts 0, s, 2s, ...
and a last window flush with the far end), probabilities averaged uniformly where windows
overlap."""
import itertools

import torch
import torch.nn.functional as F
from tqdm import tqdm


def window_starts(dim, patch, stride):
    """Window starts along an axis of length dim >= patch."""
    starts = list(range(0, dim - patch + 1, stride))
    if starts[-1] != dim - patch:
        starts.append(dim - patch)
    return starts


def sliding_window(volume, patch_size, predict, stride=None, batch_size=1, progress=False):
    """volume (M, X, Y, Z) -> averaged outputs (S, K, X, Y, Z), where predict maps a batch of
    windows (B, M, P, P, P) to (B, S, K, P, P, P) (S outputs per window, e.g. one per modality
    subset); B <= batch_size. Axes shorter than P are padded by replicating the border, and
    cropped back afterwards. progress: a progress bar over the windows."""
    P = patch_size
    stride = stride or P // 2
    dims = volume.shape[1:]
    pad = [max(P - d, 0) for d in dims]
    if any(pad):
        volume = F.pad(volume[None], [0, pad[2], 0, pad[1], 0, pad[0]], mode="replicate")[0]
    starts = list(itertools.product(*(window_starts(d, P, stride) for d in volume.shape[1:])))
    total = None
    count = torch.zeros(volume.shape[1:], dtype=volume.dtype, device=volume.device)
    bar = tqdm(total=len(starts), desc="sliding window", unit="window", disable=not progress, leave=False)
    for i in range(0, len(starts), batch_size):
        batch = starts[i:i + batch_size]
        out = predict(torch.stack([volume[:, x:x + P, y:y + P, z:z + P] for x, y, z in batch]))
        if total is None:
            total = out.new_zeros(out.shape[1:3] + volume.shape[1:])
        for (x, y, z), o in zip(batch, out):
            total[:, :, x:x + P, y:y + P, z:z + P] += o
            count[x:x + P, y:y + P, z:z + P] += 1
        bar.update(len(batch))
    bar.close()
    return (total / count.to(total.dtype))[:, :, :dims[0], :dims[1], :dims[2]]
