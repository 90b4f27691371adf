"""A model's small configuration as train_poly.py flags, for CPU demos and `make compare`:
its `small_config` (constructor arguments) and `small_recipe` (recipe values for a few
hundred iterations on the synthetic cohort), both class attributes of the model.

    python -m engine.small robustseg   ->   --model robustseg --model_args '{...}' --lr 0.001 ...
"""
import json
import shlex
import sys

from utils.recipe import format_value

from .models import ModelError, model_class


def small_flags(spec):
    """train_poly.py arguments that build and train `spec` in its small configuration."""
    cls = model_class(spec)
    if not hasattr(cls, "small_config"):
        raise ModelError(f"model {spec} has no small configuration (class attributes small_config and small_recipe)")
    flags = ["--model", spec, "--model_args", json.dumps(cls.small_config, separators=(",", ":"))]
    for name, value in getattr(cls, "small_recipe", {}).items():
        flags += [f"--{name}", json.dumps(value) if isinstance(value, dict) else format_value(value)]
    return flags


if __name__ == "__main__":
    try:
        print(shlex.join(small_flags(sys.argv[1])))
    except (IndexError, ModelError) as err:
        sys.exit(f"python -m engine.small MODEL: {err}")
