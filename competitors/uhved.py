"""U-HVED (Dorent, Joutard, Modat, Ourselin, Vercauteren, "Hetero-Modal Variational
Encoder-Decoder for Joint Modality Completion and Segmentation", MICCAI 2019), as the PyTorch
port of the IM-Fuse authors defines it. Each modality's encoder gives a diagonal Gaussian
(mean and log-variance maps) at four scales; at every scale the Gaussians of the available
modalities and a standard normal prior are multiplied (precision-weighted mean), so an absent
modality is simply left out. A sample of the product (its mean at inference) feeds a
segmentation decoder and, in training, four image decoders that rebuild every modality.

Differences from the original on purpose (README): each modality's Gaussian is gated by its
own mask column (the original gates T1, T1c, T2, FLAIR with the columns of FLAIR, T1c, T1, T2,
which mislabels its per-subset test rows), and evaluation averages probabilities, not logits.
Shapes: B batch, M modalities, P patch size; level l (1-4) has width * 2^(l-1) encoder
channels, half of them the mean and half the log-variance, on a (P / 2^(l-1))^3 grid.
"""
import itertools

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from models import register_model
from models.base import check_input
from utils.brats import CHECKPOINT_NAMES, MODALITIES
from utils.losses import one_hot, soft_dice_loss
from utils.recipe import Recipe

from .layers import norm_leaky

# the original's attribute names of the image decoders, in MODALITIES order
DECODER_NAMES = ("flair", "t1c", "t1", "t2")


class NormConv(nn.Module):
    """InstanceNorm (affine, eps 1e-6) -> LeakyReLU(0.01) -> 3^3 conv, zero padding, no bias."""

    def __init__(self, in_ch, out_ch):
        super().__init__()
        self.norm = nn.InstanceNorm3d(in_ch, eps=1e-6, affine=True)
        self.conv = nn.Conv3d(in_ch, out_ch, 3, padding=1, bias=False)

    def forward(self, x):
        return self.conv(norm_leaky(x, self.norm, 0.01))


class GaussianEncoder(nn.Module):
    """(B, 1, P, P, P) -> [(mean, log-variance) per level]: a 1x1x1 conv (no bias) and
    LeakyReLU, then four blocks of two NormConvs with 2x2x2 max-pooling between them; the
    first half of a block's channels is the mean, the rest the log-variance clamped to [-50, 50]."""

    def __init__(self, widths):
        super().__init__()
        self.stem = nn.Conv3d(1, widths[0], 1, bias=False)
        chans = (widths[0],) + tuple(widths)
        self.blocks = nn.ModuleList(nn.Sequential(NormConv(chans[l], chans[l + 1]), NormConv(chans[l + 1], chans[l + 1]))
                                    for l in range(len(widths)))

    def forward(self, x):
        x = F.leaky_relu(self.stem(x), 0.01)
        gaussians = []
        for l, block in enumerate(self.blocks):
            if l:
                x = F.max_pool3d(x, 2)
            x = block(x)
            mean, logvar = x.chunk(2, dim=1)
            gaussians.append((mean, logvar.clamp(-50, 50)))
        return gaussians


class LatentDecoder(nn.Module):
    """Latent maps z_1..z_4 (width/2 * 2^(l-1) channels) -> (B, out_ch, P, P, P) linear
    output: three stages of trilinear x2 upsampling (align_corners=True), [upsampled, z_l]
    joined, two NormConvs; then a 1x1x1 conv without bias."""

    def __init__(self, widths, out_ch):
        super().__init__()
        latent = [w // 2 for w in widths]
        self.levels = nn.ModuleList(
            nn.Sequential(NormConv(latent[l + 1] + latent[l], widths[l]), NormConv(widths[l], latent[l]))
            for l in reversed(range(len(widths) - 1)))
        self.out = nn.Conv3d(latent[0], out_ch, 1, bias=False)

    def forward(self, z):
        x = z[-1]
        for level, skip in zip(self.levels, reversed(z[:-1])):
            x = F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=True)
            x = level(torch.cat([x, skip], dim=1))
        return self.out(x)


