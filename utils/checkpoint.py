"""Checkpoints of train_poly.py, and loading a model from them or from the original code's.

A train_poly.py checkpoint keeps the original's keys ("epoch": the last finished epoch,
0-based; "state_dict"; "optim_dict"; "val_Dice_best") and adds what makes it
self-describing and resumable: "model" (registry name) and "config" (constructor arguments),
"seed", "step" (TensorBoard step), "iteration" and "sums" (iterations done in the next epoch
and their loss sums, when a signal stopped the run mid-epoch; 0 and {} otherwise). The random
states follow from seed, epoch and iteration (utils/training.py). Everything is tensors and
plain Python values, so it loads with weights_only=True.
"""
import os
import pickle
import zipfile

import torch

from models import ReferenceCheckpointError, build_model, from_reference

from .io import atomic_path


class CheckpointError(Exception):
    """A checkpoint that cannot be read or does not fit; the message is one line."""


def save_checkpoint(path, state):
    """torch.save under a temporary name, then rename: a crash never leaves a partial file."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path):
    """The checkpoint dict at `path` (on the CPU, weights_only=True)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({detail[:200]})")
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: expected a dict, got {type(ckpt).__name__}")
    return ckpt


def is_own(ckpt):
    """Whether a checkpoint was written by train_poly.py (else: the original code's format)."""
    return "model" in ckpt and "config" in ckpt


def load_model(path, name="imfuse", **config):
    """(model in eval mode on the CPU, checkpoint dict) from a train_poly.py checkpoint (its
    own model and configuration; `name` and `config` are ignored) or from one of the original
    code (built as build_model(name, **config), via models.from_reference)."""
    ckpt = load_checkpoint(path)
    if is_own(ckpt):
        try:
            model = build_model(ckpt["model"], **ckpt["config"])
            model.load_state_dict(ckpt["state_dict"])
        except (ValueError, TypeError, RuntimeError) as err:
            raise CheckpointError(f"{path}: does not fit model {ckpt['model']!r} "
                                  f"({str(err).strip().splitlines()[0][:200]})")
    else:
        try:
            model = from_reference(ckpt, name, **config)
        except ReferenceCheckpointError as err:
            raise CheckpointError(f"{path}: {err}")
    return model.eval(), ckpt


def add_original_flags(parser):
    """The flags that describe a checkpoint of the original code (which does not record its
    model): --model --patch_size --interleaved_tokenization --mamba_skip --first_skip."""
    group = parser.add_argument_group("checkpoints of the original code (ours describe their model)")
    group.add_argument("--model", default="imfuse", help="imfuse or mmformer")
    group.add_argument("--patch_size", type=int, default=128)
    group.add_argument("--interleaved_tokenization", action="store_true", help="I-MFB")
    group.add_argument("--mamba_skip", action="store_true", help="Mamba fusion of the skips")
    group.add_argument("--first_skip", action="store_true", help="a level-1 skip connection")


def load_model_from_args(args):
    """load_model(args.resume, ...) with the flags of add_original_flags."""
    config = {"patch_size": args.patch_size}
    if args.model == "imfuse":
        config.update(interleaved=args.interleaved_tokenization, mamba_skip=args.mamba_skip,
                      first_skip=args.first_skip)
    return load_model(args.resume, args.model, **config)
