"""The student and its teacher, loaded for distillation: the trainable set chosen, the vocabularies checked,
and in self-distillation the teacher pointing at the student's frozen tensors (rad.distill.modules)."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch

from rad.distill.config import DistillConfig, data_fingerprint
from rad.distill.data import DistillData
from rad.distill.modules import (
    check_same_vocabulary,
    count_parameters,
    select_trainable,
    share_frozen_weights,
)
from rad.errors import RadError
from rad.models.convert import ConversionRecord, is_hybrid_config, read_conversion_record
from rad.models.loading import load_model, resolve_to_folder
from rad.utils.identity import model_fingerprint

logger = logging.getLogger(__name__)


@dataclass
class Models:
    """The student, its teacher and what was learnt loading them."""

    student: torch.nn.Module
    teacher: torch.nn.Module
    tokenizer: object
    record: ConversionRecord | None
    self_distill: bool
    shared_bytes: int
    trainable: list[str]
    student_fingerprint: str  # the content of the hybrid it starts from (rad.utils.identity)
    teacher_fingerprint: str


def load_models(config: DistillConfig, device: torch.device) -> Models:
    """Student (the hybrid), its trainable set, and the teacher (sharing frozen weights when it can)."""

    student_loaded = load_model(config.hybrid, device=device, dtype=config.dtype or "float32")
    student = student_loaded.model
    if not is_hybrid_config(student.config):
        raise RadError(f"{config.hybrid} is not a rad hybrid (Bamba) checkpoint; make one with `rad convert`.")
    record = read_conversion_record(student_loaded.path) if student_loaded.path else None
    source = record.source_model if record else None
    teacher_spec = config.teacher or source
    if teacher_spec is None:
        raise RadError(f"{config.hybrid} has no rad_conversion.json naming its source; pass --teacher MODEL.")
    self_distill = source is not None and _same_model(teacher_spec, source)
    trainable = select_trainable(student, config.train)
    n_train, n_total = count_parameters(student)
    logger.info("Training %s: %s of %s student parameters (%.2f%%)", config.train, f"{n_train:,}",
                f"{n_total:,}", 100 * n_train / max(n_total, 1))
    share = self_distill and config.share_weights
    teacher_dtype = student.dtype if share else (config.teacher_dtype or student.dtype)
    teacher_loaded = load_model(teacher_spec, device=device, dtype=teacher_dtype)
    teacher = teacher_loaded.model
    check_same_vocabulary(student_loaded.tokenizer, teacher_loaded.tokenizer,
                          student.get_output_embeddings().weight.shape[0],
                          teacher.get_output_embeddings().weight.shape[0])
    shared_bytes = 0
    if share:
        report = share_frozen_weights(teacher, student)
        shared_bytes = report.shared_bytes
        logger.info("Self-distillation: the teacher shares %d frozen tensors (%.1f MB) with the student and "
                    "owns %.1f MB", report.shared_tensors, report.shared_bytes / 1e6, report.own_bytes / 1e6)
    else:
        for p in teacher.parameters():
            p.requires_grad_(False)
        logger.info("Teacher %s%s (own copy of its weights)", teacher_spec, " (self)" if self_distill else "")
    teacher.eval()
    return Models(student, teacher, student_loaded.tokenizer, record, self_distill, shared_bytes, trainable,
                  model_fingerprint(student_loaded), model_fingerprint(teacher_loaded))


def _same_model(a: str, b: str) -> bool:
    """Whether two model specs name the same checkpoint (the same folder once resolved)."""

    if a == b:
        return True
    try:
        fa, fb = resolve_to_folder(a), resolve_to_folder(b)
    except RadError:
        return False
    return fa is not None and fb is not None and fa.resolve() == fb.resolve()


def resume_settings(config: DistillConfig, models: Models, data: DistillData, accelerator) -> dict:
    """Everything that determines the trained weights and the held-out curve: what a resume must match."""
    return {
        "student": models.student_fingerprint,
        "teacher": models.teacher_fingerprint,
        "train": config.train,
        "steps": config.steps,  # the warm-up and cosine decay span the whole run
        "global_batch": config.micro_batch * config.grad_accum * accelerator.num_processes,
        "seed": config.seed,
        "data": {"seed": config.data.seed, "seq_len": config.data.seq_len, "content": data_fingerprint(data)},
        "optimizer": {"lr": config.lr, "min_lr_ratio": config.min_lr_ratio, "weight_decay": config.weight_decay,
                      "betas": list(config.betas), "warmup_ratio": config.warmup_ratio,
                      "max_grad_norm": config.max_grad_norm, "mixer_norm_lr_scale": config.mixer_norm_lr_scale},
        # `chunk` only splits the same sum into pieces.
        "loss": {k: v for k, v in asdict(config.loss).items() if k != "chunk"},
        # compute: the resolved precision (bf16 | fp32), before frozen weights are stored in it
        "precision": {"compute": config.precision, "student": str(models.student.dtype),
                      "teacher": str(models.teacher.dtype)},
        "eval_sequences": config.eval_sequences,  # the held-out curve's points must be comparable
    }
