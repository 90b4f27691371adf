"""The selective scan of Mamba (mamba-ssm's `selective_scan_fn`) behind three backends.

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t          (per channel d, state n)
    y_t = <C_t, h_t> + D * u_t,  out_t = y_t * silu(z_t),  dt = softplus(delta + delta_bias)

Backends, chosen per call in this order unless named by the `backend` argument or the
IMFUSE_SCAN_BACKEND environment variable ("auto", "mamba_ssm", "triton", "numba", "torch"):
  mamba_ssm  mamba-ssm's fused CUDA kernel, when the package imports and tensors are on CUDA;
  triton     Triton kernels (models/scan/triton_scan.py), compiled at first use on CUDA
             tensors, nothing to build at install; float32 only. With TRITON_INTERPRET=1 set
             before the first call they also run (slowly) on CPU tensors, when named;
  numba      the compiled CPU kernel (models/scan/cpu_numba.py), for CPU tensors;
  torch      chunked log-depth scan in plain PyTorch (models/scan/parallel_torch.py), anywhere.
The scan always runs in float32 (float64 when u is float64), also under autocast.
"""
import os
from contextlib import nullcontext

import torch

BACKENDS = ("mamba_ssm", "triton", "numba", "torch")
ENV_VAR = "IMFUSE_SCAN_BACKEND"
_imports = {}


def _import(name):
    """(module function, None) or (None, reason) for an optional backend."""
    if name not in _imports:
        try:
            if name == "mamba_ssm":
                from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as fn
            elif name == "triton":
                from .triton_scan import selective_scan_triton as fn
            elif name == "numba":
                from .cpu_numba import selective_scan_numba as fn
            else:
                from .parallel_torch import selective_scan_torch as fn
            _imports[name] = (fn, None)
        except Exception as err:  # a broken CUDA build raises more than ImportError
            _imports[name] = (None, f"{type(err).__name__}: {err}")
    return _imports[name]


def backend_available(name, device):
    """Whether `name` can run on tensors of `device` here, and if not, why not."""
    device = torch.device(device)
    if name == "mamba_ssm" and device.type != "cuda":
        return False, "mamba-ssm's kernels need CUDA tensors"
    if name == "triton" and device.type != "cuda" and not (
            device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
        return False, "Triton's kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)"
    if name == "numba" and device.type != "cpu":
        return False, "the numba kernel needs CPU tensors"
    fn, reason = _import(name)
    return fn is not None, reason


def resolve_backend(backend=None, device="cpu", dtype=torch.float32):
    """The backend a call would use: the argument, else $IMFUSE_SCAN_BACKEND, else auto."""
    name = backend or os.environ.get(ENV_VAR) or "auto"
    if name == "auto":
        for candidate in BACKENDS:
            if candidate in ("mamba_ssm", "triton") and dtype == torch.float64:
                continue  # their kernels have no float64
            if candidate == "triton" and torch.device(device).type != "cuda":
                continue  # the interpreter is for tests, not for use
            if backend_available(candidate, device)[0]:
                return candidate
        raise RuntimeError("no selective-scan backend can run here")  # torch always can
    if name not in BACKENDS:
        raise ValueError(f"unknown selective-scan backend {name!r}; "
                         f"choose one of auto, {', '.join(BACKENDS)}")
    ok, reason = backend_available(name, device)
    if not ok:
        raise RuntimeError(f"selective-scan backend {name!r} cannot run on {device}: {reason}")
    return name


def no_autocast(device):
    """A context in which autocast is off for `device`'s type."""
    kind = torch.device(device).type
    return torch.autocast(kind, enabled=False) if torch.amp.is_autocast_available(kind) \
        else nullcontext()


def _check(u, delta, A, B, C, D, z, delta_bias):
    if u.dim() != 3:
        raise ValueError(f"u must be (batch, d_inner, length), got shape {tuple(u.shape)}")
    nb, nd, L = u.shape
    if A.dim() != 2 or A.shape[0] != nd or A.is_complex():
        raise ValueError(f"A must be real (d_inner={nd}, d_state), got {tuple(A.shape)}")
    N = A.shape[1]
    expected = {"delta": (delta, (nb, nd, L)), "B": (B, (nb, N, L)), "C": (C, (nb, N, L)),
                "D": (D, (nd,)), "z": (z, (nb, nd, L)), "delta_bias": (delta_bias, (nd,))}
    for name, (t, shape) in expected.items():
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   backend=None):
    """mamba-ssm's `selective_scan_fn` semantics with autograd.

    u, delta, z: (batch, d_inner, length); A: (d_inner, d_state), real;
    B, C: (batch, d_state, length); D, delta_bias: (d_inner,). Returns y like u.
    """
    _check(u, delta, A, B, C, D, z, delta_bias)
    dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
    name = resolve_backend(backend, u.device, dtype)
    fn = _import(name)[0]
    with no_autocast(u.device):
        args = [None if t is None else t.to(dtype) for t in (u, delta, A, B, C, D, z, delta_bias)]
        y = fn(*args, delta_softplus=bool(delta_softplus))
    return y.to(u.dtype)
