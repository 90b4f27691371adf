import itertools
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from numba import njit

from models.scan import ENV_VAR, resolve_backend, selective_scan
from models.scan.cpu_numba import _exp_block32, selective_scan_numba
from models.scan.parallel_torch import selective_scan_torch
from scan_reference import recurrence

CPU_BACKENDS = {"numba": selective_scan_numba, "torch": selective_scan_torch}
FLAGS = list(itertools.product([False, True], repeat=4))  # z, D, delta_bias, softplus
FLAG_IDS = ["z{:d}-D{:d}-bias{:d}-sp{:d}".format(*f) for f in FLAGS]


def make_inputs(b, d, n, L, flags, dtype=torch.float64, seed=0):
    has_z, has_D, has_bias, softplus = flags
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)
    # without softplus delta must stay positive, or the recurrence grows without bound
    delta = r(b, d, L) if softplus else torch.rand(b, d, L, generator=g, dtype=dtype) * 0.5
    A = -torch.exp(r(d, n) * 0.5)
    tensors = dict(u=r(b, d, L), delta=delta, A=A, B=r(b, n, L), C=r(b, n, L),
                   D=r(d) if has_D else None, z=r(b, d, L) if has_z else None,
                   delta_bias=None)
    if has_bias:
        tensors["delta_bias"] = r(d) * 0.5 if softplus else torch.rand(d, generator=g, dtype=dtype) * 0.1
    for t in tensors.values():
        if t is not None:
            t.requires_grad_()
    return tensors, softplus


def grads(out, tensors, seed=1):
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    live = {k: t for k, t in tensors.items() if t is not None}
    return dict(zip(live, torch.autograd.grad((out * w).sum(), list(live.values()))))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("flags", FLAGS, ids=FLAG_IDS)
@pytest.mark.parametrize("L", [1, 37, 1000])
def test_backend_matches_recurrence(backend, flags, L):
    tensors, softplus = make_inputs(2, 3, 5, L, flags)
    ref = recurrence(**tensors, delta_softplus=softplus)
    out = CPU_BACKENDS[backend](**tensors, delta_softplus=softplus, chunk_size=16)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    g_out, g_ref = grads(out, tensors), grads(ref, tensors)
    assert g_out.keys() == g_ref.keys()
    for name in g_ref:
        torch.testing.assert_close(g_out[name], g_ref[name], rtol=1e-9, atol=1e-9, msg=name)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("flags", FLAGS, ids=FLAG_IDS)
def test_gradcheck(backend, flags):
    tensors, softplus = make_inputs(2, 3, 4, 9, flags)
    names = [k for k, t in tensors.items() if t is not None]
    fn = CPU_BACKENDS[backend]

    def f(*args):
        return fn(**dict(zip(names, args)), delta_softplus=softplus, chunk_size=4)

    assert torch.autograd.gradcheck(f, [tensors[k] for k in names])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_float32_long_sequence(backend):
    """Default chunking at a length that is no multiple of any power of two; float32."""
    flags = (True, True, True, True)
    tensors, _ = make_inputs(2, 4, 8, 3001, flags)
    ref = recurrence(**tensors, delta_softplus=True)
    t32 = {k: None if t is None else t.detach().float() for k, t in tensors.items()}
    out = selective_scan(**t32, delta_softplus=True, backend=backend)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-4, atol=1e-4)


def test_backends_agree_at_batch_and_length():
    tensors, _ = make_inputs(3, 6, 16, 4099, (True, True, True, True), dtype=torch.float32)
    outs = {name: selective_scan(**tensors, delta_softplus=True, backend=name) for name in CPU_BACKENDS}
    torch.testing.assert_close(outs["numba"], outs["torch"], rtol=1e-4, atol=1e-4)
    gn, gt = grads(outs["numba"], tensors), grads(outs["torch"], tensors)
    for name in gn:
        torch.testing.assert_close(gn[name], gt[name], rtol=2e-3, atol=2e-3, msg=name)


