"""Selective scan in Triton: forward and backward kernels that need no compiler at install.

One program per (batch, channel) walks time in blocks of `block_t` steps. Inside a block the
recurrence h_t = a_t h_{t-1} + x_t (a = exp(dt A), x = dt u B, a (block_t, d_state) tile)
runs as an associative scan; blocks run one after another, carrying the state. The forward
pass keeps only the state at each block start ((batch, d_inner, blocks, d_state), float32);
the backward pass recomputes a block's states from it and runs the adjoint recurrence
g_t = C_t dy_t + a_{t+1} g_{t+1} as a reverse associative scan, blocks last to first. The
gradients of B and C (sums over the channels) are accumulated with atomic adds; those of A,
D and delta_bias per (batch, channel), then summed. Float32 throughout, as mamba-ssm's kernel.

On CUDA tensors the kernels compile when first called (Triton ships its own compiler); with
TRITON_INTERPRET=1 set before this module is imported they run on CPU tensors (tests).
"""
import torch
import triton
import triton.language as tl

_SOFTPLUS_THRESHOLD = 20.0  # softplus(x) = x above it, as in torch and mamba-ssm


@triton.jit
def _combine(a1, x1, a2, x2):
    """(a1, x1) then (a2, x2) as one step of h -> a h + x."""
    return a1 * a2, x1 * a2 + x2


@triton.jit
def _softplus(v):
    """log(1 + exp(v)) without cancellation (log1p by Goldberg's correction), v above 20 kept."""
    w = tl.exp(-tl.abs(v))
    s = 1.0 + w
    log1p = tl.where(s == 1.0, w, tl.log(s) * w / (s - 1.0))
    return tl.where(v > 20.0, v, tl.maximum(v, 0.0) + log1p)


