"""Selective scan on the CPU: forward and backward kernels compiled with numba.

The state recurrence runs sequentially over time and in parallel over groups of channels
(one group per thread), vectorised over the state. Each thread walks time in chunks;
the decays exp(delta * A) of a chunk come from an exponential written so that LLVM
vectorises it (no library call). The forward pass keeps the state at every chunk start;
the backward pass recomputes one chunk of states from there and runs the adjoint
recurrence backwards, so its memory does not grow with the state size times the length.
The buffers of a chunk that the loops over time touch live on the thread's stack (a chunk
holds up to _STACK_STATES steps x states: 255 steps at d_state 16), so that LLVM knows they
overlap nothing and vectorises those loops without per-step overlap checks.
States, step sizes and per-step arithmetic are in the input's dtype (float32 for float32
inputs, as in mamba-ssm's CUDA kernel; float64 for float64), the decays of float32 inputs
come from a float32 exponential (twice the vector lanes; relative error about
3e-7 + |x| * 6e-8). The gradients of D and delta_bias are summed over time in float64;
that of A in the input's dtype within a chunk and in float64 over chunks.
"""
import contextlib
import math

import numba
import numpy as np
import torch
from numba import carray, njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

# Reassociation lets LLVM vectorise the reductions over the state; no "nnan"/"ninf",
# so NaN and infinite inputs propagate as in plain arithmetic.
_FASTMATH = {"reassoc", "contract", "arcp", "nsz"}
_LOG2E = 1.4426950408889634
_LN2_HI = 0.6931471803691238  # ln 2 split in two parts (Cody-Waite range reduction)
_LN2_LO = 1.9082149292705877e-10
_SOFTPLUS_THRESHOLD = 20.0  # softplus(x) = x above it, as in torch and mamba-ssm
# float32 constants of _exp_block32 (numba keeps np.float32 globals float32)
_F32_LO, _F32_HI = np.float32(-87.0), np.float32(88.0)
_F32_LOG2E, _F32_HALF = np.float32(_LOG2E), np.float32(0.5)
_F32_LN2_HI, _F32_LN2_LO = np.float32(0.693359375), np.float32(-2.12194440e-4)
_F32_C = tuple(np.float32(1 / math.factorial(i)) for i in range(8))
# Elements (time steps x states) of each per-thread stack buffer: it bounds the chunk length
# and keeps a thread's stack use near 200 KiB in float32 (400 KiB in float64).
_STACK_STATES = 4096


@njit(fastmath=_FASTMATH, inline="always", cache=True)
def _exp_block(x, out, bits, m, precise):
    """out[:m] = exp(x[:m]) in loops LLVM can vectorise. Relative error below 1e-14 when
    `precise`, else below 1e-9 (ample for float32 results)."""
    for j in range(m):
        v = min(max(x[j], -708.0), 709.0)
        k = np.floor(v * _LOG2E + 0.5)  # a float: math.floor's int stops vectorisation
        f = (v - k * _LN2_HI) - k * _LN2_LO  # |f| <= ln(2) / 2
        bits[j] = (np.int64(k) + 1023) << 52  # the float64 2**k
        p = 1.0 + f * (1.0 + f * (1 / 2 + f * (1 / 6 + f * (1 / 24 + f * (1 / 120 + f * (
            1 / 720 + f * (1 / 5040 + f * (1 / 40320))))))))  # Taylor series to degree 8
        if precise:  # loop-invariant: LLVM unswitches it; terms of degree 9 to 11
            f3 = f * f * f
            p += f3 * f3 * f3 * (1 / 362880 + f * (1 / 3628800 + f * (1 / 39916800)))
        out[j] = p
    scale = bits.view(np.float64)
    for j in range(m):
        out[j] *= scale[j]


