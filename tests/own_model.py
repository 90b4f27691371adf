"""A researcher's own model, as it would live in a file outside the project: sigmoid region
outputs, an anisotropic window, a loss of two named parts and a recipe of its own. The tests
train, evaluate and apply it through the scripts with --model tests/own_model.py:TinyRegionNet."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.brats import SUBSETS
from utils.losses import region_targets, soft_dice_loss
from utils.recipe import Recipe

# all four modalities four times as likely as any other subset
SUBSET_WEIGHTS = tuple(4.0 if all(s) else 1.0 for s in SUBSETS)


class TinyRegionNet(nn.Module):
    output_kind = "regions"
    recipe = Recipe(optimizer="adam", optimizer_args={"amsgrad": True}, lr=1e-3, weight_decay=1e-5,
                    schedule="cosine", num_epochs=4, iter_per_epoch=2, batch_size=2,
                    subset_weights=SUBSET_WEIGHTS, augmentations=("flip",), foreground_oversampling=0.5)

    def __init__(self, window=(32, 24, 16), width=4):
        super().__init__()
        self.window = tuple(window)
        self.conv = nn.Conv3d(4, width, 3, padding=1)
        self.head = nn.Conv3d(width, 3, 1)

    def forward(self, x, mask):  # x (B, 4, *window), mask (B, 4) -> (B, 3, *window)
        x = x * mask[:, :, None, None, None].to(x.dtype)  # absent modalities contribute nothing
        logits = self.head(F.relu(self.conv(x)))
        return logits if self.training else logits.sigmoid()

    def loss(self, logits, batch):
        target = region_targets(batch["label"])
        parts = {"bce": F.binary_cross_entropy_with_logits(logits, target),
                 "dice": soft_dice_loss(logits.sigmoid(), target)}
        return parts["bce"] + parts["dice"], parts


class TinyPositionNet(TinyRegionNet):
    """TinyRegionNet with a learned bias per native-grid X index: a model that uses positions
    (models/base.py), trained with the augmentations that keep voxels on the grid."""
    uses_position = True
    recipe = TinyRegionNet.recipe.replace(augmentations=("intensity", "flip"))

    def __init__(self, window=(32, 24, 16), width=4, grid_size=64):
        super().__init__(window, width)
        self.bias = nn.Parameter(torch.zeros(grid_size))

    def forward(self, x, mask, grid):  # grid (B, 3, 2): first native index and step per axis
        x = x * mask[:, :, None, None, None].to(x.dtype)
        index = grid[:, 0, :1] + grid[:, 0, 1:] * torch.arange(self.window[0], device=x.device)  # (B, X)
        logits = self.head(F.relu(self.conv(x))) + self.bias[index.clamp(0, len(self.bias) - 1)][:, None, :, None, None]
        return logits if self.training else logits.sigmoid()
