"""RAD step 2 as a stage: a hybrid converted from the loaded teacher, skipped when its folder holds one."""

from __future__ import annotations

import logging
from pathlib import Path

from rad.models.convert import (
    CONVERSION_FILE,
    ConversionConfig,
    conversion_record,
    convert_to_hybrid,
    save_hybrid,
)

logger = logging.getLogger(__name__)


def convert_stage(teacher, model: str, layers: list[int], init: str, out: Path, *, seed: int) -> Path:
    """RAD step 2 from the already loaded `teacher` (`model` is its spec, recorded with the hybrid)."""
    out = Path(out)
    if (out / CONVERSION_FILE).is_file():
        logger.info("convert: %s exists, skipped", out)
        return out
    config = ConversionConfig(layers=list(layers), init=init, seed=seed)
    hybrid = convert_to_hybrid(teacher.model, config)
    save_hybrid(hybrid, teacher.tokenizer, out, conversion_record(model, teacher.model, config), overwrite=True)
    logger.info("Converted layers %s (%s init) -> %s", list(layers), init, out)
    return out
