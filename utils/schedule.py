"""The poly learning-rate schedule, set once per epoch: lr = base (1 - epoch / epochs)^power."""


def poly_lr(base_lr, epoch, epochs, power=0.9):
    return base_lr * (1 - epoch / epochs) ** power


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr
