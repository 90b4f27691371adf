"""BraTS 2023 definitions shared by every part of the project (SPEC sections 1 and 2):
the modality order, the 15 modality subsets in the order the paper reports them, the
labels, the evaluation regions and the kinds of model output."""
import math

# Channel order everywhere (inputs, masks, checkpoints).
MODALITIES = ("flair", "t1c", "t1", "t2")
MODALITY_NAMES = ("FLAIR", "T1c", "T1", "T2")
# File suffixes of a BraTS 2023 case: <case>-<suffix>.nii.gz
MODALITY_SUFFIXES = ("t2f", "t1c", "t1n", "t2w")
# Attribute prefixes of the modalities in checkpoints of the original IM-Fuse / mmFormer code
CHECKPOINT_NAMES = ("flair", "t1ce", "t1", "t2")
SEG_SUFFIX = "seg"
# How file names end for each modality (BraTS 2023, then the 2018-2021 editions): -t2f, _flair, ...
MODALITY_ALIASES = (("t2f", "flair"), ("t1c", "t1ce", "t1gd"), ("t1n", "t1"), ("t2w", "t2"))

# The 15 non-empty subsets as masks in MODALITIES order, numbered 1-15 as in the paper.
SUBSETS = (
    (False, False, False, True),   # 1  T2
    (False, True, False, False),   # 2  T1c
    (False, False, True, False),   # 3  T1
    (True, False, False, False),   # 4  FLAIR
    (False, True, False, True),    # 5  T1c+T2
    (False, True, True, False),    # 6  T1c+T1
    (True, False, True, False),    # 7  FLAIR+T1
    (False, False, True, True),    # 8  T1+T2
    (True, False, False, True),    # 9  FLAIR+T2
    (True, True, False, False),    # 10 FLAIR+T1c
    (True, True, True, False),     # 11 FLAIR+T1c+T1
    (True, False, True, True),     # 12 FLAIR+T1+T2
    (True, True, False, True),     # 13 FLAIR+T1c+T2
    (False, True, True, True),     # 14 T1c+T1+T2
    (True, True, True, True),      # 15 FLAIR+T1c+T1+T2
)


# Subset weights (SUBSETS order) of the dropout law of ShaSpec and M3AE: the number of dropped
# modalities uniform in 0..3, then which ones uniformly (1/16 each single, 1/24 each pair,
# 1/16 each triple, 1/4 all).
DROP_COUNT_WEIGHTS = tuple(1 / len(MODALITIES) / math.comb(len(MODALITIES), len(MODALITIES) - sum(mask))
                           for mask in SUBSETS)


def subset_name(mask):
    """'FLAIR+T1c' for the mask (True, True, False, False)."""
    return "+".join(name for name, present in zip(MODALITY_NAMES, mask) if present)


SUBSET_NAMES = tuple(subset_name(mask) for mask in SUBSETS)

# Labels after preprocessing (older editions' ET label 4 becomes 3).
LABELS = {0: "background", 1: "NCR", 2: "ED", 3: "ET"}
NUM_CLASSES = len(LABELS)
LEGACY_LABEL_MAP = {4: 3}

# Evaluation regions: the labels each one contains.
REGIONS = {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)}

# What a model's output maps are: softmax probabilities of the labels ("classes"), sigmoid
# probabilities of the regions ("regions"), channel by channel, or the images of the
# modalities ("image": a pre-training stage that reconstructs them and does not segment).
OUTPUT_CHANNELS = {"classes": tuple(LABELS.values()), "regions": tuple(REGIONS), "image": MODALITY_NAMES}
OUTPUT_ACTIVATION = {"classes": "softmax", "regions": "sigmoid", "image": "none"}
SEGMENTATION_KINDS = ("classes", "regions")
REGION_THRESHOLD = 0.5


def to_labels(output, kind, axis=0):
    """Output maps (numpy array or torch tensor, channels along `axis`) -> integer label map.
    classes: argmax. regions (WT, TC, ET): the BraTS rule, ET where P(ET) > 0.5, else NCR
    where P(TC) > 0.5, else ED where P(WT) > 0.5, else background."""
    if kind == "classes":
        return output.argmax(axis)
    if kind != "regions":
        raise ValueError(f"output kind {kind!r} has no labels; use one of {', '.join(SEGMENTATION_KINDS)}")
    wt, tc, et = (output[(slice(None),) * axis + (k,)] > REGION_THRESHOLD for k in range(3))
    return et * 3 + ~et * (tc * 1 + ~tc * wt * 2)


def parse_subsets(text):
    """'all' or comma-separated subset names ('FLAIR+T1c+T1+T2,T1c'; case and the order of
    the modalities within a name do not matter) -> list of masks, in the order given."""
    if text.strip().lower() == "all":
        return list(SUBSETS)
    by_key = {frozenset(name.lower().split("+")): mask for name, mask in zip(SUBSET_NAMES, SUBSETS)}
    subsets = []
    for name in filter(None, (part.strip() for part in text.split(","))):
        key = frozenset(m.strip().lower() for m in name.split("+"))
        if key not in by_key:
            raise ValueError(f"unknown modality subset {name!r}: use names such as FLAIR+T1c+T1+T2 "
                             f"(modalities {', '.join(MODALITY_NAMES)}) or 'all'")
        if by_key[key] not in subsets:
            subsets.append(by_key[key])
    if not subsets:
        raise ValueError("no modality subset given")
    return subsets
