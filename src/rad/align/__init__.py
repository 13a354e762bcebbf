"""Layer-local alignment of a rad hybrid's mixers to the attention they replaced (`rad align`), before KD."""

from rad.align.config import DEFAULT_LR, AlignConfig, AlignSettings
from rad.align.summary import AlignEval, AlignResult, AlignSummary
from rad.align.train import run_align

__all__ = ["DEFAULT_LR", "AlignConfig", "AlignEval", "AlignResult", "AlignSettings", "AlignSummary", "run_align"]