@njit(fastmath=_FASTMATH, inline="always", cache=True)
def _exp_block32(x, out, bits, m):
    """out[:m] = exp(x[:m]) in float32 arithmetic, twice the lanes of float64 (as mamba-ssm's
    CUDA kernel, which takes exp in float32): relative error below 3e-7 for the float32-rounded
    x, whose rounding adds up to |x| * 6e-8. bits: int64 scratch."""
    bits32 = bits.view(np.int32)
    for j in range(m):
        v = min(max(np.float32(x[j]), _F32_LO), _F32_HI)
        k = np.floor(v * _F32_LOG2E + _F32_HALF)
        f = (v - k * _F32_LN2_HI) - k * _F32_LN2_LO  # |f| <= ln(2) / 2
        bits32[j] = (np.int32(k) + np.int32(127)) << np.int32(23)  # the float32 2**k
        out[j] = _F32_C[0] + f * (_F32_C[1] + f * (_F32_C[2] + f * (_F32_C[3] + f * (_F32_C[4] + f * (
            _F32_C[5] + f * (_F32_C[6] + f * _F32_C[7]))))))  # Taylor series to degree 7
    scale = bits32.view(np.float32)
    for j in range(m):
        out[j] *= scale[j]


@njit(fastmath=_FASTMATH, inline="always", cache=True)
def _log1p_unit(e):
    """log(1 + e) for e in [0, 1]: 2 atanh(s), s = e / (2 + e) <= 1/3, by its series
    (terms to s**33 reach float64 precision)."""
    s = e / (2.0 + e)
    s2 = s * s
    p = (1 / 21 + s2 * (1 / 23 + s2 * (1 / 25 + s2 * (1 / 27 + s2 * (1 / 29 + s2 * (
        1 / 31 + s2 * (1 / 33)))))))
    p = (1.0 + s2 * (1 / 3 + s2 * (1 / 5 + s2 * (1 / 7 + s2 * (1 / 9 + s2 * (1 / 11 + s2 * (
        1 / 13 + s2 * (1 / 15 + s2 * (1 / 17 + s2 * (1 / 19 + s2 * p))))))))))
    return 2.0 * s * p


@njit(fastmath=_FASTMATH, inline="always", cache=True)
def _sigmoid_block(x, neg_abs, e, sig, bits, m, precise):
    """sig[:m] = sigmoid(x[:m]); leaves e[:m] = exp(-|x|)."""
    for j in range(m):
        neg_abs[j] = -abs(x[j])
    _exp_block(neg_abs, e, bits, m, precise)
    for j in range(m):
        sig[j] = (1.0 if x[j] >= 0 else e[j]) / (1.0 + e[j])


@njit(fastmath=_FASTMATH, inline="always", cache=True)
def _load_chunk(delta, z, A, bias, has_z, softplus, precise, b, d, t0, m, N, raw, tmp, e,
                dts, ddts, gate, dgate, arg, decay, bits):
    """Per-step quantities of channel d over t0 .. t0 + m - 1, in vectorisable loops:
    dts = step size, ddts = its derivative wrt delta, gate = silu(z), dgate = silu'(z),
    decay[i * N + n] = exp(dts[i] * A[d, n])."""
    delta_c = delta[b, d, t0:t0 + m]  # slices of the chunk, indexed from 0: no
    for i in range(m):  # negative-index checks (which make LLVM gather)
        raw[i] = delta_c[i] + bias[d]
    if softplus:
        _sigmoid_block(raw, tmp, e, ddts, bits, m, precise)
        for i in range(m):
            if raw[i] > _SOFTPLUS_THRESHOLD:
                dts[i] = raw[i]
                ddts[i] = 1.0
            else:
                dts[i] = max(raw[i], 0.0) + _log1p_unit(e[i])
    else:
        for i in range(m):
            dts[i] = raw[i]
            ddts[i] = 1.0
    if has_z:
        z_c = z[b, d, t0:t0 + m]
        for i in range(m):
            raw[i] = z_c[i]
        _sigmoid_block(raw, tmp, e, dgate, bits, m, precise)
        for i in range(m):
            s = dgate[i]
            gate[i] = raw[i] * s
            dgate[i] = s * (1.0 + raw[i] * (1.0 - s))
    A_row = A[d]
    for i in range(m):
        for n in range(N):
            arg[i * N + n] = dts[i] * A_row[n]
    if precise:
        _exp_block(arg, decay, bits, m * N, True)
    else:
        _exp_block32(arg, decay, bits, m * N)


