"""Robust-MSeg (Chen, Dou, Jin, Qin, Heng, "Robust Multimodal Brain Tumor Segmentation via
Feature Disentanglement and Gated Fusion", MICCAI 2019), as the PyTorch port of the IM-Fuse
authors defines it: the content/style backbone (competitors/content_style.py) with a gated
fusion at every level. The content maps of absent modalities are zeroed, a 3^3 conv over the
four maps gives one sigmoid gate per modality and voxel, and a 1x1x1 conv merges the gated maps.

Differences from the original on purpose (README): dropout follows train/eval mode (the
original keeps it on at test time), and the data pipeline's fixes apply (data/augment.py).
"""
from functools import partial

import torch
import torch.nn as nn

from models import register_model
from utils.brats import MODALITIES
from utils.recipe import Recipe

from .content_style import (ContentEncoder, ContentStyleNet, ConvUnit, ImageDecoder, SegDecoder, StyleEncoder,
                            masked_contents)


@register_model("robustseg")
class RobustSeg(ContentStyleNet):
    """Robust-MSeg; 42,136,376 parameters at patch_size=80, of which 6,643,348 (content
    encoders, gates, merges, segmentation decoder) produce the segmentation. The image
    decoders' LayerNorms have one weight per voxel, so their shapes follow patch_size."""

    # Adam (amsgrad), lr 1e-4, L2 1e-4, poly per epoch over 300 epochs, batch 1, uniform subsets,
    # rotation + intensity + flips
    recipe = Recipe(optimizer="adam", optimizer_args={"amsgrad": True}, lr=1e-4, weight_decay=1e-4,
                    num_epochs=300,
                    val_every=(10, 15, 20, 25, 30, 40, 50, 60, 70, 90, 110, 130, 150, 175, 200, 225, 250, 260,
                               270, 275, 280, 285, 290, 295, 300))  # the original's 25 validations

    # CPU demos (engine/small.py); at width 4 the content encoders learn in time without dropout
    small_config = dict(patch_size=32, width=4, style_width=4, dropout=0.0)
    small_recipe = dict(lr=1e-2, batch_size=2, num_epochs=40, iter_per_epoch=10)

    def __init__(self, num_classes=4, patch_size=80, width=16, style_width=32, style_dim=8, dropout=0.3,
                 rec_weight=0.1, kl_weight=0.1):
        M = len(MODALITIES)
        super().__init__(num_classes, patch_size, M, width, rec_weight, kl_weight)
        W = self.widths
        # conv -> dropout -> InstanceNorm (eps 1e-6) -> LeakyReLU(0.2), reflect padding
        gconv = partial(ConvUnit, padding_mode="reflect", eps=1e-6, act=nn.LeakyReLU(0.2))
        plain = partial(ConvUnit, padding_mode="reflect", eps=None)
        relu = nn.ReLU()
        self.style_encoders = nn.ModuleList(StyleEncoder(style_width, style_dim, partial(plain, act=relu), 1)
                                            for _ in range(M))
        self.content_encoders = nn.ModuleList(ContentEncoder(W, gconv, (dropout,) * 3 + (0.0,)) for _ in range(M))
        self.gates = nn.ModuleList(gconv(M * w, M) for w in W)
        self.merges = nn.ModuleList(gconv(M * w, w, 1) for w in W)
        self.decoder = SegDecoder(W, num_classes, gconv, align_corners=True)
        # LayerNorm over the three spatial axes with per-voxel affine weights (P/4, P/2, P)
        norm = lambda level, channels: nn.LayerNorm((patch_size >> (3 - level),) * 3, eps=1e-6)  # noqa: E731
        units = {"res": plain, "up": partial(ConvUnit, eps=None), "final": plain}
        self.image_decoders = nn.ModuleList(ImageDecoder(W[-1], style_dim, units, relu, norm, 1e-5, True)
                                            for _ in range(M))
        for m in self.modules():  # He normal (fan in, gain sqrt 2); default biases
            if isinstance(m, (nn.Conv3d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def fuse(self, contents, mask):
        fused = []
        for l, (gate, merge) in enumerate(zip(self.gates, self.merges)):
            maps = masked_contents(contents, mask, l)  # (B, M, C, ...)
            weights = torch.sigmoid(gate(maps.flatten(1, 2)))  # (B, M, ...)
            fused.append(merge((maps * weights.unsqueeze(2)).flatten(1, 2)))
        return fused

    # --- the original's checkpoints (models/reference.py): RobustSeg.py attribute names ---

    def reference_renames(self):
        pairs = []
        for m, name in enumerate(MODALITIES):
            se, ce, de, ref = (f"style_encoders.{m}.", f"content_encoders.{m}.levels.", f"image_decoders.{m}.",
                               f"image_de_{name}.")
            pairs += [(f"{se}convs.{i}.", f"se_{name}.c_{i}.") for i in range(5)]
            pairs.append((f"{se}head.", f"se_{name}.se_logit.conv."))
            for l in range(4):
                pairs += [(f"{ce}{l}.{ours}.", f"ce_{name}.e{l + 1}_{ref}.")
                          for ours, ref in (("entry", "c1"), ("body.0", "c2"), ("body.1", "c3"))]
            pairs += [(f"{de}mlp.0.", f"{ref}mlp.linear_0.linear."), (f"{de}mlp.2.", f"{ref}mlp.linear_1.linear."),
                      (f"{de}mu.", f"{ref}mlp.mu.linear."), (f"{de}sigma.", f"{ref}mlp.sigma.linear."),
                      (f"{de}final.", f"{ref}G_logit.")]
            pairs += [(f"{de}res.{i}.", f"{ref}res_{i}.") for i in range(4)]
            for i in range(3):
                pairs += [(f"{de}up.{i}.conv.", f"{ref}conv_{i}."), (f"{de}up.{i}.norm.", f"{ref}layer_norm_{i + 1}.")]
        for l in range(4):
            pairs += [(f"gates.{l}.", f"att_c{l + 1}."), (f"merges.{l}.", f"fusion_c{l + 1}.")]
        for k in range(3):  # decoder stage k from the bottom is the original's d{3 - k}
            d = f"mask_de.d{3 - k}_"
            pairs += [(f"decoder.levels.{k}.up.", d + "c1."), (f"decoder.levels.{k}.merge.", d + "c2."),
                      (f"decoder.levels.{k}.out.", d + "out.")]
        pairs.append(("decoder.seg.", "mask_de.seg_logit.conv."))
        return pairs

    @classmethod
    def reference_facts(cls, state):
        if "att_c1.conv.weight" not in state:
            return []
        norm = state.get(f"image_de_{MODALITIES[0]}.layer_norm_3.weight")
        return ["Robust-MSeg"] + ([f"patch_size={norm.shape[0]}"] if norm is not None and norm.dim() == 3 else [])