def test_numba_largest_d_state_and_beyond():
    """The kernel's chunk shrinks with d_state (its per-thread buffers hold a fixed number
    of steps x states): at the largest d_state it takes, one step per chunk; above it, a
    clear error."""
    from models.scan.cpu_numba import _STACK_STATES
    largest = _STACK_STATES // 2
    tensors, _ = make_inputs(1, 2, largest, 5, (True, True, True, True))
    ref = recurrence(**tensors, delta_softplus=True)
    out = selective_scan_numba(**tensors, delta_softplus=True)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    g_out, g_ref = grads(out, tensors), grads(ref, tensors)
    for name in g_ref:
        torch.testing.assert_close(g_out[name], g_ref[name], rtol=1e-9, atol=1e-9, msg=name)
    too_big, _ = make_inputs(1, 2, largest + 1, 3, (False, False, False, True))
    with pytest.raises(ValueError, match=f"d_state up to {largest}, got {largest + 1}"):
        selective_scan_numba(**too_big, delta_softplus=True)


def test_nan_propagates():
    tensors, _ = make_inputs(1, 2, 4, 10, (False, False, False, True))
    u = tensors["u"].detach().clone()
    u[0, 0, 3] = float("nan")
    t = {k: None if v is None else v.detach() for k, v in tensors.items()} | {"u": u}
    for backend in CPU_BACKENDS:
        out = selective_scan(**t, delta_softplus=True, backend=backend)
        assert torch.isnan(out[0, 0, 3:]).all() and not torch.isnan(out[0, 0, :3]).any()
        assert not torch.isnan(out[0, 1]).any()


