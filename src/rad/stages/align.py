"""The layer-local alignment stage (before KD): a hybrid's mixers aligned into their own folder, skipped when done."""

from __future__ import annotations

import logging
from pathlib import Path

from rad.align import AlignSettings, run_align
from rad.align.summary import SUMMARY_FILE

logger = logging.getLogger(__name__)


def align_stage(settings: AlignSettings, hybrid: Path, out: Path, *, seed: int, device: str | None,
                sources: tuple[str, ...], progress: bool = True) -> Path:
    """Align `hybrid`'s mixers into `out` (resuming from its newest checkpoint); returns the aligned hybrid's folder,
    which the distill stage continues from."""
    student = Path(out) / "student"
    if (Path(out) / SUMMARY_FILE).is_file():  # written after the student: the run finished
        logger.info("align: %s exists, skipped", student)
        return student
    run_align(settings.stage_config(hybrid, out, seed=seed, device=device, sources=sources, progress=progress))
    return student
