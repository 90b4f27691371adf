"""A work-around for bf16 autocast training on the CPU.

oneDNN's bf16 weight gradient of a 3-D convolution whose input has depth 2 (more than 16
input channels) is wrong in torch 2.13's CPU build: NaN or unrelated values, varying from
run to run (it reads memory it did not write), while the output and the input gradient are
right. Such layers are found at the deepest level of small windows (a 32^3 window's 2^3
bottleneck). `guard_cpu_bf16_convs` makes those calls run in float32 while gradients are
recorded; every other call keeps bf16.
"""
import types

import torch
from torch import nn


def _needs_float32(x):
    return (x.device.type == "cpu" and x.dim() == 5 and x.shape[2] == 2 and torch.is_grad_enabled()
            and torch.is_autocast_enabled("cpu"))


def _guarded_forward(self, x):
    if _needs_float32(x):
        with torch.autocast("cpu", enabled=False):
            return type(self).forward(self, x.float())
    return type(self).forward(self, x)


def guard_cpu_bf16_convs(model):
    """Route model's Conv3d layers (subclasses included) through the float32 work-around;
    returns the number of layers guarded."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv3d)]
    for conv in convs:
        conv.forward = types.MethodType(_guarded_forward, conv)
    return len(convs)
