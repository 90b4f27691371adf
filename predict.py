"""Segment one patient's scans with a trained model, whichever of FLAIR, T1c, T1 and T2 exist.

    python predict.py --resume best.pth --input BraTS-GLI-00000-000 --output seg.nii.gz
    python predict.py --resume best.pth --flair flair.nii.gz --t1c t1c_dicom/ --output seg.nii.gz [--register]
    python predict.py --resume best.pth --flair flair_dicom/ --t1c t1c_dicom/ --output seg.dcm

--input is a folder whose NIfTI files are named like a BraTS case's (-t2f/-t1c/-t1n/-t2w as in
2023, or _flair/_t1ce/_t1/_t2); --flair/--t1c/--t1/--t2 take NIfTI files or folders of one
DICOM series. Sequences on one 1 mm grid (BraTS-like) are preprocessed as for training;
others are first resampled into a 1 mm grid aligned with a reference sequence (--reference;
default T1c, else the one with the smallest voxels), after a rigid registration to it with
--register. The scans are segmented with the sliding window (the encoders of absent sequences
are not run) and the label map (uint8: 0 background, 1 NCR, 2 ED, 3 ET) is written in the
reference's grid: same shape and affine. With --output NAME.dcm and a reference sequence given
as a DICOM series, the labels are written as a DICOM Segmentation object instead (one segment
each for NCR, ED and ET, every frame referencing its slice of the reference series), for a
PACS or a DICOM viewer; the other outputs stay as they are. --probabilities also writes the model's output maps
(X, Y, Z, K) float32: the four class probabilities (background, NCR, ED, ET) or, for a region
model, those of WT, TC and ET. Beside the label map: <output>.json (sequences and their
grids, reference, model, tumour volumes in cm3, expected quality) and <output>.png (the
prediction over each sequence in three planes through the tumour).

Several --resume checkpoints (of one model kind) are an ensemble, their probabilities
averaged; --tta mirrors every window over the voxel axes; --window_weight gaussian weights
overlapping windows as nnU-Net does. When the checkpoint's folder (or --reference_results)
holds test.py results of the model, the report and the log give the test-set Dice for the
sequences given, and warn of regions that are unreliable without a missing sequence.
"""
import sys

from utils.memory import restart_without_tcache

if __name__ == "__main__" and "--reference_path" not in sys.argv[1:]:
    restart_without_tcache()  # first, before torch's import: freed tensors' memory gets reused (utils/memory.py)

import contextlib
import json
import os
import re
import time
from dataclasses import dataclass

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import torch

from data.clinical import load_clinical, motion, nifti_affine, skull_warning
from data.patient import load_patient, modality_files, one_grid_1mm
from data.preprocessing import CaseError, uncrop
from engine.checkpoint import CheckpointError, load_ensemble
from engine.cli import add_inference_flags, add_model_flags, inference_options, inference_record, model_config
from engine.comparison import ComparisonError
from engine.evaluation import predict_ensemble
from engine.inference import select_device
from engine.quality import expected_quality, find_results, quality_line
from utils.brats import LABELS, MODALITIES, MODALITY_NAMES, OUTPUT_ACTIVATION, OUTPUT_CHANNELS, REGIONS, to_labels
from utils.figures import report_figure
from utils.io import atomic_path, nifti_image
from utils.memory import retain_freed_memory
from utils.parser import ArgumentParser

NIFTI = re.compile(r"\.nii(\.gz)?$")
DICOM = re.compile(r"\.dcm$")
VOLUMES = {**{LABELS[k]: (k,) for k in (1, 2, 3)}, "TC": REGIONS["TC"], "WT": REGIONS["WT"]}  # name -> labels


