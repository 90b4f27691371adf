"""Extract the weights of a checkpoint that holds pickled Python objects (e.g. ShaSpec's
train_SS.py saves {"model": the whole model, "optimizer": the whole SGD object, ...}) into a
plain one that this project loads with weights_only=True:

    python -m engine.convert ORIGINAL.pth OUT.pth --trust_pickled_code [--code DIR]

Unpickling runs code named in the file, and needs the classes it names importable (the
original repository's folder, given with --code or on PYTHONPATH): do it only for a file you
trust. OUT.pth holds {"state_dict": the model's tensors} and the plain values the file had
(e.g. "iter", "val_Dice_best"); nothing else is read from the original.
"""
import sys

import numpy as np
import torch

from utils.errors import first_line
from utils.io import atomic_path
from utils.parser import ArgumentParser


class ConvertError(Exception):
    """A file that cannot be converted; the message is one line."""


def _tensors(value):
    """A module's state dict, or a dict of tensors as it is; None for anything else."""
    if isinstance(value, torch.nn.Module):
        return value.state_dict()
    if isinstance(value, dict) and value and all(torch.is_tensor(v) for v in value.values()):
        return dict(value)
    return None


def extract(checkpoint):
    """{"state_dict": tensors, plain values...} from an unpickled checkpoint: the model object
    (or state dict) found under "model", "state_dict" or "network_weights", or the object itself."""
    state = _tensors(checkpoint)
    if state is None and isinstance(checkpoint, dict):
        state = next((s for key in ("model", "state_dict", "network_weights")
                      if (s := _tensors(checkpoint.get(key))) is not None), None)
    if state is None:
        raise ConvertError("no model or tensors under 'model', 'state_dict' or 'network_weights'")
    out = {"state_dict": {k: v.detach().cpu().clone() for k, v in state.items()}}
    if isinstance(checkpoint, dict):
        for key, value in checkpoint.items():
            if isinstance(value, np.generic):  # e.g. a Dice kept as a numpy float
                value = value.item()
            if type(value) in (int, float, str, bool):
                out[key] = value
    return out


def convert(source, target, code=None):
    """Unpickle `source` (with `code` importable) and write its weights to `target`."""
    if code:
        sys.path.insert(0, code)
    try:
        checkpoint = torch.load(source, map_location="cpu", weights_only=False)
    except ModuleNotFoundError as err:
        raise ConvertError(f"{source}: needs the module {err.name!r} of the code that wrote it; "
                           "give its folder with --code")
    except Exception as err:
        raise ConvertError(f"{source}: cannot be read ({type(err).__name__}: {first_line(err)})")
    try:
        out = extract(checkpoint)
    except ConvertError as err:
        raise ConvertError(f"{source}: {err}")
    with atomic_path(target) as tmp:
        torch.save(out, tmp)
    return out


def main(argv=None):
    p = ArgumentParser(prog="python -m engine.convert", description=__doc__.splitlines()[0])
    p.add_argument("source", help="checkpoint with pickled objects")
    p.add_argument("target", help="plain checkpoint to write")
    p.add_argument("--trust_pickled_code", action="store_true",
                   help="required: unpickling runs code named in the file")
    p.add_argument("--code", help="folder of the original code (put on the import path)")
    args = p.parse_args(argv)
    p.check_writable("target", args.target)
    if not args.trust_pickled_code:
        p.error(f"{args.source}: unpickling runs code named in the file; give --trust_pickled_code "
                "if you trust it")
    try:
        out = convert(args.source, args.target, args.code)
    except (ConvertError, OSError) as err:
        print(f"{p.prog}: {err}", file=sys.stderr)
        return 1
    print(f"{args.target}: {len(out['state_dict'])} tensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
