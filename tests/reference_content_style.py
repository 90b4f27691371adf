"""Independent, functional statements of the original Robust-MSeg and SFusion forward passes
(fact sheets robustseg.md and sfusion.md, section 3), reading weights by the original code's
key names (without "module."), dropout off. The model tests compare the project's modules,
loaded from the same weights, against them.

Both return {"seg": probabilities, "recon": [4 x (B, 1, P, P, P)], "mu": [...], "sigma": [...]}
(the last three only with training=True), with modalities in the project's order.
"""
import math

import torch
import torch.nn.functional as F

ROBUST_NAMES = ("flair", "t1c", "t1", "t2")
SFUSION_NAMES = ("flair", "t1ce_", "t1___", "t2___")
SFUSION_ORDER = (1, 2, 3, 0)  # T1c, T1, T2, FLAIR: the original's mask columns and fusion order


def conv(S, key, x, stride=1, pad=None, mode="zeros"):
    w, b = S[key + ".weight"], S.get(key + ".bias")
    pad = w.shape[-1] // 2 if pad is None else pad
    if pad and mode == "reflect":
        return F.conv3d(F.pad(x, (pad,) * 6, mode="reflect"), w, b, stride=stride)
    return F.conv3d(x, w, b, stride=stride, padding=pad)


def up(x, align):
    return F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=align)


# --- Robust-MSeg ---

def rs_conv(S, key, x, stride=1, pad=None, mode="reflect", norm=True, act="lrelu"):
    x = conv(S, key + ".conv", x, stride, pad, mode)
    if norm:
        x = F.instance_norm(x, eps=1e-6)
    if act == "lrelu":
        x = F.leaky_relu(x, 0.2)
    elif act == "relu":
        x = F.relu(x)
    return x


def rs_adain(x, gamma, beta):
    mean = x.mean(dim=(2, 3, 4), keepdim=True)
    var = x.var(dim=(2, 3, 4), keepdim=True)
    return gamma * (x - mean) / torch.sqrt(var + 1e-5) + beta


def robustseg(S, x, mask, training=False):
    """mask (B, 4) bool in [FLAIR, T1c, T1, T2] order, as the original takes it."""
    contents = []
    for m, n in enumerate(ROBUST_NAMES):
        h, levels = x[:, m:m + 1], []
        for l in range(1, 5):
            c1 = rs_conv(S, f"ce_{n}.e{l}_c1", h, stride=1 if l == 1 else 2)
            h = c1 + rs_conv(S, f"ce_{n}.e{l}_c3", rs_conv(S, f"ce_{n}.e{l}_c2", c1))
            levels.append(h * mask[:, m].float().view(-1, 1, 1, 1, 1))
        contents.append(levels)
    fused = []
    for l in range(4):
        maps = [contents[m][l] for m in range(4)]
        att = torch.sigmoid(rs_conv(S, f"att_c{l + 1}", torch.cat(maps, 1)))
        gated = torch.cat([maps[m] * att[:, m:m + 1] for m in range(4)], 1)
        fused.append(rs_conv(S, f"fusion_c{l + 1}", gated, pad=0))
    d = fused[3]
    for i, skip in zip((3, 2, 1), (fused[2], fused[1], fused[0])):
        d = rs_conv(S, f"mask_de.d{i}_c1", up(d, True))
        d = rs_conv(S, f"mask_de.d{i}_c2", torch.cat([d, skip], 1))
        d = rs_conv(S, f"mask_de.d{i}_out", d, pad=0)
    out = {"seg": conv(S, "mask_de.seg_logit.conv", d).softmax(1)}
    if not training:
        return out
    out.update(recon=[], mu=[], sigma=[])
    for m, n in enumerate(ROBUST_NAMES):
        s = x[:, m:m + 1]
        s = rs_conv(S, f"se_{n}.c_0", s, pad=3, norm=False, act="relu")
        for i in range(1, 5):
            s = rs_conv(S, f"se_{n}.c_{i}", s, stride=2, pad=1, norm=False, act="relu")
        s = conv(S, f"se_{n}.se_logit.conv", s.mean(dim=(2, 3, 4), keepdim=True))
        p = f"image_de_{n}."
        h = s.flatten(1)
        for k in ("linear_0", "linear_1"):
            h = F.relu(F.linear(h, S[p + f"mlp.{k}.linear.weight"], S[p + f"mlp.{k}.linear.bias"]))
        mu, sigma = (F.linear(h, S[p + f"mlp.{k}.linear.weight"], S[p + f"mlp.{k}.linear.bias"])
                     .view(h.shape[0], -1, 1, 1, 1) for k in ("mu", "sigma"))
        y = fused[3]
        for i in range(4):
            r = F.relu(rs_adain(rs_conv(S, p + f"res_{i}.conv1", y, norm=False, act=None), mu, sigma))
            y = y + rs_adain(rs_conv(S, p + f"res_{i}.conv2", r, norm=False, act=None), mu, sigma)
        for i in range(3):
            y = rs_conv(S, p + f"conv_{i}", up(y, True), pad=2, mode="zeros", norm=False, act=None)
            w, b = S[p + f"layer_norm_{i + 1}.weight"], S[p + f"layer_norm_{i + 1}.bias"]
            y = F.relu(F.layer_norm(y, tuple(w.shape), w, b, eps=1e-6))
        out["recon"].append(rs_conv(S, p + "G_logit", y, pad=3, norm=False, act=None))
        out["mu"].append(mu)
        out["sigma"].append(sigma)
    return out