@triton.jit
def _channel(A_ptr, D_ptr, bias_ptr, nd, L, N, n_blocks,
             HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's (batch, channel), states, their mask, its row of A (BLOCK_N,), D, delta
    bias, and the offsets of its (b, d) row, its batch's B/C and its block-start states."""
    b, d = tl.program_id(0), tl.program_id(1)
    n = tl.arange(0, BLOCK_N)
    nmask = n < N
    A_row = tl.load(A_ptr + d * N + n, mask=nmask, other=0.0)
    D = tl.load(D_ptr + d) if HAS_D else 0.0
    bias = tl.load(bias_ptr + d) if HAS_BIAS else 0.0
    return b, d, n, nmask, A_row, D, bias, (b * nd + d) * L, b * N * L, (b * nd + d) * n_blocks * N


@triton.jit
def _block(u_ptr, delta_ptr, B_ptr, C_ptr, base, bbase, t0, L, A_row, bias, n, nmask,
           HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, BLOCK_T: tl.constexpr):
    """Loads of one time block: times, their mask, u, raw and final step sizes, B and C
    tiles (block_t, d_state), decays and inputs of the recurrence (identity where masked)."""
    t = t0 + tl.arange(0, BLOCK_T)
    tmask = t < L
    m2 = tmask[:, None] & nmask[None, :]
    u = tl.load(u_ptr + base + t, mask=tmask, other=0.0)
    raw = tl.load(delta_ptr + base + t, mask=tmask, other=0.0)
    if HAS_BIAS:
        raw = raw + bias
    dt = _softplus(raw) if SOFTPLUS else raw
    Bt = tl.load(B_ptr + bbase + n[None, :] * L + t[:, None], mask=m2, other=0.0)
    Ct = tl.load(C_ptr + bbase + n[None, :] * L + t[:, None], mask=m2, other=0.0)
    a = tl.where(m2, tl.exp(dt[:, None] * A_row[None, :]), 1.0)
    x = tl.where(m2, (dt * u)[:, None] * Bt, 0.0)
    return t, tmask, m2, u, raw, dt, Bt, Ct, a, x


@triton.jit
def _forward_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr, states_ptr,
                    nd, L, N, n_blocks,
                    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                    SOFTPLUS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
    b, d, n, nmask, A_row, D, bias, base, bbase, sbase = _channel(
        A_ptr, D_ptr, bias_ptr, nd, L, N, n_blocks, HAS_D, HAS_BIAS, BLOCK_N)
    last = tl.arange(0, BLOCK_T) == BLOCK_T - 1
    h = tl.zeros((BLOCK_N,), tl.float32)
    for k in range(0, n_blocks):
        tl.store(states_ptr + sbase + k * N + n, h, mask=nmask)
        t, tmask, m2, u, raw, dt, Bt, Ct, a, x = _block(
            u_ptr, delta_ptr, B_ptr, C_ptr, base, bbase, k * BLOCK_T, L, A_row, bias, n, nmask,
            HAS_BIAS, SOFTPLUS, BLOCK_T)
        decay, hs = tl.associative_scan((a, x), 0, _combine)  # (BLOCK_T, BLOCK_N)
        hs = hs + decay * h[None, :]
        y = tl.sum(hs * Ct, 1) + D * u
        if HAS_Z:
            z = tl.load(z_ptr + base + t, mask=tmask, other=0.0)
            y = y * z * tl.sigmoid(z)
        tl.store(out_ptr + base + t, y, mask=tmask)
        h = tl.sum(tl.where(last[:, None], hs, 0.0), 0)  # masked steps keep the state


@triton.jit
def _backward_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, states_ptr, dout_ptr,
                     du_ptr, ddelta_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dz_ptr, dbias_ptr,
                     nd, L, N, n_blocks,
                     HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                     SOFTPLUS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
    b, d, n, nmask, A_row, D, bias, base, bbase, sbase = _channel(
        A_ptr, D_ptr, bias_ptr, nd, L, N, n_blocks, HAS_D, HAS_BIAS, BLOCK_N)
    steps = tl.arange(0, BLOCK_T)
    g_next = tl.zeros((BLOCK_N,), tl.float32)  # adjoint state at the next block's first step
    dA = tl.zeros((BLOCK_N,), tl.float32)
    dD = tl.zeros((BLOCK_T,), tl.float32)  # summed over time at the end
    dbias = tl.zeros((BLOCK_T,), tl.float32)
    for j in range(0, n_blocks):
        k = n_blocks - 1 - j
        t, tmask, m2, u, raw, dt, Bt, Ct, a, x = _block(
            u_ptr, delta_ptr, B_ptr, C_ptr, base, bbase, k * BLOCK_T, L, A_row, bias, n, nmask,
            HAS_BIAS, SOFTPLUS, BLOCK_T)
        h0 = tl.load(states_ptr + sbase + k * N + n, mask=nmask, other=0.0)
        decay, hs = tl.associative_scan((a, x), 0, _combine)
        hs = hs + decay * h0[None, :]
        dy = tl.load(dout_ptr + base + t, mask=tmask, other=0.0)
        if HAS_Z:
            z = tl.load(z_ptr + base + t, mask=tmask, other=0.0)
            s = tl.sigmoid(z)
            y = tl.sum(hs * Ct, 1) + D * u
            tl.store(dz_ptr + base + t, dy * y * s * (1.0 + z * (1.0 - s)), mask=tmask)
            dy = dy * z * s
        dD += dy * u
        tl.atomic_add(dC_ptr + bbase + n[None, :] * L + t[:, None], dy[:, None] * hs, mask=m2)
        # a_{t+1}: the next step's decay (the next block's first at the block's last step)
        t1 = t + 1
        m1 = (t1 < L)[:, None] & nmask[None, :]
        raw1 = tl.load(delta_ptr + base + t1, mask=t1 < L, other=0.0)
        if HAS_BIAS:
            raw1 = raw1 + bias
        dt1 = _softplus(raw1) if SOFTPLUS else raw1
        a1 = tl.where(m1, tl.exp(dt1[:, None] * A_row[None, :]), 0.0)
        src = dy[:, None] * Ct + tl.where((steps == BLOCK_T - 1)[:, None], a1 * g_next[None, :], 0.0)
        _, g = tl.associative_scan((a1, src), 0, _combine, reverse=True)  # (BLOCK_T, BLOCK_N)
        g_next = tl.sum(tl.where((steps == 0)[:, None], g, 0.0), 0)
        w = g * (hs - x)  # g_t h_{t-1} a_t: the gradient reaching dt_t A through the decay
        dA += tl.sum(w * dt[:, None], 0)
        gB = tl.sum(g * Bt, 1)
        ddt = tl.sum(w * A_row[None, :], 1) + gB * u
        tl.atomic_add(dB_ptr + bbase + n[None, :] * L + t[:, None], g * (dt * u)[:, None], mask=m2)
        tl.store(du_ptr + base + t, gB * dt + dy * D, mask=tmask)
        if SOFTPLUS:
            ddt = ddt * tl.where(raw > 20.0, 1.0, tl.sigmoid(raw))
        ddt = tl.where(tmask, ddt, 0.0)
        dbias += ddt
        tl.store(ddelta_ptr + base + t, ddt, mask=tmask)
    pbase = b * nd + d
    tl.store(dA_ptr + pbase * N + n, dA, mask=nmask)
    if HAS_D:
        tl.store(dD_ptr + pbase, tl.sum(dD, 0))
    if HAS_BIAS:
        tl.store(dbias_ptr + pbase, tl.sum(dbias, 0))


def _flags(D, z, delta_bias, softplus, block_t, N):
    return dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
                SOFTPLUS=bool(softplus), BLOCK_T=block_t, BLOCK_N=triton.next_power_of_2(N))