@njit(fastmath=_FASTMATH, inline="always", cache=True)
def _load_tile(X, b, t0, m, tile):
    """tile[i * N + n] = X[b, n, t0 + i]: the (m, N) time-major tile of a (b, n, l) array."""
    N = X.shape[1]
    for n in range(N):
        row = X[b, n, t0:t0 + m]
        for i in range(m):
            tile[i * N + n] = row[i]


@intrinsic
def _stack_pointer(typingctx, size, dtype):
    """Pointer to `size` (a compile-time constant) uninitialised elements of `dtype` in the
    calling function's stack frame."""
    if not isinstance(size, types.IntegerLiteral):
        return None
    count = size.literal_value

    def codegen(context, builder, signature, args):
        return cgutils.alloca_once(builder, context.get_value_type(dtype.dtype), size=count)
    return types.CPointer(dtype.dtype)(size, dtype), codegen


@njit(inline="always", cache=True)
def _stack_buffer(dtype):
    """A 1-d array of _STACK_STATES elements on the stack. LLVM knows that such buffers
    overlap neither each other nor any array argument, so the loops over the state that
    write them vectorise without the overlap checks it otherwise reruns at every time
    step (forward + backward kernels 0.17 s instead of 0.19 s at the benchmark size)."""
    return carray(_stack_pointer(_STACK_STATES, dtype), _STACK_STATES)


@njit(fastmath=_FASTMATH, inline="always", cache=True)
def _chunk_scratch(chunk, u):
    """One thread's per-chunk buffers, shared by both kernels. Per step, on the heap (on
    the stack they measured no faster): float64 work arrays for the gates; step sizes,
    gates and their derivatives. Per step and state, on the stack: decay arguments and
    decays; int64 bits for the exponential; time-major tiles of B and C."""
    dt = u.dtype
    return (np.empty(chunk), np.empty(chunk), np.empty(chunk),
            np.empty(chunk, dt), np.empty(chunk, dt), np.empty(chunk, dt), np.empty(chunk, dt),
            _stack_buffer(dt), _stack_buffer(dt), _stack_buffer(np.int64),
            _stack_buffer(dt), _stack_buffer(dt))


@njit(fastmath=_FASTMATH, inline="always", cache=True)
def _forward_steps(u, D, b, d, t0, m, N, has_z, dts, gate, decay, Bc, Cc, h, out):
    """Channel d over one chunk: h (the state, N) runs from the chunk's start to its end;
    writes out[b, d, t0:t0 + m]."""
    zero = np.zeros(1, u.dtype)[0]  # a 0 of the input's dtype (a literal 0.0 is float64)
    u_c = u[b, d, t0:t0 + m]
    out_c = out[b, d, t0:t0 + m]
    for i in range(m):
        x = dts[i] * u_c[i]
        a_row = decay[i * N:(i + 1) * N]  # rows of one step: slices, so that the loop over
        B_row = Bc[i * N:(i + 1) * N]  # the state indexes from 0 (no negative-index checks)
        C_row = Cc[i * N:(i + 1) * N]
        y = zero
        for n in range(N):
            h[n] = a_row[n] * h[n] + x * B_row[n]
            y += h[n] * C_row[n]
        y += D[d] * u_c[i]
        if has_z:
            y *= gate[i]
        out_c[i] = y


