"""Layers that more than one competitor uses."""
import torch.nn as nn
import torch.nn.functional as F

from models import cpu_kernels


class InstanceNorm(nn.InstanceNorm3d):
    """Affine InstanceNorm3d (eps 1e-5) that also takes maps of one voxel, where it returns its
    bias: stock torch refuses them, the original ShaSpec runs a torch patched to allow it (its
    ASPP image-pool branch), and small windows give one-voxel bottlenecks."""

    def __init__(self, channels):
        super().__init__(channels, affine=True)

    def forward(self, x):
        if x[0, 0].numel() > 1:
            return super().forward(x)
        centred = x - x  # the deviation from a one-voxel mean: zero, with a gradient
        return centred * self.weight.view(1, -1, 1, 1, 1) + self.bias.view(1, -1, 1, 1, 1)


def norm_leaky(x, norm, negative_slope=0.01):
    """leaky_relu(norm(x)) for an InstanceNorm3d module `norm` (affine or not); in CPU
    inference one fused pass that writes channels-last (models.cpu_kernels)."""
    params = [p for p in (norm.weight, norm.bias) if p is not None]
    if x[0, 0].numel() > 1 and not norm.track_running_stats and cpu_kernels.applies(x, *params):
        return cpu_kernels.norm_act_pad(x, norm.eps, negative_slope, weight=norm.weight, bias=norm.bias)
    return F.leaky_relu(norm(x), negative_slope)
