"""Blocks shared by IM-Fuse and mmFormer (SPEC section 3): pre-norm convolutions, the
modality encoder, the transformer block, the fusion and auxiliary decoders, and
`MultiEncoderNet`, the per-modality encoder / fusion / decoder skeleton both models share.

Shapes: B batch, M modalities, C channels, P patch size, p = P / 16, T = p**3 tokens.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.brats import CHECKPOINT_NAMES
from utils.losses import segmentation_loss
from utils.recipe import Recipe

from . import cpu_kernels
from .base import check_input
from .reference import block_renames


class PreNormConv(nn.Module):
    """InstanceNorm (no affine) -> LeakyReLU(0.2) -> Conv3d with bias."""

    def __init__(self, in_ch, out_ch, kernel_size=3, stride=1, padding_mode="reflect",
                 negative_slope=0.2, eps=1e-5):
        super().__init__()
        self.negative_slope, self.eps = negative_slope, eps
        self.conv = nn.Conv3d(in_ch, out_ch, kernel_size, stride=stride, padding=kernel_size // 2,
                              padding_mode=padding_mode)

    def forward(self, x):
        if cpu_kernels.applies(x):  # CPU inference: one fused pass, channels-last for the conv
            conv = self.conv
            x = cpu_kernels.norm_act_pad(x, self.eps, self.negative_slope, conv.padding[0], conv.padding_mode)
            return F.conv3d(x, conv.weight, conv.bias, conv.stride)
        x = F.leaky_relu(F.instance_norm(x, eps=self.eps), self.negative_slope)
        return self.conv(x)


class EncoderLevel(nn.Module):
    """entry conv, then x + body(x) with two pre-norm 3x3x3 convs (reflect padding)."""

    def __init__(self, in_ch, out_ch, first):
        super().__init__()
        # level 1: a plain conv from the image; deeper levels: a stride-2 pre-norm conv
        self.entry = (nn.Conv3d(in_ch, out_ch, 3, padding=1, padding_mode="reflect") if first
                      else PreNormConv(in_ch, out_ch, stride=2))
        self.body = nn.Sequential(PreNormConv(out_ch, out_ch), PreNormConv(out_ch, out_ch))

    def forward(self, x, entered=False):
        """entered: x is already the entry conv's output."""
        x = x if entered else self.entry(x)
        return x + self.body(x)


class Encoder(nn.Module):
    """One modality's encoder: (B, 1, P, P, P) -> [x1 ... x5], x_l (B, widths[l-1], P / 2^(l-1), ...)."""

    def __init__(self, widths):
        super().__init__()
        chans = (1,) + tuple(widths)
        self.levels = nn.ModuleList(EncoderLevel(chans[i], chans[i + 1], first=i == 0)
                                    for i in range(len(widths)))

    def forward(self, x, entered=False):
        """entered: x is already level 1's entry conv output (MultiEncoderNet computes those
        of all modalities in one grouped conv on the CPU)."""
        features = []
        for l, level in enumerate(self.levels):
            x = level(x, entered and l == 0)
            features.append(x)
        return features


class Attention(nn.Module):
    """Multi-head self-attention: qkv without bias, output projection with bias."""

    def __init__(self, dim, heads, dropout):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x):  # (B, N, dim)
        B, N, dim = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, dim)))


class TransformerBlock(nn.Module):
    """x + Dropout(Attention(LN(x))); x + FFN(LN(x)), FFN = Linear, GELU, Dropout, Linear, Dropout."""

    def __init__(self, dim=512, heads=8, mlp_dim=4096, dropout=0.1):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.drop = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(mlp_dim, dim), nn.Dropout(dropout))

    def forward(self, x):  # (B, N, dim)
        x = x + self.drop(self.attn(self.norm1(x)))
        return x + self.ffn(self.norm2(x))


class IntraModal(nn.Module):
    """1x1x1 conv to `dim`, tokens in C order + learnable position (zeros), one transformer block."""

    def __init__(self, in_ch, dim, num_tokens, heads, mlp_dim, dropout):
        super().__init__()
        self.proj = nn.Conv3d(in_ch, dim, 1)
        self.pos = nn.Parameter(torch.zeros(1, num_tokens, dim))
        self.block = TransformerBlock(dim, heads, mlp_dim, dropout)

    def forward(self, x5):  # (B, in_ch, p, p, p) -> (B, dim, p, p, p)
        B, _, *grid = x5.shape
        tokens = self.proj(x5).flatten(2).transpose(1, 2)  # (B, T, dim)
        tokens = self.block(tokens + self.pos)
        return tokens.transpose(1, 2).reshape(B, -1, *grid)


