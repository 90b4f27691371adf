"""Sliding-window inference (SPEC section 5): P^3 windows with stride P/2 (starts 0, s, 2s, ...
and a last window flush with the far end), probabilities averaged uniformly where windows
overlap."""
import torch
import torch.nn.functional as F


def window_starts(dim, patch, stride):
    """Window starts along an axis of length dim >= patch."""
    starts = list(range(0, dim - patch + 1, stride))
    if starts[-1] != dim - patch:
        starts.append(dim - patch)
    return starts


def sliding_window(volume, patch_size, predict, stride=None):
    """volume (M, X, Y, Z) -> averaged outputs (S, K, X, Y, Z), where predict maps a window
    (1, M, P, P, P) to (S, K, P, P, P) (S outputs per window, e.g. one per modality subset).
    Axes shorter than P are padded by replicating the border, and cropped back afterwards."""
    P = patch_size
    stride = stride or P // 2
    dims = volume.shape[1:]
    pad = [max(P - d, 0) for d in dims]
    if any(pad):
        volume = F.pad(volume[None], [0, pad[2], 0, pad[1], 0, pad[0]], mode="replicate")[0]
    X, Y, Z = volume.shape[1:]
    total = count = None
    for x in window_starts(X, P, stride):
        for y in window_starts(Y, P, stride):
            for z in window_starts(Z, P, stride):
                out = predict(volume[None, :, x:x + P, y:y + P, z:z + P])
                if total is None:
                    total = out.new_zeros(out.shape[:2] + (X, Y, Z))
                    count = out.new_zeros((X, Y, Z))
                total[:, :, x:x + P, y:y + P, z:z + P] += out
                count[x:x + P, y:y + P, z:z + P] += 1
    return (total / count)[:, :, :dims[0], :dims[1], :dims[2]]
