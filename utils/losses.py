"""The training loss of SPEC section 4: weighted cross-entropy + soft Dice on softmax
probabilities, summed over the fused, auxiliary and deep-supervision outputs."""
import torch.nn.functional as F


def one_hot(label, num_classes):
    """(B, *spatial) integer labels -> (B, K, *spatial) float one-hot."""
    return F.one_hot(label.long(), num_classes).movedim(-1, 1).float()


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


def total_loss(outputs, label):
    """outputs = (fused, [auxiliary], [deep supervision]) of a model in train mode ->
    (total, {"fused": ..., "aux": ..., "deep": ...}) with the three parts for logging."""
    fused, aux, deep = outputs
    parts = {"fused": segmentation_loss(fused, label),
             "aux": sum(segmentation_loss(p, label) for p in aux),
             "deep": sum(segmentation_loss(p, label) for p in deep)}
    return parts["fused"] + parts["aux"] + parts["deep"], parts