# --- SFusion ---

def sf_conv(S, key, x, stride=1, pad=None, norm=True):
    x = conv(S, key + ".unit.0", x, stride, pad)
    return F.leaky_relu(F.instance_norm(x, eps=1e-5), 0.01) if norm else x


def sf_table(n, d):
    rows = [[p / (10000 ** (2 * (j // 2) / d) + 1e-8) for j in range(d)] for p in range(n)]
    return torch.tensor([[math.sin(a) if j % 2 == 0 else math.cos(a) for j, a in enumerate(r)] for r in rows],
                        dtype=torch.float32)


def sf_transformer(S, key, x, heads):
    i = 0
    while f"{key}.layers.{i}.norm1.weight" in S:
        k = f"{key}.layers.{i}."
        B, N, C = x.shape
        qkv = x @ S[k + "self_attn.in_proj_weight"].t() + S[k + "self_attn.in_proj_bias"]
        q, kk, v = (t.reshape(B, N, heads, C // heads).transpose(1, 2) for t in qkv.split(C, -1))
        a = ((q @ kk.transpose(-1, -2)) / math.sqrt(C // heads)).softmax(-1) @ v
        a = F.linear(a.transpose(1, 2).reshape(B, N, C), S[k + "self_attn.out_proj.weight"],
                     S[k + "self_attn.out_proj.bias"])
        x = F.layer_norm(x + a, (C,), S[k + "norm1.weight"], S[k + "norm1.bias"])
        f = F.linear(F.relu(F.linear(x, S[k + "linear1.weight"], S[k + "linear1.bias"])),
                     S[k + "linear2.weight"], S[k + "linear2.bias"])
        x = F.layer_norm(x + f, (C,), S[k + "norm2.weight"], S[k + "norm2.bias"])
        i += 1
    return x


def sf_fusion(S, key, maps, grid, heads):
    B, C, V = maps[0].shape[:3]
    s = V // grid
    tokens = torch.cat([F.adaptive_avg_pool3d(m, grid).permute(0, 2, 3, 4, 1).reshape(B, -1, C) for m in maps], 1)
    tokens = sf_transformer(S, f"{key}.fusion_block", tokens + sf_table(tokens.shape[1], C), heads)
    logits = []
    for i in range(len(maps)):
        t = tokens[:, i * grid ** 3:(i + 1) * grid ** 3].reshape(B, grid, grid, grid, C).permute(0, 4, 1, 2, 3)
        y = F.conv3d(t, S[f"{key}.upsample.conv_3d.weight"])  # (B, C s^3, g, g, g)
        out = torch.empty(B, C, V, V, V)
        for a in range(s):
            for b in range(s):
                for c in range(s):
                    k = ((a * s + b) * s + c) * C
                    out[:, :, a::s, b::s, c::s] = y[:, k:k + C]
        logits.append(out)
    weights = torch.stack(logits).softmax(0)
    return sum(w * m for w, m in zip(weights, maps))


def sf_adain(x, gamma, beta):
    return gamma * (x - x.mean(dim=(2, 3, 4), keepdim=True)) / x.std(dim=(2, 3, 4), keepdim=True) + beta


def sfusion(S, x, model_mask, grid=8, heads=4, training=False):
    """model_mask: one row of 4 bools in the original's order [T1c, T1, T2, FLAIR], applied to
    the whole batch as the original does."""
    contents = {}
    for m, n in enumerate(SFUSION_NAMES):
        h, levels = x[:, m:m + 1], []
        for l in range(1, 5):
            u = sf_conv(S, f"content_encoder_{n}.unit{l}_0", h, stride=1 if l == 1 else 2)
            h = u + sf_conv(S, f"content_encoder_{n}.unit{l}.1", sf_conv(S, f"content_encoder_{n}.unit{l}.0", u))
            levels.append(h)
        contents[m] = levels
    present = [m for col, m in enumerate(SFUSION_ORDER) if model_mask[col]]
    fused = [sf_fusion(S, f"fusion{l + 1}", [contents[m][l] for m in present], grid, heads) for l in range(4)]
    d = fused[3]
    for i, skip in zip((1, 2, 3), (fused[2], fused[1], fused[0])):
        d = sf_conv(S, f"mask_decoder.features.convblock1{i}", up(d, False))
        d = sf_conv(S, f"mask_decoder.features.convblock2{i}", torch.cat([d, skip], 1))
        d = sf_conv(S, f"mask_decoder.features.convblock3{i}", d)
    out = {"seg": sf_conv(S, "mask_decoder.conv_seg", d, norm=False).softmax(1)}
    if not training:
        return out
    out.update(recon=[], mu=[], sigma=[])
    for m, n in enumerate(SFUSION_NAMES):
        s = sf_conv(S, f"style_encoder_{n}.unit.0", x[:, m:m + 1], pad=3)
        for i in range(1, 5):
            s = sf_conv(S, f"style_encoder_{n}.unit.{i}", s, stride=2, pad=2)
        s = sf_conv(S, f"style_encoder_{n}.unit2", s.mean(dim=(2, 3, 4), keepdim=True), norm=False)
        p = f"image_decoder_{n}.mlp."
        h = s.flatten(1)
        for k in ("unit.0", "unit.2"):
            h = F.leaky_relu(F.linear(h, S[p + f"{k}.unit.1.weight"], S[p + f"{k}.unit.1.bias"]), 0.01)
        mu, sigma = (F.linear(h, S[p + f"get_{k}.unit.1.weight"], S[p + f"get_{k}.unit.1.bias"])
                     .view(h.shape[0], -1, 1, 1, 1) for k in ("mu", "sigma"))
        p = f"image_decoder_{n}."
        y = fused[3]
        for i in range(1, 5):
            r = F.leaky_relu(sf_adain(sf_conv(S, p + f"ar{i}.conv1", y), mu, sigma), 0.01)
            y = y + sf_adain(sf_conv(S, p + f"ar{i}.conv2", r), mu, sigma)
        for i in range(1, 4):
            y = sf_conv(S, p + f"features.convblock{i}", up(y, False))
            y = F.leaky_relu(F.instance_norm(y, eps=1e-5), 0.01)
        out["recon"].append(sf_conv(S, p + "conv_final", y))
        out["mu"].append(mu)
        out["sigma"].append(sigma)
    return out
