"""An independent, functional statement of the original ShaSpec forward pass (DualNet_SS, fact
sheet shaspec.md, sections 3, 8-10), reading weights by the original code's key names (without
"module."), in the original's layout: x (N, 4, D, H, W) with axes (Z, X, Y) and channels
[FLAIR, T1, T1c, T2]. `mode` is the original's list of available channels; its order matters,
since every missing slot takes the shared feature of mode[0]. Returns the logits [ET, WT, TC],
or in training (logits, shared ASPP features (N*4, 256, ...), domain logits (N*4, 4)), rows
b*4 + m. `expected_shapes` lists the original state dict (944 parameters, in its order)."""
import torch
import torch.nn.functional as F

ENCODERS = ("shared_enc", "flair_enc", "t1_enc", "t1ce_enc", "t2_enc")  # state-dict order
LAYERS = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (320, 3, 2))  # bottleneck width, blocks, stride
DECODER = ((3, 256, 4096), (2, 128, 2048), (1, 64, 1024), (0, 32, 256))  # level, width, skip in
ASPP_DILATIONS = (1, 2, 4, 8)  # branch1 is 1x1, branches 2-4 are 3x3x3 with padding = dilation


def ws_conv(S, key, x, stride=1, padding=0, dilation=1):
    """Weight-standardised conv of module `key` (reads S[key + ".weight"]), no bias: each filter
    minus its mean over in-channels x kernel, over sqrt(unbiased variance + 1e-12)."""
    w = S[key + ".weight"]
    v = w.flatten(1)
    v = v - v.mean(1, keepdim=True)
    v = v / torch.sqrt(v.var(1) + 1e-12)[:, None]
    return F.conv3d(x, v.view_as(w), None, stride, padding, dilation)


def inorm(S, key, x):
    """InstanceNorm3d(affine=True), eps 1e-5. On a 1x1x1 map, which stock torch refuses and the
    original's patched functional allows, it is (v - v) / sqrt(0 + eps) * weight + bias = bias."""
    w, b = S[key + ".weight"], S[key + ".bias"]
    if x[0, 0].numel() == 1:
        return b.view(1, -1, 1, 1, 1).expand_as(x)
    return F.instance_norm(x, weight=w, bias=b, eps=1e-5)


def act(x):
    return F.leaky_relu(x, 0.01)


def unit(S, key, x, padding=0, dilation=1):  # Sequential(WS conv, IN, LReLU) named key.0 / key.1
    return act(inorm(S, key + ".1", ws_conv(S, key + ".0", x, 1, padding, dilation)))


def bottleneck(S, k, x, stride, project):
    y = act(inorm(S, k + ".norm1", ws_conv(S, k + ".conv1", x)))
    y = act(inorm(S, k + ".norm2", ws_conv(S, k + ".conv2", y, stride, 1)))
    y = inorm(S, k + ".norm3", ws_conv(S, k + ".conv3", y))
    if project:  # first block of every layer: 1x1 conv with the block's stride + IN
        x = inorm(S, k + ".downsample.1", ws_conv(S, k + ".downsample.0", x, stride))
    return act(y + x)


def encoder(S, name, x):
    """x (n, 1, D, H, W) -> ([F0 (n,64,D,H/2,W/2), F1 (n,256,/2,/4,/4), F2 (n,512,/4,/8,/8),
    F3 (n,1024,/8,/16,/16)], S (n,256,/16,/32,/32) the ASPP output, g (n,256) the mean of R)."""
    b = name + ".backbone"
    x = act(inorm(S, b + ".norm1", ws_conv(S, b + ".conv1", x, (1, 2, 2), 3)))
    feats = [x]
    x = F.max_pool3d(x, 3, 2, 1)
    for i, (_, blocks, stride) in enumerate(LAYERS):
        for j in range(blocks):
            x = bottleneck(S, f"{b}.layer{i + 1}.{j}", x, stride if j == 0 else 1, j == 0)
        feats.append(x)  # F1..F4; F4 (n, 1280, /16, /32, /32) only feeds the reduction
    r = unit(S, name + ".asppreduce", feats.pop())  # R (n, 256, ...)
    a = name + ".aspp"
    branches = [unit(S, f"{a}.branch{i + 1}", r, 0 if d == 1 else d, d) for i, d in enumerate(ASPP_DILATIONS)]
    # Image pool: mean of R -> 1x1 WS conv -> IN -> LReLU -> trilinear resize (align_corners=True)
    # of a 1x1x1 map, i.e. a broadcast. The IN of a 1x1x1 map is its bias, so the branch is the
    # constant LReLU(branch5_norm.bias), whatever R, branch5_conv.weight and branch5_norm.weight.
    pool = act(inorm(S, a + ".branch5_norm", ws_conv(S, a + ".branch5_conv", r.mean(dim=(2, 3, 4), keepdim=True))))
    pool = pool.expand(-1, -1, *r.shape[2:])
    s = unit(S, a + ".conv_cat", torch.cat(branches + [pool], 1))  # (n, 1280) -> (n, 256)
    return feats, s, r.mean(dim=(2, 3, 4))


def basic_block(S, k, x):
    y = act(inorm(S, k + ".norm1", ws_conv(S, k + ".conv1", x, 1, 1)))
    return act(inorm(S, k + ".norm2", ws_conv(S, k + ".conv2", y, 1, 1)) + x)


