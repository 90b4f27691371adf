"""Helpers shared by the test modules: the scripts as modules and the tiny IM-Fuse they train."""
import importlib.util
import os

import torch

from engine.evaluation import predict_subsets
from engine.inference import sliding_window

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
P = 32  # the smallest trainable patch: instance norm needs a bottleneck of 2^3
TINY_CONFIG = {"patch_size": P, "interleaved": True, "mamba_skip": True, "width": 2, "dim": 8, "heads": 1,
               "mlp_dim": 16}  # the model of TINY
TINY = ["--patch_size", str(P), "--width", "2", "--dim", "8", "--heads", "1", "--mlp_dim", "16",
        "--interleaved_tokenization", "--mamba_skip"]


def script(name):
    """A top-level script (train_poly.py, test.py, predict.py) as a module."""
    spec = importlib.util.spec_from_file_location(f"script_{name}", os.path.join(ROOT, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_shared_encoding_matches_forward(model, volume, subsets):
    """Evaluation's shared-encoder path (engine.evaluation.predict_subsets) gives, for each
    subset, the sliding-window average of forward passes on the images with the absent
    modalities zeroed."""
    shared = predict_subsets(model, volume, subsets)
    with torch.no_grad():
        for mask, probs in zip(subsets, shared):
            m = torch.tensor([mask])
            full = sliding_window(volume * m[0, :, None, None, None], model.window, lambda w: model(w, m)[:, None])
            torch.testing.assert_close(probs, full[0], rtol=1e-4, atol=1e-6)
