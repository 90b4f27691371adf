"""Checkpoints of the original code of IM-Fuse and the competitors: `from_reference` loads one
into a model of this project, `to_reference` writes a model in that format.

The original training scripts save {"state_dict": DataParallel(model).state_dict(), ...}:
keys carry a "module." prefix and follow the original attribute names
("flair_encoder.e1_c1.weight", "mamba_fusion_layers.3.mamba_layer.mamba.mamba.A_log", ...).
Each model states its correspondence as (our key prefix, original key prefix) pairs
(`reference_renames`) and, where the original builds tensors it never uses, lists them
(`reference_unused`, optional): those are dropped on loading (`reference_droppable`, optional,
default their prefixes) and re-created on export, so the original code can load what
`to_reference` writes. A model class may also say what it recognises in an original state
(`reference_facts(state)`, a classmethod returning phrases), for the message that refuses a
checkpoint that does not fit. A model whose tensors are laid out differently from the
original's (axis order, channel order) converts them in `reference_layout(state,
to_reference)`, a state in original key names in and out.
"""
import os

import torch

from utils.io import atomic_path
from utils.pickled import load_weights, unreadable

PREFIX = "module."


class ReferenceCheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the requested model."""


def block_renames(ours, ref):
    """A TransformerBlock under `ours` <-> the original Transformer (depth 1) under `ref`."""
    return [(ours + "norm1.", ref + "cross_attention_list.0.fn.norm."),
            (ours + "attn.", ref + "cross_attention_list.0.fn.fn."),
            (ours + "norm2.", ref + "cross_ffn_list.0.fn.norm."),
            (ours + "ffn.", ref + "cross_ffn_list.0.fn.fn.net.")]


def fusion_renames(ours, ref):
    """A MambaFusionBlock under `ours` <-> the original fusion layer under `ref` (whose Mamba
    layer sits one `.mamba` level deeper)."""
    return [(ours + "fused_tokens", ref + "fused_tokens"),
            (ours + "mamba_layer.", ref + "mamba_layer.mamba.")]


def rename_state(state, renames):
    """Rename the keys of `state` by the longest matching prefix of (from, to) pairs."""
    pairs = sorted(renames, key=lambda pair: len(pair[0]), reverse=True)
    out = {}
    for key, value in state.items():
        match = next((pair for pair in pairs if key.startswith(pair[0])), None)
        if match is None:
            raise KeyError(f"no reference name for {key!r}")
        new = match[1] + key[len(match[0]):]
        if new in out:
            raise KeyError(f"two keys map to the reference name {new!r}")
        out[new] = value
    return out


def reference_state(model, include_unused=True):
    """The model's state in the original key format, without the "module." prefix."""
    state = _layout(model, rename_state(model.state_dict(), model.reference_renames()), True)
    if include_unused:
        for prefix, make in _unused(model):
            state.update({prefix + key: value for key, value in make().items()})
    return state


def _layout(model, state, to_reference):
    return model.reference_layout(state, to_reference) if hasattr(model, "reference_layout") else state


def _unused(model):
    return model.reference_unused() if hasattr(model, "reference_unused") else []


def to_reference(model, path=None, include_unused=True):
    """{"state_dict": ...} with "module."-prefixed original keys; the unused tensors of the
    original are re-created (freshly initialised) unless include_unused=False. Written to
    `path` (through a temporary name) when given."""
    checkpoint = {"state_dict": {PREFIX + key: value.detach().cpu().clone() for key, value
                                 in reference_state(model, include_unused).items()}}
    if path is not None:
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)
    return checkpoint


def _read(checkpoint):
    source = "checkpoint"
    if isinstance(checkpoint, (str, os.PathLike)):
        source = os.fspath(checkpoint)
        if not os.path.isfile(source):
            raise ReferenceCheckpointError(f"{source}: no such checkpoint file")
        try:
            checkpoint = load_weights(source)
        except Exception as err:  # torch raises many kinds for a file that is not a checkpoint
            raise ReferenceCheckpointError(unreadable(source, err))
    if not isinstance(checkpoint, dict):
        raise ReferenceCheckpointError(f"{source}: expected a dict with 'state_dict', "
                                       f"got {type(checkpoint).__name__}")
    state = next((checkpoint[k] for k in ("state_dict", "network_weights") if k in checkpoint), checkpoint)
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ReferenceCheckpointError(f"{source}: its weights are not a dict of tensors")
    if state and all(key.startswith(PREFIX) for key in state):
        state = {key[len(PREFIX):]: value for key, value in state.items()}
    return source, state


