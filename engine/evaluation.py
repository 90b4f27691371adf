"""Evaluation over modality subsets (SPEC section 5) for any model of the contract
(models/base.py): sliding-window output maps of whole cropped volumes (each window encoded
once and decoded for every subset when the model has encode/decode, one forward pass per
subset otherwise), optionally mirrored, Gaussian-weighted and averaged over an ensemble of
checkpoints; labels by the model's output kind, BraTS metrics per case and subset, and the
per-subset summary (the paper's table)."""
import contextlib

import numpy as np
import torch

from data.preprocessing import read_meta
from data.splits import format_mask
from models import cpu_kernels
from models.blocks import mask_modalities
from utils.brats import MODALITIES, OUTPUT_CHANNELS, subset_name, to_labels
from utils.metrics import brats_metrics
from utils.progress import progress_bar

from .inference import flip_spatial, sliding_window

DICE = ("WT", "TC", "ET", "ETpp")
HD95 = ("HD95_WT", "HD95_TC", "HD95_ET")
RESULT_FIELDS = ("case", "subset", "mask") + DICE + HD95
SUMMARY_FIELDS = ("subset", "mask", "cases") + DICE + HD95


@torch.no_grad()
def predict_subsets(model, volume, subsets, batch_size=1, progress=False, origin=None, flips=((),),
                    window_weight="uniform", reference_path=False):
    """volume (M, X, Y, Z) -> the model's output maps (S, K, X, Y, Z), one per subset, on the
    model's device. With encode/decode each window is encoded once, with the images of the
    modalities no subset uses set to zero (IM-Fuse skips their encoders), and decoded once per
    subset (decode must ignore the modalities its mask marks absent); otherwise each subset is
    one forward pass with the images of its absent modalities set to zero. A model that uses
    positions (models/base.py) gets each window's place in the native grid: `origin` (the
    native index of the volume's first voxel, from the crop box) + the window's start.
    flips: test-time mirroring (engine.inference.mirror_flips): each window is also predicted
    flipped along the axes of each flip (encoded once per flip), the outputs flipped back and
    averaged; the default is no mirroring. window_weight: "uniform" or "gaussian" (sliding_window).
    reference_path: PyTorch's operators only, no fused CPU kernels (models.cpu_kernels)."""
    device = next(model.parameters()).device
    masks = torch.tensor(subsets, dtype=torch.bool, device=device)  # (S, M)
    channels = len(OUTPUT_CHANNELS[model.output_kind])
    positions = getattr(model, "uses_position", False)
    if positions and origin is None:
        raise ValueError(f"{model.__class__.__name__} places every window in the native grid: the case needs "
                         "its crop box (meta/<case>.json, written by preprocess.py)")
    size = torch.tensor(model.window, device=device)

    def predict_flip(windows, starts, flip):  # (B, M, *window) -> (B, S, K, *window)
        windows = flip_spatial(windows, flip)
        batch_masks = masks[:, None].expand(-1, windows.shape[0], -1)  # (S, B, M)
        if positions:  # (B, 3, 2): per axis the native index of voxel 0 of the (flipped) window and the step
            first = starts.to(device) + torch.as_tensor(origin, device=device)
            step = torch.ones_like(first)
            for a in flip:
                first[:, a] += size[a] - 1
                step[:, a] = -1
            grid = torch.stack([first, step], dim=-1)
            out = [model(mask_modalities(windows, m), m, grid) for m in batch_masks]
        elif hasattr(model, "encode"):
            union = batch_masks.any(0)
            features = model.encode(mask_modalities(windows, union), union)
            out = [model.decode(features, m) for m in batch_masks]
        else:
            out = [model(mask_modalities(windows, m), m) for m in batch_masks]
        out = torch.stack(out, dim=1).float()
        if out.shape[2] != channels:
            raise ValueError(f"the model outputs {out.shape[2]} channels; its output kind "
                             f"{model.output_kind!r} has {channels}")
        return flip_spatial(out, flip)

    def predict(windows, starts=None):
        return sum(predict_flip(windows, starts, flip) for flip in flips) / len(flips)

    with cpu_kernels.reference_path() if reference_path else contextlib.nullcontext():
        return sliding_window(volume.to(device, torch.float32), model.window, predict, batch_size=batch_size,
                              progress=progress, with_starts=positions, weight=window_weight)


