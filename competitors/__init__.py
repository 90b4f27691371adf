"""The models IM-Fuse is compared with, on the shared data, training and evaluation code.
Importing this package registers them with `models.build_model`."""
from .m3ae import M3AE
from .mam import MaM
from .mmformer import MMFormer
from .robustseg import RobustSeg
from .sfusion import SFusion
from .shaspec import ShaSpec
from .uhved import UHVED

__all__ = ["M3AE", "MaM", "MMFormer", "RobustSeg", "SFusion", "ShaSpec", "UHVED"]
