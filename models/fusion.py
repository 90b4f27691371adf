"""Mamba layer and Mamba Fusion Block (plain MFB and interleaved I-MFB) of IM-Fuse."""
import math

import torch
import torch.nn as nn

from .mamba import Mamba
from .scan import no_autocast


class MambaLayer(nn.Module):
    """x + Mamba(LN(x)), then x + Linear(LN(x)); runs in float32, also under autocast.

    Mamba sizes as in IM-Fuse: d_state = min(dim, max_d_state), dt_rank = ceil(dim / 16).
    """

    def __init__(self, dim, d_conv=4, expand=2, max_d_state=256, backend=None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.mamba = Mamba(dim, d_state=min(dim, max_d_state), d_conv=d_conv, expand=expand,
                           dt_rank=math.ceil(dim / 16), backend=backend)
        self.norm2 = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, dim)

    def forward(self, x, keep=None):
        """(b, l, dim) -> (b, l', dim) at the positions `keep` (a slice; default all), float32
        (float64 stays float64)."""
        with no_autocast(x.device):
            if x.dtype != torch.float64:
                x = x.float()
            out = self.mamba(self.norm1(x), keep)
            x = (x if keep is None else x[:, keep]) + out
            return x + self.head(self.norm2(x))


class MambaFusionBlock(nn.Module):
    """Fuses the (masked) token sets of `num_modalities` modalities with `num_tokens`
    learnable fusion tokens and one Mamba layer.

    MFB (interleaved=False): [mod_1 tokens, ..., mod_M tokens, fusion tokens]; output is
    the last num_tokens positions. I-MFB (interleaved=True): per position i,
    [mod_1_i, ..., mod_M_i, fusion_i]; output is every (M+1)-th token from index M.
    Mamba is causal, so each fusion token reads only the tokens placed before it.
    """

    def __init__(self, dim, num_tokens, interleaved=False, num_modalities=4, **layer_cfg):
        super().__init__()
        self.dim, self.num_tokens = dim, num_tokens
        self.interleaved, self.num_modalities = interleaved, num_modalities
        self.fused_tokens = nn.Parameter(torch.randn(1, num_tokens, dim))
        self.mamba_layer = MambaLayer(dim, **layer_cfg)

    def sequence(self, tokens):
        """(b, M, N, d) modality tokens -> the (b, (M + 1) N, d) sequence of the layout."""
        b, M, N, d = tokens.shape
        if (M, N, d) != (self.num_modalities, self.num_tokens, self.dim):
            raise ValueError(
                f"fusion block expects (batch, {self.num_modalities}, {self.num_tokens}, "
                f"{self.dim}) tokens, got {tuple(tokens.shape)}; its learnable tokens fix the "
                f"number of positions, so the patch size must match the one it was built for")
        fusion = self.fused_tokens.expand(b, N, d).to(tokens.dtype)
        if self.interleaved:
            return torch.cat([tokens.transpose(1, 2), fusion[:, :, None]], dim=2).reshape(b, (M + 1) * N, d)
        return torch.cat([tokens.reshape(b, M * N, d), fusion], dim=1)

    def fuse_tokens(self, tokens):
        """(b, M, N, d) masked modality tokens -> (b, N, d) fused tokens."""
        b, M, N, d = tokens.shape
        # only the fusion tokens' outputs are computed (the state still runs over all tokens)
        keep = slice(M, None, M + 1) if self.interleaved else slice(M * N, None)
        return self.mamba_layer(self.sequence(tokens), keep)  # (b, N, d)

    def forward(self, features):
        """M masked maps (b, d, *spatial) (a sequence, or stacked (b, M, d, *spatial))
        -> fused map (b, d, *spatial). Positions are the spatial grid flattened in C order."""
        x = torch.stack(list(features), dim=1) if isinstance(features, (list, tuple)) else features
        b, M, d, *spatial = x.shape
        tokens = x.flatten(3).transpose(2, 3)  # (b, M, N, d)
        fused = self.fuse_tokens(tokens)  # (b, N, d)
        return fused.transpose(1, 2).reshape(b, d, *spatial)
