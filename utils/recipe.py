"""A model's training recipe: the values `train_poly.py` uses for it unless a flag says
otherwise. Every model states its own (the `recipe` attribute of the model contract,
models/base.py); the defaults are IM-Fuse's (SPEC section 4). A checkpoint stores the
effective recipe (`as_dict`), so a resumed run continues with it.
"""
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional, Union

from .brats import SUBSETS
from .schedule import OPTIMIZERS, SCHEDULES, optimizer_arguments, settings_problem

AUGMENTATIONS = ("rotation", "intensity", "flip", "nnunet", "nnunet_shaspec")  # data/augment.py
# the epochs after which the IM-Fuse authors' train_poly.py validates (its val_check)
IMFUSE_VALIDATION = (50, 100, 150, 200, 300, 400, 500, 600, 700, 800, 850, 900, 910, 920, 930, 940, 950,
                     955, 960, 965, 970, 975, 980, 985, 990, 995, 1000)


@dataclass(frozen=True)
class Recipe:
    """optimizer: one of OPTIMIZERS, built with lr, weight_decay and optimizer_args (e.g.
    {"amsgrad": True}, {"momentum": 0.99, "nesterov": True}); schedule: one of SCHEDULES with
    schedule_args (utils/schedule.py); iter_per_epoch None: one pass over the training cases;
    batch_size per process; subset_weights: None (uniform) or 15 weights in SUBSETS order,
    the probability of each modality subset up to normalisation; augmentations: applied in
    the order given; foreground_oversampling: the probability that a training crop is placed
    around a random tumour voxel instead of uniformly; warmup_epochs: the first epochs of the
    run, in which every sample has every modality (the case has) before the subset law
    applies (one schedule over the whole run); grad_clip: the largest norm of the gradient
    of all parameters (clipped before each step), None for no clipping; val_every: validate
    after every N-th epoch, or after the epochs (1-based) of a tuple, and always after the
    last (IM-Fuse's: the original's 27 epochs)."""

    optimizer: str = "radam"
    optimizer_args: dict = field(default_factory=dict)
    lr: float = 2e-4
    weight_decay: float = 3e-5
    schedule: str = "poly_epoch"
    schedule_args: dict = field(default_factory=dict)
    num_epochs: int = 1000
    iter_per_epoch: Optional[int] = None
    batch_size: int = 1
    subset_weights: Optional[tuple] = None
    augmentations: tuple = ("rotation", "intensity", "flip")
    foreground_oversampling: float = 0.0
    warmup_epochs: int = 0
    grad_clip: Optional[float] = None
    val_every: Union[int, tuple] = IMFUSE_VALIDATION

    def __post_init__(self):
        for name in ("subset_weights", "augmentations", "val_every"):  # lists (from JSON or a checkpoint) as tuples
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        problem = self.problem()
        if problem:
            raise ValueError(f"recipe: {problem}")

    def check(self):
        """Raises ValueError (one line) if the values of optimizer_args or schedule_args are
        refused when the optimiser and schedule are built and stepped on a dummy parameter.
        Not at construction: an optimiser's first construction imports torch._dynamo (~1 s),
        which predict.py and test.py, importing every model's recipe, do not need."""
        problem = settings_problem(self) if self.optimizer_args or self.schedule_args else None
        if problem:
            raise ValueError(f"recipe: {problem}")
        return self

    def problem(self):
        """What is wrong with the values, in words, or None (the values of optimizer_args and
        schedule_args: check)."""
        if self.optimizer not in OPTIMIZERS:
            return f"optimizer {self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}"
        if self.schedule not in SCHEDULES:
            return f"schedule {self.schedule!r} is not one of {', '.join(SCHEDULES)}"
        for name in ("optimizer_args", "schedule_args"):
            if not isinstance(getattr(self, name), dict):
                return f"{name} must be a dict, got {getattr(self, name)!r}"
        unknown = set(self.optimizer_args) - set(optimizer_arguments(self.optimizer))
        if unknown:
            return (f"optimizer {self.optimizer} takes no {', '.join(sorted(unknown))} (it takes "
                    f"{', '.join(optimizer_arguments(self.optimizer))})")
        unknown = set(self.schedule_args) - set(SCHEDULES[self.schedule])
        if unknown:
            return (f"schedule {self.schedule} takes no {', '.join(sorted(unknown))} (it takes "
                    f"{', '.join(SCHEDULES[self.schedule]) or 'no arguments'})")
        if not (self.lr > 0 and self.weight_decay >= 0):
            return f"lr must be positive and weight_decay not negative, got {self.lr}, {self.weight_decay}"
        for name in ("num_epochs", "batch_size", "iter_per_epoch"):
            value = getattr(self, name)
            if not (value is None and name == "iter_per_epoch") and not (isinstance(value, int) and value >= 1):
                return f"{name} must be a positive integer, got {value!r}"
        w = self.subset_weights
        if w is not None and (len(w) != len(SUBSETS) or any(not math.isfinite(x) or x < 0 for x in w)
                              or sum(w) <= 0):
            return f"subset_weights must be {len(SUBSETS)} non-negative numbers, not all zero, got {w!r}"
        unknown = [a for a in self.augmentations if a not in AUGMENTATIONS]
        if unknown:
            return f"unknown augmentation {unknown[0]!r}; use any of {', '.join(AUGMENTATIONS)}"
        if not 0 <= self.foreground_oversampling <= 1:
            return f"foreground_oversampling must be in [0, 1], got {self.foreground_oversampling}"
        if not (isinstance(self.warmup_epochs, int) and self.warmup_epochs >= 0):
            return f"warmup_epochs must be a non-negative integer, got {self.warmup_epochs!r}"
        if self.warmup_epochs and self.warmup_epochs >= self.num_epochs:
            return (f"warmup_epochs ({self.warmup_epochs}) must be fewer than num_epochs ({self.num_epochs}), "
                    "or no modality would ever be dropped: give --warmup_epochs too")
        if self.grad_clip is not None and not (isinstance(self.grad_clip, (int, float)) and self.grad_clip > 0):
            return f"grad_clip must be positive (or None), got {self.grad_clip!r}"
        v = self.val_every
        if isinstance(v, tuple):
            if not v or any(not isinstance(e, int) or e < 1 for e in v) or list(v) != sorted(set(v)):
                return f"val_every must be a positive integer or increasing positive epochs, got {v!r}"
        elif not (isinstance(v, int) and v >= 1):
            return f"val_every must be a positive integer or increasing positive epochs, got {v!r}"
        return None

    def validates_after(self, epoch):
        """Whether the run validates after `epoch` (1-based)."""
        if epoch == self.num_epochs:
            return True
        if isinstance(self.val_every, tuple):
            return epoch in self.val_every
        return epoch % self.val_every == 0

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def as_dict(self):
        """Plain values, for checkpoints (torch.load with weights_only=True reads them)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values):
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"recipe: unknown field {sorted(unknown)[0]!r}")
        return cls(**values)

    def describe(self):
        """One line: name=value for every field."""
        return " ".join(f"{f.name}={format_value(getattr(self, f.name))}" for f in dataclasses.fields(self))


def format_value(value):
    """A recipe value as the log line and --help show it."""
    if isinstance(value, tuple):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) or "none"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)

