"""An independent, functional statement of the IM-Fuse and mmFormer forward passes (SPEC
section 3), reading weights by the original code's key names. The model tests compare the
project's modules, loaded from the same weights, against it."""
import math

import torch
import torch.nn.functional as F

from models.mamba import Mamba

NAMES = ("flair", "t1ce", "t1", "t2")


def prenorm(S, key, x, stride=1, pad="reflect"):
    w, b = S[key + ".conv.weight"], S[key + ".conv.bias"]
    x = F.leaky_relu(F.instance_norm(x, eps=1e-5), 0.2)
    p = w.shape[-1] // 2
    if p and pad == "reflect":
        x, p = F.pad(x, (p,) * 6, mode="reflect"), 0
    return F.conv3d(x, w, b, stride=stride, padding=p)


def conv(S, key, x):
    return F.conv3d(x, S[key + ".weight"], S[key + ".bias"])


def up(x, factor=2):
    return F.interpolate(x, scale_factor=factor, mode="trilinear", align_corners=True)


def encoder(S, name, x):
    e = f"{name}_encoder."
    x1 = F.conv3d(F.pad(x, (1,) * 6, mode="reflect"), S[e + "e1_c1.weight"], S[e + "e1_c1.bias"])
    feats = [x1 + prenorm(S, e + "e1_c3", prenorm(S, e + "e1_c2", x1))]
    for l in range(2, 6):
        h = prenorm(S, e + f"e{l}_c1", feats[-1], stride=2)
        feats.append(h + prenorm(S, e + f"e{l}_c3", prenorm(S, e + f"e{l}_c2", h)))
    return feats


