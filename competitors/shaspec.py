"""ShaSpec (Wang, Chen, Ma, Avery, Hull, Carneiro, "Multi-modal Learning with Missing Modality
via Shared-Specific Feature Modelling", CVPR 2023), as the IM-Fuse authors configured it for
BraTS 2023. Every modality image goes through one shared encoder and through its own specific
encoder (each a 3-D ResNet-50 with a channel reduction and ASPP). At the bottleneck an
available modality's slot is its shared feature plus a residual computed from [shared,
specific]; a missing modality's slot copies the shared feature of an available one. A U-Net
decoder, whose skips are the shared encoder's features of all four modalities (of a zero
image for a missing one), gives three sigmoid region maps. Two regularisers: an L1 distance
between the shared features of modality pairs and a 4-way modality classifier on the
specific encoders' pooled features.

Axes are the project's (X, Y, Z); the original's are (Z, X, Y), so its (1, 2, 2) strides are
(2, 2, 1) here and the window 80x160x160 is 160x160x80. Internally the modalities are
concatenated, classified and paired in the original's order [FLAIR, T1, T1c, T2], which makes
its checkpoints load by a permutation of kernel axes alone. Shapes: B batch, M = 4 modalities,
(X, Y, Z) the window; F0 at (X/2, Y/2, Z), Fl at (X/2^(l+1), Y/2^(l+1), Z/2^l), the bottleneck
S at (X/32, Y/32, Z/16).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from models import register_model
from models.base import check_input
from utils.brats import DROP_COUNT_WEIGHTS, MODALITIES, REGIONS
from utils.losses import region_targets
from utils.recipe import Recipe

from .layers import InstanceNorm

# The original's modality order (FLAIR, T1, T1c, T2) as indices of MODALITIES: the order of
# its concatenations, domain labels and loss pairs, and the priority of the missing-slot rule.
ORIGINAL_ORDER = tuple(MODALITIES.index(m) for m in ("flair", "t1", "t1c", "t2"))
# The original's encoder names, in MODALITIES order.
ENCODER_NAMES = ("flair_enc", "t1ce_enc", "t1_enc", "t2_enc")
# The original's output channels [ET, WT, TC] as rows of ours [WT, TC, ET].
ORIGINAL_REGIONS = tuple(list(REGIONS).index(r) for r in ("ET", "WT", "TC"))


def standardize(weight, eps=1e-12):
    """Weight standardisation: each output filter minus its mean, divided by
    sqrt(its unbiased variance + eps)."""
    weight = weight - weight.mean(dim=tuple(range(1, weight.dim())), keepdim=True)
    return weight / torch.sqrt(weight.flatten(1).var(dim=1) + eps).view(-1, *(1,) * (weight.dim() - 1))


class WSConv3d(nn.Conv3d):
    """Bias-free Conv3d whose weight is standardised before each use."""

    def __init__(self, in_ch, out_ch, kernel, stride=1, padding=0, dilation=1):
        super().__init__(in_ch, out_ch, kernel, stride, padding, dilation, bias=False)

    def forward(self, x):
        return F.conv3d(x, standardize(self.weight), None, self.stride, self.padding, self.dilation)


def conv_norm_act(in_ch, out_ch, kernel=1, padding=0, dilation=1):
    """WSConv3d -> InstanceNorm -> LeakyReLU(0.01)."""
    return nn.Sequential(WSConv3d(in_ch, out_ch, kernel, padding=padding, dilation=dilation),
                         InstanceNorm(out_ch), nn.LeakyReLU(0.01))


class Bottleneck(nn.Module):
    """1x1 conv in -> w, 3^3 conv w -> w (the stride), 1x1 conv w -> 4w, each with an
    InstanceNorm and LeakyReLU but the last, whose output is added to the shortcut (a strided
    1x1 conv + norm where the shape changes) before the LeakyReLU."""

    def __init__(self, in_ch, width, stride=1):
        super().__init__()
        out_ch = 4 * width
        self.conv1, self.norm1 = WSConv3d(in_ch, width, 1), InstanceNorm(width)
        self.conv2, self.norm2 = WSConv3d(width, width, 3, stride, padding=1), InstanceNorm(width)
        self.conv3, self.norm3 = WSConv3d(width, out_ch, 1), InstanceNorm(out_ch)
        self.downsample = (nn.Sequential(WSConv3d(in_ch, out_ch, 1, stride), InstanceNorm(out_ch))
                           if stride != 1 or in_ch != out_ch else None)

    def forward(self, x):
        out = F.leaky_relu(self.norm1(self.conv1(x)), 0.01)
        out = F.leaky_relu(self.norm2(self.conv2(out)), 0.01)
        out = self.norm3(self.conv3(out))
        return F.leaky_relu(out + (x if self.downsample is None else self.downsample(x)), 0.01)


class BasicBlock(nn.Module):
    """Two 3^3 convs (c -> c), each with an InstanceNorm, LeakyReLU after the first; the input
    added after the second norm, then LeakyReLU."""

    def __init__(self, channels):
        super().__init__()
        self.conv1, self.norm1 = WSConv3d(channels, channels, 3, padding=1), InstanceNorm(channels)
        self.conv2, self.norm2 = WSConv3d(channels, channels, 3, padding=1), InstanceNorm(channels)

    def forward(self, x):
        out = F.leaky_relu(self.norm1(self.conv1(x)), 0.01)
        return F.leaky_relu(self.norm2(self.conv2(out)) + x, 0.01)


class ResNet(nn.Module):
    """The 3-D ResNet-50 trunk: a 7^3 stem (stride (2, 2, 1)), 3^3 max-pooling (stride 2), and
    four layers of Bottlenecks of widths `widths` (the first of layers 2-4 with stride 2).
    (B, 1, X, Y, Z) -> [F0 (stem), F1, F2, F3, F4]."""

    def __init__(self, widths, blocks):
        super().__init__()
        self.conv1 = WSConv3d(1, widths[0], 7, stride=(2, 2, 1), padding=3)
        self.norm1 = InstanceNorm(widths[0])
        in_ch, layers = widths[0], []
        for i, (width, n) in enumerate(zip(widths, blocks)):
            layer = []
            for j in range(n):
                layer.append(Bottleneck(in_ch, width, stride=2 if i and not j else 1))
                in_ch = 4 * width
            layers.append(nn.Sequential(*layer))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers

    def forward(self, x):
        f0 = F.leaky_relu(self.norm1(self.conv1(x)), 0.01)
        features, x = [f0], F.max_pool3d(f0, 3, stride=2, padding=1)
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            features.append(x)
        return features


class ASPP(nn.Module):
    """Four parallel conv-norm-act branches (1x1, then 3^3 at each dilation) and an image-pool
    branch (global mean -> 1x1 conv -> norm -> act, broadcast back: since the norm of one voxel
    is its bias, this branch is LeakyReLU(bias) everywhere), concatenated and merged by a 1x1
    conv-norm-act."""

    def __init__(self, channels, dilations):
        super().__init__()
        self.branches = nn.ModuleList([conv_norm_act(channels, channels)] +
                                      [conv_norm_act(channels, channels, 3, d, d) for d in dilations])
        self.pool_conv, self.pool_norm = WSConv3d(channels, channels, 1), InstanceNorm(channels)
        self.merge = conv_norm_act(channels * (len(dilations) + 2), channels)

    def forward(self, x):
        pooled = self.pool_norm(self.pool_conv(x.mean(dim=(2, 3, 4), keepdim=True)))
        pooled = F.leaky_relu(pooled, 0.01).expand(-1, -1, *x.shape[2:])
        return self.merge(torch.cat([branch(x) for branch in self.branches] + [pooled], dim=1))


class Encoder(nn.Module):
    """(B, 1, X, Y, Z) -> (skips [F0..F3], S (B, features, X/32, Y/32, Z/16), g (B, features)):
    the ResNet trunk, a 1x1 conv-norm-act to `features` channels (R), ASPP on R (S), and the
    global mean of R (g)."""

    def __init__(self, widths, blocks, features, dilations):
        super().__init__()
        self.backbone = ResNet(widths, blocks)
        self.reduce = conv_norm_act(4 * widths[-1], features)
        self.aspp = ASPP(features, dilations)

    def forward(self, x):
        *skips, top = self.backbone(x)
        reduced = self.reduce(top)
        return skips, self.aspp(reduced), reduced.mean(dim=(2, 3, 4))


class Decoder(nn.Module):
    """From the concatenated bottleneck slots (B, M * features, ...) up four levels: a 2x2x2
    transposed conv, plus a 1x1 conv-norm-act of the level's concatenated skips, then a
    BasicBlock; a plain 1x1x1 conv to the region logits at (X/2, Y/2, Z)."""

    def __init__(self, in_ch, skip_channels, widths, num_outputs):
        super().__init__()
        chans = (in_ch,) + tuple(widths)
        self.ups = nn.ModuleList(nn.ConvTranspose3d(chans[i], chans[i + 1], 2, stride=2, bias=False)
                                 for i in range(len(widths)))
        self.skips = nn.ModuleList(conv_norm_act(s, w) for s, w in zip(skip_channels, widths))
        self.blocks = nn.ModuleList(BasicBlock(w) for w in widths)
        self.head = nn.Conv3d(widths[-1], num_outputs, 1, bias=False)

    def forward(self, x, skips):
        """skips: the concatenated skips, deepest first."""
        for up, skip_conv, block, skip in zip(self.ups, self.skips, self.blocks, skips):
            x = block(up(x) + skip_conv(skip))
        return self.head(x)


@register_model("shaspec")
class ShaSpec(nn.Module):
    """The contract of models/base.py. Eval: sigmoid probabilities of WT, TC, ET. Train:
    {"logits", "shared" (B, M, features, ...) the shared encoder's bottleneck features in
    MODALITIES order, "domain" (B, M, M) the modality classifier's logits (columns in the
    original's order)}."""

    output_kind = "regions"
    # SGD (Nesterov, momentum 0.99), lr 1e-2, no weight decay, poly per iteration over the whole
    # run; 464 passes over the training cases, the first 280 with every modality present, then
    # the original's subset law (1/16 each single, 1/24 each pair, 1/16 each triple, 1/4 all,
    # in SUBSETS order); batch 1; crops centred on tumour half the time; nnU-Net augmentation.
    recipe = Recipe(optimizer="sgd", optimizer_args={"momentum": 0.99, "nesterov": True}, lr=1e-2,
                    weight_decay=0.0, schedule="poly_iteration", num_epochs=464, warmup_epochs=280,
                    subset_weights=DROP_COUNT_WEIGHTS,
                    augmentations=("nnunet_shaspec",), foreground_oversampling=0.5,
                    # the original validates at 35 fixed iterations of its warm-up and main runs
                    # (15k ... 245k; 110k ... 406k from the warm-up's start; 33 distinct): after the
                    # epoch of 875 iterations that reaches each
                    val_every=(18, 35, 75, 115, 126, 138, 149, 155, 172, 195, 206, 218, 229, 235, 240, 252, 263,
                               269, 275, 280, 286, 309, 332, 355, 366, 378, 389, 400, 412, 423, 435, 446, 464))

    # CPU demos (engine/small.py): a 32^3 window (4x cheaper than 64x64x32, so 2,000 iterations)
    # and the original's share of warm-up (245k of 406k iterations, 60 %). With 20 % of warm-up
    # its whole tumour stayed at the core (full-modality WT 0.68 against TC 0.70)
    small_config = dict(window=(32, 32, 32), width=8, blocks=(1, 1, 1, 1), features=32, decoder_width=8)
    # The light augmentation (rotation, intensity, flips), as MaM's small recipe, and the
    # original's lr 1e-2: at 2e-2 make compare's full-modality WT was 0.70 (nnU-Net's
    # augmentation) and 0.76 (the light one); at 1e-2 0.89 (two threads, docs/models/shaspec.md)
    small_recipe = dict(lr=1e-2, batch_size=2, num_epochs=200, iter_per_epoch=10, warmup_epochs=120,
                        augmentations=("rotation", "intensity", "flip"))

    def __init__(self, window=(160, 160, 80), width=64, blocks=(3, 4, 6, 3), features=256, decoder_width=32,
                 dilations=(2, 4, 8), shared_weight=0.1, domain_weight=0.02):
        super().__init__()
        window = tuple(window)
        if len(window) != 3 or window[0] % 32 or window[1] % 32 or window[2] % 16 or min(window) <= 0:
            raise ValueError(f"window must be (X, Y, Z) with X and Y multiples of 32 and Z of 16, got {window}")
        M = len(MODALITIES)
        self.window, self.num_modalities = window, M
        self.shared_weight, self.domain_weight = shared_weight, domain_weight
        self._zero_cache = None  # (key, skips) of _zero_encoding
        widths = (width, 2 * width, 4 * width, 5 * width)  # 64, 128, 256, 320: layer4 is narrowed
        encoder = lambda: Encoder(widths, tuple(blocks), features, tuple(dilations))  # noqa: E731
        self.shared = encoder()
        self.specific = nn.ModuleList(encoder() for _ in range(M))
        self.fusion = WSConv3d(2 * features, features, 3, padding=1)
        dec_widths = tuple(decoder_width * 2 ** i for i in (3, 2, 1, 0))
        skip_channels = tuple(M * c for c in (4 * widths[2], 4 * widths[1], 4 * widths[0], widths[0]))
        self.decoder = Decoder(M * features, skip_channels, dec_widths, len(REGIONS))
        self.domain = nn.Linear(features, M)
        # Kaiming-normal (fan out) for the encoders' and decoder's convolutions; norms 1 and 0;
        # the fusion conv and the classifier keep torch's defaults
        for part in [self.shared, *self.specific, self.decoder]:
            for module in part.modules():
                if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
                    nn.init.kaiming_normal_(module.weight, mode="fan_out")
                elif isinstance(module, nn.InstanceNorm3d):
                    nn.init.ones_(module.weight)
                    nn.init.zeros_(module.bias)

    def _encode(self, x):
        """x (B, M, ...) -> (shared skips, each (B, M, C, ...); shared S (B, M, F, ...);
        specific S (B, M, F, ...); specific g (B, M, F))."""
        B, M = x.shape[:2]
        skips, shared, _ = self.shared(x.reshape(B * M, 1, *x.shape[2:]))
        specific = [enc(x[:, m:m + 1]) for m, enc in enumerate(self.specific)]
        return ([s.view(B, M, *s.shape[1:]) for s in skips], shared.view(B, M, *shared.shape[1:]),
                torch.stack([s[1] for s in specific], 1), torch.stack([s[2] for s in specific], 1))

    def _decode(self, skips, shared, specific, mask, fill):
        """Slots: available m -> S_shared,m + fusion([S_shared,m, S_spec,m]); missing -> the
        S_shared of `fill` (B,), an available modality of each sample. Concatenated in the
        original's order and decoded with the skips -> logits (B, 3, X, Y, Z)."""
        B, M = mask.shape
        flat = lambda t: t.flatten(0, 1)  # noqa: E731
        fused = flat(shared) + self.fusion(torch.cat([flat(shared), flat(specific)], 1))
        fused = fused.view(B, M, *fused.shape[1:])
        filler = shared[torch.arange(B, device=mask.device), fill][:, None]
        slots = torch.where(mask.view(B, M, 1, 1, 1, 1), fused, filler)
        order = list(ORIGINAL_ORDER)
        cat = lambda t: t[:, order].flatten(1, 2)  # noqa: E731  (B, M, C, ...) -> (B, M * C, ...)
        logits = self.decoder(cat(slots), [cat(s) for s in reversed(skips)])
        return F.interpolate(logits, scale_factor=(2, 2, 1), mode="trilinear", align_corners=False)

    def _fill(self, mask):
        """(B,) the modality whose shared feature fills the missing slots: in training a random
        available one (the original shuffles its list), else the first available in the
        original's order."""
        if self.training:
            return torch.multinomial(mask.float(), 1)[:, 0]
        priority = mask[:, list(ORIGINAL_ORDER)].float().argmax(1)
        return torch.tensor(ORIGINAL_ORDER, device=mask.device)[priority]

    def encode(self, x, mask):
        """Everything decode needs for any subset of `mask`: the encodings of the images
        (absent ones zeroed) and the shared encoding of a zero image."""
        check_input(self, x, mask)
        mask = mask.to(device=x.device, dtype=torch.bool)
        x = x * mask[:, :, None, None, None]
        return self._encode(x), self._zero_encoding(x)

    def _zero_encoding(self, x):
        """The shared encoder's skips for a zero image of x's window (1, 1, ...). In evaluation
        without gradients it is computed once per window shape, device, dtype and autocast state and
        kept while the shared encoder's weights are unchanged (their tensors and versions)."""
        zero = torch.zeros_like(x[:1, :1])
        if self.training or torch.is_grad_enabled():
            return self.shared(zero)[0]
        key = (zero.shape, zero.device, zero.dtype, torch.is_autocast_enabled(zero.device.type),
               tuple((p.data_ptr(), p._version) for p in self.shared.parameters()))
        if self._zero_cache is None or self._zero_cache[0] != key:
            self._zero_cache = (key, self.shared(zero)[0])
        return self._zero_cache[1]

    def decode(self, features, mask):
        (skips, shared, specific, _), zero_skips = features
        mask = mask.to(device=shared.device, dtype=torch.bool)
        where = lambda t, z: torch.where(mask.view(*mask.shape, *(1,) * (t.dim() - 2)), t, z)  # noqa: E731
        skips = [where(s, z[:, None]) for s, z in zip(skips, zero_skips)]
        return torch.sigmoid(self._decode(skips, shared, specific, mask, self._fill(mask)))

    def forward(self, x, mask):
        check_input(self, x, mask)
        mask = mask.to(device=x.device, dtype=torch.bool)
        skips, shared, specific, pooled = self._encode(x * mask[:, :, None, None, None])
        logits = self._decode(skips, shared, specific, mask, self._fill(mask))
        if not self.training:
            return torch.sigmoid(logits)
        return {"logits": logits, "shared": shared, "domain": self.domain(pooled)}

    def loss(self, outputs, batch):
        """dice + bce + shared_weight x shared + domain_weight x domain -> (total, parts):
        dice: mean over regions of 1 - the batch mean of 2 sum(p t) / (sum p + sum t + 1);
        bce: binary cross-entropy of the logits, mean over voxels and batch, summed over the
        regions; shared: mean absolute difference of the shared bottleneck features, summed over
        the pairs (FLAIR, T1), (T1, T1c), (T1c, T2), (T2, FLAIR); domain: cross-entropy of the
        modality classifier. The last two include absent modalities, as in the original."""
        logits, shared = outputs["logits"], outputs["shared"]
        target = region_targets(batch["label"])
        prob, dims = torch.sigmoid(logits), tuple(range(2, logits.dim()))
        dice = 2 * (prob * target).sum(dims) / (prob.sum(dims) + target.sum(dims) + 1)  # (B, 3)
        o = ORIGINAL_ORDER
        labels = torch.tensor(o, device=logits.device).argsort().repeat(logits.shape[0])
        parts = {"dice": (1 - dice.mean(0)).mean(),
                 "bce": F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(dims + (0,)).sum(),
                 "shared": sum((shared[:, o[i]] - shared[:, o[(i + 1) % len(o)]]).abs().mean()
                               for i in range(len(o))),
                 "domain": F.cross_entropy(outputs["domain"].flatten(0, 1), labels)}
        total = (parts["dice"] + parts["bce"] + self.shared_weight * parts["shared"]
                 + self.domain_weight * parts["domain"])
        return total, parts

    # --- the original's checkpoints (models/reference.py): DualNet_SS.py / Res50.py names ---

    def reference_renames(self):
        def encoder(ours, ref):
            pairs = [(ours + "backbone.", ref + "backbone."), (ours + "reduce.", ref + "asppreduce."),
                     (ours + "aspp.pool_conv.", ref + "aspp.branch5_conv."),
                     (ours + "aspp.pool_norm.", ref + "aspp.branch5_norm."),
                     (ours + "aspp.merge.", ref + "aspp.conv_cat.")]
            return pairs + [(f"{ours}aspp.branches.{i}.", f"{ref}aspp.branch{i + 1}.")
                            for i in range(len(self.shared.aspp.branches))]

        pairs = encoder("shared.", "shared_enc.")
        for m, name in enumerate(ENCODER_NAMES):
            pairs += encoder(f"specific.{m}.", name + ".")
        levels = len(self.decoder.blocks)
        for i in range(levels):  # ours deepest first, the original's numbered by level
            level = levels - 1 - i
            pairs += [(f"decoder.ups.{i}.", f"shared_dec.transposeconv_stage{level}."),
                      (f"decoder.skips.{i}.", f"shared_dec.shortcut_conv{level}."),
                      (f"decoder.blocks.{i}.", f"shared_dec.stage{level}_de.")]
        return pairs + [("decoder.head.", "shared_dec.cls_conv.0."), ("fusion.", "compos_layer.conv."),
                        ("domain.", "dom_classifier.")]

    def reference_layout(self, state, to_reference):
        """Kernels (Z, X, Y) <-> (X, Y, Z); the head's rows [ET, WT, TC] <-> [WT, TC, ET]."""
        axes = (0, 1, 4, 2, 3) if to_reference else (0, 1, 3, 4, 2)
        rows = list(ORIGINAL_REGIONS) if to_reference else torch.tensor(ORIGINAL_REGIONS).argsort().tolist()
        out = {k: v.permute(*axes).contiguous() if v.dim() == 5 else v for k, v in state.items()}
        out["shared_dec.cls_conv.0.weight"] = out["shared_dec.cls_conv.0.weight"][rows]
        return out

    @classmethod
    def reference_facts(cls, state):
        stem = state.get("shared_enc.backbone.conv1.weight")
        if "compos_layer.conv.weight" not in state or stem is None:
            return []
        return [f"ShaSpec with width={stem.shape[0]}"]
