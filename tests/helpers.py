"""Helpers shared by the test modules: the scripts as modules and the tiny IM-Fuse they train."""
import importlib.util
import os

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
