"""The teacher pass of alignment: each converted layer's (input, target) pair from one forward, stopped early.

For every converted layer l, the input is the teacher's normalised hidden state there (the input of the attention
that l's mixer replaces, = input_layernorm(h)) and the target is that attention's output, before the residual add.
Forward hooks on the teacher's token mixers capture both; the hook on the last converted layer's mixer raises a
private exception, so nothing after it runs: no later layer, no final norm, never the lm_head. This works for any
`model.layers` decoder without knowing its forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rad.align.mixers import token_mixer_of
from rad.errors import RadError


class _TeacherStopped(Exception):
    """Raised by the hook on the last converted layer: everything alignment needs has been captured."""


@dataclass
class LayerPairs:
    """The (input, target) pairs of one batch: `inputs[l]` and `targets[l]` are [B, T, H] for each layer l."""

    inputs: dict[int, torch.Tensor]
    targets: dict[int, torch.Tensor]
    attention_mask: torch.Tensor


@torch.no_grad()
def teacher_pairs(teacher: nn.Module, layers: list[int], input_ids: torch.Tensor,
                  attention_mask: torch.Tensor) -> LayerPairs:
    """Run `teacher` on a batch until the last layer of `layers` has produced its attention output."""
    if not layers:
        raise RadError("There is no converted layer to align.")
    inputs: dict[int, torch.Tensor] = {}
    targets: dict[int, torch.Tensor] = {}
    last = max(layers)
    handles = []

    def capture_input(layer):
        def hook(_module, args, kwargs):
            inputs[layer] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        return hook

    def capture_output(layer):
        def hook(_module, _args, output):
            targets[layer] = output[0] if isinstance(output, tuple) else output
            if layer == last:
                raise _TeacherStopped
        return hook

    for layer in layers:
        mixer = token_mixer_of(teacher, layer)
        handles.append(mixer.register_forward_pre_hook(capture_input(layer), with_kwargs=True))
        handles.append(mixer.register_forward_hook(capture_output(layer)))
    base = getattr(teacher, "model", teacher)  # the decoder stack without the lm_head
    try:
        base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _TeacherStopped:
        pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [layer for layer in layers if layer not in targets]
    if missing:
        raise RadError(f"The teacher's forward never reached layer {missing[0]}; is it a decoder with these layers?")
    return LayerPairs(inputs=inputs, targets=targets, attention_mask=attention_mask)
