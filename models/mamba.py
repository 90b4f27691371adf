"""Mamba block (Gu & Dao): the parameters, initialisation and computation of mamba-ssm's
`Mamba` module, so state dicts move between the two unchanged, running with or without
mamba-ssm (see models/scan for the selective-scan backends)."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

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

    def forward(self, hidden_states):
        L = hidden_states.shape[1]
        backend = resolve_backend(self.backend, hidden_states.device,
                                  torch.float64 if hidden_states.dtype == torch.float64
                                  else torch.float32)
        xz = self.in_proj(hidden_states).transpose(1, 2)  # (b, 2 * d_inner, l)
        x, z = xz.chunk(2, dim=1)  # (b, d_inner, l) each
        conv = _causal_conv1d_fn() if backend == "mamba_ssm" else None
        if conv is not None:
            x = conv(x.contiguous(), self.conv1d.weight.squeeze(1), self.conv1d.bias,
                     activation="silu")
        else:
            x = F.silu(self.conv1d(x)[..., :L])
        x_dbl = self.x_proj(x.transpose(1, 2))  # (b, l, dt_rank + 2 * d_state)
        dt, B, C = x_dbl.split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = (dt @ self.dt_proj.weight.t()).transpose(1, 2)  # (b, d_inner, l); bias in the scan
        A = -torch.exp(self.A_log)  # (d_inner, d_state)
        # the scan runs in float32 (float64 for float64 inputs) whatever the autocast state
        y = selective_scan(x, dt, A, B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous(),
                           self.D, z=z, delta_bias=self.dt_proj.bias, delta_softplus=True,
                           backend=backend)  # (b, d_inner, l)
        return self.out_proj(y.transpose(1, 2))
