"""An independent, functional statement of the original MaM / M3FeCon forward pass (class
MultimodalRecon of the nnU-Net v2 fork, fact sheet mam.md, sections 2-3, 8-9), reading weights by
the original `network_weights` key names (no "module."), in the original's layout: x (N, 4, D, H, W)
with spatial axes in SimpleITK order (z, y, x) and channels [FLAIR, T1, T1c, T2]; `mask` is one
list of 4 bools in that order for the whole batch (True = present). A missing channel is not
zeroed; the network masks it internally. Returns (logits [WT, TC, ET], R, G): R the merged
bottleneck (N, 4*C, n, n, n), modality-major; G the detached stacked bottleneck (N, 4, C, n, n, n),
as the original returns it (not reshaped). `expected_shapes` lists the original state dict in its
order, including the `convs.{k}.all_modules.{0,1}` aliases of `conv` / `norm` and the unused
4-channel encoder stored as `encoder.*` and again as `decoder.encoder.*` (691 tensors)."""
import torch
import torch.nn.functional as F

FEATURES = (32, 64, 128, 256, 512, 512)  # per stage after concatenation; one modality has 1/4
M = 4  # modalities


def block(S, key, x, stride=1):
    """ConvDropoutNormReLU `key`: Conv3d(k3, padding 1, bias) -> InstanceNorm(affine, 1e-5) ->
    LeakyReLU(0.01). On a 1-voxel map (32^3 input), which nn.InstanceNorm3d refuses, it returns
    the limit (v - mean) / sqrt(0 + eps) * weight + bias = bias."""
    x = F.conv3d(x, S[key + ".conv.weight"], S[key + ".conv.bias"], stride, 1)
    w, b = S[key + ".norm.weight"], S[key + ".norm.bias"]
    if x[0, 0].numel() == 1:
        x = b.view(1, -1, 1, 1, 1).expand_as(x)
    else:
        x = F.instance_norm(x, weight=w, bias=b, eps=1e-5)
    return F.leaky_relu(x, 0.01)


def stacked(S, key, x, stride=1):  # StackedConvBlocks: convs.0 carries the stride, convs.1 not
    return block(S, key + ".convs.1", block(S, key + ".convs.0", x, stride))


def modality_encoder(S, j, x):  # x (N, 1, D, H, W) -> 6 maps (N, C_s / 4, D / 2^s, ...)
    out = []
    for s in range(len(FEATURES)):
        x = stacked(S, f"modality_specific_encoders.{j}.stages.{s}.0", x, 1 if s == 0 else 2)
        out.append(x)
    return out


def layer_norm(S, key, t):
    return F.layer_norm(t, t.shape[-1:], S[key + ".weight"], S[key + ".bias"], 1e-5)


def transformer(S, t, heads, dim_head):
    """feature_reconstruction (depth 1, pre-norm): t (N, L, C) -> (N, L, C)."""
    P, (N, L, _) = "feature_reconstruction.", t.shape
    t = t + S[P + "pos_embedding"][:, :L]                               # (1, 256, C) sliced
    a = P + "layers.0.0."                                               # Attention
    qkv = F.linear(layer_norm(S, a + "norm", t), S[a + "to_qkv.weight"])  # no bias, (N, L, 3hd)
    q, k, v = (u.reshape(N, L, heads, dim_head).transpose(1, 2) for u in qkv.chunk(3, -1))
    att = torch.softmax(q @ k.transpose(-1, -2) * dim_head ** -0.5, -1)   # (N, h, L, L)
    o = (att @ v).transpose(1, 2).reshape(N, L, heads * dim_head)          # heads major
    t = t + F.linear(o, S[a + "to_out.0.weight"], S[a + "to_out.0.bias"])
    f = P + "layers.0.1.net."                                           # FeedForward
    h = F.gelu(F.linear(layer_norm(S, f + "0", t), S[f + "1.weight"], S[f + "1.bias"]))
    t = t + F.linear(h, S[f + "4.weight"], S[f + "4.bias"])
    return layer_norm(S, P + "norm", t)                                 # final LayerNorm


def decoder(S, skips, deep_supervision):
    """nnU-Net UNetDecoder on skips [(N, C_0, D), ..., (N, C_5, D/32)], bottom-up."""
    x, outs, n = skips[-1], [], len(skips) - 1
    for i in range(n):
        x = F.conv_transpose3d(x, S[f"decoder.transpconvs.{i}.weight"],
                               S[f"decoder.transpconvs.{i}.bias"], stride=2)
        x = stacked(S, f"decoder.stages.{i}", torch.cat([x, skips[n - 1 - i]], 1))  # [up, skip]
        if deep_supervision or i == n - 1:  # without deep supervision only the last head runs
            outs.append(F.conv3d(x, S[f"decoder.seg_layers.{i}.weight"],
                                 S[f"decoder.seg_layers.{i}.bias"]))
    outs = outs[::-1]  # full resolution first
    return outs if deep_supervision else outs[0]