class _TritonScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, block_t):
        u, delta, A, B, C = (t.contiguous() for t in (u, delta, A, B, C))
        D, z, delta_bias = (None if t is None else t.contiguous() for t in (D, z, delta_bias))
        nb, nd, L = u.shape
        N = A.shape[1]
        n_blocks = triton.cdiv(L, block_t)
        out = torch.empty_like(u)
        states = u.new_empty(nb, nd, n_blocks, N)
        _forward_kernel[(nb, nd)](u, delta, A, B, C, D if D is not None else u, z if z is not None else u,
                                  delta_bias if delta_bias is not None else u, out, states,
                                  nd, L, N, n_blocks, **_flags(D, z, delta_bias, delta_softplus, block_t, N))
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, states)
        ctx.softplus, ctx.block_t = bool(delta_softplus), block_t
        return out

    @staticmethod
    def backward(ctx, dout):
        u, delta, A, B, C, D, z, delta_bias, states = ctx.saved_tensors
        nb, nd, L = u.shape
        N = A.shape[1]
        du, ddelta = torch.empty_like(u), torch.empty_like(u)
        dB, dC = torch.zeros_like(B), torch.zeros_like(C)
        dz = torch.empty_like(u) if z is not None else None
        dA = u.new_empty(nb, nd, N)
        dD, dbias = u.new_zeros(nb, nd), u.new_zeros(nb, nd)
        _backward_kernel[(nb, nd)](u, delta, A, B, C, D if D is not None else u, z if z is not None else u,
                                   delta_bias if delta_bias is not None else u, states, dout.contiguous(),
                                   du, ddelta, dA, dB, dC, dD, dz if dz is not None else du, dbias,
                                   nd, L, N, states.shape[2],
                                   **_flags(D, z, delta_bias, ctx.softplus, ctx.block_t, N))
        return (du, ddelta, dA.sum(0), dB, dC, dD.sum(0) if D is not None else None, dz,
                dbias.sum(0) if delta_bias is not None else None, None, None)


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          block_t=64):
    """Selective scan of float32 tensors with Triton kernels; see models.scan."""
    if u.dtype != torch.float32:
        raise ValueError(f"the Triton scan runs in float32, got {u.dtype}")
    return _TritonScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, block_t)