def predict_ensemble(models, volume, subsets, batch_size=1, progress=False, origin=None, flips=((),),
                     window_weight="uniform", reference_path=False):
    """predict_subsets of each model of the list `models` (each with its own window), averaged:
    (S, K, X, Y, Z)."""
    total = None
    for model in models:
        out = predict_subsets(model, volume, subsets, batch_size, progress, origin, flips, window_weight,
                              reference_path)
        total = out if total is None else total + out.to(total.device)
    return total / len(models)


def evaluate(model, dataset, subsets=None, batch_size=1, distances=True, progress=True,
             on_case=None, indices=None, flips=((),), window_weight="uniform", reference_path=False):
    """Segment every case (or those at `indices`) of an EvalDataset with each of `subsets`
    (default: the case's assigned subset) -> result rows {case, subset, mask, WT, TC, ET,
    ETpp[, HD95_*]}. model: a model, or a list of them (an ensemble, averaged; see
    engine.checkpoint.load_ensemble); flips and window_weight as predict_subsets.
    on_case(sample, meta, subsets, labels (S, X, Y, Z) uint8) is called after each case."""
    models = list(model) if isinstance(model, (list, tuple)) else [model]
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    rows = []
    for index in progress_bar(range(len(dataset)) if indices is None else indices, enabled=progress,
                              desc="evaluate", unit="case"):
        sample = dataset[index]
        meta = read_meta(dataset.root, sample["name"])
        spacing = meta["spacing"] if meta else (1, 1, 1)
        case_subsets = list(subsets or [tuple(sample["mask"].tolist())])
        probs = predict_ensemble(models, sample["image"], case_subsets, batch_size, origin=sample.get("origin"),
                                 flips=flips, window_weight=window_weight, reference_path=reference_path)
        labels = to_labels(probs, models[0].output_kind, axis=1).to(torch.uint8).cpu().numpy()
        del probs
        target = sample["label"].numpy()
        for mask, pred in zip(case_subsets, labels):
            rows.append({"case": sample["name"], "subset": subset_name(mask),
                         "mask": format_mask(mask), **brats_metrics(pred, target, spacing, distances)})
        if on_case:
            on_case(sample, meta, case_subsets, labels)
    for m, training in zip(models, was_training):
        m.train(training)
    return rows


def summarize(rows):
    """Per-subset means of the result rows (subsets in order of appearance), then a row
    "mean" averaging the subset means."""
    metrics = [k for k in DICE + HD95 if rows and k in rows[0]]
    by_subset = {}
    for row in rows:
        by_subset.setdefault((row["subset"], row["mask"]), []).append(row)
    summary = [{"subset": name, "mask": mask, "cases": len(group),
                **{k: float(np.mean([r[k] for r in group])) for k in metrics}}
               for (name, mask), group in by_subset.items()]
    if summary:
        summary.append({"subset": "mean", "mask": "", "cases": len({r["case"] for r in rows}),
                        **{k: float(np.mean([s[k] for s in summary])) for k in metrics}})
    return summary


def summary_markdown(summary):
    """The summary as a Markdown table: Dice in %, HD95 in mm."""
    metrics = [k for k in DICE + HD95 if summary and k in summary[0]]
    head = ["Subset", "Cases"] + [f"{k} Dice %" if k in DICE else f"{k[5:]} HD95 mm" for k in metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summary:
        values = [f"{100 * s[k]:.2f}" if k in DICE else f"{s[k]:.2f}" for k in metrics]
        lines.append("| " + " | ".join([s["subset"], str(s["cases"])] + values) + " |")
    return "\n".join(lines) + "\n"


@torch.no_grad()
def parameters_in_use(model):
    """Parameters of the modules an eval forward pass with every modality present runs (one
    pass on a zero window): the model's size at inference, without training-only parts. On
    the reference path: the fused CPU kernels take some modules' parameters without calling them."""
    device = next(model.parameters()).device
    ran, hooks = set(), [m.register_forward_hook(lambda module, args, out: ran.add(module)) for m in model.modules()]
    was_training = model.training
    try:
        M = len(MODALITIES)
        inputs = [torch.zeros(1, M, *model.window, device=device), torch.ones(1, M, dtype=torch.bool, device=device)]
        if getattr(model, "uses_position", False):  # the window at the native grid's corner
            inputs.append(torch.tensor([[[0, 1]] * 3], device=device))
        with cpu_kernels.reference_path():
            model.eval()(*inputs)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    params = {id(p): p for module in ran for p in module.parameters(recurse=False)}
    return sum(p.numel() for p in params.values())
