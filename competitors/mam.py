"""Missing as Masking (Liu et al., "Missing as Masking: Arbitrary Cross-modal Feature
Reconstruction for Incomplete Multimodal Brain Tumor Segmentation", MICCAI 2024; "M3FeCon" in
the paper's figure), the network of the original's nnU-Net plan "3d_fullres_multiencoder_recon"
built directly. Each modality has a small nnU-Net encoder (six stages of two conv-norm-act
blocks). The skips of missing modalities are zeroed; at the bottleneck a missing modality's
map is replaced by a learned token map, a one-block transformer over the bottleneck tokens of
all four modalities reconstructs it from the present ones, and the reconstruction is supervised
by the map the encoder gives when the modality is seen. An nnU-Net decoder (transposed convs,
deep-supervision heads) gives three sigmoid region maps.

Axes are the project's (X, Y, Z); the original's arrays are (Z, Y, X) (SimpleITK order), so
its kernels, tokens and position embedding are transposed on loading. The concatenations keep
the original's modality order [FLAIR, T1, T1c, T2]. Shapes: B batch, M = 4 modalities, P the
patch side, stage s at P / 2^s with width[s] channels per modality, the bottleneck n = P / 32.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from models import register_model
from models.base import check_input
from utils.brats import MODALITIES, REGIONS
from utils.losses import region_targets
from utils.recipe import Recipe

from .layers import InstanceNorm, norm_leaky

# The original's modality order (FLAIR, T1, T1c, T2) as indices of MODALITIES.
ORIGINAL_ORDER = tuple(MODALITIES.index(m) for m in ("flair", "t1", "t1c", "t2"))


class ConvNormAct(nn.Module):
    """3^3 conv (bias, zero padding 1) -> affine InstanceNorm (eps 1e-5; a one-voxel map, at
    patch sizes below 64, gives its bias) -> LeakyReLU(0.01)."""

    def __init__(self, in_ch, out_ch, stride=1):
        super().__init__()
        self.conv = nn.Conv3d(in_ch, out_ch, 3, stride, padding=1)
        self.norm = InstanceNorm(out_ch)

    def forward(self, x):
        return norm_leaky(self.conv(x), self.norm, 0.01)


def stage(in_ch, out_ch, stride=1):
    """Two ConvNormAct blocks, the first with the stage's stride."""
    return nn.Sequential(ConvNormAct(in_ch, out_ch, stride), ConvNormAct(out_ch, out_ch))


class Encoder(nn.Module):
    """nnU-Net's plain encoder: (B, in_ch, P, P, P) -> the outputs of its stages, the first at
    full resolution, each further one at half the previous."""

    def __init__(self, in_ch, widths):
        super().__init__()
        chans = (in_ch,) + tuple(widths)
        self.stages = nn.ModuleList(stage(chans[s], chans[s + 1], 2 if s else 1) for s in range(len(widths)))

    def forward(self, x):
        out = []
        for s in self.stages:
            x = s(x)
            out.append(x)
        return out


class Reconstruction(nn.Module):
    """Tokens (B, N, dim) + a learned position embedding -> one pre-norm transformer block
    (multi-head self-attention without qkv bias; LayerNorm-Linear-GELU-Linear) -> LayerNorm."""

    def __init__(self, tokens, dim, heads, head_dim, mlp_dim):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.pos = nn.Parameter(torch.randn(1, tokens, dim))
        self.attn_norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * heads * head_dim, bias=False)
        self.proj = nn.Linear(heads * head_dim, dim)
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        B, N, _ = x.shape
        x = x + self.pos
        q, k, v = self.qkv(self.attn_norm(x)).view(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, -1))
        return self.norm(x + self.mlp(x))


