"""SFusion (Liu, Wei, Li, Zhou, "SFusion: Self-attention based N-to-One Multimodal Fusion
Block", MICCAI 2023) on the Robust-MSeg backbone (competitors/content_style.py), as the IM-Fuse
authors ran it ("TF_RMBTS"). At every level the content maps of the available modalities, and
only those, are pooled to a token grid, passed together through a transformer, turned back
into one full-resolution weight map each and softmax-normalised across the modalities; the
fused map is the weighted sum of the content maps. An absent modality is left out.

The original lists the available modalities in the order T1c, T1, T2, FLAIR (which decides
their positional slots); the model takes masks in the project's order and keeps that order
internally. Differences from the original on purpose (README): every sample of a batch uses
its own mask (the original applies the first sample's to all), the style encoders do not run
at inference, and the data pipeline's fixes apply (data/augment.py).
"""
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import register_model
from utils.brats import MODALITIES
from utils.recipe import Recipe

from .content_style import ContentEncoder, ContentStyleNet, ConvUnit, ImageDecoder, SegDecoder, StyleEncoder

# The original's fusion order (indices into MODALITIES) and its per-modality attribute suffixes
FUSION_ORDER = tuple(MODALITIES.index(m) for m in ("t1c", "t1", "t2", "flair"))
CHECKPOINT_SUFFIXES = dict(zip(("flair", "t1c", "t1", "t2"), ("flair", "t1ce_", "t1___", "t2___")))