def region_fusion(in_ch, out_ch):
    """RFM: pre-norm convs with zero padding, 1x1x1 in -> out, 3x3x3, 1x1x1."""
    return nn.Sequential(PreNormConv(in_ch, out_ch, 1, padding_mode="zeros"),
                         PreNormConv(out_ch, out_ch, 3, padding_mode="zeros"),
                         PreNormConv(out_ch, out_ch, 1, padding_mode="zeros"))


def upsample(x, factor=2):
    return F.interpolate(x, scale_factor=factor, mode="trilinear", align_corners=True)


class DecoderLevel(nn.Module):
    """Upsample x2 and halve the channels, join the skip input, merge conv, 1x1x1 conv.

    merge_in: channels after joining (2 * out_ch, or out_ch when the level has no skip);
    rfm_in: channels of the skip input when it passes through an RFM first (fusion decoder).
    """

    def __init__(self, in_ch, out_ch, merge_in, rfm_in=None):
        super().__init__()
        self.up = PreNormConv(in_ch, out_ch)
        self.rfm = region_fusion(rfm_in, out_ch) if rfm_in else None
        self.merge = PreNormConv(merge_in, out_ch)
        self.out = PreNormConv(out_ch, out_ch, 1)

    def forward(self, x, skip=None, skip_first=True):
        x = self.up(upsample(x))
        if self.rfm is not None:
            skip = self.rfm(skip)
        if skip is not None:
            x = torch.cat([skip, x] if skip_first else [x, skip], dim=1)
        return self.out(self.merge(x))


class FusionDecoder(nn.Module):
    """Decoder of the fused features; skip_channels[l - 1] is the channel count of the level-l
    skip input (None: level without skip; only level 1 may lack one). Returns softmax
    probabilities, and with deep_supervision also the heads of levels 2-5 upsampled to P."""

    def __init__(self, widths, bottleneck_ch, skip_channels, num_classes):
        super().__init__()
        self.rfm5 = region_fusion(bottleneck_ch, widths[-1])
        self.levels = nn.ModuleList(
            DecoderLevel(widths[l + 1], widths[l], 2 * widths[l] if skip_channels[l] else widths[l],
                         skip_channels[l]) for l in range(len(widths) - 1))
        self.heads = nn.ModuleList(nn.Conv3d(w, num_classes, 1) for w in widths[1:])
        self.seg = nn.Conv3d(widths[0], num_classes, 1)

    def forward(self, skips, x5, deep_supervision=False):
        x = self.rfm5(x5)
        deep = [self.heads[-1](x).softmax(1)] if deep_supervision else []
        for l in reversed(range(len(self.levels))):
            x = self.levels[l](x, skips[l], skip_first=True)
            if deep_supervision and l > 0:
                deep.append(self.heads[l - 1](x).softmax(1))
        pred = self.seg(x).softmax(1)
        if not deep_supervision:
            return pred
        # heads of levels 5, 4, 3, 2 -> levels 2, 3, 4, 5, each upsampled to the input size
        deep = [upsample(d, 2 ** (len(deep) - i)) for i, d in enumerate(deep)][::-1]
        return pred, deep


class AuxDecoder(nn.Module):
    """Plain U-Net decoder on one modality's own x1 ... x5 (joins [upsampled, skip])."""

    def __init__(self, widths, num_classes):
        super().__init__()
        self.levels = nn.ModuleList(DecoderLevel(widths[l + 1], widths[l], 2 * widths[l])
                                    for l in range(len(widths) - 1))
        self.seg = nn.Conv3d(widths[0], num_classes, 1)

    def forward(self, features):
        x = features[-1]
        for l in reversed(range(len(self.levels))):
            x = self.levels[l](x, features[l], skip_first=False)
        return self.seg(x).softmax(1)


def mask_modalities(x, mask):
    """Zero the features of missing modalities: x (B, M, ...), mask (B, M) bool."""
    keep = mask.to(device=x.device, dtype=torch.bool).view(*mask.shape, *(1,) * (x.dim() - 2))
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))


