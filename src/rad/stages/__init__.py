"""The pipeline's stages as public functions that `rad run`, `rad sweep` and `rad ablate` stand on.

Each takes its stage's settings (one schema and one source of defaults per stage, shared with the stage's own
command), writes its own folder, and is skipped when that folder already holds a result finished under the same
settings, so an interrupted orchestrator continues where it stopped. Data flows search → convert → (align →) distill →
evaluate (and speed); `run.run_stages` is one run's whole sequence, the unit `rad run` is and `rad sweep` repeats.
"""

from rad.stages.align import align_stage
from rad.stages.convert import convert_stage
from rad.stages.distill import distill_stage
from rad.stages.evaluate import eval_stage
from rad.stages.search import search_stage
from rad.stages.speed import speed_stage

__all__ = ["align_stage", "convert_stage", "distill_stage", "eval_stage", "search_stage", "speed_stage"]
