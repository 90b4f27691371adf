"""The models IM-Fuse is compared with, on the shared data, training and evaluation code.
Importing this package registers them with `models.build_model`."""
from .mmformer import MMFormer

__all__ = ["MMFormer"]
