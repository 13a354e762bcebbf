"""The pipeline's stages as public functions that `rad run` and `rad ablate` both stand on.

Each takes its stage's settings dataclass (one schema and one source of defaults per stage, shared with the
stage's own command), writes its own folder, and is skipped when that folder already holds a finished
result, so an interrupted orchestrator continues where it stopped.
"""

from __future__ import annotations

import logging
from pathlib import Path

from rad.distill.config import DistillSettings
from rad.distill.summary import SUMMARY_FILE
from rad.models.convert import CONVERSION_FILE
from rad.search.config import SearchSettings
from rad.search.report import RESULT_FILE as SEARCH_FILE
from rad.search.report import SearchResult

logger = logging.getLogger(__name__)


def search_stage(teacher, settings: SearchSettings, out: Path, *, seed: int) -> SearchResult:
    """RAD step 1 into `out` (resuming its study), or the finished result already there."""
    from rad.search.run import load_matching_search, run_search

    out = Path(out)
    if (out / SEARCH_FILE).is_file():
        result = load_matching_search(teacher, settings.stage_config(seed=seed, out=out), out)
        logger.info("search: %s exists (same settings), skipped", out / SEARCH_FILE)
        return result
    run_search(teacher, settings.stage_config(seed=seed, out=out))
    return SearchResult.load(out)


def convert_stage(teacher, model: str, layers: list[int], init: str, out: Path, *, seed: int) -> Path:
    """RAD step 2 from the already loaded `teacher` (`model` is its spec, recorded with the hybrid)."""
    from rad.models.convert import ConversionConfig, conversion_record, convert_to_hybrid, save_hybrid

    out = Path(out)
    if (out / CONVERSION_FILE).is_file():
        logger.info("convert: %s exists, skipped", out)
        return out
    config = ConversionConfig(layers=list(layers), init=init, seed=seed)
    hybrid = convert_to_hybrid(teacher.model, config)
    save_hybrid(hybrid, teacher.tokenizer, out, conversion_record(model, teacher.model, config), overwrite=True)
    logger.info("Converted layers %s (%s init) -> %s", list(layers), init, out)
    return out


def distill_stage(settings: DistillSettings, hybrid: Path, out: Path, train: str, *, seed: int,
                  device: str | None, sources: tuple[str, ...], progress: bool = True) -> Path:
    """RAD step 3 into `out` (resuming from its newest checkpoint); returns the student's folder."""
    from rad.distill.train import run_distill

    student = Path(out) / "student"
    if (Path(out) / SUMMARY_FILE).is_file():  # written after the student: the run finished
        logger.info("distill: %s exists, skipped", student)
        return student
    run_distill(settings.stage_config(hybrid, out, train, seed=seed, device=device, sources=sources,
                                      progress=progress))
    return student