def product_of_gaussians(mean, logvar, mask, eps=1e-7):
    """Product of the Gaussians of the present experts and N(0, 1), element-wise.
    mean, logvar (B, M, ...); mask (B, M) or (M,) bool -> (mean, log-variance) (B, ...):
    precisions T_m = 1 / (exp(logvar_m) + eps), mean = sum T_m mean_m / (1 + sum T_m),
    variance = 1 / (1 + sum T_m), log-variance = log(variance + eps)."""
    mask = mask.expand(mean.shape[:2]) if mask.dim() == 1 else mask
    keep = mask.view(*mask.shape, *(1,) * (mean.dim() - 2))
    precision = torch.where(keep, 1 / (logvar.exp() + eps), torch.zeros((), dtype=mean.dtype, device=mean.device))
    total = 1 + precision.sum(1)
    return (precision * mean).sum(1) / total, torch.log(1 / total + eps)


def gaussian_kl(mean_a, logvar_a, mean_b, logvar_b):
    """The original's divergence of a from b: 0.5 mean(-1 + logvar_b - logvar_a +
    (var_a + (mean_a - mean_b)^2) / (var_b + 0.01)) over all elements."""
    return 0.5 * (-1 + logvar_b - logvar_a + (logvar_a.exp() + (mean_a - mean_b) ** 2) / (logvar_b.exp() + 1e-2)).mean()


