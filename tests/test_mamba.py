import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from models.mamba import Mamba
from scan_reference import recurrence

# Parameter shapes of mamba-ssm's Mamba as saved in IM-Fuse checkpoints
# (d_state = min(d_model, 256), dt_rank = ceil(d_model / 16)).
EXPECTED = {
    16: {"in_proj.weight": (64, 16), "conv1d.weight": (32, 1, 4), "conv1d.bias": (32,),
         "x_proj.weight": (33, 32), "dt_proj.weight": (32, 1), "dt_proj.bias": (32,),
         "A_log": (32, 16), "D": (32,), "out_proj.weight": (16, 32)},
    32: {"in_proj.weight": (128, 32), "conv1d.weight": (64, 1, 4), "conv1d.bias": (64,),
         "x_proj.weight": (66, 64), "dt_proj.weight": (64, 2), "dt_proj.bias": (64,),
         "A_log": (64, 32), "D": (64,), "out_proj.weight": (32, 64)},
    64: {"in_proj.weight": (256, 64), "conv1d.weight": (128, 1, 4), "conv1d.bias": (128,),
         "x_proj.weight": (132, 128), "dt_proj.weight": (128, 4), "dt_proj.bias": (128,),
         "A_log": (128, 64), "D": (128,), "out_proj.weight": (64, 128)},
    512: {"in_proj.weight": (2048, 512), "conv1d.weight": (1024, 1, 4), "conv1d.bias": (1024,),
          "x_proj.weight": (544, 1024), "dt_proj.weight": (1024, 32), "dt_proj.bias": (1024,),
          "A_log": (1024, 256), "D": (1024,), "out_proj.weight": (512, 1024)},
}


@pytest.mark.parametrize("d_model", EXPECTED)
def test_parameter_names_and_shapes(d_model):
    m = Mamba(d_model, d_state=min(d_model, 256))
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == EXPECTED[d_model]


def test_bias_options_add_and_remove_parameters():
    m = Mamba(16, conv_bias=False, bias=True)
    assert "conv1d.bias" not in m.state_dict()
    assert m.in_proj.bias.shape == (64,) and m.out_proj.bias.shape == (16,)


@pytest.mark.parametrize("d_model, d_state", [(16, 16), (64, 64), (512, 256)])
def test_initialisation(d_model, d_state):
    dt_min, dt_max = 0.001, 0.1
    m = Mamba(d_model, d_state=d_state, dt_min=dt_min, dt_max=dt_max)
    rank = math.ceil(d_model / 16)
    expected_A = torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).expand(2 * d_model, -1)
    torch.testing.assert_close(m.A_log.detach(), expected_A)
    assert torch.equal(m.D.detach(), torch.ones(2 * d_model))
    dt = F.softplus(m.dt_proj.bias.detach().double())
    assert dt.min() >= dt_min * (1 - 1e-5) and dt.max() <= dt_max * (1 + 1e-5)
    assert dt.max() / dt.min() > 2  # drawn, not constant
    bound = rank ** -0.5
    assert m.dt_proj.weight.abs().max() <= bound and m.dt_proj.weight.abs().max() > bound / 2
    c = Mamba(d_model, d_state=d_state, dt_init="constant", dt_scale=2.0)
    assert torch.all(c.dt_proj.weight == 2.0 * bound)
    floor = Mamba(d_model, dt_min=1e-6, dt_max=2e-6, dt_init_floor=1e-4)
    torch.testing.assert_close(F.softplus(floor.dt_proj.bias.detach()), torch.full((2 * d_model,), 1e-4))
    assert m.A_log._no_weight_decay and m.D._no_weight_decay


def test_state_dict_round_trip(tmp_path):
    torch.manual_seed(0)
    a = Mamba(32)
    path = tmp_path / "mamba.pth"
    torch.save(a.state_dict(), path)
    b = Mamba(32)
    b.load_state_dict(torch.load(path, weights_only=True), strict=True)
    x = torch.randn(2, 40, 32)
    torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)


def reference_mamba(m, x):
    """mamba-ssm's Mamba computation, spelled out with the plain recurrence."""
    L = x.shape[1]
    xz = x @ m.in_proj.weight.t()
    xi, z = xz[..., :m.d_inner], xz[..., m.d_inner:]
    xi = xi.transpose(1, 2)
    xi = F.conv1d(F.pad(xi, (m.d_conv - 1, 0)), m.conv1d.weight, m.conv1d.bias, groups=m.d_inner)
    xi = xi * torch.sigmoid(xi)
    proj = xi.transpose(1, 2) @ m.x_proj.weight.t()
    dt = proj[..., :m.dt_rank] @ m.dt_proj.weight.t()
    B = proj[..., m.dt_rank:m.dt_rank + m.d_state]
    C = proj[..., m.dt_rank + m.d_state:]
    y = recurrence(xi, dt.transpose(1, 2), -torch.exp(m.A_log), B.transpose(1, 2), C.transpose(1, 2),
                   m.D, z.transpose(1, 2), m.dt_proj.bias, delta_softplus=True)
    assert y.shape[-1] == L
    return y.transpose(1, 2) @ m.out_proj.weight.t()


@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_forward_and_gradients_match_reference(backend):
    torch.manual_seed(0)
    m = Mamba(16, backend=backend).double()
    x = torch.randn(2, 30, 16, dtype=torch.float64, requires_grad=True)
    out, ref = m(x), reference_mamba(m, x)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    w = torch.randn_like(out)
    g = torch.autograd.grad((out * w).sum(), [x] + list(m.parameters()))
    g_ref = torch.autograd.grad((ref * w).sum(), [x] + list(m.parameters()))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_causal():
    torch.manual_seed(0)
    m = Mamba(16).double()
    x = torch.randn(1, 20, 16, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 12] += 1.0
    y, y2 = m(x), m(x2)
    torch.testing.assert_close(y[:, :12], y2[:, :12], rtol=0, atol=0)
    assert (y[:, 12:] - y2[:, 12:]).abs().amax(-1).min() > 0


def test_gpu_extras_not_imported():
    code = ("import sys, torch, models.mamba, models.fusion;"
            "x = torch.randn(1, 8, 16); models.fusion.MambaLayer(16)(x);"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('mamba_ssm', 'causal_conv1d')];"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
