"""Checkpoints of train_poly.py, and loading a model from them or from the original code's.

A train_poly.py checkpoint keeps the original's keys ("epoch": the last finished epoch,
0-based; "state_dict"; "optim_dict"; "val_Dice_best") and adds what makes it
self-describing and resumable: "model" (registry name, or the `module:ClassName` the user
named), "config" (constructor arguments), "recipe" (the effective recipe), "schedule" (the
learning-rate scheduler's state, where it has one), "seed", "step" (TensorBoard step),
"iteration" and "sums" (iterations done in the next epoch and their loss sums, when a signal
stopped the run mid-epoch; 0 and {} otherwise). The random states follow from seed, epoch and
iteration (engine/training.py). Everything is tensors and plain Python values, so it loads
with weights_only=True. A checkpoint never imports code on its own say: a model from outside
the project is built only when the user names its module again.
"""
import os

import torch

from models.reference import ReferenceCheckpointError, load_reference_state
from utils.brats import SEGMENTATION_KINDS
from utils.errors import first_line
from utils.io import atomic_path
from utils.pickled import load_weights, unreadable

from .models import DEFAULT_MODEL, ModelError, build_model, class_name, is_registered


# the fields of a train_poly.py checkpoint that loading reads: name -> type (REQUIRED ones must be there)
OWN_FIELDS = {"model": str, "config": dict, "state_dict": dict, "recipe": dict, "epoch": int}
REQUIRED = ("model", "config", "state_dict")


class CheckpointError(Exception):
    """A checkpoint that cannot be read or does not fit; the message is one line."""


def save_checkpoint(path, state):
    """torch.save under a temporary name, then rename: a crash never leaves a partial file."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path):
    """The checkpoint dict at `path` (on the CPU, weights_only=True; numpy scalars allowed)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        ckpt = load_weights(path)
    except Exception as err:  # torch raises many kinds for a file that is not a checkpoint
        raise CheckpointError(unreadable(path, err))
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: expected a dict, got {type(ckpt).__name__}")
    if is_own(ckpt):
        wrong = [k for k, kind in OWN_FIELDS.items() if (k in ckpt or k in REQUIRED) and not isinstance(ckpt.get(k), kind)]
        if wrong:
            raise CheckpointError(f"{path}: a train_poly.py checkpoint with {', '.join(wrong)} missing or of the "
                                  "wrong type")
    state = next((ckpt[k] for k in ("state_dict", "network_weights") if k in ckpt), ckpt)
    if isinstance(state, dict):
        bad = [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise CheckpointError(f"{path}: NaN or infinite weights in {len(bad)} tensor{'s' * (len(bad) > 1)} "
                                  f"(e.g. {bad[0]})")
    return ckpt


def is_own(ckpt):
    """Whether a checkpoint was written by train_poly.py (else: the original code's format)."""
    return "model" in ckpt and "config" in ckpt


def checkpoint_model(path, ckpt, given=None):
    """The model spec to build for a train_poly.py checkpoint: its recorded name, or for a
    model from outside the project the spec the user gives again (`given`; its file may have
    moved, its class name must be the recorded one)."""
    recorded = ckpt["model"]
    if is_registered(recorded):
        if given not in (None, recorded):
            raise CheckpointError(f"{path}: holds a {recorded} model, not {given}")
        return recorded
    if given is None:
        raise CheckpointError(f"{path}: its model {recorded} is not part of this project; "
                              f"name its module again with --model {recorded}")
    if class_name(given) != class_name(recorded):
        raise CheckpointError(f"{path}: holds a {recorded} model; --model {given} names another class")
    return given


def load_model(path, model=None, config=None):
    """(segmenting model in eval mode on the CPU, checkpoint dict) from a train_poly.py checkpoint (its
    own model and configuration; `model` only to name the module of a model from outside the
    project) or from one of the original code (built as `model`, default imfuse, with
    `config`, its weights mapped by the model's reference_renames)."""
    ckpt = load_checkpoint(path)
    spec = model or DEFAULT_MODEL
    try:
        if is_own(ckpt):
            spec = checkpoint_model(path, ckpt, model)
            net = build_model(spec, **ckpt["config"])
            net.load_state_dict(ckpt["state_dict"])
        else:
            net = build_model(spec, **(config or {}))
            if not hasattr(net, "reference_renames"):
                raise CheckpointError(f"{path}: not a train_poly.py checkpoint, and {spec} has no "
                                      "mapping to the original code's checkpoints")
            load_reference_state(net, ckpt)
    except ModelError as err:
        raise CheckpointError(f"{path}: {err}")
    except ReferenceCheckpointError as err:
        raise CheckpointError(f"{path}: {err}")
    except RuntimeError as err:  # load_state_dict: the weights do not fit the configuration
        raise CheckpointError(f"{path}: does not fit model {spec!r} "
                              f"({first_line(err)})")
    if net.output_kind not in SEGMENTATION_KINDS:
        raise CheckpointError(f"{path}: its {spec} model outputs {net.output_kind!r}, not a segmentation (a "
                              f"pre-training stage); train a segmentation stage from it with train_poly.py "
                              f"--model {spec} --pretrained {path} (and the sizes of this run)")
    return net.eval(), ckpt


def load_ensemble(paths, model=None, config=None):
    """([models], [checkpoints]) of load_model for each path: an ensemble, whose outputs are
    averaged. CheckpointError (one line) unless they share one model kind (class) and output
    kind; their configurations (and windows) may differ."""
    loaded = [load_model(path, model, config) for path in paths]
    first = loaded[0][0]
    for path, (net, _) in zip(paths[1:], loaded[1:]):
        if type(net) is not type(first) or net.output_kind != first.output_kind:
            raise CheckpointError(f"{path}: a {type(net).__name__} model with {net.output_kind} outputs; "
                                  f"{paths[0]} holds a {type(first).__name__} with {first.output_kind} outputs: "
                                  "an ensemble averages checkpoints of one model kind")
    return [net for net, _ in loaded], [ckpt for _, ckpt in loaded]
