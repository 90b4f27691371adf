"""Case lists in the original's formats: `train.txt` (one case per line) and
`val15splits.csv` / `test15splits.csv` (columns case,mask; mask like "[False, True, False, True]"
in MODALITIES order). Plain one-case-per-line lists are accepted everywhere."""
import csv
import os
import re

import numpy as np

from utils.brats import MODALITIES, SUBSETS
from utils.io import atomic_path

SPLIT_FILES = {"train": "train.txt", "val": "val15splits.csv", "test": "test15splits.csv"}
FRACTIONS = (0.7, 0.1, 0.2)


def make_split(cases, seed=0, fractions=FRACTIONS):
    """Seeded split of the case names -> {"train": [...], "val": [...], "test": [...]}."""
    cases = sorted(cases)
    order = np.random.default_rng(seed).permutation(len(cases))
    n_train = int(round(fractions[0] * len(cases)))
    n_val = int(round(fractions[1] * len(cases)))
    shuffled = [cases[i] for i in order]
    return {"train": sorted(shuffled[:n_train]), "val": sorted(shuffled[n_train:n_train + n_val]),
            "test": sorted(shuffled[n_train + n_val:])}


def format_mask(mask):
    return "[" + ", ".join(str(bool(m)) for m in mask) + "]"


def parse_mask(text, where="mask"):
    """"[False, True, False, True]", "[0, 1, 0, 1]" or "0101" -> tuple of 4 bools."""
    s = text.strip().strip("\"'").lower()
    tokens = list(s) if re.fullmatch(r"[01]+", s) else re.findall(r"true|false|[01]", s)
    if len(tokens) != len(MODALITIES) or re.sub(r"true|false|[01\[\],\s]", "", s):
        raise ValueError(f"{where}: cannot read the modality mask {text!r}")
    mask = tuple(t in ("true", "1") for t in tokens)
    if not any(mask):
        raise ValueError(f"{where}: the modality mask {text!r} has no modality")
    return mask


def write_split(out_dir, split):
    """Write train.txt, val15splits.csv and test15splits.csv (masks cycle through SUBSETS)."""
    for part, name in SPLIT_FILES.items():
        with atomic_path(os.path.join(out_dir, name)) as tmp, open(tmp, "w", newline="") as f:
            if part == "train":
                f.writelines(f"{case}\n" for case in split[part])
            else:
                writer = csv.writer(f, lineterminator="\n")
                writer.writerow(["case", "mask"])
                writer.writerows([case, format_mask(SUBSETS[i % len(SUBSETS)])]
                                 for i, case in enumerate(split[part]))


def read_split(path):
    """[(case, mask or None), ...] from a case list: a CSV with columns case,mask or one
    case per line (blank lines and '#' comments ignored). ValueError for a file that is not
    text, names no case or names one twice."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such split file")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file of case names")
    if "\0" in text:
        raise ValueError(f"{path}: not a text file of case names")
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    if lines and lines[0].replace(" ", "").lower().startswith("case,"):
        reader = csv.DictReader(lines, skipinitialspace=True)
        if "mask" not in (reader.fieldnames or []):
            raise ValueError(f"{path}: expected the columns case,mask")
        # an unquoted mask spills its commas into extra columns: join them back
        entries = [((row["case"] or "").strip(), parse_mask(",".join([row["mask"] or ""] + row.get(None, [])),
                                                            f"{path}, case {row['case']}"))
                   for row in reader]
    else:
        entries = [(line, None) for line in lines]
    if not entries:
        raise ValueError(f"{path}: no case in it")
    seen = set()
    for case, _ in entries:
        if case in seen:
            raise ValueError(f"{path}: case {case} listed twice")
        seen.add(case)
    return entries