def _looks_like(state):
    """What the original weights say about the variant (model, patch size, skips), as text."""
    facts = []
    if "multimodal_transformer.cross_attention_list.0.fn.fn.qkv.weight" in state:
        facts.append("IM-Fuse" if "fused_pos" in state else "mmFormer")
    pos = state.get("flair_pos")
    if pos is not None and pos.dim() == 3:
        side = round(pos.shape[1] ** (1 / 3))
        if side ** 3 == pos.shape[1]:
            facts.append(f"patch_size={16 * side}")
    rfm4 = state.get("decoder_fuse.RFM4.fusion_layer.0.conv.weight")
    if "fused_pos" in state and rfm4 is not None:
        facts.append(f"mamba_skip={rfm4.shape[1] == rfm4.shape[0]}")
        facts.append(f"first_skip={'decoder_fuse.RFM1.fusion_layer.0.conv.weight' in state}")
    from . import _REGISTRY
    for cls in dict.fromkeys(_REGISTRY.values()):
        if hasattr(cls, "reference_facts"):
            facts += cls.reference_facts(state)
    return ", ".join(facts) or "nothing recognisable"


def _config_text(model):
    size = "patch_size" if hasattr(model, "patch_size") else "window"
    names = [n for n in (size, "interleaved", "mamba_skip", "first_skip") if hasattr(model, n)]
    return f"{model.registry_name}({', '.join(f'{n}={getattr(model, n)}' for n in names)})"


def load_reference_state(model, checkpoint):
    """Load an original checkpoint (dict or path) into `model`; refuse one that does not fit."""
    source, original = _read(checkpoint)
    unused = tuple(model.reference_droppable() if hasattr(model, "reference_droppable")
                   else [prefix for prefix, _ in _unused(model)])
    state = {key: value for key, value in original.items() if not key.startswith(unused)}
    own = model.state_dict()
    expected = rename_state(own, model.reference_renames())  # reference key -> our tensor
    ours = dict(zip(expected, own))  # reference key -> our key (same order)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = {k: v.shape for k, v in _layout(model, dict(expected), True).items()}  # in the original's layout
    wrong = [k for k in expected if k in state and state[k].shape != shapes[k]]
    if missing or unexpected or wrong:
        detail = []
        if missing:
            detail.append(f"{len(missing)} tensors missing (e.g. {missing[0]})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            detail.append(f"{len(wrong)} of another shape (e.g. {k}: {tuple(state[k].shape)} in the "
                          f"checkpoint, {tuple(shapes[k])} in the model)")
        flags = ("patch_size, mamba_skip and first_skip" if hasattr(model, "mamba_skip")
                 else "the model's sizes (patch_size or window, width, ...)")
        raise ReferenceCheckpointError(
            f"{source} does not fit {_config_text(model)}: {'; '.join(detail)}. The checkpoint "
            f"looks like {_looks_like(original)}; check {flags} (and the model name)")
    state = _layout(model, {k: state[k] for k in expected}, False)
    model.load_state_dict({ours[k]: state[k] for k in expected})
    return model


def from_reference(checkpoint, name, **config):
    """build_model(name, **config) with the weights of an original checkpoint (a dict with
    "state_dict" or nnU-Net's "network_weights", a plain state dict, or a path to one). MFB
    and I-MFB have the same weights: pass the right `interleaved`, it cannot be read from the
    checkpoint."""
    from . import build_model
    return load_reference_state(build_model(name, **config), checkpoint)


def module_state(module, renames=()):
    """A freshly built module's state, renamed; for re-creating tensors the original never uses."""
    return rename_state(module.state_dict(), renames) if renames else module.state_dict()
