"""Evaluation over modality subsets (SPEC section 5): sliding-window segmentation of whole
cropped volumes with each window encoded once and decoded for every subset, BraTS metrics
per case and subset, and the per-subset summary (the paper's table)."""
import numpy as np
import torch
from tqdm import tqdm

from data.preprocessing import read_meta
from data.splits import format_mask

from .brats import subset_name
from .inference import sliding_window
from .metrics import brats_metrics

DICE = ("WT", "TC", "ET", "ETpp")
HD95 = ("HD95_WT", "HD95_TC", "HD95_ET")
RESULT_FIELDS = ("case", "subset", "mask") + DICE + HD95
SUMMARY_FIELDS = ("subset", "mask", "cases") + DICE + HD95


@torch.no_grad()
def predict_subsets(model, volume, subsets, batch_size=1, progress=False):
    """volume (M, X, Y, Z) -> probabilities (S, K, X, Y, Z), one per subset, on the model's
    device. Each window is encoded once, without the encoders of modalities that no subset
    uses, and decoded once per subset."""
    device = next(model.parameters()).device
    masks = torch.tensor(subsets, dtype=torch.bool, device=device)  # (S, M)

    def predict(windows):  # (B, M, P, P, P) -> (B, S, K, P, P, P)
        B = windows.shape[0]
        features = model.encode(windows, masks.any(0).expand(B, -1))
        return torch.stack([model.decode(features, m.expand(B, -1)).float() for m in masks], dim=1)

    return sliding_window(volume.to(device, torch.float32), model.patch_size, predict,
                          batch_size=batch_size, progress=progress)


def evaluate(model, dataset, subsets=None, batch_size=1, distances=True, progress=True,
             on_case=None, indices=None):
    """Segment every case (or those at `indices`) of an EvalDataset with each of `subsets`
    (default: the case's assigned subset) -> result rows {case, subset, mask, WT, TC, ET,
    ETpp[, HD95_*]}.
    on_case(sample, meta, subsets, labels (S, X, Y, Z) uint8) is called after each case."""
    was_training = model.training
    model.eval()
    rows = []
    for index in tqdm(range(len(dataset)) if indices is None else indices, desc="evaluate", unit="case", disable=not progress):
        sample = dataset[index]
        meta = read_meta(dataset.root, sample["name"])
        spacing = meta["spacing"] if meta else (1, 1, 1)
        case_subsets = list(subsets or [tuple(sample["mask"].tolist())])
        probs = predict_subsets(model, sample["image"], case_subsets, batch_size)
        labels = probs.argmax(1).to(torch.uint8).cpu().numpy()
        del probs
        target = sample["label"].numpy()
        for mask, pred in zip(case_subsets, labels):
            rows.append({"case": sample["name"], "subset": subset_name(mask),
                         "mask": format_mask(mask), **brats_metrics(pred, target, spacing, distances)})
        if on_case:
            on_case(sample, meta, case_subsets, labels)
    model.train(was_training)
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


def uncrop(cropped, shape, box):
    """cropped (..., x, y, z) placed back at the crop box `box` of the native grid `shape`
    (X, Y, Z) -> (..., X, Y, Z), zeros outside."""
    full = np.zeros(cropped.shape[:-3] + tuple(shape), dtype=cropped.dtype)
    full[(...,) + tuple(slice(lo, hi) for lo, hi in box)] = cropped
    return full