@njit(fastmath=_FASTMATH, inline="always", cache=True)
def _backward_steps(u, D, A_row, dout, b, d, t0, m, N, has_z, dts, ddts, gate, dgate, decay,
                    Bc, Cc, hs, dh, dAc, dBc, dCc, du, ddelta, dz_c):
    """Channel d over one chunk, backwards. hs[:N] holds the state at the chunk's start;
    the states of the chunk are recomputed into hs[(i + 1) * N:]. dh: gradient reaching the
    state from after the chunk, on return from its start. A_row: A[d] (a copy on the stack:
    read from A itself, the backward kernel took 0.17 s instead of 0.11 s at the benchmark
    size). Adds the chunk's share of dA
    to dAc, of dB, dC to dBc, dCc (time-major); writes du, ddelta and, with z, dz_c (dz of
    the chunk); returns the shares of dD and d delta_bias."""
    zero = np.zeros(1, u.dtype)[0]
    u_c, dout_c = u[b, d, t0:t0 + m], dout[b, d, t0:t0 + m]
    du_c, ddelta_c = du[b, d, t0:t0 + m], ddelta[b, d, t0:t0 + m]
    for i in range(m):
        x = dts[i] * u_c[i]
        a_row = decay[i * N:(i + 1) * N]
        B_row = Bc[i * N:(i + 1) * N]
        h_prev = hs[i * N:(i + 1) * N]
        h_now = hs[(i + 1) * N:(i + 2) * N]
        for n in range(N):
            h_now[n] = a_row[n] * h_prev[n] + x * B_row[n]
    dD = 0.0
    dbias = 0.0
    for i in range(m - 1, -1, -1):
        uu = u_c[i]
        dt = dts[i]
        dy = dout_c[i]
        a_row = decay[i * N:(i + 1) * N]
        B_row = Bc[i * N:(i + 1) * N]
        C_row = Cc[i * N:(i + 1) * N]
        dB_row = dBc[i * N:(i + 1) * N]
        dC_row = dCc[i * N:(i + 1) * N]
        h_prev = hs[i * N:(i + 1) * N]
        h_now = hs[(i + 1) * N:(i + 2) * N]
        if has_z:
            y = zero  # from 0, not from D * u: LLVM vectorises the sum only then
            for n in range(N):
                y += h_now[n] * C_row[n]
            dz_c[i] = dy * (y + D[d] * uu) * dgate[i]
            dy = dy * gate[i]
        dD += dy * uu
        dtu = dt * uu
        wa = zero  # sum_n dL/d(decay) * decay * A
        hb = zero  # sum_n dL/dh * B
        for n in range(N):
            a = a_row[n]
            dC_row[n] += dy * h_now[n]
            dhn = dh[n] + dy * C_row[n]
            w = dhn * h_prev[n] * a
            dAc[n] += w * dt
            wa += w * A_row[n]
            hb += dhn * B_row[n]
            dB_row[n] += dhn * dtu
            dh[n] = dhn * a
        du_c[i] = dy * D[d] + hb * dt
        ddt = (wa + hb * uu) * ddts[i]
        ddelta_c[i] = ddt
        dbias += ddt
    return dD, dbias


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _forward(u, delta, A, B, C, D, z, bias, has_z, softplus, precise, chunk, groups, out, ckpt):
    """u, delta, z: (b, d, l); A: (d, n); B, C: (b, n, l); D, bias: (d,).

    Writes out (b, d, l) and ckpt (b, d, ceil(l / chunk), n), the state before each chunk
    (the first, zeros, given).
    Channels are split in `groups` (one per thread); each thread walks time chunk by
    chunk over all its channels, with B and C of the chunk copied once into time-major
    tiles (B and C are used in the (b, n, l) layout mamba-ssm takes; no transposed copies).
    """
    nb, nd, L = u.shape
    N = A.shape[1]
    nc = ckpt.shape[2]
    for g in prange(groups):
        lo = g * nd // groups
        hi = (g + 1) * nd // groups
        raw, tmp, e, dts, ddts, gate, dgate, arg, decay, bits, Bc, Cc = _chunk_scratch(chunk, u)
        h = _stack_buffer(u.dtype)  # the state of one channel (N elements); between chunks in ckpt
        for b in range(nb):
            for c in range(nc):
                t0 = c * chunk
                m = min(chunk, L - t0)
                _load_tile(B, b, t0, m, Bc)
                _load_tile(C, b, t0, m, Cc)
                for d in range(lo, hi):
                    for n in range(N):
                        h[n] = ckpt[b, d, c, n]
                    _load_chunk(delta, z, A, bias, has_z, softplus, precise, b, d, t0, m, N,
                                raw, tmp, e, dts, ddts, gate, dgate, arg, decay, bits)
                    _forward_steps(u, D, b, d, t0, m, N, has_z, dts, gate, decay, Bc, Cc, h, out)
                    if c + 1 < nc:
                        for n in range(N):
                            ckpt[b, d, c + 1, n] = h[n]


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _backward(u, delta, A, B, C, D, z, bias, has_z, softplus, precise, chunk, ckpt, dout,
              du, ddelta, dz, dA, dD, dbias, dB_part, dC_part):
    """Gradients of _forward's output, with the channel groups of _forward, one group
    per dB_part.shape[0]; dB_part, dC_part (groups, b, n, l) receive each group's share
    of the sums over channels. dA, dD, dbias are float64 (sums over batch and time).
    """
    nb, nd, L = u.shape
    N = A.shape[1]
    groups = dB_part.shape[0]
    for g in prange(groups):
        lo = g * nd // groups
        hi = (g + 1) * nd // groups
        raw, tmp, e, dts, ddts, gate, dgate, arg, decay, bits, Bc, Cc = _chunk_scratch(chunk, u)
        dBc, dCc, hs = _stack_buffer(u.dtype), _stack_buffer(u.dtype), _stack_buffer(u.dtype)
        # of one channel, N elements each: gradient reaching the state, the chunk's share of
        # dA (summed in the input's dtype), A[d]
        dh, dAc, A_row = _stack_buffer(u.dtype), _stack_buffer(u.dtype), _stack_buffer(u.dtype)
        dh_all = np.empty((hi - lo, N), u.dtype)  # gradient reaching each state from later steps
        dA_acc = np.zeros((hi - lo, N))
        dD_acc = np.zeros(hi - lo)
        dbias_acc = np.zeros(hi - lo)
        for b in range(nb):
            dh_all[:] = 0.0
            for c in range(ckpt.shape[2] - 1, -1, -1):
                t0 = c * chunk
                m = min(chunk, L - t0)
                _load_tile(B, b, t0, m, Bc)
                _load_tile(C, b, t0, m, Cc)
                dBc[:m * N] = 0.0
                dCc[:m * N] = 0.0
                for d in range(lo, hi):
                    k = d - lo
                    _load_chunk(delta, z, A, bias, has_z, softplus, precise, b, d, t0, m, N,
                                raw, tmp, e, dts, ddts, gate, dgate, arg, decay, bits)
                    for n in range(N):
                        hs[n] = ckpt[b, d, c, n]
                        dh[n] = dh_all[k, n]
                        dAc[n] = 0.0
                        A_row[n] = A[d, n]
                    dz_c = dz[b, d, t0:t0 + m] if has_z else dz[0, 0, :0]  # dz: (1, 1, 1) without z
                    sums = _backward_steps(u, D, A_row, dout, b, d, t0, m, N, has_z, dts, ddts, gate,
                                           dgate, decay, Bc, Cc, hs, dh, dAc, dBc, dCc,
                                           du, ddelta, dz_c)
                    dD_acc[k] += sums[0]
                    dbias_acc[k] += sums[1]
                    for n in range(N):
                        dh_all[k, n] = dh[n]
                        dA_acc[k, n] += dAc[n]
                for n in range(N):
                    dB_row = dB_part[g, b, n, t0:t0 + m]
                    dC_row = dC_part[g, b, n, t0:t0 + m]
                    for i in range(m):
                        dB_row[i] = dBc[i * N + n]
                        dC_row[i] = dCc[i * N + n]
        for d in range(lo, hi):
            for n in range(N):
                dA[d, n] = dA_acc[d - lo, n]
            dD[d] = dD_acc[d - lo]
            dbias[d] = dbias_acc[d - lo]


