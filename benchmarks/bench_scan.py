"""Selective scan, forward + backward, at the size of IM-Fuse's level-2 skip at patch 64
(length 5 * 32**3 = 163,840, d_inner 32, d_state 16, batch 1, float32, with z, D,
delta_bias and softplus as in the Mamba block).

Prints the median time of each backend and its ratio to the plain PyTorch recurrence
and to mambapy's parallel scan (when mambapy is installed; it is not a dependency).

    python benchmarks/bench_scan.py [--length 163840] [--reps 5] [--loop-reps 1]
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from models.scan import selective_scan  # noqa: E402


def plain_recurrence(u, delta, A, B, C, D, z, delta_bias):
    """One time step at a time, with autograd: the baseline. Inputs are unbound along
    time once, so that the backward pass stays linear in the length."""
    dt = F.softplus(delta + delta_bias[:, None])
    A = A[None]  # (1, d, n)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[2])
    ys = []
    for dt_t, u_t, B_t, C_t in zip(dt.unbind(-1), u.unbind(-1), B.unbind(-1), C.unbind(-1)):
        h = torch.exp(dt_t[..., None] * A) * h + (dt_t * u_t)[..., None] * B_t[:, None]
        ys.append((h * C_t[:, None]).sum(-1))
    return (torch.stack(ys, -1) + D[:, None] * u) * F.silu(z)


def to_mambapy_layout(inputs):
    """Inputs as contiguous tensors in mambapy's (b, l, d) / (b, l, n) layout."""
    u, delta, A, B, C, D, z, bias = (t.detach() for t in inputs)
    seq = [t.transpose(1, 2).contiguous().requires_grad_() for t in (u, delta, B, C, z)]
    return seq[:2] + [A.clone().requires_grad_()] + seq[2:4] + [D.clone().requires_grad_(),
                                                                 seq[4], bias.clone().requires_grad_()]


def mambapy_scan(u, delta, A, B, C, D, z, delta_bias):
    """The same function through mambapy's parallel scan; inputs in its layout
    (u, delta, z: (b, l, d); B, C: (b, l, n)); returns (b, d, l) like the others."""
    from mambapy.pscan import pscan
    dt = F.softplus(delta + delta_bias)  # (b, l, d)
    decay = torch.exp(dt.unsqueeze(-1) * A)  # (b, l, d, n)
    inp = (dt * u).unsqueeze(-1) * B.unsqueeze(2)
    hs = pscan(decay, inp)
    y = (hs @ C.unsqueeze(-1)).squeeze(-1)  # (b, l, d)
    return ((y + D * u) * F.silu(z)).transpose(1, 2)


def backend_fn(name):
    return lambda u, delta, A, B, C, D, z, bias: selective_scan(
        u, delta, A, B, C, D, z, bias, delta_softplus=True, backend=name)


def time_fwd_bwd(fn, inputs, grad_out, reps):
    fwd, tot = [], []
    out = None
    for _ in range(reps):
        for t in inputs:
            t.grad = None
        t0 = time.perf_counter()
        out = fn(*inputs)
        t1 = time.perf_counter()
        out.backward(grad_out)
        t2 = time.perf_counter()
        fwd.append(t1 - t0)
        tot.append(t2 - t0)
    return statistics.median(fwd), statistics.median(tot), out.detach()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, default=5 * 32 ** 3)
    p.add_argument("--d-inner", type=int, default=32)
    p.add_argument("--d-state", type=int, default=16)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--reps", type=int, default=5, help="timed runs per fast backend")
    p.add_argument("--loop-reps", type=int, default=1, help="timed runs of the plain recurrence")
    args = p.parse_args()

    g = torch.Generator().manual_seed(0)
    b, d, n, L = args.batch, args.d_inner, args.d_state, args.length
    r = lambda *s: torch.randn(*s, generator=g)
    inputs = [r(b, d, L), r(b, d, L), -torch.exp(r(d, n)), r(b, n, L), r(b, n, L), r(d), r(b, d, L), r(d)]
    for t in inputs:
        t.requires_grad_()
    grad_out = r(b, d, L)

    candidates = {"numba (CPU kernel)": (backend_fn("numba"), inputs),
                  "torch (chunked parallel)": (backend_fn("torch"), inputs)}
    try:
        import mambapy  # noqa: F401
        candidates["mambapy pscan"] = (mambapy_scan, to_mambapy_layout(inputs))
    except ImportError:
        print("mambapy not installed: no comparison with its parallel scan")
    candidates["plain recurrence"] = (plain_recurrence, inputs)

    print(f"selective scan fwd+bwd: batch {b}, d_inner {d}, d_state {n}, length {L:,}, "
          f"float32, {torch.get_num_threads()} torch threads")
    results, ref = {}, None
    for name, (fn, args_in) in candidates.items():
        reps = args.loop_reps if name == "plain recurrence" else args.reps
        if name != "plain recurrence":
            time_fwd_bwd(fn, args_in, grad_out, 1)  # warm-up (numba compiles or loads its cache)
        fwd, tot, out = time_fwd_bwd(fn, args_in, grad_out, reps)
        ref = out if ref is None else ref
        results[name] = (fwd, tot)
        err = (out - ref).abs().max().item()
        print(f"  {name:26s} fwd {fwd:8.3f} s  fwd+bwd {tot:8.3f} s  (median of {reps}; "
              f"max |out - numba| {err:.1e})", flush=True)

    print("fwd+bwd speed-up (row faster than column by):")
    baselines = [k for k in ("plain recurrence", "mambapy pscan") if k in results]
    print("  " + " " * 26 + "".join(f"{k:>20s}" for k in baselines))
    for name in candidates:
        if name in baselines:
            continue
        print(f"  {name:26s}" + "".join(f"{results[k][1] / results[name][1]:19.1f}x" for k in baselines))


if __name__ == "__main__":
    main()
