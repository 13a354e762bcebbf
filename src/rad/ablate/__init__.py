"""`rad ablate`: the paper's ablation at small scale (RAD_METHOD §4).

{searched, uniform} layers x {rad, mil} init x {mixers, all} trained, from one teacher with the same data,
steps and seed; held-out KL curves, steps each arm needs to reach the baseline's final KL (baseline:
uniform layers, `mil` init, all parameters), task scores, a plot and a report.
"""

from rad.ablate.config import (
    AblateAlign,
    AblateConfig,
    AblateDistill,
    AblateEval,
    Arm,
    BaselineArm,
    load_ablate_config,
)
from rad.ablate.metrics import convergence, read_curve, steps_to_reach
from rad.ablate.results import AblateResult
from rad.ablate.run import run_ablation

__all__ = [
    "AblateAlign",
    "AblateConfig",
    "AblateDistill",
    "AblateEval",
    "AblateResult",
    "Arm",
    "BaselineArm",
    "convergence",
    "load_ablate_config",
    "read_curve",
    "run_ablation",
    "steps_to_reach",
]
