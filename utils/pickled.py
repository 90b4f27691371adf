"""Checkpoints that hold pickled Python objects (a whole model or optimizer, as some original
training scripts save): torch.load(weights_only=True) refuses them, since unpickling them runs
code named in the file. This says so in one line and names the one way this project reads
them: an explicit conversion (engine/convert.py)."""
import pickle

import numpy as np
import torch

from .errors import first_line

CONVERT = "python -m engine.convert {path} OUT.pth --trust_pickled_code"
# numpy scalars (a Dice or a loss kept as np.float64, as nnU-Net's log keeps them) are plain
# numbers: reading them runs no code of the file. numpy 1.x wrote the scalar's constructor as
# numpy.core.multiarray.scalar (numpy 2: numpy._core), so a file of either version loads.
NUMPY_SCALARS = [np._core.multiarray.scalar, (np._core.multiarray.scalar, "numpy.core.multiarray.scalar"),
                 np.dtype] + [getattr(np.dtypes, f"{kind}DType")
                              for kind in ("Float64", "Float32", "Float16", "Int64", "Int32", "Bool")]


def load_weights(path):
    """torch.load(path) on the CPU with weights_only=True, numpy scalars allowed."""
    with torch.serialization.safe_globals(NUMPY_SCALARS):
        return torch.load(path, map_location="cpu", weights_only=True)


def pickled_objects(path):
    """The classes and functions (module.name) a checkpoint file would import when unpickled
    that weights_only loading does not allow; [] for a plain file or one torch cannot list."""
    allowed = {g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}" for g in NUMPY_SCALARS}
    try:
        return [name for name in torch.serialization.get_unsafe_globals_in_checkpoint(path) if name not in allowed]
    except (RuntimeError, OSError, ValueError, pickle.UnpicklingError):
        return []


def unreadable(path, err):
    """One line for a file torch cannot load with weights_only: the pickled objects it holds
    (pickled_problem) or that it is no checkpoint this project can read, with torch's reason
    unless that reason is advice to unpickle."""
    problem = pickled_problem(path)
    if problem:
        return problem
    detail = first_line(err)
    reason = "" if "weights_only" in str(err) or "unpickl" in detail.lower() else f" ({detail})"
    return f"{path}: not a checkpoint this project can read safely{reason}"


def pickled_problem(path):
    """One line for a file of pickled objects (what they are and how to convert it), or None."""
    names = pickled_objects(path)
    if not names:
        return None
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return (f"{path}: holds pickled Python objects ({shown}); reading them runs code from the file, "
            f"so it is not done here. If you trust the file, extract its weights once with "
            f"`{CONVERT.format(path=path)}` (the original code must be importable) and use OUT.pth")
