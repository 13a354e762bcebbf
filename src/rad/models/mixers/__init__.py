"""The mixer seam: ask here about the mixers that replace attention layers, never a mixer's own internals.

Finding converted layers and their mixers (`converted_layers`, `mixer_layers`, `layer_mixer`), running one
alone (`mixer_output`), telling its parameters apart (`is_mixer_parameter`, `is_gain_parameter`), and the
`MixerKind` that builds, initialises, names and decodes it (`mixer_kind`, `mixer_kind_of`). Kinds register
here at import; adding a layout is one module with a `MixerKind` plus a `register_mixer_kind` line below.
Shapes: batch B, tokens T, hidden size H.
"""

from __future__ import annotations

import torch
from torch import nn

from rad.errors import RadError
from rad.models.layers import decoder_layers
from rad.models.mixers.base import (
    MIXER_KINDS,
    InitDefaults,
    MixerGeometry,
    MixerKind,
    StateSpec,
    register_mixer_kind,
)
from rad.models.mixers.mamba2 import Mamba2

register_mixer_kind(Mamba2())

DEFAULT_MIXER = "mamba2"  # what `rad convert` builds


def mixer_kind(name: str = DEFAULT_MIXER) -> MixerKind:
    """The registered kind called `name`."""
    try:
        return MIXER_KINDS[name]
    except KeyError:
        raise RadError(f"Unknown mixer kind {name!r}; registered: {', '.join(MIXER_KINDS)}.") from None


def mixer_kind_of(mixer: nn.Module) -> MixerKind:
    """The kind a mixer module found in a model belongs to."""
    for kind in MIXER_KINDS.values():
        if kind.owns(mixer):
            return kind
    raise RadError(f"{type(mixer).__name__} is no mixer kind rad knows ({', '.join(MIXER_KINDS)}).")


def layer_mixer(layer: nn.Module) -> nn.Module | None:
    """The mixer of one decoder layer, or None when the layer kept its attention."""
    for kind in MIXER_KINDS.values():
        mixer = kind.find(layer)
        if mixer is not None and kind.owns(mixer):
            return mixer
    return None


def mixer_layers(model: nn.Module) -> dict[int, nn.Module]:
    """{layer index: mixer module} for every layer whose attention a mixer replaced, in layer order."""
    found = {}
    for i, layer in enumerate(decoder_layers(model)):
        mixer = layer_mixer(layer)
        if mixer is not None:
            found[i] = mixer
    return found


def converted_layers(model: nn.Module) -> list[int]:
    """Indices of the layers whose attention a mixer replaced (empty for a plain Transformer)."""
    return list(mixer_layers(model))


def mixer_output(layer_or_mixer: nn.Module, normed_hidden: torch.Tensor,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Run a converted layer's mixer alone: (B, T, H) -> (B, T, H), with gradients.

    `normed_hidden` is the layer's input after its input RMSNorm (what the attention would have read);
    `attention_mask` (B, T), 1 for real tokens, zeroes padded positions as the model's forward does. The
    same full-sequence code path the Hugging Face forward runs, not the decode-time recurrence.
    """
    mixer = layer_mixer(layer_or_mixer)
    if mixer is None:  # given the mixer itself
        mixer = layer_or_mixer
    return mixer_kind_of(mixer).output(mixer, normed_hidden, attention_mask)


def is_mixer_parameter(name: str) -> bool:
    """Whether a parameter / state-dict name of a hybrid belongs to a mixer: the 'mixers' trainable set."""
    return any(kind.is_mixer_parameter(name) for kind in MIXER_KINDS.values())


def is_gain_parameter(name: str) -> bool:
    """Whether a parameter is a mixer's output gain (trained at the init's `norm_lr_scale` x lr)."""
    return any(kind.is_mixer_parameter(name) and kind.is_gain_parameter(name) for kind in MIXER_KINDS.values())


def init_defaults(init: str, kind: str = DEFAULT_MIXER) -> InitDefaults:
    """What `init` wants around it (geometry settings, gain lr multiplier); a RadError for an unknown init."""
    defaults = mixer_kind(kind).init_defaults
    if init not in defaults:
        raise RadError(f"Unknown init {init!r}; choose one of {', '.join(defaults)}.")
    return defaults[init]


def load_overrides(config, chunk_size: int | None, device: torch.device) -> dict:
    """`from_pretrained` keyword overrides for a saved model of `config` (e.g. a hybrid's scan chunk)."""
    overrides: dict = {}
    for kind in MIXER_KINDS.values():
        overrides.update(kind.load_overrides(config, chunk_size, device))
    return overrides


INITS = mixer_kind().inits  # the default kind's inits: the CLI's and `rad ablate`'s choices

__all__ = [
    "DEFAULT_MIXER",
    "INITS",
    "MIXER_KINDS",
    "InitDefaults",
    "MixerGeometry",
    "MixerKind",
    "StateSpec",
    "converted_layers",
    "init_defaults",
    "is_gain_parameter",
    "is_mixer_parameter",
    "layer_mixer",
    "load_overrides",
    "mixer_kind",
    "mixer_kind_of",
    "mixer_layers",
    "mixer_output",
    "register_mixer_kind",
]