def parser():
    p = ArgumentParser(description=__doc__.splitlines()[0])
    add_inference_flags(p)
    p.add_argument("--input", help="folder with the patient's BraTS-named NIfTI files")
    for name, flag in zip(MODALITY_NAMES, MODALITIES):
        p.add_argument(f"--{flag}", help=f"the {name} image: a NIfTI file or a folder of one DICOM series "
                                         "(instead of --input)")
    p.add_argument("--reference", choices=MODALITIES,
                   help="the sequence whose grid the outputs take and the 1 mm working grid follows "
                        "(default t1c when given, else the sequence with the smallest voxels)")
    p.add_argument("--register", action="store_true",
                   help="register every other sequence rigidly to the reference (mutual information) "
                        "before resampling, for patient motion between sequences")
    p.add_argument("--output", required=True,
                   help="label map to write: .nii.gz or .nii, or .dcm for a DICOM-SEG on a DICOM reference series")
    p.add_argument("--probabilities", nargs="?", const="", metavar="PATH",
                   help="also write the model's output maps: class or region probabilities "
                        "(default PATH: <output>_probabilities.nii.gz)")
    p.add_argument("--reference_results", metavar="DIR",
                   help="test.py results of this model (default: the checkpoint's folder, when they are there) "
                        "for the expected-quality line: test-set Dice for the sequences given")
    p.add_argument("--batch_size", type=int, default=1, help="sliding windows per forward pass")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    add_model_flags(p, sizes=False, title="the model: a train_poly.py checkpoint names its own (give "
                                          "--model again for one from outside the project); for a "
                                          "checkpoint of the original code give its variant")
    return p


def outputs(p, args):
    """[(path, kind)] to write; bad names are a usage error."""
    dicom = DICOM.search(args.output)
    if not (NIFTI.search(args.output) or dicom):
        p.error(f"--output {args.output}: give a .nii.gz, .nii or .dcm file name")
    if dicom and not any(path and os.path.isdir(path) for path in [getattr(args, m) for m in MODALITIES]):
        p.error(f"--output {args.output}: a DICOM-SEG needs the reference sequence as a folder of a DICOM "
                "series (--flair/--t1c/--t1/--t2 FOLDER); give a .nii.gz name for NIfTI inputs")
    base = DICOM.sub("", NIFTI.sub("", args.output))
    paths = [(args.output, "dicom_seg" if dicom else "labels"), (base + ".json", "report"), (base + ".png", "figure")]
    if args.probabilities is not None:
        path = args.probabilities or base + "_probabilities.nii.gz"
        if not NIFTI.search(path) or os.path.abspath(path) == os.path.abspath(args.output):
            p.error(f"--probabilities {path}: give a .nii.gz or .nii file name other than --output")
        paths.append((path, "probabilities"))
    return paths


def segment(models, patient, shape, batch_size=1, progress=False, **options):
    """-> (labels (X, Y, Z) uint8, output maps (X, Y, Z, K) float32) in the grid of `shape` the
    patient's crop box lies in; outside the crop: background (class probabilities) or no region.
    models: a list, an ensemble when several (averaged); options: engine.cli.inference_options."""
    model = models[0]
    probs = predict_ensemble(models, torch.from_numpy(patient.volume), [patient.mask], batch_size,
                             progress, origin=[lo for lo, _ in patient.box],
                             **options)[0].cpu().numpy()  # (K, x, y, z)
    full = uncrop(probs, shape, patient.box)
    if model.output_kind == "classes":
        full[0][uncrop(np.ones(probs.shape[1:], bool), shape, patient.box) == 0] = 1
    labels = to_labels(probs, model.output_kind).astype(np.uint8)
    return uncrop(labels, shape, patient.box), np.moveaxis(full, 0, -1)


@dataclass
class Result:
    """A prediction in the output grid (the reference sequence's) and in the working grid."""
    labels: np.ndarray  # (X, Y, Z) uint8, output grid
    maps: np.ndarray  # (X, Y, Z, K) float32, output grid
    affine: np.ndarray  # the output grid's
    images: np.ndarray  # (M, x, y, z) the model's input: the working grid's crop box
    crop_labels: np.ndarray  # (x, y, z) the labels there
    work_affine: np.ndarray  # the working grid's
    report: dict
    reference_files: tuple = ()  # the reference DICOM series' files, one per slice of the output grid's z


def nifti_grid(path):
    """The source grid of a NIfTI file, for the report."""
    img = nib.load(path)
    return {"source": path, "format": "nifti", "shape": list(img.shape),
            "spacing_mm": [round(float(z), 4) for z in img.header.get_zooms()[:3]],
            "orientation": "".join(nib.aff2axcodes(img.affine))}


def volumes(labels, affine):
    """{NCR, ED, ET, TC, WT: cm3}: voxel counts times the voxel volume of `affine`."""
    voxel = abs(np.linalg.det(np.asarray(affine)[:3, :3])) / 1000
    return {name: round(float(np.isin(labels, values).sum() * voxel), 4) for name, values in VOLUMES.items()}


