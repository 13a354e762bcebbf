"""Targeted (self-)distillation of a rad hybrid (RAD §3): train the new Mamba2 mixers against the teacher."""

from rad.distill.config import DEFAULT_LR, DistillConfig, DistillSettings
from rad.distill.data import DataConfig, build_data
from rad.distill.loss import chunked_distill_terms, kl_divergence
from rad.distill.modules import TRAIN_CHOICES, select_trainable, share_frozen_weights
from rad.distill.objective import LossWeights
from rad.distill.summary import DistillResult, DistillSummary
from rad.distill.train import run_distill

__all__ = [
    "DEFAULT_LR",
    "TRAIN_CHOICES",
    "DataConfig",
    "DistillConfig",
    "DistillResult",
    "DistillSettings",
    "DistillSummary",
    "LossWeights",
    "build_data",
    "chunked_distill_terms",
    "kl_divergence",
    "run_distill",
    "select_trainable",
    "share_frozen_weights",
]