class MultiEncoderNet(nn.Module):
    """Per-modality encoders and intra-modal transformers, a fusion decoder and the auxiliary
    decoder shared by the modalities. Subclasses build the fusion parts and define `fuse`.
    The model contract (models/base.py): window (P, P, P), softmax classes, SPEC section 4's
    recipe and loss.

    encode(x) -> features: [x1, x2, x3, x4, intra-modal x5], each (B, M, C_l, *grid_l);
    decode(features, mask) -> fused probabilities (B, K, P, P, P);
    forward(x, mask): eval mode the fused probabilities; train mode
    (fused, [M auxiliary predictions], [deep supervision of levels 2, 3, 4, 5]).
    """

    output_kind = "classes"
    # RAdam, lr 2e-4, weight decay 3e-5, poly per epoch over 1000 epochs, batch 1, one pass
    # over the cases per epoch, uniform subsets, rotation + intensity + flips
    recipe = Recipe()
    # CPU demos (engine/small.py): patch 32, widths 4-64, token dim 64; 600 iterations of 2 at lr 1e-2
    small_config = dict(patch_size=32, width=4, dim=64, heads=4, mlp_dim=128, dropout=0.0)
    small_recipe = dict(lr=1e-2, batch_size=2, num_epochs=60, iter_per_epoch=10)

    def __init__(self, num_classes, patch_size, num_modalities, width, dim, heads, mlp_dim,
                 dropout, skip_channels, bottleneck_ch, num_levels=5):
        super().__init__()
        factor = 2 ** (num_levels - 1)
        if patch_size <= 0 or patch_size % factor:
            raise ValueError(f"patch_size must be a positive multiple of {factor}, got {patch_size}")
        self.num_classes, self.patch_size, self.num_modalities = num_classes, patch_size, num_modalities
        self.widths = tuple(width * 2 ** l for l in range(num_levels))
        self.grid = patch_size // factor  # bottleneck grid side p
        self.dim, self.skip_channels = dim, skip_channels
        self.encoders = nn.ModuleList(Encoder(self.widths) for _ in range(num_modalities))
        self.intra = nn.ModuleList(IntraModal(self.widths[-1], dim, self.grid ** 3, heads, mlp_dim,
                                              dropout) for _ in range(num_modalities))
        self.decoder = FusionDecoder(self.widths, bottleneck_ch, skip_channels, num_classes)
        self.aux_decoder = AuxDecoder(self.widths, num_classes)

    @property
    def window(self):
        return (self.patch_size,) * 3

    def loss(self, outputs, batch):
        """Weighted cross-entropy + soft Dice of the fused, each auxiliary and each
        deep-supervision output, summed -> (total, {"fused", "aux", "deep"})."""
        fused, aux, deep = outputs
        label = batch["label"]
        parts = {"fused": segmentation_loss(fused, label),
                 "aux": sum(segmentation_loss(p, label) for p in aux),
                 "deep": sum(segmentation_loss(p, label) for p in deep)}
        return parts["fused"] + parts["aux"] + parts["deep"], parts

    def fuse(self, features):
        """Masked features (level 1 None when it has no skip) -> (skip inputs of levels 1-4 (None where a level has none),
        bottleneck map (B, bottleneck_ch, p, p, p))."""
        raise NotImplementedError

    def _encoder_features(self, x, skip=(), unused=()):
        """Per-modality encoder outputs stacked: 5 tensors (B, M, C_l, *grid_l). Modalities
        listed in `skip` are not run; their features are zeros. Levels (0-based) in `unused`
        are not stacked (None)."""
        run = [m for m in range(self.num_modalities) if m not in skip]
        if not run:
            raise ValueError("at least one modality must be present")
        entries = [self.encoders[m].levels[0].entry for m in run]
        if len(run) > 1 and cpu_kernels.applies(x, *(c.weight for c in entries), min_channels=1):
            grouped = self._grouped_entries(x, run, entries)
            outs = {m: self.encoders[m](entry, entered=True) for m, entry in zip(run, grouped)}
        else:
            outs = {m: self.encoders[m](x[:, m:m + 1]) for m in run}
        if skip:
            zeros = [torch.zeros_like(f) for f in outs[run[0]]]
            outs.update({m: zeros for m in skip})
        per_mod = [outs[m] for m in range(self.num_modalities)]
        return [None if l in unused else torch.stack(level, dim=1) for l, level in enumerate(zip(*per_mod))]

    @staticmethod
    def _grouped_entries(x, run, convs):
        """The outputs of the level-1 entry convs `convs` of the modalities `run`, as one
        grouped conv in channels-last memory: oneDNN has no fast path for one input channel,
        and on the CPU four such convs at once take a third of the time of four apart."""
        first = convs[0]
        weight, bias = torch.cat([c.weight for c in convs]), torch.cat([c.bias for c in convs])
        padded = F.pad(x[:, run], [first.padding[0]] * 6, mode=first.padding_mode)
        out = F.conv3d(padded.contiguous(memory_format=torch.channels_last_3d), weight, bias, groups=len(run))
        return out.split(first.out_channels, dim=1)

    def _intra(self, x5, skip=()):  # (B, M, C5, p, p, p) -> (B, M, dim, p, p, p)
        out = {m: self.intra[m](x5[:, m]) for m in range(self.num_modalities) if m not in skip}
        zeros = torch.zeros_like(next(iter(out.values())))
        return torch.stack([out.get(m, zeros) for m in range(self.num_modalities)], dim=1)

    def encode(self, x, mask=None):
        """x (B, M, P, P, P) in MODALITIES order -> [x1, x2, x3, x4, intra-modal x5], each
        (B, M, C, ...); x1 is None when level 1 has no skip connection (decode never reads it).
        With a mask, encoders of modalities absent in every sample are skipped (their features
        are zeros, as decode would make them)."""
        check_input(self, x, mask)
        skip = () if mask is None else [m for m in range(self.num_modalities) if not mask[:, m].any()]
        feats = self._encoder_features(x, skip, unused=() if self.skip_channels[0] else (0,))
        return feats[:-1] + [self._intra(feats[-1], skip)]

    def decode(self, features, mask, deep_supervision=False):
        """features from `encode`, mask (B, M) bool -> fused probabilities (B, K, P, P, P)
        (and the deep-supervision list with deep_supervision=True)."""
        # level 1 is masked only when it has a skip connection (None otherwise)
        masked = [mask_modalities(f, mask) if f is not None and (l or self.skip_channels[0]) else None
                  for l, f in enumerate(features)]
        skips, x5 = self.fuse(masked)
        return self.decoder(skips, x5, deep_supervision)

    def forward(self, x, mask):
        if not self.training:
            return self.decode(self.encode(x, mask), mask)
        check_input(self, x, mask)
        feats = self._encoder_features(x)
        aux = [self.aux_decoder([f[:, m] for f in feats]) for m in range(self.num_modalities)]
        fused, deep = self.decode(feats[:-1] + [self._intra(feats[-1])], mask, deep_supervision=True)
        return fused, aux, deep

    # --- correspondence with the original code's checkpoints (see models/reference.py) ---

    def reference_renames(self):
        """(our key prefix, original key prefix) pairs for the shared parts."""
        if self.num_modalities != len(CHECKPOINT_NAMES):
            raise ValueError("the original checkpoints hold exactly four modalities")
        pairs = []
        for i, name in enumerate(CHECKPOINT_NAMES):
            for l in range(len(self.widths)):
                enc, ref = f"encoders.{i}.levels.{l}.", f"{name}_encoder.e{l + 1}_"
                pairs += [(enc + "entry.", ref + "c1."), (enc + "body.0.", ref + "c2."),
                          (enc + "body.1.", ref + "c3.")]
            pairs += [(f"intra.{i}.proj.", f"{name}_encode_conv."), (f"intra.{i}.pos", f"{name}_pos")]
            pairs += block_renames(f"intra.{i}.block.", f"{name}_transformer.")
        for ours, ref in (("decoder.", "decoder_fuse."), ("aux_decoder.", "decoder_sep.")):
            for l in range(len(self.widths) - 1):
                lev, d = f"{ours}levels.{l}.", f"{ref}d{l + 1}_"
                pairs += [(lev + "up.", d + "c1."), (lev + "merge.", d + "c2."),
                          (lev + "out.", d + "out."), (lev + "rfm.", f"{ref}RFM{l + 1}.fusion_layer.")]
            pairs.append((f"{ours}seg.", f"{ref}seg_layer."))
        pairs.append(("decoder.rfm5.", "decoder_fuse.RFM5.fusion_layer."))
        pairs += [(f"decoder.heads.{k}.", f"decoder_fuse.seg_d{k + 1}.") for k in range(len(self.widths) - 1)]
        return pairs

    def reference_unused(self):
        """(original key prefix, function returning a fresh state for it) for each part the
        original builds but never uses."""
        return []

    def reference_droppable(self):
        """Original key prefixes dropped when loading (the unused parts)."""
        return [prefix for prefix, _ in self.reference_unused()]
