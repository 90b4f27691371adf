"""IM-Fuse and the building blocks of the models it is compared with, built by name:

    model = build_model("imfuse", patch_size=128, interleaved=True, mamba_skip=True)
    model = from_reference("model_best.pth", "imfuse", interleaved=True, mamba_skip=True)

Every model follows the contract of models/base.py and registers itself with
`@register_model(name)`; the competitors live in `competitors/`, which registers them when
imported (the engine imports both).
"""
_REGISTRY = {}


def register_model(name):
    """Class decorator: make the class buildable as build_model(name, **config)."""
    def add(cls):
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"model name {name!r} is registered twice")
        _REGISTRY[name] = cls
        cls.registry_name = name
        return cls
    return add


def list_models():
    """The registered names (those of the packages imported so far)."""
    return sorted(_REGISTRY)


def model_class(name):
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(list_models())}")
    return _REGISTRY[name]


def build_model(name, **config):
    """The model registered as `name`, built with its constructor arguments `config`."""
    return model_class(name)(**config)


from .imfuse import IMFuse  # noqa: E402  (registers "imfuse")
from .reference import ReferenceCheckpointError, from_reference, to_reference  # noqa: E402

__all__ = ["IMFuse", "ReferenceCheckpointError", "build_model", "from_reference", "list_models",
           "model_class", "register_model", "to_reference"]
