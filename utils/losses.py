"""Loss terms the models' losses are made of: weighted cross-entropy and soft Dice on
probabilities (SPEC section 4), and the one-hot and region targets they compare with."""
import torch
import torch.nn.functional as F

from .brats import REGIONS


def one_hot(label, num_classes):
    """(B, *spatial) integer labels -> (B, K, *spatial) float one-hot."""
    return F.one_hot(label.long(), num_classes).movedim(-1, 1).float()


def region_targets(label):
    """(B, *spatial) integer labels -> (B, 3, *spatial) float masks of WT, TC, ET."""
    return torch.stack([torch.isin(label, torch.tensor(labels, device=label.device))
                        for labels in REGIONS.values()], dim=1).float()


def weighted_cross_entropy(prob, target, clamp=0.005):
    """prob, target (B, K, *spatial). Class k of sample b weighs 1 - |target_bk| / |target_b|;
    the loss is the mean over voxels of sum_k -w_bk t_k log(clamp(p_k, clamp, 1))."""
    dims = tuple(range(2, target.dim()))
    counts = target.sum(dims)  # (B, K)
    weight = 1 - counts / counts.sum(1, keepdim=True)
    weight = weight.view(*weight.shape, *(1,) * len(dims))
    return -(weight * target * prob.clamp(clamp, 1).log()).sum(1).mean()


def soft_dice_loss(prob, target, eps=1e-7):
    """1 - mean over classes of 2 sum(p t) / (sum p + sum t + eps), sums over the whole batch."""
    dims = (0,) + tuple(range(2, target.dim()))
    dice = 2 * (prob * target).sum(dims) / (prob.sum(dims) + target.sum(dims) + eps)
    return 1 - dice.mean()


def segmentation_loss(prob, label):
    """Weighted cross-entropy + soft Dice of probabilities (B, K, ...) against labels (B, ...)."""
    target = one_hot(label, prob.shape[1])
    return weighted_cross_entropy(prob, target) + soft_dice_loss(prob, target)