@contextlib.contextmanager
def _torch_threads():
    """Run kernels on as many threads as torch uses (OMP_NUM_THREADS: 1 per process under
    torchrun) and leave torch's count as it was: numba's OpenMP layer shares libgomp with
    torch and sets both counts to NUMBA_NUM_THREADS (every core) when its pool starts."""
    threads = torch.get_num_threads()
    numba.set_num_threads(max(1, min(numba.config.NUMBA_NUM_THREADS, threads)))
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def _groups(nd):
    """Work groups for the kernels: one per thread."""
    return max(1, min(numba.get_num_threads(), nd))


class _NumbaScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk_size):
        nb, nd, L = u.shape
        N = A.shape[1]
        if N > _STACK_STATES // 2:
            raise ValueError(f"the numba selective scan takes d_state up to {_STACK_STATES // 2}, "
                             f"got {N}; use the torch backend")
        # the stack buffers hold the states of a chunk and the one before it
        longest = _STACK_STATES // N - 1
        chunk_size = max(1, min(chunk_size or longest, longest, L))
        zeros_d = torch.zeros(nd, dtype=u.dtype)
        Dv = zeros_d if D is None else D
        bias = zeros_d if delta_bias is None else delta_bias
        zv = u.new_zeros(1, 1, 1) if z is None else z
        # strided inputs are read in place (e.g. (b, d, l) views of time-major (b, l, d) tensors:
        # a chunk's rows stay in cache across its channels); the output takes u's layout
        u, delta, A, B, C, Dv, zv, bias = (t.detach() for t in (u, delta, A, B, C, Dv, zv, bias))
        out = torch.empty_like(u) if u.stride(-1) == 1 else u.new_empty(nb, L, nd).transpose(1, 2)
        ckpt = u.new_empty(nb, nd, -(-L // chunk_size), A.shape[1])
        ckpt[:, :, 0] = 0.0  # the state before the first step
        with _torch_threads():
            _forward(u.numpy(), delta.numpy(), A.numpy(), B.numpy(), C.numpy(), Dv.numpy(),
                     zv.numpy(), bias.numpy(), z is not None, bool(delta_softplus),
                     u.dtype == torch.float64, chunk_size,
                     _groups(nd), out.numpy(), ckpt.numpy())
        ctx.save_for_backward(u, delta, A, B, C, Dv, zv, bias, ckpt)
        ctx.flags = (D is not None, z is not None, delta_bias is not None,
                     bool(delta_softplus), chunk_size)
        return out

    @staticmethod
    def backward(ctx, dout):
        u, delta, A, B, C, Dv, zv, bias, ckpt = ctx.saved_tensors
        has_D, has_z, has_bias, softplus, chunk_size = ctx.flags
        nb, nd, L = u.shape
        N = A.shape[1]
        with _torch_threads():
            groups = _groups(nd)
            du = torch.empty_like(u)
            ddelta = torch.empty_like(du)
            dz = torch.empty_like(zv)  # the kernel writes all of it when z is given
            f64 = dict(dtype=torch.float64)
            dA, dD, dbias = torch.empty(nd, N, **f64), torch.empty(nd, **f64), torch.empty(nd, **f64)
            dB = u.new_empty(groups, nb, N, L)
            dC = u.new_empty(groups, nb, N, L)
            _backward(*(t.numpy() for t in (u, delta, A, B, C, Dv, zv, bias)), has_z, softplus,
                      u.dtype == torch.float64, chunk_size, ckpt.numpy(), dout.to(u.dtype).contiguous().numpy(),
                      du.numpy(), ddelta.numpy(), dz.numpy(), dA.numpy(), dD.numpy(), dbias.numpy(),
                      dB.numpy(), dC.numpy())
        dtype = u.dtype
        for k in range(1, groups):  # summed into group 0's share: no new 2 x (b, n, l) block
            dB[0] += dB[k]
            dC[0] += dC[k]
        dB, dC = dB[0], dC[0]
        return (du, ddelta, dA.to(dtype), dB, dC,
                dD.to(dtype) if has_D else None, dz if has_z else None,
                dbias.to(dtype) if has_bias else None, None, None)


def selective_scan_numba(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                         delta_softplus=False, chunk_size=None):
    """Selective scan of CPU tensors of one dtype (float32 or float64); see models.scan.

    chunk_size: time steps between the states kept for the backward pass; at most (and by
    default) _STACK_STATES // d_state - 1, 255 at d_state 16. Each thread prepares step
    sizes, gates and decays of a channel a chunk at a time, so longer chunks spread that
    set-up over more steps (at the size of benchmarks/bench_scan.py, 64 steps took about
    10% longer forward+backward than 255 or more) and keep fewer states.
    """
    return _NumbaScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk_size)
