"""What trains, and a teacher that shares the student's frozen weights in memory.

In RAD self-distillation the teacher is the source Transformer, and the student is that same network
with a few attention layers replaced. Every other weight is identical and frozen, so the teacher can
point at the student's tensors instead of holding a second copy: only the replaced attention layers
(and whatever trains) keep teacher-owned tensors. Twins are found by `rad.models.naming.hybrid_name`, the
map the conversion itself copies by.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from rad.errors import RadError
from rad.models.layers import decoder_layers
from rad.models.mixers import converted_layers, is_mixer_parameter
from rad.models.naming import hybrid_mlp_prefix, hybrid_name

logger = logging.getLogger(__name__)

TRAIN_CHOICES = ("mixers", "mixers+mlp", "all")


def select_trainable(student: nn.Module, train: str) -> list[str]:
    """Freeze everything but `train` ('mixers', 'mixers+mlp' or 'all'); return the trainable names."""
    if train not in TRAIN_CHOICES:
        raise RadError(f"Unknown --train {train!r}; choose one of {', '.join(TRAIN_CHOICES)}.")
    mixers = converted_layers(student)
    if not mixers and train != "all":
        raise RadError("The student has no mixers to train; convert some layers first or use --train all.")
    mixer_mlps = tuple(hybrid_mlp_prefix(i) for i in mixers)
    names = []
    for name, param in student.named_parameters():
        if train == "all":
            keep = True
        elif train == "mixers":
            keep = is_mixer_parameter(name)
        else:
            keep = is_mixer_parameter(name) or name.startswith(mixer_mlps)
        param.requires_grad_(keep)
        if keep:
            names.append(name)
    return names


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, a tied embedding counted once."""
    params = list(model.parameters())  # deduplicated by identity
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


@dataclass
class SharingReport:
    shared_tensors: int
    shared_bytes: int
    own_bytes: int


@torch.no_grad()
def share_frozen_weights(teacher: nn.Module, student: nn.Module) -> SharingReport:
    """Point every teacher parameter whose student twin is frozen and equal at the student's tensor.

    A twin must match in shape and value (checked), so a teacher that is not the student's source is
    left untouched. Trainable twins are never shared: the teacher must keep the original values.
    """
    student_params = dict(student.named_parameters(remove_duplicate=False))
    shared = shared_bytes = own = 0
    owned_ids: set[int] = set()
    for name, param in list(teacher.named_parameters(remove_duplicate=False)):
        twin = student_params.get(hybrid_name(name))
        module_name, _, leaf = name.rpartition(".")
        module = teacher.get_submodule(module_name)
        if (
            twin is not None
            and not twin.requires_grad
            and twin.shape == param.shape
            and twin.dtype == param.dtype
            and (twin.data_ptr() == param.data_ptr() or torch.equal(twin.to(param.device), param))
        ):
            if twin.data_ptr() != param.data_ptr() and id(param) not in owned_ids:
                owned_ids.add(id(param))  # a tied tensor appears under two names: count it once
                shared += 1
                shared_bytes += param.numel() * param.element_size()
            module._parameters[leaf] = twin
        elif id(param) not in owned_ids:
            owned_ids.add(id(param))
            own += param.numel() * param.element_size()
        param.requires_grad_(False)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return SharingReport(shared_tensors=shared, shared_bytes=shared_bytes, own_bytes=own)


def replaced_attention_layers(teacher: nn.Module, student: nn.Module) -> list[int]:
    """Indices where the student has a mixer and the teacher an attention layer."""
    t_layers = decoder_layers(teacher)
    return [i for i in converted_layers(student) if i < len(t_layers) and hasattr(t_layers[i], "self_attn")]


def check_same_vocabulary(student_tokenizer, teacher_tokenizer, student_vocab: int, teacher_vocab: int) -> None:
    """A teacher with another tokenizer gives distributions over other tokens: refuse it clearly."""
    if student_vocab != teacher_vocab:
        raise RadError(
            f"The teacher's vocabulary ({teacher_vocab} logits) differs from the student's ({student_vocab}); "
            "distillation needs a teacher with the same tokenizer."
        )
    both = student_tokenizer is not None and teacher_tokenizer is not None
    if both and student_tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
        raise RadError(
            "The teacher's tokenizer maps tokens to different ids than the student's; "
            "distillation needs a teacher with the same tokenizer."
        )


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute activations in the backward pass (non-reentrant), trading compute for memory."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "config"):
        model.config.use_cache = False
