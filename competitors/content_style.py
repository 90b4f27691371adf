"""The content/style backbone of Robust-MSeg (Chen et al., MICCAI 2019), which SFusion (Liu et
al., MICCAI 2023) reuses: per-modality content encoders (four levels) and style encoders (an
8-d code), a fusion of the available modalities' content at every level (the one part the two
models define differently, `fuse`), a segmentation decoder on the fused content and, for
training only, one image decoder per modality that rebuilds that modality from the deepest
fused content and its own style code by adaptive instance normalisation.

The two originals differ in many small choices (paddings, norms, activations, upsampling,
the image decoder's normalisation); each model states its own through the factories it gives
the blocks below. Shapes: B batch, M modalities, C channels, P patch size; content level l
(1-4) has width * 2^(l-1) channels on a (P / 2^(l-1))^3 grid.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from models import cpu_kernels
from models.base import check_input
from models.blocks import mask_modalities
from utils.losses import segmentation_loss


class ConvUnit(nn.Module):
    """Conv3d (bias, 'same' padding unless given) -> element-wise dropout -> InstanceNorm (no
    affine; eps, or none when eps is None) -> activation (a module or None)."""

    def __init__(self, in_ch, out_ch, kernel_size=3, stride=1, padding=None, padding_mode="zeros",
                 dropout=0.0, eps=1e-5, act=None):
        super().__init__()
        self.conv = nn.Conv3d(in_ch, out_ch, kernel_size, stride,
                              kernel_size // 2 if padding is None else padding, padding_mode=padding_mode)
        self.dropout, self.eps, self.act = dropout, eps, act

    def forward(self, x):
        x = F.dropout(self.conv(x), self.dropout, self.training)
        slope = cpu_kernels.activation_slope(self.act)
        if self.eps is not None and slope is not None and cpu_kernels.applies(x):  # CPU inference: one pass
            return cpu_kernels.norm_act_pad(x, self.eps, slope)
        if self.eps is not None:
            x = F.instance_norm(x, eps=self.eps)
        return x if self.act is None else self.act(x)


class ContentEncoder(nn.Module):
    """(B, 1, P, P, P) -> [c1, c2, c3, c4]: per level an entry unit (stride 2 below level 1)
    u and u + unit(unit(u)), the first of those two with dropout where `dropout[l]` says."""

    def __init__(self, widths, unit, dropout):
        super().__init__()
        chans = (1,) + tuple(widths)
        self.levels = nn.ModuleList(nn.ModuleDict({
            "entry": unit(chans[l], chans[l + 1], stride=1 if l == 0 else 2),
            "body": nn.Sequential(unit(chans[l + 1], chans[l + 1], dropout=dropout[l]),
                                  unit(chans[l + 1], chans[l + 1]))}) for l in range(len(widths)))

    def forward(self, x):
        features = []
        for level in self.levels:
            x = level["entry"](x)
            x = x + level["body"](x)
            features.append(x)
        return features


class StyleEncoder(nn.Module):
    """(B, 1, P, P, P) -> style code (B, code, 1, 1, 1): a 7^3 unit, four stride-2 4^3 units
    (width, 2 width, 4 width, 4 width, 4 width channels), the spatial mean, a plain 1x1x1 conv."""

    def __init__(self, width, code, unit, down_padding):
        super().__init__()
        chans = (1, width, 2 * width, 4 * width, 4 * width, 4 * width)
        self.convs = nn.Sequential(unit(1, width, 7), *(unit(chans[i], chans[i + 1], 4, stride=2, padding=down_padding)
                                                        for i in range(1, 5)))
        self.head = nn.Conv3d(4 * width, code, 1)

    def forward(self, x):
        return self.head(self.convs(x).mean(dim=(2, 3, 4), keepdim=True))


class SegDecoder(nn.Module):
    """Fused content [f1, f2, f3, f4] -> class probabilities (B, K, P, P, P). Three stages from
    the bottom: upsample x2, unit to half the channels, join [that, skip], 3^3 unit, 1x1x1
    unit; then a plain 1x1x1 conv and softmax."""

    def __init__(self, widths, num_classes, unit, align_corners):
        super().__init__()
        self.align_corners = align_corners
        self.levels = nn.ModuleList(nn.ModuleDict({
            "up": unit(widths[l + 1], widths[l]), "merge": unit(2 * widths[l], widths[l]),
            "out": unit(widths[l], widths[l], 1)}) for l in reversed(range(len(widths) - 1)))
        self.seg = nn.Conv3d(widths[0], num_classes, 1)

    def forward(self, fused):
        x = fused[-1]
        for level, skip in zip(self.levels, reversed(fused[:-1])):
            x = F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=self.align_corners)
            x = level["merge"](torch.cat([level["up"](x), skip], dim=1))
            x = level["out"](x)
        return self.seg(x).softmax(1)


def adaptive_instance_norm(x, scale, shift, eps):
    """scale * (x - mean) / sqrt(var + eps) + shift, mean and unbiased variance per sample and
    channel over space; scale and shift (B, C, 1, 1, 1)."""
    mean = x.mean(dim=(2, 3, 4), keepdim=True)
    var = x.var(dim=(2, 3, 4), keepdim=True)
    return scale * (x - mean) / torch.sqrt(var + eps) + shift


class AdaptiveResBlock(nn.Module):
    """x + AdaIN(conv2(act(AdaIN(conv1(x)))))."""

    def __init__(self, channels, unit, act, eps):
        super().__init__()
        self.conv1, self.conv2 = unit(channels, channels), unit(channels, channels)
        self.act, self.eps = act, eps

    def forward(self, x, scale, shift):
        y = self.act(adaptive_instance_norm(self.conv1(x), scale, shift, self.eps))
        return x + adaptive_instance_norm(self.conv2(y), scale, shift, self.eps)


class ImageDecoder(nn.Module):
    """One modality's reconstruction from the deepest fused content (B, C, P/8, ...) and its
    style code: an MLP gives the AdaIN scale ("mu") and shift ("sigma") vectors (B, C, 1, 1, 1);
    four adaptive residual blocks; three stages of upsampling x2, a 5^3 unit halving the
    channels, a norm (`norm(level, channels)`, level 1-3) and the activation; a 7^3 unit to one
    channel. Returns (reconstruction (B, 1, P, P, P), mu, sigma)."""

    def __init__(self, channels, code, units, act, norm, eps, align_corners):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(code, channels), act, nn.Linear(channels, channels), act)
        self.mu, self.sigma = nn.Linear(channels, channels), nn.Linear(channels, channels)
        self.res = nn.ModuleList(AdaptiveResBlock(channels, units["res"], act, eps) for _ in range(4))
        chans = [channels // 2 ** i for i in range(4)]
        self.up = nn.ModuleList(nn.ModuleDict({"conv": units["up"](chans[i], chans[i + 1], 5),
                                               "norm": norm(i + 1, chans[i + 1])}) for i in range(3))
        self.final = units["final"](chans[-1], 1, 7)
        self.act, self.align_corners = act, align_corners

    def forward(self, content, style):
        h = self.mlp(style.flatten(1))
        mu, sigma = (head(h)[..., None, None, None] for head in (self.mu, self.sigma))
        x = content
        for block in self.res:
            x = block(x, mu, sigma)
        for stage in self.up:
            x = F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=self.align_corners)
            x = self.act(stage["norm"](stage["conv"](x)))
        return self.final(x), mu, sigma


def kl_term(mu, sigma):
    """Mean over samples and channels of 0.5 (mu^2 + sigma^2 - 1 - log sigma^2), with log sigma^2
    clamped to [-50, 50] (the originals' regulariser of the AdaIN scale and shift)."""
    log_var = torch.log(sigma ** 2).clamp(-50, 50)
    return (0.5 * (mu ** 2 + log_var.exp() - 1 - log_var)).mean()


class ContentStyleNet(nn.Module):
    """The shared skeleton. A subclass builds content_encoders, style_encoders,
    image_decoders (one per modality) and decoder, and defines `fuse(contents, mask)`: contents[m] the four content maps of modality m (None for a
    modality absent in every sample of an evaluation batch) -> four fused maps.

    forward(x, mask): eval mode class probabilities (B, 4, P, P, P) (= decode(encode(x,
    mask), mask)); train mode {"seg" probabilities, "recon" (B, M, P, P, P), "mu" and "sigma"
    (B, M, C)}.
    """

    output_kind = "classes"

    def __init__(self, num_classes, patch_size, num_modalities, width, rec_weight, kl_weight):
        super().__init__()
        if patch_size < 16 or patch_size % 8:
            raise ValueError(f"patch_size must be a multiple of 8 and at least 16, got {patch_size}")
        self.num_classes, self.patch_size, self.num_modalities = num_classes, patch_size, num_modalities
        self.widths = tuple(width * 2 ** l for l in range(4))
        self.rec_weight, self.kl_weight = rec_weight, kl_weight

    @property
    def window(self):
        return (self.patch_size,) * 3

    def encode(self, x, mask):
        """x (B, M, P, P, P) -> the content maps of each modality present in some sample of
        `mask` (None for the others); they do not depend on the mask, so evaluation encodes a
        window once for all subsets."""
        check_input(self, x, mask)
        run = mask.any(0).tolist()
        return [enc(x[:, m:m + 1]) if run[m] else None for m, enc in enumerate(self.content_encoders)]

    def decode(self, contents, mask):
        """Contents from `encode`, mask (B, M) -> class probabilities (B, K, P, P, P); the
        modalities `mask` marks absent do not count."""
        device = next(c[0].device for c in contents if c is not None)
        return self.decoder(self.fuse(contents, mask.to(device=device, dtype=torch.bool)))

    def forward(self, x, mask):
        if not self.training:
            return self.decode(self.encode(x, mask), mask)
        check_input(self, x, mask)
        mask = mask.to(device=x.device, dtype=torch.bool)
        contents = [enc(x[:, m:m + 1]) for m, enc in enumerate(self.content_encoders)]
        fused = self.fuse(contents, mask)
        recon, mu, sigma = zip(*(dec(fused[-1], enc(x[:, m:m + 1])) for m, (enc, dec)
                                 in enumerate(zip(self.style_encoders, self.image_decoders))))
        return {"seg": self.decoder(fused), "recon": torch.cat(recon, dim=1),
                "mu": torch.stack(mu, dim=1).flatten(2), "sigma": torch.stack(sigma, dim=1).flatten(2)}

    def loss(self, outputs, batch):
        """Weighted cross-entropy + soft Dice of the segmentation, + rec_weight x the sum over
        the modalities (present or not) of the mean |image - reconstruction|, + kl_weight x
        the sum over the modalities of kl_term(mu, sigma) -> (total, {"seg", "rec", "kl"})."""
        image = batch["image"]
        parts = {"seg": segmentation_loss(outputs["seg"], batch["label"]),
                 "rec": (image - outputs["recon"]).abs().mean(dim=(0, 2, 3, 4)).sum(),
                 "kl": sum(kl_term(outputs["mu"][:, m], outputs["sigma"][:, m]) for m in range(image.shape[1]))}
        return parts["seg"] + self.rec_weight * parts["rec"] + self.kl_weight * parts["kl"], parts


def masked_contents(contents, mask, level):
    """(B, M, C, ...) content of `level` with the absent modalities' maps zero."""
    present = next(c[level] for c in contents if c is not None)
    maps = [c[level] if c is not None else torch.zeros_like(present) for c in contents]
    return mask_modalities(torch.stack(maps, dim=1), mask)
