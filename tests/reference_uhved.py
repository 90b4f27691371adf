"""An independent, functional statement of the original U-HVED forward pass (fact sheet
uhved.md, sections 2-3), reading weights by the original code's key names (without
"module."), with the original's expert gating: the experts are stacked as [T1, T1c, T2, FLAIR]
and expert j of sample b counts when mask[b, j] is set. Returns the segmentation logits, or in
training (given the noise of each level) {"seg" softmax, "T1", "T1c", "T2", "Flair"}."""
import torch
import torch.nn.functional as F

EXPERTS = (("t1", 2), ("t1ce", 1), ("t2", 3), ("flair", 0))  # encoder name, channel of x


def pn_conv(S, key, x):
    x = F.instance_norm(x, weight=S[key + ".norm.weight"], bias=S[key + ".norm.bias"], eps=1e-6)
    return F.conv3d(F.leaky_relu(x, 0.01), S[key + ".conv.weight"], padding=1)


def encoder(S, name, x):
    x = F.leaky_relu(F.conv3d(x, S[f"{name}_encoder.conv1.weight"]), 0.01)
    out = []
    for l in range(1, 5):
        if l > 1:
            x = F.max_pool3d(x, 2)
        x = pn_conv(S, f"{name}_encoder.e{l}_c2", pn_conv(S, f"{name}_encoder.e{l}_c1", x))
        half = x.shape[1] // 2
        out.append((x[:, :half], x[:, half:].clamp(-50, 50)))
    return out


def decoder(S, name, z):
    x = z[3]
    for i, skip in zip((1, 2, 3), (z[2], z[1], z[0])):
        x = torch.cat([F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=True), skip], 1)
        x = pn_conv(S, f"{name}_decoder.d{i}_c2", pn_conv(S, f"{name}_decoder.d{i}_c1", x))
    return F.conv3d(x, S[f"{name}_decoder.conv_out.weight"])


def uhved(S, x, mask, noise=None):
    """x (B, 4, P, P, P) in [FLAIR, T1c, T1, T2] order; mask (B, 4) read as the original reads it."""
    params = [encoder(S, name, x[:, c:c + 1]) for name, c in EXPERTS]
    z = []
    for level in range(4):
        T = torch.stack([1 / (p[level][1].exp() + 1e-7) for p in params])  # (4, B, C, ...)
        mu = torch.stack([p[level][0] / (p[level][1].exp() + 1e-7) for p in params])
        keep = mask.t().float().view(4, mask.shape[0], *(1,) * (T.dim() - 2))
        T, mu = T * keep, mu * keep
        mean = mu.sum(0) / (T.sum(0) + 1)
        logvar = torch.log(1 / (T.sum(0) + 1) + 1e-7)
        z.append(mean if noise is None else mean + torch.exp(0.5 * logvar) * noise[level])
    if noise is None:
        return decoder(S, "seg", z)
    return {"seg": decoder(S, "seg", z).softmax(1), **{k: decoder(S, n, z) for k, n in
                                                       (("T1", "t1"), ("T1c", "t1c"), ("T2", "t2"), ("Flair", "flair"))}}
