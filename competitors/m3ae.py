"""M3AE (Liu et al., "M3AE: Multimodal Representation Learning for Brain Tumor Segmentation
with Missing Modalities", AAAI 2023): one 3-D U-Net over the four modalities as input channels,
trained in two stages.

Stage "pretrain" is a multimodal masked autoencoder: per sample k of the modalities (k uniform
in 0..3) and all but a fixed number of the remaining 16^3 patches are hidden, hidden voxels
take the value of a learned full-size "substitute image" at their place in the native grid,
and the network reconstructs the whole 4-channel crop. Stage "finetune" starts from that
network (all but its head) and the frozen substitute image and trains segmentation: a missing
modality's channel is the substitute image at the window's native position, and two copies of
each crop with independent modality dropout are tied by the MSE of their coarsest outputs.

Axes are the project's (X, Y, Z), modalities in MODALITIES order; the original's arrays are
(Z, Y, X) with channels [T1, T1c, T2, FLAIR] and region rows [ET, TC, WT], converted when its
checkpoints are read or written. Shapes: B batch, M = 4 modalities, P the patch side, C the
base width, N = native_shape.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from models import register_model
from models.base import check_input
from utils.brats import DROP_COUNT_WEIGHTS, MODALITIES, REGIONS, SUBSETS
from utils.losses import region_targets
from utils.recipe import Recipe

# The original's channel order (T1, T1c, T2, FLAIR) as indices of MODALITIES.
ORIGINAL_ORDER = tuple(MODALITIES.index(m) for m in ("t1", "t1c", "t2", "flair"))
STAGES = ("pretrain", "finetune")


class BasicBlock(nn.Module):
    """Pre-activation residual block: x + conv(relu(gn(conv(relu(gn(x)))))), 3^3 convs with bias."""

    def __init__(self, channels, groups):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(groups, channels), nn.Conv3d(channels, channels, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(groups, channels), nn.Conv3d(channels, channels, 3, padding=1)

    def forward(self, x):
        y = self.conv1(F.relu(self.norm1(x)))
        return x + self.conv2(F.relu(self.norm2(y)))


class UNet(nn.Module):
    """The original's UNet3D_g: (B, 4, P, P, P) -> [logits (B, K, P, P, P)], with deep
    supervision (built with it and asked for) [head on the P/4 level upsampled x4, head on the
    P/2 level upsampled x2 (both trilinear, align_corners), final]. Widths C, 2C, 4C, 8C; 1, 2, 2, 4 blocks per level;
    strided 3^3 convs down; 1^3 conv, nearest x2 and an added skip up."""

    def __init__(self, width, outputs, deep_supervision, groups, blocks=(1, 2, 2, 4)):
        super().__init__()
        widths = [width * 2 ** i for i in range(len(blocks))]
        self.stem = nn.Conv3d(len(MODALITIES), width, 3, padding=1)
        self.levels = nn.ModuleList(nn.Sequential(*(BasicBlock(w, groups) for _ in range(n)))
                                    for w, n in zip(widths, blocks))
        self.downs = nn.ModuleList(nn.Conv3d(a, b, 3, stride=2, padding=1) for a, b in zip(widths, widths[1:]))
        self.reduces = nn.ModuleList(nn.Conv3d(b, a, 1) for a, b in zip(widths[-2::-1], widths[:0:-1]))
        self.ups = nn.ModuleList(BasicBlock(w, groups) for w in widths[-2::-1])
        self.head = nn.Conv3d(width, outputs, 1)
        # on the two coarser decoder levels (4C and 2C at the original's four levels)
        self.ds_heads = nn.ModuleList(nn.Conv3d(w, outputs, 1) for w in widths[-2:0:-1]) if deep_supervision else None

    def forward(self, x, deep_supervision=False):
        skips = []
        x = self.stem(x)
        for i, level in enumerate(self.levels):
            if i:
                x = self.downs[i - 1](x)
            x = level(x)
            skips.append(x)
        decoded = []
        for reduce, up, skip in zip(self.reduces, self.ups, skips[-2::-1]):
            x = up(F.interpolate(reduce(x), scale_factor=2, mode="nearest") + skip)
            decoded.append(x)
        out = [self.head(x)]
        if deep_supervision:
            out = [F.interpolate(head(d), scale_factor=2 ** (len(self.ds_heads) - i), mode="trilinear",
                                 align_corners=True) for i, (head, d) in enumerate(zip(self.ds_heads, decoded))] + out
        return out


def draw_present(batch, num_modalities, device, available=None):
    """(batch, M) bool: per sample k modalities dropped, k uniform in 0..M-1, then which ones
    uniformly (torch's random state). A sample whose `available` row (B, M) lacks modalities
    draws from the same law restricted to the subsets of those it has (renormalised), as the
    data pipeline draws the batch's mask."""
    present = torch.ones(batch, num_modalities, dtype=torch.bool)
    for b in range(batch):
        if available is not None and not bool(available[b].all()):
            have = available[b].cpu()
            allowed = [s for s in SUBSETS if not any(m and not h for m, h in zip(s, have.tolist()))]
            weights = torch.tensor([DROP_COUNT_WEIGHTS[SUBSETS.index(s)] for s in allowed])
            present[b] = torch.tensor(allowed[int(torch.multinomial(weights, 1))])
            continue
        k = int(torch.randint(num_modalities, ()))
        present[b, torch.randperm(num_modalities)[:k]] = False
    return present.to(device)


@register_model("m3ae")
class M3AE(nn.Module):
    """The contract of models/base.py with positions (uses_position). Stage "finetune" (output
    kind "regions"): eval, sigmoid probabilities of WT, TC, ET; train, {"logits": [deep-
    supervision logits, coarsest first, final], each (2B, 3, P, P, P): the batch's copy with
    its own mask, then a copy with a mask drawn here}. Stage "pretrain" (output kind "image"):
    eval, the 4-channel reconstruction of the window with absent modalities filled; train,
    {"reconstruction" (B, M, P, P, P), "deviation": the norm of the substitute image's
    deviation from its per-channel means}.

    native_shape: the (X, Y, Z) grid the substitute image covers (BraTS: 240 x 240 x 155);
    window positions beyond it (padding) read its border."""

    uses_position = True
    uses_available = True  # the second copy's mask and the masker keep to the modalities a case has
    # Adam lr 3e-4, cosine per epoch. Pre-training: no weight decay, the substitute image at lr
    # 5e-3, 600 epochs, batch 2, no augmentation. Fine-tuning: weight decay 1e-4 (L2), 300
    # epochs, batch 1 (two copies), subsets by the number of dropped modalities uniform 0-3,
    # intensity and flip augmentation.
    recipes = {"pretrain": Recipe(optimizer="adam", lr=3e-4, weight_decay=0.0, schedule="cosine", num_epochs=600,
                                  batch_size=2, augmentations=()),
               "finetune": Recipe(optimizer="adam", lr=3e-4, weight_decay=1e-4, schedule="cosine", num_epochs=300,
                                  subset_weights=DROP_COUNT_WEIGHTS, augmentations=("intensity", "flip"),
                                  val_every=(25, 50, 75, 100, 125, 150, 175, 200, 225, 250, 260, 270, 275, 280,
                                             285, 290, 295, 300))}  # the original's 18 validations

    # the demo cohort's native grid; two 16^3 mask patches per axis
    small_config = dict(patch_size=32, width=8, native_shape=(64, 64, 48))
    small_recipe = dict(lr=2e-3, batch_size=2, num_epochs=60, iter_per_epoch=10)
    small_pretraining = dict(config=dict(stage="pretrain"), recipe=dict(lr=2e-3, num_epochs=30, iter_per_epoch=10))

    def __init__(self, patch_size=128, width=16, stage="finetune", native_shape=(240, 240, 155), groups=8,
                 mask_patch=16, mask_ratio=0.875, limage_lr=5e-3, limage_weight=0.005, dice_weight=0.7,
                 bce_weight=0.3, distill_weight=0.1):
        super().__init__()
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {', '.join(STAGES)}, got {stage!r}")
        if patch_size % 8 or patch_size <= 0:
            raise ValueError(f"patch_size must be a positive multiple of 8, got {patch_size}")
        if width % groups:
            raise ValueError(f"width must be a multiple of groups ({groups}), got {width}")
        M = len(MODALITIES)
        self.patch_size, self.num_modalities, self.stage = patch_size, M, stage
        self.native_shape = tuple(native_shape)
        self.limage_lr, self.limage_weight = limage_lr, limage_weight
        self.dice_weight, self.bce_weight, self.distill_weight = dice_weight, bce_weight, distill_weight
        self.output_kind = "image" if stage == "pretrain" else "regions"
        self.recipe = self.recipes[stage]
        if stage == "pretrain":
            if patch_size % mask_patch:
                raise ValueError(f"patch_size must be a multiple of mask_patch ({mask_patch}), got {patch_size}")
            tokens = (patch_size // mask_patch) ** 3  # per modality
            self.mask_patch, self.visible = mask_patch, int((1 - mask_ratio) * M * tokens)
            if not 0 < self.visible <= tokens:  # k = 3 dropped modalities leave one modality's tokens
                raise ValueError(f"patch_size {patch_size} and mask_ratio {mask_ratio} leave {self.visible} of the "
                                 f"{M * tokens} {mask_patch}^3 patches visible; it must be 1 to {tokens} (one "
                                 "modality's)")
        self.unet = UNet(width, M if stage == "pretrain" else len(REGIONS), stage == "finetune", groups)
        # (1, M, *N): the substitute image, trained in pre-training only
        self.limage = nn.Parameter(torch.randn(1, M, *self.native_shape), requires_grad=stage == "pretrain")

    @property
    def window(self):
        return (self.patch_size,) * 3

    @property
    def pretraining_config(self):
        """The stage before's constructor arguments (--pretrained reads an original pre-training
        checkpoint with them)."""
        return {"stage": "pretrain"} if self.stage == "finetune" else None

    @property
    def pretrained_keys(self):
        """What a fresh run must take from a checkpoint of the stage before (--pretrained)."""
        return ("limage",) if self.stage == "finetune" else ()

    def optimizer_groups(self, recipe):
        """Parameter groups for the optimiser: the network at the recipe's lr; in pre-training
        the substitute image at limage_lr (in fine-tuning it is frozen)."""
        groups = [{"params": list(self.unet.parameters())}]
        if self.limage.requires_grad:
            groups.append({"params": [self.limage], "lr": self.limage_lr})
        return groups

    def substitute(self, grid):
        """(B, M, P, P, P): the substitute image at the windows of grid (B, 3, 2) (per axis the
        native index of the first voxel and the step), indices beyond the grid clamped."""
        steps = torch.arange(self.patch_size, device=grid.device)
        idx = [(grid[:, a, :1] + grid[:, a, 1:] * steps).clamp(0, n - 1) for a, n in enumerate(self.native_shape)]
        S = self.limage[0][:, idx[0][:, :, None, None], idx[1][:, None, :, None], idx[2][:, None, None, :]]
        return S.transpose(0, 1)  # (M, B, P, P, P) -> (B, M, P, P, P)

    def fill(self, x, keep, grid):
        """x where keep (B, M) or (B, M, P, P, P) is True, else the substitute image."""
        keep = keep.view(*keep.shape, *(1,) * (x.dim() - keep.dim()))
        return torch.where(keep, x, self.substitute(grid).to(x.dtype))

    def visible_patches(self, batch, device, available=None):
        """(B, M, P, P, P) bool, the pre-training mask: per sample k modalities dropped (k
        uniform in 0..3; among those `available` (B, M) says the case has), then `visible`
        16^3 patches of the others drawn uniformly."""
        M, n = self.num_modalities, self.patch_size // self.mask_patch
        tokens = torch.zeros(batch, M * n ** 3, dtype=torch.bool)
        for b, present in enumerate(draw_present(batch, M, "cpu", available)):
            candidates = torch.nonzero(present.repeat_interleave(n ** 3))[:, 0]
            tokens[b, candidates[torch.randperm(len(candidates))[:self.visible]]] = True
        tokens = tokens.view(batch, M, n, n, n)
        for axis in (2, 3, 4):
            tokens = tokens.repeat_interleave(self.mask_patch, axis)
        return tokens.to(device)

    def forward(self, x, mask, grid, available=None):
        """available (B, M): in training, the modalities each case has (default: all); the
        second copy's mask and the pre-training masker keep to them."""
        check_input(self, x, mask)
        mask, grid = mask.to(device=x.device, dtype=torch.bool), grid.to(x.device)
        if self.stage == "pretrain":
            if not self.training:
                return self.unet(self.fill(x, mask, grid))[-1]
            S = self.limage
            deviation = (S - S.mean((2, 3, 4), keepdim=True)).norm()
            filled = self.fill(x, self.visible_patches(x.shape[0], x.device, available), grid)
            return {"reconstruction": self.unet(filled)[-1], "deviation": deviation}
        if not self.training:
            return torch.sigmoid(self.unet(self.fill(x, mask, grid))[-1])
        masks = torch.cat([mask, draw_present(x.shape[0], self.num_modalities, x.device, available)])
        return {"logits": self.unet(self.fill(x.repeat(2, 1, 1, 1, 1), masks, grid.repeat(2, 1, 1)), True)}

    def loss(self, outputs, batch):
        """Pre-training: MSE of the reconstruction against the whole crop + limage_weight x the
        deviation norm -> (total, {"mse", "deviation"}). Fine-tuning: for each output, the mean
        over regions of dice_weight (1 - (2 sum(s t) + 1) / (sum s^2 + sum t^2 + 1)) + bce_weight
        BCE (s = sigmoid, sums and means over both copies of the batch), summed over the
        outputs, + distill_weight x the MSE between the copies' coarsest outputs -> (total,
        {"seg", "distill"})."""
        if self.stage == "pretrain":
            mse = F.mse_loss(outputs["reconstruction"], batch["image"].to(outputs["reconstruction"].dtype))
            return mse + self.limage_weight * outputs["deviation"], {"mse": mse, "deviation": outputs["deviation"]}
        logits = outputs["logits"]
        target = region_targets(batch["label"]).repeat(2, 1, 1, 1, 1).to(logits[-1].dtype)
        dims = (0, 2, 3, 4)
        seg = 0
        for z in logits:
            s = torch.sigmoid(z)
            dice = (2 * (s * target).sum(dims) + 1) / ((s * s).sum(dims) + (target * target).sum(dims) + 1)
            bce = F.binary_cross_entropy_with_logits(z, target, reduction="none").mean(dims)
            seg = seg + (self.dice_weight * (1 - dice) + self.bce_weight * bce).mean()
        first, second = logits[0].chunk(2)
        distill = F.mse_loss(first, second)
        return seg + self.distill_weight * distill, {"seg": seg, "distill": distill}

    # --- the original's checkpoints (models/reference.py): DataParallel(Unet_missing) ---

    def _blocks(self):
        """(our prefix, original prefix) of every BasicBlock."""
        names = [["conv1b"], ["conv2a", "conv2b"], ["conv3a", "conv3b"], ["conv4a", "conv4b", "conv4c", "conv4d"]]
        pairs = [(f"unet.levels.{i}.{j}.", f"unet.{name}.") for i, level in enumerate(names)
                 for j, name in enumerate(level)]
        return pairs + [(f"unet.ups.{i}.", f"unet.up{4 - i}convb.") for i in range(len(self.unet.ups))]

    def reference_renames(self):
        parts = [("norm1.", "gn1."), ("conv1.", "conv1."), ("norm2.", "gn2."), ("conv2.", "conv2.")]
        pairs = [(ours + a, ref + b) for ours, ref in self._blocks() for a, b in parts]
        pairs += [(f"unet.downs.{i}.", f"unet.ds{i + 1}.") for i in range(len(self.unet.downs))]
        pairs += [(f"unet.reduces.{i}.", f"unet.up{4 - i}conva.") for i in range(len(self.unet.reduces))]
        pairs += [("unet.stem.", "unet.conv1a."), ("unet.head.", "unet.up1conv."), ("unet.ds_heads.", "unet.ds_out."),
                  ("limage", "limage")]
        return pairs

    def reference_layout(self, state, to_reference):
        """Kernels and the substitute image (Z, Y, X) <-> (X, Y, Z); the stem's input channels
        and the substitute image's channels [T1, T1c, T2, FLAIR] <-> MODALITIES order; the
        heads' rows [ET, TC, WT] <-> [WT, TC, ET] (pre-training: the modalities, as the input)."""
        out = {k: v.permute(0, 1, 4, 3, 2).contiguous() if v.dim() == 5 else v for k, v in state.items()}
        channels = list(ORIGINAL_ORDER) if to_reference else torch.tensor(ORIGINAL_ORDER).argsort().tolist()
        for key in ("unet.conv1a.weight", "limage"):
            out[key] = out[key][:, channels].contiguous()
        rows = channels if self.stage == "pretrain" else [2, 1, 0]
        for key in [k for k in out if k.startswith(("unet.up1conv.", "unet.ds_out."))]:
            out[key] = out[key][rows].contiguous()
        return out

    @classmethod
    def reference_facts(cls, state):
        stem, head, limage = (state.get(k) for k in ("unet.conv1a.weight", "unet.up1conv.weight", "limage"))
        if stem is None or head is None or limage is None:
            return []
        stage = "pretrain" if head.shape[0] == len(MODALITIES) else "finetune"
        native = tuple(limage.shape[2:][::-1])
        return [f"M3AE with width={stem.shape[0]}, stage={stage!r}, native_shape={native}"]
