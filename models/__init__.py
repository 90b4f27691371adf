"""IM-Fuse and the models it is compared with, built by name:

    model = build_model("imfuse", patch_size=128, interleaved=True, mamba_skip=True)
    model = from_reference("model_best.pth", "imfuse", interleaved=True, mamba_skip=True)

Every model registers itself with `@register_model(name)`; competitors live in `competitors/`.
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
    import competitors  # noqa: F401  (registers the competitors)
    return sorted(_REGISTRY)


def model_class(name):
    if name not in list_models():
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(list_models())}")
    return _REGISTRY[name]


def build_model(name, **config):
    """The model registered as `name`, built with its constructor arguments `config`."""
    return model_class(name)(**config)


from .imfuse import IMFuse  # noqa: E402  (registers "imfuse")
from .reference import ReferenceCheckpointError, from_reference, to_reference  # noqa: E402

__all__ = ["IMFuse", "ReferenceCheckpointError", "build_model", "from_reference", "list_models",
           "model_class", "register_model", "to_reference"]
