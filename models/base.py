"""The model contract: what training, evaluation and prediction (the engine) need from a model.
IM-Fuse, mmFormer and every competitor follow it; so can a researcher's own model, in a file
of its own (`train_poly.py --model my_model.py:MyNet`). A model is an nn.Module with

    window         3-tuple (X, Y, Z): the training crop and the sliding window of evaluation
                   (cubic models derive it from their `patch_size` argument)
    output_kind    "classes": softmax over background, NCR, ED, ET (4 channels),
                   "regions": sigmoid of WT, TC, ET, in that order (3 channels), or
                   "image": the 4 modalities (a pre-training stage that does not segment:
                   trained without validation, refused by test.py and predict.py)
    recipe         a utils.recipe.Recipe: the training defaults train_poly.py uses for it
    forward(x, mask)
                   x (B, 4, *window) in MODALITIES order, mask (B, 4) bool (the modalities
                   present). Eval mode: the output maps (B, channels, *window) as
                   probabilities of the output kind; they must not depend on the images of
                   absent modalities. Train mode: whatever `loss` takes.
    loss(outputs, batch) -> (total, {name: tensor})
                   outputs: forward's in train mode; batch: {"image", "label", "mask"} as
                   given to forward ("label" (B, *window) int64, labels 0-3). The parts are
                   logged by name; parameters enter the loss through forward only.
    encode(x, mask) -> features, decode(features, mask) -> output maps   (optional)
                   with them, evaluation encodes each window once for all subsets
                   (encode's mask: the union of the subsets); without, it runs one forward
                   pass per subset.
    uses_position   (optional, default False)
                   True when the model needs to know where each window lies in the native
                   image grid (e.g. to read a learned full-size image there): forward then
                   takes a third argument, grid (B, 3, 2) int64, per axis (X, Y, Z) the native
                   index of the window's first voxel and the step (+1, or -1 along an axis a
                   training crop was flipped); voxel i lies at first + step * i (beyond the
                   grid where the crop was padded). Training then takes only augmentations
                   that keep voxels on the grid, and every case needs its crop box
                   (meta/<case>.json); evaluation runs one forward pass per subset.
    uses_available   (optional, default False)
                   True when training draws modality masks of its own (beyond the batch's):
                   forward then gets the keyword argument available (B, 4) bool in training,
                   the modalities each case has (a natively missing one is all zeros), so
                   that its draws keep to them as the batch's mask does.
    optimizer_groups(recipe)   (optional)
                   the optimiser's parameter groups (dicts with "params", optionally their
                   own "lr"); default: every parameter, at the recipe's lr
    pretrained_keys   (optional, default ())
                   state keys a fresh training run must take from a checkpoint of an earlier
                   stage (train_poly.py --pretrained; refused without)
    pretraining_config   (optional, default None)
                   the constructor arguments that turn this configuration into the stage
                   before's: --pretrained then also reads an original checkpoint of that stage
                   (with from_reference)
    unused_parameters   (optional, default False)
                   True when a training step may leave parameters without a gradient (e.g.
                   the encoders of absent modalities); distributed training then looks for
                   them at every step.

Constructor arguments are the model's configuration (checkpoints store them); sizes default
to the original's.
"""
from utils.brats import OUTPUT_CHANNELS
from utils.recipe import Recipe


def check_input(model, x, mask=None):
    """ValueError unless x is (B, M, *model.window) with M = model.num_modalities and the mask,
    when given, (B, M) with a modality in every sample."""
    M, window = model.num_modalities, tuple(model.window)
    if x.dim() != 5 or x.shape[1] != M or tuple(x.shape[2:]) != window:
        raise ValueError(f"input must be (batch, {M}, {', '.join(map(str, window))}) for the window "
                         f"{'x'.join(map(str, window))}, got {tuple(x.shape)}")
    if mask is not None and tuple(mask.shape) != (x.shape[0], M):
        raise ValueError(f"mask must be (batch, {M}) bool, got {tuple(mask.shape)}")
    if mask is not None and not mask.any(1).all():
        raise ValueError("every sample needs at least one modality")


def contract_problem(model):
    """What keeps `model` (an instance) from following the contract, in words, or None."""
    window = getattr(model, "window", None)
    if not (isinstance(window, tuple) and len(window) == 3
            and all(isinstance(w, int) and w > 0 for w in window)):
        return f"`window` must be a 3-tuple of positive ints, got {window!r}"
    kind = getattr(model, "output_kind", None)
    if kind not in OUTPUT_CHANNELS:
        return f"`output_kind` must be one of {', '.join(map(repr, OUTPUT_CHANNELS))}, got {kind!r}"
    if not isinstance(getattr(model, "recipe", None), Recipe):
        return "`recipe` must be a utils.recipe.Recipe"
    if not callable(getattr(model, "loss", None)):
        return "no `loss(outputs, batch)` method"
    if hasattr(model, "encode") != hasattr(model, "decode"):
        return "`encode` and `decode` come together (or neither)"
    return None