class Decoder(nn.Module):
    """nnU-Net's U-Net decoder over skips of `widths` (shallowest first): per level, bottom up,
    a 2x2x2 transposed conv to the skip's width, [upsampled, skip] concatenated, a stage of two
    ConvNormAct blocks and a 1x1x1 head to the outputs. Returns the heads' logits, full
    resolution first (all levels with deep supervision, else only the last)."""

    def __init__(self, widths, num_outputs):
        super().__init__()
        up = list(reversed(widths))  # bottleneck first
        self.ups = nn.ModuleList(nn.ConvTranspose3d(up[i], up[i + 1], 2, stride=2) for i in range(len(up) - 1))
        self.stages = nn.ModuleList(stage(2 * w, w) for w in up[1:])
        self.heads = nn.ModuleList(nn.Conv3d(w, num_outputs, 1) for w in up[1:])

    def forward(self, skips, deep_supervision):
        x, outputs = skips[-1], []
        for i, (up, block, head) in enumerate(zip(self.ups, self.stages, self.heads)):
            x = block(torch.cat([up(x), skips[-2 - i]], 1))
            if deep_supervision or i == len(self.heads) - 1:
                outputs.append(head(x))
        return outputs[::-1]


@register_model("mam")
class MaM(nn.Module):
    """The contract of models/base.py. Eval: sigmoid probabilities of WT, TC, ET. Train:
    {"logits": [the deep-supervision logits, full resolution first], "bottleneck" (B, M, C, n,
    n, n) with the reconstructed maps of the missing modalities, "target" (B, M, C, n, n, n) the
    encoders' own maps, detached}."""

    output_kind = "regions"
    # SGD (Nesterov, momentum 0.99) lr 1e-2, wd 3e-5, poly per epoch, gradient norm clipped at
    # 12; 500 epochs of 150 iterations, batch 1; every crop centred on tumour; uniform subsets;
    # nnU-Net's default augmentation
    recipe = Recipe(optimizer="sgd", optimizer_args={"momentum": 0.99, "nesterov": True}, lr=1e-2,
                    weight_decay=3e-5, schedule="poly_epoch", num_epochs=500, iter_per_epoch=150, grad_clip=12.0,
                    augmentations=("nnunet",), foreground_oversampling=1.0,
                    # the original's 22 validations, after its 0-based epochs 20, 50, ..., 495, 499
                    val_every=(21, 51, 71, 101, 121, 151, 201, 251, 301, 351, 371, 391, 401, 421, 451, 461, 471,
                               481, 486, 491, 496, 500))

    # five stages: a 2^3 bottleneck at a 32^3 window
    small_config = dict(patch_size=32, stages=5, width=4, max_width=32, heads=2, head_dim=16, mlp_dim=64)
    # the paper's light augmentation: 600 iterations are too few for nnU-Net's (full-modality WT
    # 0.73 with it, 0.89 without on the demo's test cases)
    small_recipe = dict(batch_size=2, num_epochs=60, iter_per_epoch=10, augmentations=("rotation", "intensity", "flip"))

    def __init__(self, patch_size=128, width=8, max_width=128, stages=6, heads=4, head_dim=32, mlp_dim=256,
                 ds_weights=None):
        super().__init__()
        down = 2 ** (stages - 1)
        if patch_size % down or patch_size < down:
            raise ValueError(f"patch_size must be a positive multiple of {down}, got {patch_size}")
        if ds_weights is None:  # nnU-Net's: 1 / 2^i from full resolution down, the coarsest 0
            ds_weights = [1 / 2 ** i for i in range(stages - 2)] + [0]
        if len(ds_weights) != stages - 1 or not sum(ds_weights) > 0:
            raise ValueError(f"ds_weights: one weight per decoder level ({stages - 1}), not all zero")
        M = len(MODALITIES)
        self.patch_size, self.num_modalities = patch_size, M
        self.ds_weights = tuple(w / sum(ds_weights) for w in ds_weights)
        self.widths = widths = tuple(min(width * 2 ** s, max_width) for s in range(stages))  # per modality
        self.encoders = nn.ModuleList(Encoder(1, widths) for _ in range(M))
        n, C = patch_size // down, widths[-1]
        self.tokens = nn.Parameter(torch.randn(M, C, n, n, n))  # (M, C, n, n, n): a missing modality's map
        self.reconstruction = Reconstruction(M * n ** 3, C, heads, head_dim, mlp_dim)
        self.decoder = Decoder(tuple(M * w for w in widths), len(REGIONS))
        for module in self.modules():  # nnU-Net's He initialisation (slope 0.01); norms 1 and 0
            if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
                nn.init.kaiming_normal_(module.weight, a=1e-2)
                nn.init.zeros_(module.bias)

    @property
    def window(self):
        return (self.patch_size,) * 3

    def encode(self, x, mask=None):
        """Every modality's stage outputs, stacked (B, M, C_s, ...); with a mask the encoders of
        modalities absent from every sample are skipped (zeros in their place)."""
        check_input(self, x, mask)
        run = [True] * self.num_modalities if mask is None else mask.any(0).tolist()
        outs = [enc(x[:, m:m + 1]) if run[m] else None for m, enc in enumerate(self.encoders)]
        template = next(o for o in outs if o is not None)
        outs = [o if o is not None else [torch.zeros_like(t) for t in template] for o in outs]
        return [torch.stack(level, 1) for level in zip(*outs)]

    def _fuse(self, features, mask):
        """-> (skips for the decoder, modality-major in the original's order; the bottleneck
        (B, M, C, n, n, n) with missing modalities reconstructed)."""
        B, M = mask.shape
        present = mask.view(B, M, 1, 1, 1, 1)
        bottom = torch.where(present, features[-1], self.tokens)
        n = bottom.shape[-1]
        tokens = bottom.permute(0, 1, 3, 4, 5, 2).reshape(B, M * n ** 3, -1)  # (B, M n^3, C): (m, x, y, z)
        rebuilt = self.reconstruction(tokens).view(B, M, n, n, n, -1).permute(0, 1, 5, 2, 3, 4)
        bottom = torch.where(present, features[-1], rebuilt)
        order = list(ORIGINAL_ORDER)
        skips = [(f * present)[:, order].flatten(1, 2) for f in features[:-1]] + [bottom[:, order].flatten(1, 2)]
        return skips, bottom

    def decode(self, features, mask):
        mask = mask.to(device=features[0].device, dtype=torch.bool)
        skips, _ = self._fuse(features, mask)
        return torch.sigmoid(self.decoder(skips, deep_supervision=False)[0])

    def forward(self, x, mask):
        if not self.training:
            return self.decode(self.encode(x, mask), mask)
        check_input(self, x, mask)
        mask = mask.to(device=x.device, dtype=torch.bool)
        features = self.encode(x)  # all four: the missing ones' are the reconstruction targets
        skips, bottom = self._fuse(features, mask)
        return {"logits": self.decoder(skips, deep_supervision=True), "bottleneck": bottom,
                "target": features[-1].detach()}

    def loss(self, outputs, batch):
        """sum_i w_i (BCE_i - Dice_i) over the deep-supervision outputs (targets downsampled by
        nearest neighbour: the voxel nearest each coarse voxel's centre, as nnU-Net) + the MSE of
        the reconstructed bottleneck maps of the missing modalities against the encoders' (each
        (sample, modality) pair weighing alike; 0 when none is missing) -> (total, {"seg",
        "mse"}). Dice: the mean over samples and regions of
        (2 sum(p t) + 1e-5) / max(sum p + sum t + 1e-5, 1e-8)."""
        target = region_targets(batch["label"])
        seg = 0
        for w, logits in zip(self.ds_weights, outputs["logits"]):  # a weight of 0 keeps its head in the graph
            t = F.interpolate(target, size=logits.shape[2:], mode="nearest-exact")
            p, dims = torch.sigmoid(logits), tuple(range(2, logits.dim()))
            dice = (2 * (p * t).sum(dims) + 1e-5) / ((p.sum(dims) + t.sum(dims) + 1e-5).clamp_min(1e-8))
            seg = seg + w * (F.binary_cross_entropy_with_logits(logits, t) - dice.mean())
        missing = ~batch["mask"].to(device=target.device, dtype=torch.bool)
        errors = ((outputs["bottleneck"] - outputs["target"]) ** 2).flatten(2).mean(2)  # (B, M)
        mse = errors[missing].mean() if missing.any() else errors.sum() * 0
        return seg + mse, {"seg": seg, "mse": mse}

    # --- the original's checkpoints (models/reference.py): `network_weights` of nnU-Net ---

    def _blocks(self):
        """(our prefix, original prefix) of every ConvNormAct block."""
        pairs = []
        for m, enc in enumerate(self.encoders):
            j = ORIGINAL_ORDER.index(m)
            pairs += [(f"encoders.{m}.stages.{s}.{k}.", f"modality_specific_encoders.{j}.stages.{s}.0.convs.{k}.")
                      for s in range(len(enc.stages)) for k in range(2)]
        return pairs + [(f"decoder.stages.{i}.{k}.", f"decoder.stages.{i}.convs.{k}.")
                        for i in range(len(self.decoder.stages)) for k in range(2)]

    def reference_renames(self):
        r = "feature_reconstruction."
        pairs = [(ours + part, ref + part) for ours, ref in self._blocks() for part in ("conv.", "norm.")]
        pairs += [(f"decoder.ups.{i}.", f"decoder.transpconvs.{i}.") for i in range(len(self.decoder.ups))]
        pairs += [(f"decoder.heads.{i}.", f"decoder.seg_layers.{i}.") for i in range(len(self.decoder.heads))]
        transformer = [("pos", "pos_embedding"), ("attn_norm.", "layers.0.0.norm."), ("qkv.", "layers.0.0.to_qkv."),
                       ("proj.", "layers.0.0.to_out.0."), ("mlp.0.", "layers.0.1.net.0."),
                       ("mlp.1.", "layers.0.1.net.1."), ("mlp.3.", "layers.0.1.net.4."), ("norm.", "norm.")]
        return pairs + [("tokens", "learned_bottleneck_tokens")] + [("reconstruction." + ours, r + ref)
                                                                    for ours, ref in transformer]

    def reference_layout(self, state, to_reference):
        """Kernels and token maps (Z, Y, X) <-> (X, Y, Z); tokens and position embedding in the
        original's modality order <-> ours. On export the aliases nnU-Net's blocks store
        (`all_modules.0` = conv, `all_modules.1` = norm) are added."""
        out = {k: v.permute(0, 1, 4, 3, 2).contiguous() if v.dim() == 5 else v for k, v in state.items()}
        M, order = self.num_modalities, list(ORIGINAL_ORDER)
        rows = order if to_reference else torch.tensor(order).argsort().tolist()  # original j <-> ours m
        out["learned_bottleneck_tokens"] = out["learned_bottleneck_tokens"][rows]
        key = "feature_reconstruction.pos_embedding"
        n, C = self.tokens.shape[-1], self.tokens.shape[1]
        out[key] = out[key].view(M, n, n, n, C)[rows].permute(0, 3, 2, 1, 4).reshape(1, -1, C).contiguous()
        if to_reference:
            for _, ref in self._blocks():
                for i, part in enumerate(("conv", "norm")):
                    out.update({f"{ref}all_modules.{i}.{p}": out[f"{ref}{part}.{p}"] for p in ("weight", "bias")})
        return out

    def reference_droppable(self):
        """The aliases and the full 4-channel encoder the original stores (twice) but never runs."""
        return ["encoder.", "decoder.encoder."] + [ref + "all_modules." for _, ref in self._blocks()]

    def reference_unused(self):
        """That encoder (4 input channels, the concatenated widths; one copy under both names),
        re-created on export."""
        state = {}

        def make():
            if not state:
                encoder = Encoder(self.num_modalities, [self.num_modalities * w for w in self.widths])
                for key, value in encoder.state_dict().items():  # stages.s.k.part.p
                    _, s, k, part, p = key.split(".")
                    alias = f"all_modules.{('conv', 'norm').index(part)}"
                    state.update({f"stages.{s}.0.convs.{k}.{name}.{p}": value for name in (part, alias)})
            return state

        return [("encoder.", make), ("decoder.encoder.", make)]

    @classmethod
    def reference_facts(cls, state):
        tokens = state.get("learned_bottleneck_tokens")
        stem = state.get("modality_specific_encoders.0.stages.0.0.convs.0.conv.weight")
        if tokens is None or stem is None:
            return []
        stages = len({k.split(".")[3] for k in state if k.startswith("modality_specific_encoders.0.stages.")})
        return [f"MaM with patch_size={2 ** (stages - 1) * tokens.shape[-1]}, width={stem.shape[0]}, stages={stages}"]
