"""Independent functional statement of the original M3AE network (ccarliu/m3ae).

`Unet_missing` = learned substitute image `limage` + `UNet3D_g`, written with
torch.nn.functional only, in the original's conventions: checkpoint keys
(without `module.`), axes (z, y, x), channels [T1, T1c, T2, FLAIR], outputs
[ET, TC, WT]. Used by tests to check the project's reimplementation.
"""
import math

import torch
import torch.nn.functional as F

# (name, kind, in-width multiplier, out-width multiplier); kinds: conv3, down (3^3 stride 2),
# conv1 (1^3), block (BasicBlock). Multipliers of C; 0 in / -1 out mean 4 input channels / K.
_LAYERS = [
    ("conv1a", "conv3", 0, 1), ("conv1b", "block", 1, 1),
    ("ds1", "down", 1, 2), ("conv2a", "block", 2, 2), ("conv2b", "block", 2, 2),
    ("ds2", "down", 2, 4), ("conv3a", "block", 4, 4), ("conv3b", "block", 4, 4),
    ("ds3", "down", 4, 8), ("conv4a", "block", 8, 8), ("conv4b", "block", 8, 8),
    ("conv4c", "block", 8, 8), ("conv4d", "block", 8, 8),
    ("up4conva", "conv1", 8, 4), ("up4convb", "block", 4, 4),
    ("up3conva", "conv1", 4, 2), ("up3convb", "block", 2, 2),
    ("up2conva", "conv1", 2, 1), ("up2convb", "block", 1, 1),
    ("up1conv", "conv1", 1, -1),
]
_DS = [("ds_out.0", "conv1", 4, -1), ("ds_out.1", "conv1", 2, -1)]


def reference_shapes(width=16, out_channels=3, deep_supervision=True, native=(155, 240, 240)):
    """{original key (no `module.`): shape}, in the original registration order."""
    def ch(m):
        return 4 if m == 0 else out_channels if m == -1 else m * width

    shapes = {"limage": (1, 4) + tuple(native)}
    for name, kind, cin, cout in _LAYERS + (_DS if deep_supervision else []):
        p, ci, co = "unet." + name, ch(cin), ch(cout)
        if kind == "block":  # registration order: gn1, conv1, gn2, conv2
            for i in ("1", "2"):
                shapes[f"{p}.gn{i}.weight"] = shapes[f"{p}.gn{i}.bias"] = (ci,)
                shapes[f"{p}.conv{i}.weight"] = (ci, ci, 3, 3, 3)
                shapes[f"{p}.conv{i}.bias"] = (ci,)
        else:
            k = 1 if kind == "conv1" else 3
            shapes[p + ".weight"] = (co, ci, k, k, k)
            shapes[p + ".bias"] = (co,)
    return shapes


def random_reference_state(width, out_channels, deep_supervision, native, generator, dtype=torch.float64):
    """Random state with the original's keys/shapes; conv weights ~ N(0, 1/fan_in)."""
    state = {}
    for key, shape in reference_shapes(width, out_channels, deep_supervision, native).items():
        z = torch.randn(shape, generator=generator, dtype=dtype)
        if key == "limage":
            state[key] = z
        elif ".gn" in key:
            state[key] = 1 + 0.1 * z if key.endswith("weight") else 0.1 * z
        elif key.endswith("weight"):
            state[key] = z / math.sqrt(math.prod(shape[1:]))
        else:
            state[key] = 0.1 * z
    return state


def _strip(state):
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}


def reference_fill(state, image, present, location):
    """x * m + limage[window] * (1 - m), m = whole-channel availability in [T1, T1c, T2, FLAIR]."""
    limage = _strip(state)["limage"].to(image.dtype)
    P = image.shape[-3:]
    crops = [limage[0, :, z:z + P[0], y:y + P[1], x:x + P[2]] for z, y, x in location.tolist()]
    m = present.to(image.dtype)[:, :, None, None, None]
    return image * m + torch.stack(crops) * (1 - m)


def reference_logits(state, image, present, location, training=False):
    """Final logits (B, K, P, P, P) [ET, TC, WT]; [out4, out3, final] when training with ds_out."""
    s = {k: v.to(image.dtype) for k, v in _strip(state).items()}  # follow the image's dtype

    def conv(x, p, stride=1):
        w = s[p + ".weight"]
        return F.conv3d(x, w, s[p + ".bias"], stride=stride, padding=w.shape[-1] // 2)

    def block(x, p):
        y = conv(F.relu(F.group_norm(x, 8, s[p + ".gn1.weight"], s[p + ".gn1.bias"], 1e-5)), p + ".conv1")
        y = conv(F.relu(F.group_norm(y, 8, s[p + ".gn2.weight"], s[p + ".gn2.bias"], 1e-5)), p + ".conv2")
        return y + x

    def up(x, p, skip):
        return F.interpolate(conv(x, p), scale_factor=2) + skip

    u = "unet."
    x = reference_fill(s, image, present, location)
    c1 = block(conv(x, u + "conv1a"), u + "conv1b")
    c2 = block(block(conv(c1, u + "ds1", 2), u + "conv2a"), u + "conv2b")
    c3 = block(block(conv(c2, u + "ds2", 2), u + "conv3a"), u + "conv3b")
    c4 = conv(c3, u + "ds3", 2)
    for n in "abcd":
        c4 = block(c4, u + "conv4" + n)
    u4 = block(up(c4, u + "up4conva", c3), u + "up4convb")
    u3 = block(up(u4, u + "up3conva", c2), u + "up3convb")
    u2 = block(up(u3, u + "up2conva", c1), u + "up2convb")
    final = conv(u2, u + "up1conv")
    if not (training and u + "ds_out.0.weight" in s):
        return final
    tri = dict(mode="trilinear", align_corners=True)
    out4 = F.interpolate(conv(u4, u + "ds_out.0"), scale_factor=4, **tri)
    out3 = F.interpolate(conv(u3, u + "ds_out.1"), scale_factor=2, **tri)
    return [out4, out3, final]


if __name__ == "__main__":
    def count(sh, unet_only=True):
        return sum(math.prod(v) for k, v in sh.items() if not (unet_only and k == "limage"))

    a = reference_shapes(16, 3, True)
    b = reference_shapes(16, 3, False)
    c = reference_shapes(16, 4, False)
    assert list(a)[0] == "limage" and list(a)[-1] == "unet.ds_out.1.bias"
    assert (count(a), len(a)) == (4_704_505, 117), (count(a), len(a))
    assert (count(b), len(b)) == (4_704_211, 113), (count(b), len(b))
    assert count(c) == 4_704_228, count(c)
    assert math.prod(a["limage"]) == 35_712_000
    print("unet params ds/no-ds/out4:", count(a), count(b), count(c), "tensors:", len(a), len(b),
          "limage:", math.prod(a["limage"]))
    print("self-check OK")