@register_model("uhved")
class UHVED(nn.Module):
    """U-HVED; 1,250,552 parameters, of which 959,112 (the encoders and the segmentation
    decoder) produce the segmentation. Fully convolutional: patch_size (a multiple of 8) only
    sets the window.

    encode(x, mask) -> [(mean, log-variance) (B, M, C_l, ...) per level];
    decode(gaussians, mask) -> class probabilities (B, 4, P, P, P) from the product's mean;
    forward(x, mask): eval mode decode(encode(x, mask), mask); train mode {"seg"
    probabilities, "recon" (B, M, P, P, P), "gaussians"} from one sample of the product per
    level shared by the five decoders.
    """

    output_kind = "classes"
    # Adam (amsgrad), lr 1e-3, L2 1e-5, reduce-on-plateau (torch's defaults) on the validation
    # Dice, 400 epochs, batch 1, uniform subsets, rotation + intensity + flips
    recipe = Recipe(optimizer="adam", optimizer_args={"amsgrad": True}, lr=1e-3, weight_decay=1e-5,
                    schedule="plateau", num_epochs=400,
                    # the original's 41 validations (the plateau schedule steps at each)
                    val_every=(5, 10, 15, 20, 30, 35, 40, 45, 50, 55, 60, 65, 70, 75, 90, 100, 110, 125, 150, 175,
                               200, 225, 250, 260, 270, 275, 280, 285, 290, 295, 300, 310, 320, 330, 340, 350,
                               360, 370, 380, 390, 400))

    small_config = dict(patch_size=32)  # CPU demos (engine/small.py)
    small_recipe = dict(lr=5e-3, batch_size=2, num_epochs=40, iter_per_epoch=10)

    def __init__(self, num_classes=4, patch_size=112, width=8, rec_weight=0.1, kl_weight=0.1):
        super().__init__()
        if patch_size < 8 or patch_size % 8:
            raise ValueError(f"patch_size must be a positive multiple of 8, got {patch_size}")
        M = len(MODALITIES)
        self.num_classes, self.patch_size, self.num_modalities = num_classes, patch_size, M
        self.rec_weight, self.kl_weight = rec_weight, kl_weight
        widths = tuple(width * 2 ** l for l in range(4))
        self.encoders = nn.ModuleList(GaussianEncoder(widths) for _ in range(M))
        self.image_decoders = nn.ModuleList(LatentDecoder(widths, 1) for _ in range(M))
        self.seg_decoder = LatentDecoder(widths, num_classes)
        with torch.no_grad():  # the original's: weights truncated N(0, 2 / prod(shape[:-1])) in [-2, 2], biases 0
            for name, p in self.named_parameters():
                if name.endswith("weight"):
                    nn.init.trunc_normal_(p, std=float(np.sqrt(2.0 / np.prod(p.shape[:-1]))))
                else:
                    nn.init.zeros_(p)

    @property
    def window(self):
        return (self.patch_size,) * 3

    def encode(self, x, mask=None):
        """Gaussians of every modality per level, stacked over the modalities; with a mask the
        encoders of modalities absent from every sample are skipped (zeros in their place)."""
        check_input(self, x, mask)
        run = [True] * self.num_modalities if mask is None else mask.any(0).tolist()
        per_modality = [enc(x[:, m:m + 1]) if run[m] else None for m, enc in enumerate(self.encoders)]
        template = next(g for g in per_modality if g is not None)
        per_modality = [g if g is not None else [(torch.zeros_like(a), torch.zeros_like(b)) for a, b in template]
                        for g in per_modality]
        return [tuple(torch.stack(part, dim=1) for part in zip(*level)) for level in zip(*per_modality)]

    def decode(self, gaussians, mask):
        mask = mask.to(device=gaussians[0][0].device, dtype=torch.bool)
        return self.seg_decoder([product_of_gaussians(mean, logvar, mask)[0] for mean, logvar in gaussians]).softmax(1)

    def forward(self, x, mask):
        if not self.training:
            return self.decode(self.encode(x, mask), mask)
        check_input(self, x, mask)
        mask = mask.to(device=x.device, dtype=torch.bool)
        gaussians = self.encode(x)
        z = []
        for mean, logvar in gaussians:
            post_mean, post_logvar = product_of_gaussians(mean, logvar, mask)
            z.append(post_mean + torch.exp(0.5 * post_logvar) * torch.randn_like(post_mean))
        return {"seg": self.seg_decoder(z).softmax(1), "recon": torch.cat([dec(z) for dec in self.image_decoders], 1),
                "gaussians": gaussians}

    def kl(self, gaussians, mask):
        """Mean over the levels of the mean over the 15 subsets S of D(available || S) +
        D(S || N(0, 1)), products taken with eps 1e-5 (as the original's loss does)."""
        subsets = [torch.tensor([m in s for m in range(self.num_modalities)], device=mask.device)
                   for k in range(1, self.num_modalities + 1)
                   for s in itertools.combinations(range(self.num_modalities), k)]
        total = 0
        for mean, logvar in gaussians:
            full = product_of_gaussians(mean, logvar, mask, eps=1e-5)
            zero = torch.zeros_like(full[0])
            for subset in subsets:
                sub = product_of_gaussians(mean, logvar, subset, eps=1e-5)
                total = total + (gaussian_kl(*full, *sub) + gaussian_kl(*sub, zero, zero)) / len(subsets)
        return total / len(gaussians)

    def loss(self, outputs, batch):
        """Cross-entropy (unweighted, probabilities clamped to [0.005, 1]) + soft Dice +
        kl_weight x `kl` + rec_weight x the mean squared error of the reconstructions of all
        four modalities -> (total, {"ce", "dice", "kl", "rec"})."""
        target = one_hot(batch["label"], outputs["seg"].shape[1])
        parts = {"ce": -(target * outputs["seg"].clamp(0.005, 1).log()).sum(1).mean(),
                 "dice": soft_dice_loss(outputs["seg"], target),
                 "kl": self.kl(outputs["gaussians"], batch["mask"].to(torch.bool)),
                 "rec": ((outputs["recon"] - batch["image"]) ** 2).mean()}
        return parts["ce"] + parts["dice"] + self.kl_weight * parts["kl"] + self.rec_weight * parts["rec"], parts

    # --- the original's checkpoints (models/reference.py): UHVED.py attribute names ---

    def reference_renames(self):
        pairs = []
        for m in range(self.num_modalities):
            enc = f"{CHECKPOINT_NAMES[m]}_encoder."
            pairs.append((f"encoders.{m}.stem.", enc + "conv1."))
            pairs += [(f"encoders.{m}.blocks.{l}.{i}.", f"{enc}e{l + 1}_c{i + 1}.") for l in range(4) for i in range(2)]
        decoders = [(f"image_decoders.{m}.", f"{DECODER_NAMES[m]}_decoder.") for m in range(self.num_modalities)]
        for ours, ref in decoders + [("seg_decoder.", "seg_decoder.")]:
            pairs += [(f"{ours}levels.{k}.{i}.", f"{ref}d{k + 1}_c{i + 1}.") for k in range(3) for i in range(2)]
            pairs.append((ours + "out.", ref + "conv_out."))
        return pairs

    @classmethod
    def reference_facts(cls, state):
        return ["U-HVED"] if "t1ce_encoder.e1_c1.conv.weight" in state else []
