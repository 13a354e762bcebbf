"""The one adapter between alignment and a hybrid's mixers: which layers were converted, and a mixer run alone.

Alignment needs two things from a hybrid and nothing else: the indices of its converted layers, and the output of
one layer's mixer for a given (already normalised) input. Both live here so that a general mixer seam in
`rad.models` can replace these bodies without touching the training loop. Today they read a stock
`BambaForCausalLM`: a converted layer holds `layer.mamba`, called the way Bamba's own decoder layer calls it.
"""

from __future__ import annotations

import torch
from torch import nn

from rad.models.layers import decoder_layers, mamba_layer_indices


def converted_layers(hybrid: nn.Module) -> list[int]:
    """Indices of the layers whose attention was replaced by a mixer (ascending)."""
    return mamba_layer_indices(hybrid)


def mixer_module(hybrid: nn.Module, layer: int) -> nn.Module:
    """The mixer of converted layer `layer`: the module whose parameters alignment trains."""
    return decoder_layers(hybrid)[layer].mamba


def mixer_parameter_prefix(layer: int) -> str:
    """The name prefix of layer `layer`'s mixer parameters in the hybrid's state dict."""
    return f"model.layers.{layer}.mamba."


def mixer_output(hybrid: nn.Module, layer: int, normed_hidden: torch.Tensor,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The mixer of `layer` applied to `normed_hidden` (= input_layernorm(h), [B, T, H]), before the residual add.

    `attention_mask` is the 2-D padding mask (1 = real token) or None for an unpadded batch, as Bamba's model
    passes it to its linear-attention layers (`create_recurrent_attention_mask`: None when all ones)."""
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None
    return mixer_module(hybrid, layer)(hidden_states=normed_hidden, attention_mask=attention_mask)


def token_mixer_of(model: nn.Module, layer: int) -> nn.Module:
    """The token mixer of a teacher's layer: its attention, or its mixer when the teacher is itself a hybrid.
    Its input is the layer's normalised hidden state; its output is what the residual adds."""
    block = decoder_layers(model)[layer]
    mixer = getattr(block, "self_attn", None) or getattr(block, "mamba", None)
    if mixer is None:
        from rad.errors import RadError

        raise RadError(f"Layer {layer} of the teacher has neither attention nor a mixer; is it a decoder model?")
    return mixer
