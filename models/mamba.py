"""Mamba block (Gu & Dao): the parameters, initialisation and computation of mamba-ssm's
`Mamba` module, so state dicts move between the two unchanged, running with or without
mamba-ssm (see models/scan for the selective-scan backends)."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import cpu_kernels
from .scan import resolve_backend, selective_scan

__all__ = ["Mamba", "selective_scan"]


def _causal_conv1d_fn():
    try:
        from causal_conv1d import causal_conv1d_fn
        return causal_conv1d_fn
    except Exception:
        return None


class Mamba(nn.Module):
    """Selective state-space block; input and output (batch, length, d_model).

    `backend` names the selective-scan backend (None: $IMFUSE_SCAN_BACKEND or automatic).
    """

    def __init__(self, d_model, d_state=16, d_conv=4, expand=2, dt_rank="auto", dt_min=0.001,
                 dt_max=0.1, dt_init="random", dt_scale=1.0, dt_init_floor=1e-4, conv_bias=True,
                 bias=False, backend=None):
        super().__init__()
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        self.backend = backend
        # Created in mamba-ssm's order, so one seed gives both the same weights.
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner,
                                padding=d_conv - 1, bias=conv_bias)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)

        dt_init_std = self.dt_rank ** -0.5 * dt_scale
        if dt_init == "constant":
            nn.init.constant_(self.dt_proj.weight, dt_init_std)
        elif dt_init == "random":
            nn.init.uniform_(self.dt_proj.weight, -dt_init_std, dt_init_std)
        else:
            raise ValueError(f"dt_init must be 'constant' or 'random', got {dt_init!r}")
        # dt log-uniform in [dt_min, dt_max]; the bias is its inverse softplus.
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min)).clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.dt_proj.bias._no_reinit = True

        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))  # (d_inner, d_state); A = -exp(A_log)
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.D._no_weight_decay = True
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

    def conv_silu(self, x):
        """silu(causal depthwise conv1d(x)) in the time-major layout: (b, l, d_inner) -> same.
        A weighted sum of d_conv shifted copies: no transposed copy, and on the CPU 2-3x faster
        than a depthwise conv1d at IM-Fuse's lengths."""
        L, k = x.shape[1], self.d_conv
        w = self.conv1d.weight[:, 0]  # (d_inner, k); tap k - 1 multiplies the current step
        xp = F.pad(x, (0, 0, k - 1, 0))  # (b, l + k - 1, d_inner), k - 1 zero steps first
        y = xp[:, k - 1:] * w[:, k - 1]
        if self.conv1d.bias is not None:
            y = y + self.conv1d.bias
        for j in range(k - 1):
            y = torch.addcmul(y, xp[:, j:j + L], w[:, j])
        return F.silu(y)

    def forward(self, hidden_states, keep=None):
        """(b, l, d_model) -> (b, l', d_model): the outputs at the positions `keep` (a slice of
        the length; default all). The state runs over every position either way."""
        backend = resolve_backend(self.backend, hidden_states.device,
                                  torch.float64 if hidden_states.dtype == torch.float64
                                  else torch.float32)
        xz = self.in_proj(hidden_states)  # (b, l, 2 * d_inner)
        x, z = xz.chunk(2, dim=-1)  # (b, l, d_inner) each: views, time-major
        conv = _causal_conv1d_fn() if backend == "mamba_ssm" else None
        if conv is not None:  # its kernel takes the (b, d_inner, l) layout
            x = conv(x.transpose(1, 2).contiguous(), self.conv1d.weight.squeeze(1), self.conv1d.bias,
                     activation="silu").transpose(1, 2)
        elif cpu_kernels.applies(x, *self.conv1d.parameters()):
            x = cpu_kernels.conv_silu(x, self.conv1d.weight[:, 0], self.conv1d.bias)
        else:
            x = self.conv_silu(x)
        x_dbl = self.x_proj(x)  # (b, l, dt_rank + 2 * d_state)
        dt, B, C = x_dbl.split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = dt @ self.dt_proj.weight.t()  # (b, l, d_inner); bias in the scan
        A = -torch.exp(self.A_log)  # (d_inner, d_state)
        # the scan takes (b, channels, l) views of the time-major tensors (the numba kernel reads
        # them strided, the GPU kernels copy them); it runs in float32 (float64 for float64
        # inputs) whatever the autocast state
        y = selective_scan(x.transpose(1, 2), dt.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2),
                           self.D, z=z.transpose(1, 2), delta_bias=self.dt_proj.bias, delta_softplus=True,
                           backend=backend).transpose(1, 2)  # (b, l, d_inner)
        return self.out_proj(y if keep is None else y[:, keep])
