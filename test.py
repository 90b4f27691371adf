"""Evaluate a trained model on the test cases under every modality subset (SPEC section 5).

    python test.py --datapath BRATS2023_Training_npy --resume runs/imfuse/best.pth --savepath results/imfuse

Writes <savepath>/results.csv (one row per case and subset), summary.csv and summary.md (per
subset means and the mean over subsets: the paper's table), figures/<case>.png and run.json
(the model, its configuration, parameters, the cases and the seconds per case, which
compare.py reads); with --save_nifti also predictions/<subset>/<case>.nii.gz in the original
image space.
Several --resume checkpoints (of one model kind) are an ensemble: their probabilities are
averaged. --tta mirrors every window over the voxel axes (all 8 flips by default) and
--window_weight gaussian weights overlapping windows as nnU-Net does; the defaults (one
checkpoint, no mirroring, uniform weights) are the paper's protocol, and run.json records the
choice.
Checkpoints of train_poly.py describe their model (one of your own: name its module again
with --model); for checkpoints of the original code give the variant flags
(--interleaved_tokenization, --mamba_skip, --first_skip, --patch_size).
"""
import sys

from utils.memory import restart_without_tcache

if __name__ == "__main__" and "--reference_path" not in sys.argv[1:]:
    restart_without_tcache()  # first, before torch's import: freed tensors' memory gets reused (utils/memory.py)

import json
import os
import time
import warnings

import numpy as np

from data.datasets import EvalDataset
from data.preprocessing import CaseError, uncrop
from engine.checkpoint import CheckpointError, load_ensemble
from engine.cli import add_inference_flags, add_model_flags, inference_options, inference_record, model_config
from engine.evaluation import (RESULT_FIELDS, SUMMARY_FIELDS, evaluate, parameters_in_use, summarize,
                               summary_markdown)
from engine.inference import select_device
from engine.models import DEFAULT_MODEL
from utils.brats import parse_subsets, subset_name
from utils.figures import case_figure
from utils.io import save_nifti, write_csv, write_text
from utils.memory import retain_freed_memory
from utils.parser import ArgumentParser


def parser():
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datapath", required=True, help="preprocessed data (vol/, seg/, meta/, splits/)")
    p.add_argument("--savepath", required=True, help="output folder")
    p.add_argument("--test_file", help="test case list (default <datapath>/splits/test15splits.csv)")
    p.add_argument("--dataname", default="BRATS2023")
    p.add_argument("--subsets", default="all",
                   help="'all' or comma-separated subsets such as FLAIR+T1c+T1+T2,T1c")
    p.add_argument("--batch_size", type=int, default=1, help="sliding windows per forward pass")
    p.add_argument("--save_nifti", action="store_true", help="write the label maps as NIfTI")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    add_inference_flags(p)
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    add_model_flags(p, sizes=False, title="the model: a train_poly.py checkpoint names its own (give "
                                          "--model again for one from outside the project); for a "
                                          "checkpoint of the original code give its variant")
    return p


def case_writer(savepath, nifti):
    """on_case callback of evaluate: the PNG, and with nifti the label maps."""
    warned = []

    def write(sample, meta, subsets, labels):
        name = sample["name"]
        titles = [subset_name(s) for s in subsets]
        case_figure(os.path.join(savepath, "figures", f"{name}.png"), sample["image"][0].numpy(),
                    sample["label"].numpy(), labels, titles)
        if not nifti:
            return
        placed = meta is not None and "crop_box" in meta
        if not placed and not warned:
            warned.append(name)
            warnings.warn(f"{name}: no crop box in the preprocessing metadata (meta/{name}.json); label maps "
                          "are written in the cropped space with an identity affine")
        for title, label in zip(titles, labels):
            full, affine = ((uncrop(label, meta["original_shape"], meta["crop_box"]), meta["affine"]) if placed
                            else (label, np.eye(4)))
            save_nifti(os.path.join(savepath, "predictions", title, f"{name}.nii.gz"), full, affine)

    return write


def inference_note(args):
    """', mirrored over xyz, Gaussian windows' for the title of summary.md ('' for the protocol's)."""
    parts = ([f"mirrored over {args.tta.lower()}"] if args.tta else []) + (
        ["Gaussian windows"] if args.window_weight == "gaussian" else [])
    return "".join(f", {part}" for part in parts)


def main(argv=None):
    p = parser()
    args = p.parse_args(argv)
    p.check_writable("--savepath", args.savepath)
    if args.batch_size < 1:
        p.error("--batch_size must be positive")
    try:
        subsets = parse_subsets(args.subsets)
    except ValueError as err:
        p.error(str(err))
    device = select_device(args.device)
    if device.type == "cpu" and not args.reference_path:  # the reference path keeps the allocator's defaults
        retain_freed_memory()
    test_file = args.test_file or os.path.join(args.datapath, "splits", "test15splits.csv")
    config = model_config(p, args)
    options = inference_options(p, args)
    try:
        models, ckpts = load_ensemble(args.resume, args.model, config)
        model, ckpt = models[0], ckpts[0]
        dataset = EvalDataset(args.datapath, test_file)
        start = time.perf_counter()
        rows = evaluate([m.to(device) for m in models], dataset, subsets, args.batch_size,
                        progress=not args.no_progress, on_case=case_writer(args.savepath, args.save_nifti), **options)
        seconds = time.perf_counter() - start
        summary = summarize(rows)
        write_csv(os.path.join(args.savepath, "results.csv"), rows, RESULT_FIELDS)
        write_csv(os.path.join(args.savepath, "summary.csv"), summary, SUMMARY_FIELDS)
        table = summary_markdown(summary)
        epoch = f", epoch {ckpt['epoch'] + 1}" if "epoch" in ckpt and len(ckpts) == 1 else ""
        names = " + ".join(os.path.basename(path) for path in args.resume)
        write_text(os.path.join(args.savepath, "summary.md"),
                   f"# {names}{epoch}{inference_note(args)}: {len(dataset)} test cases\n\n{table}")
        run = {"model": ckpt.get("model") or args.model or DEFAULT_MODEL,
               "config": ckpt.get("config") or config, "checkpoint": os.path.abspath(args.resume[0]),
               **inference_record(args, options), "configs": [c.get("config") or config for c in ckpts],
               "epoch": ckpt.get("epoch"), "parameters": sum(q.numel() for m in models for q in m.parameters()),
               "parameters_in_use": sum(parameters_in_use(m) for m in models), "window": list(model.window),
               "test_file": os.path.abspath(test_file), "cases": len(dataset),
               "subsets": [subset_name(s) for s in subsets], "seconds_per_case": seconds / max(len(dataset), 1),
               "device": str(device)}
        write_text(os.path.join(args.savepath, "run.json"), json.dumps(run, indent=1) + "\n")
    except (CaseError, CheckpointError, OSError, ValueError) as err:  # OSError: also an unwritable savepath
        print(f"test.py: {err}", file=sys.stderr)
        return 1
    print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
