"""Segment one patient's scans with a trained model, whichever of FLAIR, T1c, T1 and T2 exist.

    python predict.py --resume best.pth --input BraTS-GLI-00000-000 --output seg.nii.gz
    python predict.py --resume best.pth --flair flair.nii.gz --t1 t1.nii.gz --output seg.nii.gz

--input is a folder whose NIfTI files are named like a BraTS case's (-t2f/-t1c/-t1n/-t2w as in
2023, or _flair/_t1ce/_t1/_t2). The scans are preprocessed as for training, segmented with the
sliding window (the encoders of absent sequences are not run) and the label map (uint8: 0
background, 1 NCR, 2 ED, 3 ET) is written in the input's grid: same shape and affine.
--probabilities also writes the model's output maps (X, Y, Z, K) float32: the four class
probabilities (background, NCR, ED, ET) or, for a region model, those of WT, TC and ET.
"""
import argparse
import contextlib
import os
import re
import sys
import time

import nibabel as nib
import numpy as np
import torch

from data.patient import load_patient, modality_files
from data.preprocessing import CaseError, uncrop
from engine.checkpoint import CheckpointError, load_model
from engine.cli import add_model_flags, model_config
from engine.evaluation import predict_subsets
from utils.brats import MODALITIES, MODALITY_NAMES, OUTPUT_ACTIVATION, OUTPUT_CHANNELS, to_labels
from utils.io import atomic_path, nifti_image

NIFTI = re.compile(r"\.nii(\.gz)?$")


def parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--resume", required=True, help="checkpoint (train_poly.py's or the original code's)")
    p.add_argument("--input", help="folder with the patient's BraTS-named NIfTI files")
    for name, flag in zip(MODALITY_NAMES, MODALITIES):
        p.add_argument(f"--{flag}", help=f"the {name} image (instead of --input)")
    p.add_argument("--output", required=True, help="label map to write (.nii.gz or .nii)")
    p.add_argument("--probabilities", nargs="?", const="", metavar="PATH",
                   help="also write the model's output maps: class or region probabilities "
                        "(default PATH: <output>_probabilities.nii.gz)")
    p.add_argument("--batch_size", type=int, default=1, help="sliding windows per forward pass")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    add_model_flags(p, sizes=False, title="the model: a train_poly.py checkpoint names its own (give "
                                          "--model again for one from outside the project); for a "
                                          "checkpoint of the original code give its variant")
    return p


def outputs(p, args):
    """[(path, kind)] to write; bad names are a usage error."""
    if not NIFTI.search(args.output):
        p.error(f"--output {args.output}: give a .nii.gz or .nii file name")
    paths = [(args.output, "labels")]
    if args.probabilities is not None:
        path = args.probabilities or NIFTI.sub("", args.output) + "_probabilities.nii.gz"
        if not NIFTI.search(path) or os.path.abspath(path) == os.path.abspath(args.output):
            p.error(f"--probabilities {path}: give a .nii.gz or .nii file name other than --output")
        paths.append((path, "probabilities"))
    return paths


def segment(model, patient, batch_size, progress):
    """-> (labels (X, Y, Z) uint8, output maps (X, Y, Z, K) float32) in the native grid;
    outside the crop: background (class probabilities) or no region."""
    probs = predict_subsets(model, torch.from_numpy(patient.volume), [patient.mask], batch_size, progress,
                            origin=[lo for lo, _ in patient.box])[0].cpu().numpy()  # (K, x, y, z)
    shape = patient.reference.shape
    full = uncrop(probs, shape, patient.box)
    if model.output_kind == "classes":
        full[0][uncrop(np.ones(probs.shape[1:], bool), shape, patient.box) == 0] = 1
    labels = to_labels(probs, model.output_kind).astype(np.uint8)
    return uncrop(labels, shape, patient.box), np.moveaxis(full, 0, -1)


def main(argv=None):
    p = parser()
    args = p.parse_args(argv)
    explicit = [getattr(args, m) for m in MODALITIES]
    if args.input and any(explicit):
        p.error("give --input or the files (--flair --t1c --t1 --t2), not both")
    if not args.input and not any(explicit):
        p.error("give --input FOLDER or at least one of --flair --t1c --t1 --t2")
    if args.batch_size < 1:
        p.error("--batch_size must be positive")
    targets = outputs(p, args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        paths = modality_files(args.input) if args.input else explicit
        model, _ = load_model(args.resume, args.model, model_config(p, args))
        start = time.perf_counter()
        patient = load_patient(paths, model.window)
        used = [f"{name} ({os.path.basename(path)})" for name, path in zip(MODALITY_NAMES, paths) if path]
        missing = [name for name, path in zip(MODALITY_NAMES, paths) if not path]
        print(f"predict.py: using {', '.join(used)}" + (f"; missing {', '.join(missing)}" if missing else ""),
              file=sys.stderr)
        labels, probs = segment(model.to(device), patient, args.batch_size, not args.no_progress)
        channels = f"{', '.join(OUTPUT_CHANNELS[model.output_kind])} ({OUTPUT_ACTIVATION[model.output_kind]})"
        data = {"labels": (labels, "labels 0 background, 1 NCR, 2 ED, 3 ET"),
                "probabilities": (probs, f"channels {channels}")}
        with contextlib.ExitStack() as stack:  # all outputs renamed together, none on failure
            for path, kind in targets:
                image = nifti_image(data[kind][0], patient.reference.affine)
                image.header["descrip"] = data[kind][1][:79].encode()
                nib.save(image, stack.enter_context(atomic_path(path)))
    except (CaseError, CheckpointError, FileNotFoundError, ValueError, OSError) as err:
        print(f"predict.py: {err}", file=sys.stderr)
        return 1
    counts = ", ".join(f"{name} {int((labels == k).sum())}" for k, name in ((1, "NCR"), (2, "ED"), (3, "ET")))
    print(f"predict.py: wrote {', '.join(path for path, _ in targets)} ({'x'.join(map(str, labels.shape))}; "
          f"voxels {counts}) in {time.perf_counter() - start:.1f} s on {device}", file=sys.stderr)
    if len(targets) > 1:
        print(f"predict.py: {targets[1][0]} holds {channels}, last axis", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
