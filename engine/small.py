"""A model's small configuration as train_poly.py flags, for CPU demos and `make compare`:
its `small_config` (constructor arguments) and `small_recipe` (recipe values for a few
hundred iterations on the synthetic cohort), both class attributes of the model. A model
trained in two stages (M3AE) also has `small_pretraining`: {"config": the constructor
arguments that change, "recipe": its recipe values} of the stage before.

    python -m engine.small robustseg   ->   --model robustseg --model_args '{...}' --lr 0.001 ...
    python -m engine.small m3ae --pretraining   ->   the pre-training stage's flags (nothing
                                                     for a model trained in one stage)
"""
import json
import shlex
import sys

from utils.recipe import format_value

from .models import ModelError, model_class


def small_flags(spec, pretraining=False):
    """train_poly.py arguments that build and train `spec` in its small configuration (the
    stage before, with pretraining=True: [] for a model trained in one stage)."""
    cls = model_class(spec)
    if not hasattr(cls, "small_config"):
        raise ModelError(f"model {spec} has no small configuration (class attributes small_config and small_recipe)")
    config, recipe = cls.small_config, getattr(cls, "small_recipe", {})
    if pretraining:
        if not hasattr(cls, "small_pretraining"):
            return []
        config, recipe = {**config, **cls.small_pretraining["config"]}, cls.small_pretraining["recipe"]
    flags = ["--model", spec, "--model_args", json.dumps(config, separators=(",", ":"))]
    for name, value in recipe.items():
        flags += [f"--{name}", json.dumps(value) if isinstance(value, dict) else format_value(value)]
    return flags


if __name__ == "__main__":
    args = sys.argv[1:]
    try:
        if len(args) not in (1, 2) or args[1:] not in ([], ["--pretraining"]):
            raise ModelError("give a registered model name, and --pretraining for the stage before")
        flags = small_flags(args[0], pretraining=args[1:] == ["--pretraining"])
        print(shlex.join(flags) if flags else "")
    except ModelError as err:
        sys.exit(f"python -m engine.small MODEL [--pretraining]: {err}")