def test_automatic_choice_and_overrides(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert resolve_backend(None, "cpu") == "numba"
    assert resolve_backend(None, "cpu", torch.float64) == "numba"
    monkeypatch.setenv(ENV_VAR, "torch")
    assert resolve_backend(None, "cpu") == "torch"
    assert resolve_backend("numba", "cpu") == "numba"  # the argument wins over the variable
    monkeypatch.setenv(ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match="unknown selective-scan backend 'nonsense'"):
        resolve_backend(None, "cpu")


def test_env_var_changes_the_backend_used(monkeypatch):
    calls = []
    import models.scan as scan

    real = scan._import("torch")[0]
    monkeypatch.setitem(scan._imports, "torch", (lambda *a, **k: calls.append(1) or real(*a, **k), None))
    tensors, _ = make_inputs(1, 2, 3, 5, (False, False, False, False))
    monkeypatch.setenv(ENV_VAR, "torch")
    selective_scan(**tensors)
    monkeypatch.setenv(ENV_VAR, "numba")
    selective_scan(**tensors)
    assert calls == [1]


def test_unavailable_backend_is_refused():
    with pytest.raises(RuntimeError, match="mamba_ssm.*cannot run on cpu"):
        resolve_backend("mamba_ssm", "cpu")
    with pytest.raises(RuntimeError, match="numba.*cannot run on meta"):
        resolve_backend("numba", "meta")
    assert resolve_backend(None, "meta") == "torch"


@pytest.mark.parametrize("bad, message", [
    (dict(u=torch.zeros(2, 3)), "u must be"),
    (dict(A=torch.zeros(4, 5)), "A must be real"),
    (dict(B=torch.zeros(2, 5, 7)), "B must have shape"),
    (dict(z=torch.zeros(2, 3, 7)), "z must have shape"),
    (dict(delta_bias=torch.zeros(4)), "delta_bias must have shape"),
])
def test_shape_errors(bad, message):
    args = dict(u=torch.zeros(2, 3, 6), delta=torch.zeros(2, 3, 6), A=torch.zeros(3, 5),
                B=torch.zeros(2, 5, 6), C=torch.zeros(2, 5, 6)) | bad
    with pytest.raises(ValueError, match=message):
        selective_scan(**args)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_float32_under_autocast(backend):
    tensors, _ = make_inputs(1, 4, 8, 50, (True, True, True, True), dtype=torch.float32)
    plain = selective_scan(**tensors, delta_softplus=True, backend=backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = selective_scan(**tensors, delta_softplus=True, backend=backend)
    assert inside.dtype == torch.float32
    torch.testing.assert_close(inside, plain, rtol=0, atol=0)
    half = {k: None if t is None else t.detach().bfloat16() for k, t in tensors.items()}
    out = selective_scan(**half, delta_softplus=True, backend=backend)
    expect = selective_scan(**{k: None if t is None else t.float() for k, t in half.items()},
                            delta_softplus=True, backend=backend)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expect.bfloat16(), rtol=0, atol=0)


def test_numba_kernel_keeps_torchs_thread_count():
    """numba's OpenMP pool shares libgomp with torch; starting it must not raise torch's
    thread count (1 per process under torchrun) to every core."""
    code = ("import torch\n"
            "from models.scan.cpu_numba import selective_scan_numba as scan\n"
            "u = torch.randn(1, 4, 64, requires_grad=True)\n"
            "scan(u, torch.rand(1, 4, 64), -torch.rand(4, 8), torch.randn(1, 8, 64), torch.randn(1, 8, 64)).sum().backward()\n"
            "print(torch.get_num_threads())\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "2"})
    assert out.stdout.split() == ["1"]


def test_float32_exponential_of_the_numba_kernel():
    """The decays of float32 inputs: exp in float32 arithmetic, within 3e-7 of the exact
    exponential of the float32-rounded argument."""

    @njit
    def run(x, out, bits):
        _exp_block32(x, out, bits, x.size)

    x = np.concatenate([np.linspace(-87, 88, 20001), -np.logspace(-8, 0, 101), [0.0]])
    out, bits = np.empty_like(x), np.empty(x.size, np.int64)
    run(x, out, bits)
    assert np.max(np.abs(out / np.exp(x.astype(np.float32).astype(np.float64)) - 1)) < 3e-7
    run(np.array([-300.0, -1e30]), out[:2], bits[:2])
    assert 0 < out[0] < 2e-38 and 0 < out[1] < 2e-38  # clamped below -87: at most exp(-87)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_numba_reads_time_major_views(dtype):
    """The Mamba block passes (b, d, l) views of time-major (b, l, d) tensors, u and z slices of
    one (b, l, 2d) projection, B and C of another: the kernel reads them in place and gives the
    recurrence's values and gradients (and the result is time-major like u)."""
    g = torch.Generator().manual_seed(3)
    b, d, n, L = 2, 5, 4, 300
    xz = torch.randn(b, L, 2 * d, generator=g, dtype=dtype)
    proj = torch.randn(b, L, 1 + 2 * n, generator=g, dtype=dtype)
    delta = torch.randn(b, L, d, generator=g, dtype=dtype)
    tensors = dict(u=xz[..., :d].transpose(1, 2), delta=delta.transpose(1, 2),
                   A=-torch.exp(torch.randn(d, n, generator=g, dtype=dtype) * 0.5),
                   B=proj[..., 1:1 + n].transpose(1, 2), C=proj[..., 1 + n:].transpose(1, 2),
                   D=torch.randn(d, generator=g, dtype=dtype), z=xz[..., d:].transpose(1, 2),
                   delta_bias=torch.randn(d, generator=g, dtype=dtype) * 0.5)
    assert not tensors["u"].is_contiguous() and not tensors["B"].is_contiguous()
    for t in tensors.values():
        t.requires_grad_()
    out = selective_scan_numba(**tensors, delta_softplus=True, chunk_size=64)
    ref = recurrence(**{k: t.detach().contiguous().double().requires_grad_() for k, t in tensors.items()},
                     delta_softplus=True)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    assert out.stride(1) == 1  # time-major, like u
    torch.testing.assert_close(out.double(), ref.detach(), rtol=tol, atol=tol)
    g_out = grads(out, tensors)
    g_ref = grads(recurrence(**tensors, delta_softplus=True), tensors)
    for name in g_ref:
        torch.testing.assert_close(g_out[name], g_ref[name], rtol=10 * tol, atol=10 * tol, msg=name)
