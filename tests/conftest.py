"""Fixtures shared by the test modules."""
import os

# Triton's kernels run on CPU tensors by its interpreter (tests/test_scan_triton.py); the
# variable is read when triton is first imported, so it is set before anything imports it.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from data.preprocessing import preprocess_all  # noqa: E402
from data.synthetic import make_cohort  # noqa: E402
from helpers import P  # noqa: E402


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory):
    """(raw folder, preprocessed folder) of 6 synthetic 40x36x32 cases (4 train, 1 val, 1 test),
    preprocessed with --min-size 32. Tests copy it before changing it."""
    base = tmp_path_factory.mktemp("cohort")
    raw, npy = str(base / "raw"), str(base / "npy")
    make_cohort(raw, 6, seed=3, size=(40, 36, 32), workers=1)
    preprocess_all(raw, npy, min_size=P, progress=False)
    return raw, npy
