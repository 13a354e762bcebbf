"""What alignment asks of a hybrid's mixers, answered by the mixer seam (`rad.models.mixers`).

Alignment needs three things: the indices of the converted layers, the output of one layer's mixer for a given
(already normalised) input, and which parameters are that mixer's. The seam owns all three; these thin names keep
the training loop's vocabulary (a layer index) and add the teacher's side: its token mixer at a layer.
"""

from __future__ import annotations

import torch
from torch import nn

from rad.errors import RadError
from rad.models.layers import decoder_layers
from rad.models.mixers import converted_layers, layer_mixer
from rad.models.mixers import mixer_output as seam_mixer_output

__all__ = ["converted_layers", "mixer_module", "mixer_output", "mixer_parameter_prefix", "token_mixer_of"]


def mixer_module(hybrid: nn.Module, layer: int) -> nn.Module:
    """The mixer of converted layer `layer`: the module whose parameters alignment trains."""
    mixer = layer_mixer(decoder_layers(hybrid)[layer])
    if mixer is None:
        raise RadError(f"Layer {layer} of the hybrid has no mixer; align only converted layers.")
    return mixer


def mixer_parameter_prefix(hybrid: nn.Module, layer: int) -> str:
    """The name prefix of layer `layer`'s mixer parameters in the hybrid's state dict."""
    mixer = mixer_module(hybrid, layer)
    return next(name for name, module in hybrid.named_modules() if module is mixer) + "."


def mixer_output(hybrid: nn.Module, layer: int, normed_hidden: torch.Tensor,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The mixer of `layer` applied to `normed_hidden` (= input_layernorm(h), [B, T, H]), before the residual add."""
    return seam_mixer_output(mixer_module(hybrid, layer), normed_hidden, attention_mask)


def token_mixer_of(model: nn.Module, layer: int) -> nn.Module:
    """The token mixer of a teacher's layer: its attention, or its mixer when the teacher is itself a hybrid.
    Its input is the layer's normalised hidden state; its output is what the residual adds."""
    block = decoder_layers(model)[layer]
    mixer = getattr(block, "self_attn", None)
    if mixer is None:  # a hybrid teacher: its mixer (explicit None checks: a module's truth value is not its presence)
        mixer = layer_mixer(block)
    if mixer is None:
        raise RadError(f"Layer {layer} of the teacher has neither attention nor a mixer; is it a decoder model?")
    return mixer
