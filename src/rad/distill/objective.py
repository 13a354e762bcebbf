"""One module whose forward runs teacher and student and returns the loss terms.

Everything that needs gradients happens inside `forward`, so DDP / FSDP wrappers (which hook the
wrapped module's forward) see the whole computation. The teacher is held outside the module's
registered children: accelerate must not wrap, shard or broadcast it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rad.distill.loss import chunked_distill_terms, fused_distill_terms
from rad.errors import RadError
from rad.models.layers import decoder_layers
from rad.models.mixers import mixer_output


@dataclass
class LossWeights:
    kl: float = 1.0
    ce: float = 0.0
    align: float = 0.0
    temperature: float = 1.0
    chunk: int = 128

    def __post_init__(self):
        for name in ("kl", "ce", "align"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise RadError(f"The {name} loss weight must be a number of at least 0, got {value!r}.")
        if self.kl == 0 and self.ce == 0 and self.align == 0:
            raise RadError("Every loss weight is 0, so nothing would be learnt; give kl, ce or align a weight above 0.")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature > 0):
            raise RadError(f"The distillation temperature must be a positive number, got {self.temperature!r}.")
        if isinstance(self.chunk, bool) or not isinstance(self.chunk, int) or self.chunk < 1:
            raise RadError(f"The loss chunk must be a whole number of at least 1 position, got {self.chunk!r}.")


def _plain_linear(head: nn.Module) -> bool:
    return type(head) is nn.Linear and head.bias is None


class DistillObjective(nn.Module):
    def __init__(self, student: nn.Module, teacher: nn.Module, weights: LossWeights, align_layers: list[int]):
        super().__init__()
        self.student = student
        object.__setattr__(self, "_teacher", teacher)  # not a child module (see the module docstring)
        self.weights = weights
        self.align_layers = list(align_layers)

    @property
    def teacher(self) -> nn.Module:
        return self._teacher

    def _teacher_pass(self, input_ids, attention_mask):
        """Final hidden states of the teacher, plus (input, output) of each replaced attention layer."""
        captured: dict[int, list[torch.Tensor]] = {}
        handles = []
        if self.weights.align > 0:
            layers = decoder_layers(self.teacher)
            for i in self.align_layers:
                attn = layers[i].self_attn

                def pre(_m, args, kwargs, i=i):
                    captured[i] = [kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]]

                def post(_m, _args, output, i=i):
                    captured[i].append(output[0] if isinstance(output, tuple) else output)

                handles.append(attn.register_forward_pre_hook(pre, with_kwargs=True))
                handles.append(attn.register_forward_hook(post))
        try:
            with torch.no_grad():
                out = self.teacher.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        finally:
            for h in handles:
                h.remove()
        return out.last_hidden_state, captured

    def forward(self, input_ids, attention_mask, loss_mask, labels=None):
        """Sums of the loss terms over this micro-batch's counted positions (see `chunked_distill_terms`)."""
        w = self.weights
        teacher_hidden, captured = self._teacher_pass(input_ids, attention_mask)
        student_out = self.student.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        student_hidden = student_out.last_hidden_state
        # Position t predicts token t+1: drop the last position; labels are the next tokens.
        mask = loss_mask[:, 1:].to(student_hidden.dtype)
        targets = None
        if w.ce > 0 or labels is not None:
            targets = input_ids[:, 1:].masked_fill(loss_mask[:, 1:] == 0, -100)
        s_head, t_head = self.student.lm_head, self.teacher.lm_head
        if _plain_linear(s_head) and _plain_linear(t_head):
            terms = fused_distill_terms(
                student_hidden[:, :-1], teacher_hidden[:, :-1], mask, s_head.weight, t_head.weight,
                labels=targets, temperature=w.temperature, chunk=w.chunk,
            )
        else:
            terms = chunked_distill_terms(
                student_hidden[:, :-1], teacher_hidden[:, :-1], mask, s_head, t_head,
                labels=targets, temperature=w.temperature, chunk=w.chunk,
            )
        align = student_hidden.new_zeros((), dtype=torch.float32)
        if w.align > 0 and captured:
            layers = decoder_layers(self.student)
            pad_mask = attention_mask if attention_mask is not None and not bool(attention_mask.all()) else None
            weight = attention_mask[..., None].float() if attention_mask is not None else None
            for i, (attn_in, attn_out) in captured.items():
                mixed = mixer_output(layers[i], attn_in.to(student_hidden.dtype), pad_mask)
                err = F.mse_loss(mixed.float(), attn_out.float(), reduction="none")
                if weight is not None:
                    err = err * weight
                align = align + err.mean(-1).sum()  # summed over tokens, like the KL
        terms["align_sum"] = align
        terms["loss_sum"] = w.kl * terms["kl_sum"] + w.ce * terms["ce_sum"] + w.align * align
        return terms
