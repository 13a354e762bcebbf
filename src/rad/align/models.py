"""The hybrid and its teacher, loaded for alignment (`load_models`), and what identifies a run on resume
(`resume_settings`: a checkpoint records it, `--resume` under anything else is refused)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from rad.align.config import AlignConfig, compare_shapes
from rad.align.mixers import converted_layers, mixer_parameter_prefix
from rad.distill.config import data_fingerprint
from rad.distill.data import DistillData
from rad.distill.models import _same_model
from rad.distill.modules import check_same_vocabulary, share_frozen_weights
from rad.errors import RadError
from rad.models.convert import ConversionRecord, is_hybrid_config, read_conversion_record
from rad.models.loading import load_model
from rad.utils.identity import model_fingerprint

logger = logging.getLogger(__name__)


@dataclass
class AlignModels:
    """The hybrid, its teacher (once or twice, see `load_models`) and what was learnt loading them."""

    student: torch.nn.Module
    target_teacher: torch.nn.Module  # gives the (input, target) pairs, in the resolved precision
    eval_teacher: torch.nn.Module | None  # float32, for the held-out KL (None: kl_eval off)
    tokenizer: object
    record: ConversionRecord | None
    teacher_spec: str
    layers: list[int]
    student_fingerprint: str
    teacher_fingerprint: str


def load_models(config: AlignConfig, device: torch.device, precision: str) -> AlignModels:
    """The hybrid (float32, only its mixers trainable) and its teacher: one in the pass's precision for the pairs,
    one in float32 for the held-out KL. A float32 source teacher shares the hybrid's frozen tensors (one copy)."""

    student_loaded = load_model(config.hybrid, device=device, dtype="float32")
    student = student_loaded.model
    if not is_hybrid_config(student.config):
        raise RadError(f"{config.hybrid} is not a rad hybrid (Bamba) checkpoint; make one with `rad convert`.")
    layers = converted_layers(student)
    if not layers:
        raise RadError(f"{config.hybrid} has no converted layers; convert some with `rad convert MODEL --layers ...`.")
    record = read_conversion_record(student_loaded.path) if student_loaded.path else None
    teacher_spec = config.teacher or (record.source_model if record else None)
    if teacher_spec is None:
        raise RadError(f"{config.hybrid} has no rad_conversion.json naming its source; pass --teacher MODEL.")
    prefixes = tuple(mixer_parameter_prefix(student, i) for i in layers)
    for name, param in student.named_parameters():
        param.requires_grad_(name.startswith(prefixes))
    self_teacher = record is not None and _same_model(teacher_spec, record.source_model)

    def load_teacher(dtype: str, share: bool):
        loaded = load_model(teacher_spec, device=device, dtype=dtype)
        model = loaded.model
        compare_shapes(teacher_spec, model.config.hidden_size, model.config.num_hidden_layers,
                        student.config.hidden_size, student.config.num_hidden_layers)
        if share:
            share_frozen_weights(model, student)
        for p in model.parameters():
            p.requires_grad_(False)
        return loaded

    eval_loaded = load_teacher("float32", self_teacher) if config.kl_eval or precision == "fp32" else None
    if eval_loaded is not None:
        check_same_vocabulary(student_loaded.tokenizer, eval_loaded.tokenizer,
                              student.get_output_embeddings().weight.shape[0],
                              eval_loaded.model.get_output_embeddings().weight.shape[0])
    target_loaded = eval_loaded if precision == "fp32" else load_teacher("bfloat16", False)
    fingerprint = model_fingerprint(target_loaded)
    logger.info("Aligning %d mixers (layers %s) to %s, teacher pass in %s", len(layers),
                ",".join(map(str, layers)), teacher_spec, precision)
    return AlignModels(student=student, target_teacher=target_loaded.model.eval(),
                       eval_teacher=eval_loaded.model.eval() if eval_loaded is not None else None,
                       tokenizer=student_loaded.tokenizer, record=record, teacher_spec=teacher_spec, layers=layers,
                       student_fingerprint=model_fingerprint(student_loaded), teacher_fingerprint=fingerprint)


def resume_settings(config: AlignConfig, models: AlignModels, data: DistillData, precision: str,
                    mixer_autocast: bool) -> dict:
    """Everything that determines the aligned weights and the held-out numbers: what a resume must match."""

    return {
        "student": models.student_fingerprint,
        "teacher": models.teacher_fingerprint,
        "layers": list(models.layers),
        "steps": config.steps,
        "epochs": config.epochs,
        "batch": config.batch,
        "seed": config.seed,
        "data": {"seed": config.data.seed, "seq_len": config.data.seq_len, "content": data_fingerprint(data)},
        "optimizer": {"lr": config.lr, "min_lr_ratio": config.min_lr_ratio, "weight_decay": config.weight_decay,
                      "betas": list(config.betas), "warmup_ratio": config.warmup_ratio,
                      "max_grad_norm": config.max_grad_norm},
        "precision": {"teacher": precision, "mixer_autocast": mixer_autocast},
        # A float32 teacher's pairs are rounded to bf16 in the cache: epochs after the first then differ.
        "cached_targets_rounded": bool(config.cache) and config.epochs > 1 and precision == "fp32",
        "eval_sequences": config.eval_sequences,
    }


def cache_identity(run_settings: dict) -> dict:
    """What a pair cache must have been made under: the settings that decide its (input, target) pairs."""
    keys = ("teacher", "layers", "steps", "batch", "seed", "data")
    return {**{k: run_settings[k] for k in keys}, "precision": run_settings["precision"]["teacher"]}

