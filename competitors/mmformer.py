"""mmFormer (Zhang et al., MICCAI 2022), the transformer model IM-Fuse is built on: the same
encoders, intra-modal transformers and decoders; the masked modality tokens are fused by one
inter-modal transformer over all of them, and every level's skip input is the concatenation
of the masked maps."""
import torch
import torch.nn as nn

from models import register_model
from models.blocks import MultiEncoderNet, TransformerBlock
from models.reference import block_renames, module_state
from utils.brats import CHECKPOINT_NAMES


@register_model("mmformer")
class MMFormer(MultiEncoderNet):
    """mmFormer; 36,391,760 parameters at patch_size=128."""

    def __init__(self, num_classes=4, patch_size=128, num_modalities=4, width=8, dim=512,
                 heads=8, mlp_dim=4096, dropout=0.1):
        M = num_modalities
        widths = [width * 2 ** l for l in range(5)]
        super().__init__(num_classes, patch_size, M, width, dim, heads, mlp_dim, dropout,
                         skip_channels=[M * w for w in widths[:4]], bottleneck_ch=M * widths[-1])
        self.inter = TransformerBlock(dim, heads, mlp_dim, dropout)
        self.inter_proj = nn.Conv3d(M * dim, M * widths[-1], 1)
        for m in self.modules():  # He init (ReLU gain), default bias
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight)

    def fuse(self, features):
        skips = [f.flatten(1, 2) for f in features[:4]]  # channel concatenation, modality-major
        x5 = features[4]  # (B, M, dim, p, p, p)
        B, M, dim, *grid = x5.shape
        tokens = x5.flatten(3).transpose(2, 3).reshape(B, M * self.grid ** 3, dim)  # (B, M T, dim)
        pos = torch.cat([intra.pos for intra in self.intra], dim=1)  # the intra-modal embeddings
        tokens = self.inter(tokens + pos)
        # the original reinterprets the (B, M T, dim) memory as a (B, p, p, p, M dim) grid
        x5 = tokens.reshape(B, *grid, M * dim).permute(0, 4, 1, 2, 3)
        return skips, self.inter_proj(x5)

    def reference_renames(self):
        return super().reference_renames() + [("inter_proj.", "multimodal_decode_conv.")] + \
            block_renames("inter.", "multimodal_transformer.")

    def reference_unused(self):
        return [(f"{name}_decode_conv.",
                 lambda: module_state(nn.Conv3d(self.dim, self.widths[-1], 1)))
                for name in CHECKPOINT_NAMES]
