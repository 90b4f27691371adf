"""Models named on the command line: a registered name (`imfuse`, `mmformer`, ...), or a
researcher's own class as `path/to/file.py:ClassName` or `package.module:ClassName`, imported
when (and only when) the user names it. Every model is checked against the contract of
models/base.py when it is built."""
import importlib
import importlib.util
import inspect
import os
import re
import sys

import torch.nn as nn

import competitors  # noqa: F401  (registers the competitors)
import models
from models.base import contract_problem
from utils.errors import first_line


DEFAULT_MODEL = "imfuse"  # what --model means when not given


class ModelError(ValueError):
    """A model that cannot be found, imported or built; the message is one line."""


def is_registered(spec):
    return ":" not in spec


def class_name(spec):
    """The class a spec names: the registry name, or what follows the colon."""
    return spec.rpartition(":")[2]


def _is_file(module_text):
    return module_text.endswith(".py") or os.sep in module_text


def canonical_spec(spec):
    """The spec as a checkpoint records it: a file's path made absolute."""
    module_text, colon, attr = spec.rpartition(":")
    return f"{os.path.abspath(module_text)}:{attr}" if colon and _is_file(module_text) else spec


def _import(module_text, spec):
    if _is_file(module_text):
        path = os.path.abspath(module_text)
        if not os.path.isfile(path):
            raise ModelError(f"--model {spec}: no such file {module_text}")
        name = "_user_model_" + re.sub(r"\W", "_", path)
        if name not in sys.modules:
            if os.path.dirname(path) not in sys.path:  # its own helper modules, after the project's
                sys.path.append(os.path.dirname(path))
            module_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            try:
                module_spec.loader.exec_module(module)
            except Exception as err:
                del sys.modules[name]
                raise _import_failed(spec, module_text, err)
        return sys.modules[name]
    try:
        return importlib.import_module(module_text)
    except Exception as err:
        raise _import_failed(spec, module_text, err)


def _import_failed(spec, module_text, err):
    """The one-line error for a module that raised while being imported."""
    detail = first_line(err, 300)
    return ModelError(f"--model {spec}: importing {module_text} failed ({type(err).__name__}: {detail})")


def model_class(spec):
    """The class of a registered name or of a `module:ClassName` spec."""
    if is_registered(spec):
        try:
            return models.model_class(spec)
        except ValueError as err:
            raise ModelError(f"{err}, or name your own class as path/to/file.py:ClassName")
    module_text, _, attr = spec.rpartition(":")
    cls = getattr(_import(module_text, spec), attr, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ModelError(f"--model {spec}: {module_text} defines no nn.Module subclass {attr}")
    return cls


def _plain(value):
    """Whether a value is made of what torch.load(weights_only=True) reads back."""
    if isinstance(value, (tuple, list)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return value is None or isinstance(value, (bool, int, float, str))


def constructor_defaults(cls):
    """{argument: default} of the class's constructor, for the defaults a checkpoint can hold."""
    return {name: p.default for name, p in inspect.signature(cls).parameters.items()
            if p.default is not inspect.Parameter.empty and _plain(p.default)}


def accepts(cls, argument):
    return argument in inspect.signature(cls).parameters


def build_model(spec, **config):
    """The model of `spec` (a registered name or module:ClassName) built with its constructor
    arguments `config`, checked against the contract."""
    cls = model_class(spec)
    try:
        model = cls(**config)
    except (TypeError, ValueError) as err:
        raise ModelError(f"model {spec}: {first_line(err, 300)}")
    problem = contract_problem(model)
    if problem:
        raise ModelError(f"model {spec} does not follow the model contract: {problem} "
                         "(README, 'Adding a model')")
    return model
