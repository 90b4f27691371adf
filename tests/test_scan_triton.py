"""The Triton selective scan, run by Triton's interpreter on CPU tensors, against the plain
recurrence (in float64) and the numba kernel. conftest.py sets TRITON_INTERPRET=1 before
triton is imported."""
import os
import subprocess
import sys

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("TRITON_INTERPRET=1 was not set before triton was imported", allow_module_level=True)
pytest.importorskip("triton")

from models.scan import ENV_VAR, resolve_backend, selective_scan  # noqa: E402
from models.scan.cpu_numba import selective_scan_numba  # noqa: E402
from models.scan.triton_scan import selective_scan_triton  # noqa: E402
from helpers import ROOT  # noqa: E402
from scan_reference import recurrence  # noqa: E402
from test_scan import FLAG_IDS, FLAGS, make_inputs  # noqa: E402

RTOL = 1e-5  # largest difference / largest magnitude of the reference, per tensor


def float32_copy(tensors):
    return {k: None if t is None else t.detach().float().requires_grad_() for k, t in tensors.items()}


def grads(out, tensors, seed=1):
    """Gradients of sum(out * w) for one w (drawn in float64 whatever out's dtype)."""
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    live = {k: t for k, t in tensors.items() if t is not None}
    return dict(zip(live, torch.autograd.grad((out * w.to(out.dtype)).sum(), list(live.values()))))


def assert_relative(out, ref, name="output"):
    scale = ref.abs().max().clamp_min(1e-30)
    err = ((out.double() - ref.double()).abs().max() / scale).item()
    assert err <= RTOL, f"{name}: relative error {err:.2e}"


def check_against_recurrence(b, d, n, L, flags, block_t, seed=0):
    """Output and every gradient of the Triton scan (float32) against the float64 recurrence."""
    t64, softplus = make_inputs(b, d, n, L, flags, seed=seed)
    t32 = float32_copy(t64)
    out = selective_scan_triton(**t32, delta_softplus=softplus, block_t=block_t)
    ref = recurrence(**t64, delta_softplus=softplus)
    assert out.dtype == torch.float32
    assert_relative(out, ref)
    g_out, g_ref = grads(out, t32), grads(ref, t64)
    assert g_out.keys() == g_ref.keys()
    for name in g_ref:
        assert_relative(g_out[name], g_ref[name], name)


@pytest.mark.parametrize("flags", FLAGS, ids=FLAG_IDS)
def test_triton_matches_recurrence(flags):
    # batch 2, 37 steps in blocks of 16 (the last block partly empty), d_state 5 (padded to 8)
    check_against_recurrence(2, 3, 5, 37, flags, block_t=16)


@pytest.mark.parametrize("n", [1, 4, 16])
@pytest.mark.parametrize("L,block_t", [(1, 16), (32, 8), (45, 16)])
def test_triton_d_state_and_lengths(n, L, block_t):
    check_against_recurrence(3, 2, n, L, (True, True, True, True), block_t, seed=n + L)


@pytest.mark.slow
@pytest.mark.parametrize("flags", FLAGS, ids=FLAG_IDS)
@pytest.mark.parametrize("L", [1, 100, 300])
def test_triton_matches_recurrence_long(flags, L):
    check_against_recurrence(2, 4, 16, L, flags, block_t=64, seed=L)


def test_triton_agrees_with_numba():
    t64, _ = make_inputs(2, 4, 16, 150, (True, True, True, True), seed=3)
    a, b = float32_copy(t64), float32_copy(t64)
    out_t = selective_scan_triton(**a, delta_softplus=True, block_t=32)
    out_n = selective_scan_numba(**b, delta_softplus=True)
    assert_relative(out_t, out_n)
    g_t, g_n = grads(out_t, a), grads(out_n, b)
    for name in g_n:
        assert_relative(g_t[name], g_n[name], name)


def test_backward_keeps_no_state_per_step():
    """What autograd keeps: the inputs and one state per block, nothing of size b*d*L*n."""
    b, d, n, L, block_t = 2, 3, 4, 40, 8
    t64, _ = make_inputs(b, d, n, L, (True, True, True, True))
    t32 = float32_copy(t64)
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: sizes.append(x.numel()) or x, lambda x: x):
        selective_scan_triton(**t32, delta_softplus=True, block_t=block_t)
    assert sizes and max(sizes) < b * d * L * n
    assert b * d * (L // block_t) * n in sizes  # the block-start states


def test_triton_backend_by_name_and_environment(monkeypatch):
    t64, _ = make_inputs(1, 2, 4, 20, (True, True, True, True))
    t32 = float32_copy(t64)
    assert resolve_backend("triton", "cpu") == "triton"  # the interpreter is on
    assert resolve_backend(None, "cpu") == "numba"  # ... but auto never takes it on the CPU
    monkeypatch.setenv(ENV_VAR, "triton")
    assert resolve_backend(None, "cpu") == "triton"
    out = selective_scan(**t32, delta_softplus=True)
    ref = selective_scan(**t32, delta_softplus=True, backend="numba")
    assert_relative(out, ref)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the scan stays float32 under autocast
        inside = selective_scan(**t32, delta_softplus=True)
    torch.testing.assert_close(inside, out)
    with pytest.raises(ValueError, match="float32"):
        selective_scan(**make_inputs(1, 2, 4, 5, (False, False, False, True))[0], delta_softplus=True)


def test_triton_needs_cuda_or_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="Triton's kernels need CUDA tensors"):
        resolve_backend("triton", "cpu")
    assert resolve_backend(None, "cuda", torch.float64) != "triton"  # no float64 kernels


COMPILE = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import models.scan.triton_scan as ts
ints = ["nd", "L", "N", "n_blocks"]
for fn in (ts._forward_kernel, ts._backward_kernel):
    names = fn.arg_names
    for on in (True, False):
        flags = dict(HAS_D=on, HAS_Z=on, HAS_BIAS=on, SOFTPLUS=on, BLOCK_T=64, BLOCK_N=16)
        sig = {n: "constexpr" if n in flags else "i32" if n in ints else "*fp32" for n in names}
        kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=flags), target=GPUTarget("cuda", 90, 32))
        assert kernel.asm["cubin"], fn.__name__
print("compiled")
"""


def test_kernels_compile_for_an_h100_without_one(tmp_path):
    """The interpreter runs the kernels' Python; this compiles them (Triton's own compiler,
    down to an sm_90 cubin) as a CUDA machine would, which needs no GPU."""
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path))
    run = subprocess.run([sys.executable, "-c", COMPILE], cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0 and "compiled" in run.stdout, run.stderr[-2000:]