def mam(S, x, mask, deep_supervision=False, heads=4, dim_head=32):
    """x (N, 4, D, H, W), D = H = W divisible by 32; mask: 4 bools [FLAIR, T1, T1c, T2]."""
    feats = [modality_encoder(S, j, x[:, j:j + 1]) for j in range(M)]
    st = [torch.stack([f[s] for f in feats], 1) for s in range(len(FEATURES))]  # (N, 4, C, ...)
    keep = torch.tensor([bool(m) for m in mask], device=x.device).view(1, M, 1, 1, 1, 1)
    b = st[-1]                                                          # (N, 4, C, n, n, n)
    G = b.detach()
    N, _, C, n0, n1, n2 = b.shape
    z = torch.where(keep, b, S["learned_bottleneck_tokens"].unsqueeze(0))  # tokens (4, C, n, n, n)
    tok = z.permute(0, 1, 3, 4, 5, 2).reshape(N, M * n0 * n1 * n2, C)   # 'b m c h w d -> b (m h w d) c'
    rec = transformer(S, tok, heads, dim_head)
    rec = rec.reshape(N, M, n0, n1, n2, C).permute(0, 1, 5, 2, 3, 4)    # (N, 4, C, n, n, n)
    R = torch.where(keep, b, rec).reshape(N, M * C, n0, n1, n2)         # present keep their own
    skips = [torch.where(keep, s, torch.zeros((), dtype=s.dtype, device=s.device))
             .reshape(N, -1, *s.shape[3:]) for s in st[:-1]]            # (N, 4*C_s, ...) zeroed
    return decoder(S, skips + [R], deep_supervision), R, G


def expected_shapes(patch=128, features=FEATURES, heads=4, dim_head=32, mlp_dim=256,
                    max_seq_len=256, num_classes=3):
    """{key: shape} of the original network_weights, in state-dict order. The original hard-codes
    Transformer(128, 1, 4, 32, 256) and 4^3 tokens; here dim = features[-1] // 4 and the token side
    = patch / 2^5, so reduced test models can be described too."""
    S, mod = {}, [f // M for f in features]
    dim, n, inner = mod[-1], patch // 2 ** (len(features) - 1), heads * dim_head

    def conv_block(key, o, i):
        for name, shape in (("conv", (o, i, 3, 3, 3)), ("norm", (o,)),
                            ("all_modules.0", (o, i, 3, 3, 3)), ("all_modules.1", (o,))):
            S[f"{key}.{name}.weight"], S[f"{key}.{name}.bias"] = shape, (o,)

    def plain_encoder(prefix, cin, widths):
        for s, w in enumerate(widths):
            conv_block(f"{prefix}stages.{s}.0.convs.0", w, cin)
            conv_block(f"{prefix}stages.{s}.0.convs.1", w, w)
            cin = w

    S["learned_bottleneck_tokens"] = (M, dim, n, n, n)
    for j in range(M):
        plain_encoder(f"modality_specific_encoders.{j}.", 1, mod)
    P = "feature_reconstruction."
    S[P + "pos_embedding"] = (1, max_seq_len, dim)
    for key, shape in (("norm.weight", (dim,)), ("norm.bias", (dim,)),
                       ("layers.0.0.norm.weight", (dim,)), ("layers.0.0.norm.bias", (dim,)),
                       ("layers.0.0.to_qkv.weight", (3 * inner, dim)),
                       ("layers.0.0.to_out.0.weight", (dim, inner)), ("layers.0.0.to_out.0.bias", (dim,)),
                       ("layers.0.1.net.0.weight", (dim,)), ("layers.0.1.net.0.bias", (dim,)),
                       ("layers.0.1.net.1.weight", (mlp_dim, dim)), ("layers.0.1.net.1.bias", (mlp_dim,)),
                       ("layers.0.1.net.4.weight", (dim, mlp_dim)), ("layers.0.1.net.4.bias", (dim,))):
        S[P + key] = shape
    plain_encoder("encoder.", M, features)           # unused 4-channel encoder ...
    plain_encoder("decoder.encoder.", M, features)   # ... and its second name
    up = [(features[-(i + 1)], features[-(i + 2)]) for i in range(len(features) - 1)]
    for i, (_, w) in enumerate(up):
        conv_block(f"decoder.stages.{i}.convs.0", w, 2 * w)
        conv_block(f"decoder.stages.{i}.convs.1", w, w)
    for i, (lo, w) in enumerate(up):
        S[f"decoder.transpconvs.{i}.weight"], S[f"decoder.transpconvs.{i}.bias"] = (lo, w, 2, 2, 2), (w,)
    for i, (_, w) in enumerate(up):
        S[f"decoder.seg_layers.{i}.weight"] = (num_classes, w, 1, 1, 1)
        S[f"decoder.seg_layers.{i}.bias"] = (num_classes,)
    return S
