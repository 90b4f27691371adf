"""Selective scan in plain PyTorch for any device: chunks of time, a log-depth scan inside.

Time is cut into chunks sized so that one (batch, channels, chunk, state) tensor stays
within a memory budget. Inside a chunk the linear recurrence runs as a Hillis-Steele scan
(log2(chunk) elementwise steps); chunks run one after another, carrying the state. The
forward pass keeps only the state at each chunk start; the backward pass recomputes a
chunk's states and runs the adjoint recurrence with the same scan, reversed. Memory
therefore does not grow with the length beyond the inputs and their gradients.
"""
import torch
import torch.nn.functional as F


def _scan(a, b):
    """h_t = a_t * h_{t-1} + b_t along dim 2 with h_{-1} = 0, in log2(T) steps."""
    T = a.shape[2]
    k = 1
    while k < T:
        b = torch.cat([b[:, :, :k], torch.addcmul(b[:, :, k:], a[:, :, k:], b[:, :, :-k])], dim=2)
        if 2 * k < T:
            a = torch.cat([a[:, :, :k], a[:, :, k:] * a[:, :, :-k]], dim=2)
        k *= 2
    return b


def _step_size(delta, delta_bias, softplus):
    dt = delta if delta_bias is None else delta + delta_bias[:, None]
    return F.softplus(dt) if softplus else dt


def _chunk_states(dt, u, A, B, h0):
    """States (b, d, T, n) of one chunk starting from h0 (b, d, n), and the decays."""
    decay = torch.exp(dt[..., None] * A[:, None, :])  # (b, d, T, n)
    inp = (dt * u)[..., None] * B.transpose(1, 2)[:, None]  # (b, d, T, n)
    inp[:, :, 0] += decay[:, :, 0] * h0
    return _scan(decay, inp), decay


def _chunks(L, chunk):
    return [slice(t0, min(L, t0 + chunk)) for t0 in range(0, L, chunk)]


class _ChunkedScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk_size):
        nb, nd, L = u.shape
        dt = _step_size(delta, delta_bias, delta_softplus)
        h = u.new_zeros(nb, nd, A.shape[1])
        starts, ys = [], []
        for sl in _chunks(L, chunk_size):
            starts.append(h)
            hs, _ = _chunk_states(dt[..., sl], u[..., sl], A, B[..., sl], h)
            ys.append(torch.einsum("bdtn,bnt->bdt", hs, C[..., sl]))
            h = hs[:, :, -1]
        y = torch.cat(ys, dim=2)
        if D is not None:
            y = y + D[:, None] * u
        out = y * F.silu(z) if z is not None else y
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, torch.stack(starts, dim=2))
        ctx.softplus, ctx.chunk_size = bool(delta_softplus), chunk_size
        return out

    @staticmethod
    def backward(ctx, dout):
        u, delta, A, B, C, D, z, delta_bias, starts = ctx.saved_tensors
        nb, nd, L = u.shape
        raw = delta if delta_bias is None else delta + delta_bias[:, None]
        dt = F.softplus(raw) if ctx.softplus else raw
        du, ddt = torch.empty_like(u), torch.empty_like(u)
        dB, dC = torch.empty_like(B), torch.empty_like(C)
        dz = torch.empty_like(z) if z is not None else None
        dA = torch.zeros_like(A)
        dD = torch.zeros_like(D) if D is not None else None
        carry = u.new_zeros(nb, nd, A.shape[1])  # gradient reaching the chunk's last state
        chunks = _chunks(L, ctx.chunk_size)
        for c in range(len(chunks) - 1, -1, -1):
            sl = chunks[c]
            h0 = starts[:, :, c]
            dt_c, u_c, B_c, C_c = dt[..., sl], u[..., sl], B[..., sl], C[..., sl]
            hs, decay = _chunk_states(dt_c, u_c, A, B_c, h0)
            dy = dout[..., sl]
            if z is not None:
                y = torch.einsum("bdtn,bnt->bdt", hs, C_c)
                if D is not None:
                    y = y + D[:, None] * u_c
                s = torch.sigmoid(z[..., sl])
                dz[..., sl] = dy * y * s * (1 + z[..., sl] * (1 - s))
                dy = dy * z[..., sl] * s
            if D is not None:
                dD += (dy * u_c).sum(dim=(0, 2))
            dC[..., sl] = torch.einsum("bdt,bdtn->bnt", dy, hs)
            # adjoint recurrence: g_t = dy_t C_t + decay_{t+1} g_{t+1}
            src = dy[..., None] * C_c.transpose(1, 2)[:, None]
            src[:, :, -1] += carry
            nxt = torch.cat([decay[:, :, 1:], torch.ones_like(decay[:, :, :1])], dim=2)
            g = _scan(nxt.flip(2), src.flip(2)).flip(2)
            carry = decay[:, :, 0] * g[:, :, 0]
            h_prev = torch.cat([h0[:, :, None], hs[:, :, :-1]], dim=2)
            w = g * h_prev * decay  # gradient wrt (dt * A) of each decay
            dA += torch.einsum("bdtn,bdt->dn", w, dt_c)
            gb = torch.einsum("bdtn,bnt->bdt", g, B_c)
            ddt[..., sl] = torch.einsum("bdtn,dn->bdt", w, A) + gb * u_c
            dB[..., sl] = torch.einsum("bdtn,bdt->bnt", g, dt_c * u_c)
            du[..., sl] = gb * dt_c + (dy * D[:, None] if D is not None else 0)
        if ctx.softplus:
            ddt = ddt * torch.where(raw > 20, torch.ones_like(raw), torch.sigmoid(raw))
        dbias = ddt.sum(dim=(0, 2)) if delta_bias is not None else None
        return du, ddt, dA, dB, dC, dD, dz, dbias, None, None


def default_chunk_size(nb, nd, n, budget=1 << 22):
    """Chunk length keeping one (b, d, chunk, n) tensor within `budget` elements."""
    return max(1, budget // max(1, nb * nd * n))


def selective_scan_torch(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                         delta_softplus=False, chunk_size=None):
    """Selective scan of tensors of one dtype on any device; see models.scan."""
    if chunk_size is None:
        chunk_size = default_chunk_size(u.shape[0], u.shape[1], A.shape[1])
    return _ChunkedScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk_size)