def _crop(array, box):
    return array[tuple(slice(lo, hi) for lo, hi in box)]


def announce(paths, log):
    used = [f"{name} ({os.path.basename(os.path.normpath(path))})" for name, path in zip(MODALITY_NAMES, paths) if path]
    missing = [name for name, path in zip(MODALITY_NAMES, paths) if not path]
    log(f"using {', '.join(used)}" + (f"; missing {', '.join(missing)}" if missing else ""))


def predict_brats_like(models, paths, args, options, log):
    """Sequences on one 1 mm grid, preprocessed exactly as training cases."""
    patient = load_patient(paths, largest_window(models))
    announce(paths, log)
    labels, maps = segment(models, patient, patient.reference.shape, args.batch_size, not args.no_progress,
                           **options)
    for k, path in enumerate(paths):
        warning = path and skull_warning(MODALITY_NAMES[k], path, np.asarray(nib.load(path).dataobj))
        if warning:
            log(f"warning: {warning}")
    index = MODALITIES.index(args.reference) if args.reference else next(k for k, path in enumerate(paths) if path)
    reference = MODALITY_NAMES[index]
    report = {"reference": reference, "working_grid": "the sequences' own (one 1 mm grid)",
              "sequences": {MODALITY_NAMES[k]: nifti_grid(path) for k, path in enumerate(paths) if path}}
    affine = patient.reference.affine
    return Result(labels, maps, affine, patient.volume, _crop(labels, patient.box), affine, report)


def predict_clinical(models, paths, args, options, log):
    """Sequences on other grids: resampled into the reference's 1 mm working grid (registered
    first with --register); the outputs sent back into the reference's grid."""
    model = models[0]
    patient = load_clinical(paths, largest_window(models), args.reference, args.register, log)
    grid, ref = patient.grid, patient.reference
    if DICOM.search(args.output) and ref.kind != "dicom":
        raise CaseError(None, ref.source, f"the reference {ref.name} is not a DICOM series: a DICOM-SEG "
                                          "(--output .dcm) needs one (choose it with --reference)")
    announce(paths, log)
    for s in patient.sequences:
        warning = skull_warning(s.name, s.source, sitk.GetArrayViewFromImage(s.image))
        if warning:
            log(f"warning: {warning}")
    log(f"reference {ref.name} ({'x'.join(map(str, ref.image.GetSize()))} voxels of "
        f"{'x'.join(f'{v:g}' for v in ref.image.GetSpacing())} mm); working grid "
        f"{'x'.join(map(str, grid.GetSize()))} at 1 mm")
    work_labels, work_maps = segment(models, patient, tuple(grid.GetSize()), args.batch_size, not args.no_progress,
                                     **options)
    labels = patient.to_reference(work_labels, nearest=True)
    maps = patient.to_reference(work_maps, nearest=False)
    if model.output_kind == "classes":  # outside the working grid: background
        maps[..., 0] = np.clip(1 - maps[..., 1:].sum(-1), 0, 1)
    sequences = {s.name: s.grid() for s in patient.sequences}
    if args.register:
        for s in patient.sequences:
            if s is not ref:
                angles, shift = motion(s.transform)
                sequences[s.name]["registration"] = {"rotation_deg_xyz": [round(a, 3) for a in angles],
                                                     "translation_mm": [round(t, 3) for t in shift]}
    report = {"reference": ref.name, "sequences": sequences,
              "working_grid": {"shape": list(grid.GetSize()), "spacing_mm": 1.0}}
    return Result(labels, maps, nifti_affine(ref.image), patient.volume, _crop(work_labels, patient.box),
                  nifti_affine(grid), report, ref.files)


def largest_window(models):
    """The smallest crop every model's window fits in (per axis the largest window)."""
    return tuple(max(w) for w in zip(*(m.window for m in models)))


def results_for(args, model_name):
    """The test.py run (engine.quality.find_results) for the expected-quality line: that of
    --reference_results (ComparisonError when it is not one of this model), else that in the
    first checkpoint's folder when there is one, else None."""
    if args.reference_results:
        try:
            return find_results(args.reference_results, model_name, required=True)
        except ComparisonError as err:
            raise ComparisonError(f"--reference_results {err}")
    return find_results(os.path.dirname(os.path.abspath(args.resume[0])), model_name)


