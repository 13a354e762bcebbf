"""RAD step 3 as a stage: a hybrid distilled into its own folder, skipped when the run there finished."""

from __future__ import annotations

import logging
from pathlib import Path

from rad.distill.config import DistillSettings
from rad.distill.summary import SUMMARY_FILE
from rad.distill.train import run_distill

logger = logging.getLogger(__name__)


def distill_stage(settings: DistillSettings, hybrid: Path, out: Path, train: str, *, seed: int,
                  device: str | None, sources: tuple[str, ...], progress: bool = True) -> Path:
    """RAD step 3 into `out` (resuming from its newest checkpoint); returns the student's folder."""
    student = Path(out) / "student"
    if (Path(out) / SUMMARY_FILE).is_file():  # written after the student: the run finished
        logger.info("distill: %s exists, skipped", student)
        return student
    run_distill(settings.stage_config(hybrid, out, train, seed=seed, device=device, sources=sources,
                                      progress=progress))
    return student