def positional_encoding(length, dim):
    """(length, dim) sinusoidal table: angle pos / (10000^(2 floor(j / 2) / dim) + 1e-8), sine
    at even j and cosine at odd j (computed in float64)."""
    pos = torch.arange(length, dtype=torch.float64)[:, None]
    j = torch.arange(dim, dtype=torch.float64)
    angle = pos / (10000.0 ** (2 * (j // 2) / dim) + 1e-8)
    return torch.where(j % 2 == 0, angle.sin(), angle.cos()).float()


def depth_to_space(x, scale):
    """(B, s^3 C, g, g, g) -> (B, C, g s, g s, g s): channel ((a s + b) s + c) C + ch goes to
    voxel (i s + a, j s + b, k s + c) of channel ch (the channel index varies fastest)."""
    B, _, g, _, _ = x.shape
    C = x.shape[1] // scale ** 3
    x = x.view(B, scale, scale, scale, C, g, g, g).permute(0, 4, 5, 1, 6, 2, 7, 3)
    return x.reshape(B, C, g * scale, g * scale, g * scale)


class SFusionBlock(nn.Module):
    """N content maps (B, C, V, V, V) -> one: tokens from a g^3 average pool of each map, the N
    g^3 tokens + positional encoding through `depth` post-norm transformer layers (`heads`
    heads, FFN 4C, ReLU; its layers start identical), per modality a 1x1x1 conv to C s^3
    channels (s = V / g) and depth-to-space to a (B, C, V, V, V) weight map, softmax across the
    modalities, weighted sum of the maps."""

    def __init__(self, channels, volume, token_grid=8, heads=4, depth=8, dropout=0.1):
        super().__init__()
        if volume % token_grid:
            raise ValueError(f"a fusion over {volume}^3 maps needs a token grid dividing {volume}, got {token_grid}")
        self.grid, self.scale = token_grid, volume // token_grid
        layer = nn.TransformerEncoderLayer(channels, heads, 4 * channels, dropout, batch_first=True)
        self.transformer = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.dropout = nn.Dropout(dropout)
        self.upsample = nn.Conv3d(channels, channels * self.scale ** 3, 1, bias=False)

    def forward(self, maps):
        B, C = maps[0].shape[:2]
        g = self.grid
        # (B, N g^3, C): each map's g^3 grid in C order, the modalities one after the other
        tokens = torch.cat([F.adaptive_avg_pool3d(m, g).flatten(2).transpose(1, 2) for m in maps], dim=1)
        pos = positional_encoding(tokens.shape[1], C).to(tokens)
        tokens = self.transformer(self.dropout(tokens + pos))
        logits = [depth_to_space(self.upsample(t.transpose(1, 2).reshape(B, C, g, g, g)), self.scale)
                  for t in tokens.split(g ** 3, dim=1)]
        weights = torch.stack(logits).softmax(0)  # (N, B, C, V, V, V)
        return (weights * torch.stack(maps)).sum(0)


@register_model("sfusion")
class SFusion(ContentStyleNet):
    """SFusion; 41,353,400 parameters at patch_size=128, of which 10,532,372 (content
    encoders, fusion blocks, segmentation decoder) produce the segmentation. The fusion
    blocks' upsampling convs follow patch_size / token_grid."""

    # Adam (amsgrad), lr 1e-4, L2 1e-4, poly per epoch over 200 epochs, batch 1, uniform subsets,
    # rotation + flips (no intensity augmentation)
    recipe = Recipe(optimizer="adam", optimizer_args={"amsgrad": True}, lr=1e-4, weight_decay=1e-4,
                    num_epochs=200, augmentations=("rotation", "flip"),
                    val_every=(10, 15, 20, 25, 30, 40, 50, 60, 70, 75, 80, 90, 110, 130, 150, 175, 200))  # 17
    # an absent modality's content encoder gets no gradient (Adam then leaves it unchanged)
    unused_parameters = True

    # CPU demos (engine/small.py), without dropout. Width 8: at width 4 the weighted-sum fusion
    # leaves 4 channels per level for all four modalities and the output stayed flat inside the
    # tumour (make compare TC = ET = 0); at 8 one- and two-thread runs gave full-modality TC 0.92
    small_config = dict(patch_size=32, width=8, style_width=4, token_grid=2, heads=2, depth=2, dropout=0.0,
                        attn_dropout=0.0)
    # lr 2e-3 without the L2 term: with it (1e-4, added to the gradient that Adam then
    # normalises) weights whose true gradient is small shrink by up to lr per step, the fusion's
    # weight maps decay to uniform, and the sub-regions appear, then vanish (TC 0.25 at epoch 30,
    # 0 from epoch 40 on); at lr 1e-2 they never appear (all at width 4: docs/models/sfusion.md)
    small_recipe = dict(lr=2e-3, weight_decay=0.0, batch_size=2, num_epochs=60, iter_per_epoch=10)

    def __init__(self, num_classes=4, patch_size=128, width=16, style_width=32, style_dim=8, dropout=0.3,
                 token_grid=8, heads=4, depth=8, attn_dropout=0.1, rec_weight=0.1, kl_weight=0.1):
        M = len(MODALITIES)
        super().__init__(num_classes, patch_size, M, width, rec_weight, kl_weight)
        W = self.widths
        act = nn.LeakyReLU(0.01)
        # conv -> dropout -> InstanceNorm (eps 1e-5) -> LeakyReLU(0.01), zero padding
        gconv = partial(ConvUnit, eps=1e-5, act=act)
        self.style_encoders = nn.ModuleList(StyleEncoder(style_width, style_dim, gconv, 2) for _ in range(M))
        self.content_encoders = nn.ModuleList(ContentEncoder(W, gconv, (dropout,) * 4) for _ in range(M))
        self.fusions = nn.ModuleList(SFusionBlock(w, patch_size >> l, token_grid, heads, depth, attn_dropout)
                                     for l, w in enumerate(W))
        self.decoder = SegDecoder(W, num_classes, gconv, align_corners=False)
        norm = lambda level, channels: nn.InstanceNorm3d(channels)  # noqa: E731
        units = {"res": gconv, "up": gconv, "final": gconv}
        self.image_decoders = nn.ModuleList(ImageDecoder(W[-1], style_dim, units, act, norm, 0.0, False)
                                            for _ in range(M))

    def fuse(self, contents, mask):
        """Each group of samples with the same mask fused over its available modalities in
        FUSION_ORDER; with one modality (at inference) the content passes unchanged, as the
        block's softmax over one map would give it."""
        groups = {}
        for b, row in enumerate(mask.tolist()):
            groups.setdefault(tuple(row), []).append(b)
        per_group = []
        for row, samples in groups.items():
            index = None if len(groups) == 1 else torch.tensor(samples, device=mask.device)
            present = [m for m in FUSION_ORDER if row[m]]
            fused = []
            for l, block in enumerate(self.fusions):
                maps = [contents[m][l] if index is None else contents[m][l].index_select(0, index) for m in present]
                fused.append(block(maps) if len(maps) > 1 or self.training else maps[0])
            per_group.append(fused)
        if len(groups) == 1:
            return per_group[0]
        order = torch.tensor([b for samples in groups.values() for b in samples], device=mask.device).argsort()
        return [torch.cat([fused[l] for fused in per_group]).index_select(0, order) for l in range(len(self.fusions))]

    # --- the original's checkpoints (models/reference.py): SFusion.py / layers_sfusion.py names ---

    def reference_renames(self):
        pairs = []
        for m, name in enumerate(MODALITIES):
            sfx = CHECKPOINT_SUFFIXES[name]
            se, ce, de = f"style_encoders.{m}.", f"content_encoders.{m}.levels.", f"image_decoders.{m}."
            rse, rce, rde = f"style_encoder_{sfx}.", f"content_encoder_{sfx}.", f"image_decoder_{sfx}."
            pairs += [(f"{se}convs.{i}.conv.", f"{rse}unit.{i}.unit.0.") for i in range(5)]
            pairs.append((f"{se}head.", f"{rse}unit2.unit.0."))
            for l in range(4):
                pairs += [(f"{ce}{l}.entry.conv.", f"{rce}unit{l + 1}_0.unit.0.")]
                pairs += [(f"{ce}{l}.body.{i}.conv.", f"{rce}unit{l + 1}.{i}.unit.0.") for i in range(2)]
            pairs += [(f"{de}mlp.0.", f"{rde}mlp.unit.0.unit.1."), (f"{de}mlp.2.", f"{rde}mlp.unit.2.unit.1."),
                      (f"{de}mu.", f"{rde}mlp.get_mu.unit.1."), (f"{de}sigma.", f"{rde}mlp.get_sigma.unit.1."),
                      (f"{de}final.conv.", f"{rde}conv_final.unit.0.")]
            for i in range(4):
                pairs += [(f"{de}res.{i}.conv{j}.conv.", f"{rde}ar{i + 1}.conv{j}.unit.0.") for j in (1, 2)]
            pairs += [(f"{de}up.{i}.conv.conv.", f"{rde}features.convblock{i + 1}.unit.0.") for i in range(3)]
        for l in range(4):
            pairs += [(f"fusions.{l}.transformer.", f"fusion{l + 1}.fusion_block."),
                      (f"fusions.{l}.upsample.", f"fusion{l + 1}.upsample.conv_3d.")]
        for k in range(3):
            for ours, ref in (("up", 1), ("merge", 2), ("out", 3)):
                pairs.append((f"decoder.levels.{k}.{ours}.conv.",
                              f"mask_decoder.features.convblock{ref}{k + 1}.unit.0."))
        pairs.append(("decoder.seg.", "mask_decoder.conv_seg.unit.0."))
        return pairs

    @classmethod
    def reference_facts(cls, state):
        up = state.get("fusion1.upsample.conv_3d.weight")
        if up is None or up.dim() != 5:
            return []
        scale = round((up.shape[0] / up.shape[1]) ** (1 / 3))
        return ["SFusion", f"patch_size / token_grid = {scale} (the original's token_grid is 8)"]