def _ras(volume, affine):
    """(X, Y, Z) voxel array -> the same voxels with axes pointing right, anterior, superior."""
    return nib.orientations.apply_orientation(volume, nib.orientations.io_orientation(affine))


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
    for path, kind in targets:
        p.check_writable("--output" if kind != "probabilities" else "--probabilities", path)
    options = inference_options(p, args)
    device = select_device(args.device)
    if device.type == "cpu" and not args.reference_path:  # the reference path keeps the allocator's defaults
        retain_freed_memory()
    log = lambda line: print(f"predict.py: {line}", file=sys.stderr)  # noqa: E731
    try:
        paths = modality_files(args.input) if args.input else explicit
        if args.reference and not paths[MODALITIES.index(args.reference)]:
            raise CaseError(None, "input", f"--reference {args.reference}: no "
                                           f"{MODALITY_NAMES[MODALITIES.index(args.reference)]} sequence given")
        models, _ = load_ensemble(args.resume, args.model, model_config(p, args))
        model = models[0]
        name = getattr(model, "registry_name", type(model).__name__)
        run = results_for(args, name)
        start = time.perf_counter()
        models = [m.to(device) for m in models]
        brats_like = not args.register and one_grid_1mm(paths)
        result = (predict_brats_like if brats_like else predict_clinical)(models, paths, args, options, log)
        channels = f"{', '.join(OUTPUT_CHANNELS[model.output_kind])} ({OUTPUT_ACTIVATION[model.output_kind]})"
        cm3 = volumes(result.labels, result.affine)
        mask = tuple(path is not None for path in paths)
        quality = run and expected_quality(run, mask, checkpoints=args.resume)
        report = {"output": os.path.abspath(args.output), "model": name,
                  "checkpoint": os.path.abspath(args.resume[0]),
                  **inference_record(args, options),
                  **result.report, "missing": [name for name, path in zip(MODALITY_NAMES, paths) if not path],
                  "volumes_cm3": cm3, "expected_quality": quality or None}
        with contextlib.ExitStack() as stack:  # all outputs renamed together, none on failure
            for path, kind in targets:
                tmp = stack.enter_context(atomic_path(path))
                if kind == "report":
                    with open(tmp, "w") as f:
                        json.dump(report, f, indent=1)
                elif kind == "dicom_seg":
                    from utils.dicom_seg import write_dicom_seg  # pydicom: imported only for a DICOM-SEG
                    write_dicom_seg(tmp, result.labels, result.reference_files, name,
                                    os.path.basename(args.resume[0])[:64])
                elif kind == "figure":
                    present = [k for k, path in enumerate(paths) if path]
                    report_figure(tmp, [_ras(result.images[k], result.work_affine) for k in present],
                                  _ras(result.crop_labels, result.work_affine), [MODALITY_NAMES[k] for k in present])
                else:
                    data, text = ((result.labels, "labels 0 background, 1 NCR, 2 ED, 3 ET") if kind == "labels"
                                  else (result.maps, f"channels {channels}"))
                    image = nifti_image(data, result.affine)
                    image.header["descrip"] = text[:79].encode()
                    nib.save(image, tmp)
    except (CaseError, CheckpointError, ComparisonError, FileNotFoundError, ValueError, OSError) as err:
        print(f"predict.py: {err}", file=sys.stderr)
        return 1
    if quality:
        log(quality_line(quality))
        for warning in quality["warnings"]:
            log(f"warning: {warning}")
    counts = ", ".join(f"{name} {int((result.labels == k).sum())}" for k, name in ((1, "NCR"), (2, "ED"), (3, "ET")))
    log(f"wrote {', '.join(path for path, _ in targets)} ({'x'.join(map(str, result.labels.shape))}; "
        f"voxels {counts}) in {time.perf_counter() - start:.1f} s on {device}")
    log("volumes " + ", ".join(f"{name} {v:.2f} cm3" for name, v in cm3.items()))
    probabilities = [path for path, kind in targets if kind == "probabilities"]
    if probabilities:
        log(f"{probabilities[0]} holds {channels}, last axis")
    return 0


if __name__ == "__main__":
    sys.exit(main())