def transformer(S, key, x, pos, heads=8):
    x = x + pos
    a, f = key + ".cross_attention_list.0.fn.", key + ".cross_ffn_list.0.fn."
    B, N, C = x.shape
    h = F.layer_norm(x, (C,), S[a + "norm.weight"], S[a + "norm.bias"])
    q, k, v = (h @ S[a + "fn.qkv.weight"].t()).reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
    attn = ((q @ k.transpose(-2, -1)) * (C // heads) ** -0.5).softmax(-1)
    h = (attn @ v).transpose(1, 2).reshape(B, N, C)
    x = x + F.linear(h, S[a + "fn.proj.weight"], S[a + "fn.proj.bias"])
    h = F.layer_norm(x, (C,), S[f + "norm.weight"], S[f + "norm.bias"])
    h = F.linear(F.gelu(F.linear(h, S[f + "fn.net.0.weight"], S[f + "fn.net.0.bias"])),
                 S[f + "fn.net.3.weight"], S[f + "fn.net.3.bias"])
    return x + h


def tokens(x):  # (B, d, X, Y, Z) -> (B, XYZ, d), grid in C order
    return x.permute(0, 2, 3, 4, 1).reshape(x.shape[0], -1, x.shape[1])


def mamba_fusion(S, key, maps, interleaved):
    """Four masked maps (B, d, ...) -> fused map, by the original layer under `key`."""
    B, d, *grid = maps[0].shape
    seqs = [tokens(m) for m in maps]
    N = seqs[0].shape[1]
    fused = S[key + "fused_tokens"].expand(B, N, d)
    if interleaved:
        seq = torch.stack(seqs + [fused], dim=2).reshape(B, 5 * N, d)
    else:
        seq = torch.cat(seqs + [fused], dim=1)
    k = key + "mamba_layer.mamba."
    mamba = Mamba(d, d_state=min(d, 256), dt_rank=math.ceil(d / 16)).to(seq.dtype)
    mamba.load_state_dict({n: S[k + "mamba." + n] for n in mamba.state_dict()})
    x = seq + mamba(F.layer_norm(seq, (d,), S[k + "norm1.weight"], S[k + "norm1.bias"]))
    x = x + F.linear(F.layer_norm(x, (d,), S[k + "norm2.weight"], S[k + "norm2.bias"]),
                     S[k + "head.weight"], S[k + "head.bias"])
    out = x[:, 4::5] if interleaved else x[:, -N:]
    return out.reshape(B, *grid, d).permute(0, 4, 1, 2, 3)


def decoder_fuse(S, skips, x5):
    """skips: {level: skip input}; returns (fused prediction, deep supervision of levels 2-5)."""
    d = "decoder_fuse."

    def rfm(n, x):
        for i in range(3):
            x = prenorm(S, f"{d}RFM{n}.fusion_layer.{i}", x, pad="zeros")
        return x

    x = rfm(5, x5)
    heads = {5: conv(S, d + "seg_d4", x).softmax(1)}
    for l in (4, 3, 2, 1):
        x = prenorm(S, f"{d}d{l}_c1", up(x))
        if l in skips:
            x = torch.cat([rfm(l, skips[l]), x], dim=1)
        x = prenorm(S, f"{d}d{l}_out", prenorm(S, f"{d}d{l}_c2", x))
        if l > 1:
            heads[l] = conv(S, f"{d}seg_d{l - 1}", x).softmax(1)
    pred = conv(S, d + "seg_layer", x).softmax(1)
    return pred, [up(heads[l], 2 ** (l - 1)) for l in (2, 3, 4, 5)]


def decoder_sep(S, feats):
    d = "decoder_sep."
    x = feats[4]
    for l in (4, 3, 2, 1):
        x = prenorm(S, f"{d}d{l}_c1", up(x))
        x = prenorm(S, f"{d}d{l}_out", prenorm(S, f"{d}d{l}_c2", torch.cat([x, feats[l - 1]], 1)))
    return conv(S, d + "seg_layer", x).softmax(1)


def forward(S, x, mask, model="imfuse", interleaved=False, mamba_skip=False, first_skip=False):
    """(fused prediction, auxiliary predictions, deep supervision) of the original network
    with weights S (original keys, no "module." prefix), dropout off."""
    B, P = x.shape[0], x.shape[-1]
    p = P // 16
    feats = [encoder(S, n, x[:, i:i + 1]) for i, n in enumerate(NAMES)]
    intra = []
    for i, n in enumerate(NAMES):
        t = tokens(conv(S, f"{n}_encode_conv", feats[i][4]))
        t = transformer(S, f"{n}_transformer", t, S[f"{n}_pos"])
        intra.append(t.reshape(B, p, p, p, -1).permute(0, 4, 1, 2, 3))
    aux = [decoder_sep(S, f) for f in feats]

    def masked(maps):  # zero the missing modalities, as the original's MaskModal does
        stack = torch.stack(maps, dim=1)
        out = torch.zeros_like(stack)
        out[mask] = stack[mask]
        return out

    levels = [masked([f[l] for f in feats]) for l in range(4)]
    x5 = masked(intra)
    skips = {}
    if model == "mmformer":
        skips = {l + 1: levels[l].flatten(1, 2) for l in range(4)}
        t = torch.cat([tokens(x5[:, i]) for i in range(4)], dim=1)
        t = transformer(S, "multimodal_transformer", t, torch.cat([S[f"{n}_pos"] for n in NAMES], 1))
        bottleneck = conv(S, "multimodal_decode_conv", t.reshape(B, p, p, p, -1).permute(0, 4, 1, 2, 3))
    else:
        skip_levels = ([1] if first_skip else []) + [2, 3, 4]
        for i, l in enumerate(skip_levels):
            if mamba_skip:
                skips[l] = mamba_fusion(S, f"mamba_fusion_layers.{i}.", list(levels[l - 1].unbind(1)),
                                        interleaved)
            else:
                skips[l] = levels[l - 1].flatten(1, 2)
        last = len(skip_levels) if mamba_skip else 4
        fused = mamba_fusion(S, f"mamba_fusion_layers.{last}.", list(x5.unbind(1)), interleaved)
        t = transformer(S, "multimodal_transformer", tokens(fused), S["fused_pos"])
        bottleneck = conv(S, "multimodal_decode_conv", t.reshape(B, p, p, p, -1).permute(0, 4, 1, 2, 3))
    pred, deep = decoder_fuse(S, skips, bottleneck)
    return pred, aux, deep
