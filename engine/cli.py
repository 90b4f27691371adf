"""Command-line flags shared by train_poly.py, test.py and predict.py: the model and its
configuration (the original code's flag names), one flag per recipe field, and the inference
options (ensembles, mirroring, window weights)."""
import argparse
import dataclasses
import json
import os

from models import list_models
from utils.brats import SUBSETS
from utils.recipe import AUGMENTATIONS, Recipe, format_value
from utils.schedule import OPTIMIZERS, SCHEDULES

from .inference import AXES, WINDOW_WEIGHTS, mirror_flips
from .models import DEFAULT_MODEL, ModelError, accepts, model_class

# flag -> constructor argument, for the models that have it
VARIANT_FLAGS = {"interleaved_tokenization": "interleaved", "mamba_skip": "mamba_skip", "first_skip": "first_skip"}
SIZE_FLAGS = {"patch_size": int, "width": int, "dim": int, "heads": int, "mlp_dim": int, "dropout": float,
              "depth": int, "token_grid": int}
STAGE_FLAG = "stage"  # --stage: the training stage of a model trained in stages (M3AE)


def add_model_flags(parser, sizes=True, title="model"):
    """--model and the configuration flags (only those given reach the constructor)."""
    group = parser.add_argument_group(title)
    group.add_argument("--model", help=f"registered model ({', '.join(list_models())}; default "
                                       f"{DEFAULT_MODEL}) or your own class as path/to/file.py:ClassName "
                                       "or package.module:ClassName")
    group.add_argument("--patch_size", type=int, help="window side of cubic models (default: the model's, 128)")
    group.add_argument("--interleaved_tokenization", action="store_true", help="IM-Fuse: I-MFB instead of MFB")
    group.add_argument("--mamba_skip", action="store_true", help="IM-Fuse: Mamba fusion of the skip connections")
    group.add_argument("--first_skip", action="store_true", help="IM-Fuse: a level-1 skip connection too")
    if sizes:
        group.add_argument("--window", nargs=3, type=int, metavar=("X", "Y", "Z"),
                           help="window of a model whose constructor takes `window`")
        group.add_argument("--model_args", type=_json_dict, metavar="JSON",
                           help="any constructor arguments, e.g. '{\"style_width\": 8}'")
        for flag, kind in SIZE_FLAGS.items():
            if flag != "patch_size":
                group.add_argument(f"--{flag}", type=kind, help="model size (default: the paper's)")
        group.add_argument(f"--{STAGE_FLAG}", metavar="STAGE",
                           help="M3AE: pretrain (masked autoencoder, no labels, no validation) or finetune "
                                "(segmentation, the default; start it from a pre-training run with --pretrained)")


def add_inference_flags(parser):
    """--resume (one checkpoint or an ensemble), --tta, --window_weight and --reference_path of
    test.py and predict.py."""
    parser.add_argument("--resume", required=True, nargs="+", metavar="CHECKPOINT",
                        help="checkpoint (train_poly.py's or the original code's); several: an ensemble "
                             "(one model kind; their probabilities averaged)")
    parser.add_argument("--tta", nargs="?", const=AXES, default="", metavar="AXES",
                        help=f"test-time mirroring over the voxel axes given (any of {AXES}; default all "
                             "three: 8 flips), probabilities averaged")
    parser.add_argument("--window_weight", choices=WINDOW_WEIGHTS, default="uniform",
                        help="how overlapping windows are averaged: uniformly (the paper's protocol) or with "
                             "Gaussian weights, sigma 1/8 of the window (nnU-Net's)")
    parser.add_argument("--reference_path", action="store_true",
                        help="PyTorch's float32 operators only: none of the fused CPU kernels "
                             "(models/cpu_kernels.py) that predict and evaluate faster with the same labels, "
                             "and the C allocator's defaults (utils/memory.py)")


def inference_options(parser, args):
    """{flips, window_weight, reference_path} for engine.evaluation from the flags; a bad --tta
    is a usage error."""
    try:
        flips = mirror_flips(args.tta.lower())
    except ValueError as err:
        parser.error(f"--tta: {err}")
    return {"flips": flips, "window_weight": args.window_weight, "reference_path": args.reference_path}


def inference_record(args, options):
    """What run.json and predict.py's report record of the inference flags."""
    return {"checkpoints": [os.path.abspath(path) for path in args.resume], "tta": args.tta.lower(),
            "flips": len(options["flips"]), "window_weight": args.window_weight,
            "reference_path": args.reference_path}


