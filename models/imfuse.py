"""IM-Fuse (SPEC section 3): per-modality encoders and intra-modal transformers, a Mamba
Fusion Block (plain MFB or interleaved I-MFB) at the bottleneck followed by an inter-modal
transformer, optional Mamba fusion of the skip connections, and the fusion decoder."""
import torch
import torch.nn as nn

from utils.brats import CHECKPOINT_NAMES

from . import register_model
from .blocks import MultiEncoderNet, TransformerBlock
from .fusion import MambaFusionBlock
from .reference import block_renames, fusion_renames, module_state


@register_model("imfuse")
class IMFuse(MultiEncoderNet):
    """IM-Fuse. The paper's configuration: interleaved=True, mamba_skip=True, first_skip=False,
    patch_size=128 (44,384,776 parameters).

    interleaved: I-MFB token layout instead of MFB; mamba_skip: fuse the skip connections of
    levels 2-4 with their own fusion blocks instead of concatenating the masked maps;
    first_skip: give level 1 a skip connection too (fused like the others).
    The learnable fusion tokens and positional embeddings tie the model to its patch size.
    """

    small_config = dict(MultiEncoderNet.small_config, interleaved=True, mamba_skip=True)  # the paper's structure
    # the first 20 of the 60 epochs with every modality: without it the tumour core and enhancing
    # tumour appeared only after epoch 40 (full-modality ET 0.25 - 0.52 over five runs); with it
    # ET 0.53 and 0.63 in two (seeds 999, 1; docs/comparing.md)
    small_recipe = dict(MultiEncoderNet.small_recipe, warmup_epochs=20)

    def __init__(self, num_classes=4, patch_size=128, interleaved=False, mamba_skip=False,
                 first_skip=False, num_modalities=4, width=8, dim=512, heads=8, mlp_dim=4096,
                 dropout=0.1, backend=None):
        M = num_modalities
        widths = [width * 2 ** l for l in range(5)]
        skip_channels = [w if mamba_skip else M * w for w in widths[:4]]
        if not first_skip:
            skip_channels[0] = None
        super().__init__(num_classes, patch_size, M, width, dim, heads, mlp_dim, dropout,
                         skip_channels, bottleneck_ch=M * widths[-1])
        self.interleaved, self.mamba_skip, self.first_skip = interleaved, mamba_skip, first_skip
        # levels (0-based) whose skip input is fused by a Mamba Fusion Block
        self.skip_levels = [l for l in range(4) if skip_channels[l] and mamba_skip]
        self.skip_fusions = nn.ModuleList(
            MambaFusionBlock(widths[l], (patch_size // 2 ** l) ** 3, interleaved, M, backend=backend)
            for l in self.skip_levels)
        T = self.grid ** 3
        self.fusion = MambaFusionBlock(dim, T, interleaved, M, backend=backend)
        self.fused_pos = nn.Parameter(torch.zeros(1, T, dim))
        self.inter = TransformerBlock(dim, heads, mlp_dim, dropout)
        self.inter_proj = nn.Conv3d(dim, M * widths[-1], 1)
        for m in self.modules():  # He init for leaky ReLU (slope 0.01), zero bias
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, a=1e-2)
                nn.init.zeros_(m.bias)

    def fuse(self, features):
        fusions = dict(zip(self.skip_levels, self.skip_fusions))
        skips = []
        for l, f in enumerate(features[:4]):  # f (B, M, C, *grid), None: level without skip
            if f is None:
                skips.append(None)
            elif l in fusions:
                skips.append(fusions[l](f))
            else:
                skips.append(f.flatten(1, 2))  # channel concatenation, modality-major
        x5 = features[4]  # (B, M, dim, p, p, p)
        B, M, dim, *grid = x5.shape
        fused = self.fusion.fuse_tokens(x5.flatten(3).transpose(2, 3))  # (B, T, dim)
        fused = self.inter(fused + self.fused_pos)
        return skips, self.inter_proj(fused.transpose(1, 2).reshape(B, dim, *grid))

    def reference_renames(self):
        # the original numbers its fusion layers from the first fused skip level, bottleneck
        # last; without mamba_skip it builds all five and uses only the last
        pairs = super().reference_renames()
        for i in range(len(self.skip_levels)):
            pairs += fusion_renames(f"skip_fusions.{i}.", f"mamba_fusion_layers.{i}.")
        bottleneck = len(self.skip_levels) if self.mamba_skip else 4
        pairs += fusion_renames("fusion.", f"mamba_fusion_layers.{bottleneck}.")
        pairs += [("fused_pos", "fused_pos"), ("inter_proj.", "multimodal_decode_conv.")]
        return pairs + block_renames("inter.", "multimodal_transformer.")

    def reference_unused(self):
        dim, T, M = self.dim, self.grid ** 3, self.num_modalities

        def fusion(width, tokens):
            return lambda: module_state(MambaFusionBlock(width, tokens, self.interleaved, M),
                                        fusion_renames("", ""))

        unused = [("mamba_fusion_layer.", fusion(dim, T))]
        if not self.mamba_skip:
            unused += [(f"mamba_fusion_layers.{l}.", fusion(w, (self.patch_size // 2 ** l) ** 3))
                       for l, w in enumerate(self.widths[:4])]
        if self.first_skip:
            unused += [(f"{name}_decode_conv.", lambda: module_state(nn.Conv3d(dim, self.widths[-1], 1)))
                       for name in CHECKPOINT_NAMES]
        return unused

    def reference_droppable(self):
        # versions of the original code differ in whether they build the per-modality decode convs
        return super().reference_droppable() + [f"{name}_decode_conv." for name in CHECKPOINT_NAMES]
