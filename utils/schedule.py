"""Optimisers and learning-rate schedules of the recipes (utils/recipe.py).

Closed-form schedules scale each parameter group's initial learning rate by a factor of the
position in the run, so a resumed run (or one whose number of epochs changed) needs no
scheduler state:
    poly_epoch      (1 - epoch / epochs)^power, set at the start of each epoch (IM-Fuse)
    poly_iteration  (1 - t / T)^power, t the iteration counted from the run's start and
                    T = epochs x iterations per epoch, set before every iteration (nnU-Net, ShaSpec)
    cosine          (1 + cos(pi epoch / epochs)) / 2, set at the start of each epoch
    constant        1
plateau is torch's ReduceLROnPlateau on the validation score (mode "max"), stepped after
every validation; its state travels in the checkpoint.
"""
import inspect
import math

import torch

OPTIMIZERS = {"radam": torch.optim.RAdam, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}
PLATEAU_ARGS = ("factor", "patience", "threshold", "threshold_mode", "cooldown", "min_lr", "eps")
# schedule -> the schedule_args it accepts
SCHEDULES = {"poly_epoch": ("power",), "poly_iteration": ("power",), "cosine": (), "constant": (),
             "plateau": PLATEAU_ARGS}
POLY_POWER = 0.9


def poly(position, total, power=POLY_POWER):
    return (1 - position / total) ** power


def cosine(position, total):
    return (1 + math.cos(math.pi * position / total)) / 2


def optimizer_arguments(name):
    """The keyword arguments optimizer_args may set for the optimiser `name`."""
    return tuple(p for p in inspect.signature(OPTIMIZERS[name]).parameters
                 if p not in ("self", "params", "lr", "weight_decay"))


def make_optimizer(recipe, params):
    """The recipe's optimiser over `params`; each group remembers its initial lr."""
    try:
        optimizer = OPTIMIZERS[recipe.optimizer](params, lr=recipe.lr, weight_decay=recipe.weight_decay,
                                                 **recipe.optimizer_args)
    except Exception as err:  # any bad value of optimizer_args: one line
        raise ValueError(f"recipe: {recipe.optimizer} with {recipe.optimizer_args}: {err}")
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    return optimizer


def settings_problem(recipe):
    """What is wrong with the values of optimizer_args and schedule_args, in words, or None:
    the optimiser and the schedule are built and stepped once on a dummy parameter."""
    power = recipe.schedule_args.get("power", POLY_POWER)
    if not (isinstance(power, (int, float)) and not isinstance(power, bool) and math.isfinite(power) and power > 0):
        return f"the schedule's power must be a positive number, got {power!r}"
    try:
        optimizer = make_optimizer(recipe, [torch.zeros(1, requires_grad=True)])
        schedule = LRSchedule(optimizer, recipe, 1)
    except ValueError as err:
        return str(err).removeprefix("recipe: ")
    try:
        schedule.start_epoch(0)
        schedule.validated(0.5)
    except Exception as err:
        return f"{recipe.schedule} with {recipe.schedule_args}: {err}"
    return None


class LRSchedule:
    """Sets the learning rates of `optimizer` as the recipe's schedule says. The training
    loop calls start_epoch, start_iteration and validated; each returns the first group's lr
    (start_epoch: the lr of the epoch's first iteration)."""

    def __init__(self, optimizer, recipe, iters_per_epoch):
        self.optimizer, self.kind, self.args = optimizer, recipe.schedule, dict(recipe.schedule_args)
        self.epochs, self.iters = recipe.num_epochs, iters_per_epoch
        try:
            self.plateau = (torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", **self.args)
                            if self.kind == "plateau" else None)
        except Exception as err:
            raise ValueError(f"recipe: plateau with {self.args}: {err}")

    def _scale(self, factor):
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
        return self.lr

    @property
    def lr(self):
        return self.optimizer.param_groups[0]["lr"]

    def start_epoch(self, epoch):
        if self.kind == "poly_epoch":
            return self._scale(poly(epoch, self.epochs, **self.args))
        if self.kind == "poly_iteration":
            return self.start_iteration(epoch, 0)
        if self.kind == "cosine":
            return self._scale(cosine(epoch, self.epochs))
        if self.kind == "constant":
            return self._scale(1.0)
        return self.lr

    def start_iteration(self, epoch, iteration):
        if self.kind == "poly_iteration":
            return self._scale(poly(epoch * self.iters + iteration, self.epochs * self.iters, **self.args))
        return self.lr

    def validated(self, score):
        if self.plateau is not None:
            self.plateau.step(score)
        return self.lr

    def state_dict(self):
        return self.plateau.state_dict() if self.plateau is not None else {}

    def load_state_dict(self, state):
        if self.plateau is not None and state:
            self.plateau.load_state_dict(state)
