"""The selective scan as a plain sequential recurrence, one time step at a time: the
independent definition the backends are tested against."""
import torch.nn.functional as F
import torch


def recurrence(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    b, d, L = u.shape
    h = u.new_zeros(b, d, A.shape[1])
    ys = []
    for t in range(L):
        dt = delta[:, :, t, None]  # (b, d, 1)
        h = torch.exp(dt * A) * h + dt * u[:, :, t, None] * B[:, None, :, t]
        ys.append((h * C[:, None, :, t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D[:, None] * u
    if z is not None:
        y = y * z * torch.sigmoid(z)
    return y
