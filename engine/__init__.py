"""The engine: training, evaluation, sliding-window inference and checkpoints for every model
that follows the contract of models/base.py. Importing it registers every model of the
project (models/ and competitors/); `build_model` also takes a researcher's own class as
`path/to/file.py:ClassName`.

    from engine import build_model
    model = build_model("mmformer", patch_size=128)
"""
from models import list_models

from .models import ModelError, build_model, model_class

__all__ = ["ModelError", "build_model", "list_models", "model_class"]