def model_config(parser, args, check=True):
    """The constructor arguments the flags give, checked against the class of --model (default
    imfuse): a flag the model does not take is a usage error. check=False: the class is not
    known yet (a resumed run checks the flags against its checkpoint's model)."""
    config = {name: True for flag, name in VARIANT_FLAGS.items() if getattr(args, flag)}
    config.update({flag: getattr(args, flag) for flag in (*SIZE_FLAGS, STAGE_FLAG)
                   if getattr(args, flag, None) is not None})
    if getattr(args, "window", None):
        config["window"] = tuple(args.window)
    config.update(getattr(args, "model_args", None) or {})
    if not check:
        return config
    spec = args.model or DEFAULT_MODEL
    try:
        cls = model_class(spec)
    except ModelError as err:
        parser.error(str(err))
    flags = {name: flag for flag, name in VARIANT_FLAGS.items()}
    for name in config:
        if not accepts(cls, name):
            parser.error(f"--{flags.get(name, name)} does not apply to model {spec!r}")
    return config


def _grad_clip(text):
    if text.strip().lower() == "none":
        return None
    return _recipe_value("grad_clip", float(text))


def _val_every(text):
    """N, or comma-separated epochs."""
    values = tuple(int(v) for v in text.split(","))
    return _recipe_value("val_every", values if "," in text else values[0])


def _int_from(minimum, words):
    """An argparse type: an integer of at least `minimum`."""
    def parse(text):
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be a {words} integer, got {value}")
        return value
    parse.__name__ = "integer"  # argparse names it in "invalid integer value"
    return parse


positive_int, non_negative_int = _int_from(1, "positive"), _int_from(0, "non-negative")


def _json_dict(text):
    try:
        value = json.loads(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"not JSON ({err})")
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"amsgrad\": true}}', got {text}")
    return value


def _recipe_value(field, value):
    """value, checked as the recipe checks it (a usage error otherwise)."""
    try:
        Recipe(**{field: value}).check()
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix("recipe: "))
    return value


def _recipe_float(field):
    """An argparse type: a number, checked as the recipe checks `field`."""
    def parse(text):
        return _recipe_value(field, float(text))
    parse.__name__ = "number"  # argparse names it in "invalid number value"
    return parse


def _subset_weights(text):
    if text.strip().lower() == "uniform":
        return None
    try:
        weights = tuple(float(w) for w in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'uniform' or {len(SUBSETS)} comma-separated numbers")
    return _recipe_value("subset_weights", weights)


def _augmentations(text):
    names = tuple(n.strip() for n in text.split(",") if n.strip() and n.strip().lower() != "none")
    return _recipe_value("augmentations", names)


RECIPE_FLAGS = {  # recipe field -> (argparse keyword arguments, help)
    "optimizer": (dict(choices=tuple(OPTIMIZERS)), ""),
    "optimizer_args": (dict(type=_json_dict, metavar="JSON"), "e.g. '{\"amsgrad\": true}'"),
    "lr": (dict(type=_recipe_float("lr")), "base learning rate"),
    "weight_decay": (dict(type=_recipe_float("weight_decay")), ""),
    "schedule": (dict(choices=tuple(SCHEDULES)), "learning-rate schedule"),
    "schedule_args": (dict(type=_json_dict, metavar="JSON"), "e.g. '{\"power\": 0.9}', '{\"patience\": 10}'"),
    "num_epochs": (dict(type=positive_int), "may also change when resuming"),
    "iter_per_epoch": (dict(type=positive_int), "iterations per epoch (recipe None: one pass over the cases)"),
    "batch_size": (dict(type=positive_int), "per process"),
    "subset_weights": (dict(type=_subset_weights, metavar="W1,...,W15|uniform"),
                       "probability of each modality subset, in the paper's order, up to normalisation"),
    "augmentations": (dict(type=_augmentations, metavar="NAMES"),
                      f"comma-separated, applied in order: any of {', '.join(AUGMENTATIONS)}, or none"),
    "foreground_oversampling": (dict(type=_recipe_float("foreground_oversampling"), metavar="P"),
                                "probability of a crop centred on a tumour voxel"),
    "warmup_epochs": (dict(type=non_negative_int), "first epochs with every modality present"),
    "grad_clip": (dict(type=_grad_clip, metavar="NORM|none"), "clip the gradient norm before each step"),
    "val_every": (dict(type=_val_every, metavar="N|E1,E2,..."),
                  "validate every N epochs, or after the epochs listed (1-based); always after the last"),
}
assert set(RECIPE_FLAGS) == {f.name for f in dataclasses.fields(Recipe)}


def add_recipe_flags(parser):
    """One flag per recipe field; a flag not given leaves the model's (or the checkpoint's) value."""
    group = parser.add_argument_group("recipe (default: the model's; a resumed run keeps its checkpoint's)")
    defaults = Recipe()
    for name, (kwargs, help_text) in RECIPE_FLAGS.items():
        imfuse = format_value(getattr(defaults, name))
        group.add_argument(f"--{name}", default=argparse.SUPPRESS, help=f"{help_text} (IM-Fuse: {imfuse})".lstrip(),
                           **kwargs)


def recipe_flags(args):
    """{field: value} of the recipe flags given."""
    return {name: getattr(args, name) for name in RECIPE_FLAGS if hasattr(args, name)}