def decoder(S, z, skips):
    """z (N, 1024, D/16, H/32, W/32) the four slots; skips [F0..F3] of the four modalities
    concatenated (N, 4 C_l, ...) -> logits (N, 3, D, H, W) [ET, WT, TC]."""
    y, p = z, "shared_dec."
    for level, _, _ in DECODER:  # each level doubles D, H, W
        y = F.conv_transpose3d(y, S[f"{p}transposeconv_stage{level}.weight"], stride=2)  # plain, no bias
        y = y + unit(S, f"{p}shortcut_conv{level}", skips[level])
        y = basic_block(S, f"{p}stage{level}_de", y)
    y = F.conv3d(y, S["shared_dec.cls_conv.0.weight"])  # plain 1x1x1, (N, 3, D, H/2, W/2)
    return F.interpolate(y, scale_factor=(1, 2, 2), mode="trilinear", align_corners=False)


def shaspec(S, x, mode, training=False):
    """x (N, 4, D, H, W), D % 16 == 0, H, W % 32 == 0; mode: list of available channels."""
    N, _, D, H, W = x.shape
    x = torch.stack([x[:, m] if m in mode else torch.zeros_like(x[:, m]) for m in range(4)], 1)
    feats, s_sh, _ = encoder(S, "shared_enc", x.reshape(N * 4, 1, D, H, W))  # rows b*4 + m
    skips = [f.reshape(N, 4 * f.shape[1], *f.shape[2:]) for f in feats]  # [F_FLAIR, F_T1, F_T1c, F_T2]
    shared = s_sh.reshape(N, 4, *s_sh.shape[1:])  # (N, 4, 256, d, h, w)
    slots, g_spec = [], []
    for m, name in enumerate(ENCODERS[1:]):
        if m in mode or training:
            _, s_sp, g = encoder(S, name, x[:, m:m + 1])
            g_spec.append(g)
        if m in mode:  # shared + WS 3x3x3 conv (512 -> 256) of [shared, specific]; no norm
            slots.append(shared[:, m] + ws_conv(S, "compos_layer.conv", torch.cat([shared[:, m], s_sp], 1), 1, 1))
        else:
            slots.append(shared[:, mode[0]])
    logits = decoder(S, torch.cat(slots, 1), skips)
    if not training:
        return logits
    dom = F.linear(torch.stack(g_spec, 1).reshape(N * 4, -1), S["dom_classifier.weight"], S["dom_classifier.bias"])
    return logits, s_sh, dom


def expected_shapes(in_ch=1, num_classes=3):
    """{original state-dict key: shape} of DualNet_SS(norm_cfg="IN", weight_std=True), in the
    original's registration order: 944 parameters (IN affine, no buffers), 187,708,132 values."""
    out = {}

    def conv(key, o, i, k):
        out[key + ".weight"] = (o, i, k, k, k)

    def norm(key, c):
        out[key + ".weight"] = out[key + ".bias"] = (c,)

    def enc(e):
        conv(f"{e}.asppreduce.0", 256, 1280, 1)
        norm(f"{e}.asppreduce.1", 256)
        for i, d in enumerate(ASPP_DILATIONS):
            conv(f"{e}.aspp.branch{i + 1}.0", 256, 256, 1 if d == 1 else 3)
            norm(f"{e}.aspp.branch{i + 1}.1", 256)
        conv(f"{e}.aspp.branch5_conv", 256, 256, 1)
        norm(f"{e}.aspp.branch5_norm", 256)
        conv(f"{e}.aspp.conv_cat.0", 256, 1280, 1)
        norm(f"{e}.aspp.conv_cat.1", 256)
        b = e + ".backbone"
        conv(b + ".conv1", 64, in_ch, 7)
        norm(b + ".norm1", 64)
        cin = 64
        for i, (w, blocks, _) in enumerate(LAYERS):
            for j in range(blocks):
                k = f"{b}.layer{i + 1}.{j}"
                for n, (o, ci, ks) in enumerate(((w, cin, 1), (w, w, 3), (4 * w, w, 1))):
                    conv(f"{k}.conv{n + 1}", o, ci, ks)
                    norm(f"{k}.norm{n + 1}", o)
                if j == 0:
                    conv(k + ".downsample.0", 4 * w, cin, 1)
                    norm(k + ".downsample.1", 4 * w)
                cin = 4 * w

    enc("shared_enc")
    for level, c, cin in DECODER:
        conv(f"shared_dec.shortcut_conv{level}.0", c, cin, 1)
        norm(f"shared_dec.shortcut_conv{level}.1", c)
    for level, c, _ in DECODER:  # ConvTranspose3d weight is (in, out, 2, 2, 2)
        out[f"shared_dec.transposeconv_stage{level}.weight"] = (4 * c if level == 3 else 2 * c, c, 2, 2, 2)
    for level, c, _ in DECODER:
        for n in (1, 2):
            conv(f"shared_dec.stage{level}_de.conv{n}", c, c, 3)
            norm(f"shared_dec.stage{level}_de.norm{n}", c)
    conv("shared_dec.cls_conv.0", num_classes, 32, 1)
    conv("compos_layer.conv", 256, 512, 3)
    out["dom_classifier.weight"], out["dom_classifier.bias"] = (4, 256), (4,)
    for e in ENCODERS[1:]:
        enc(e)
    return out
