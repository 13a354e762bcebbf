"""RAD step 1 as a stage: the layer search into its own folder, skipped when finished under the same settings."""

from __future__ import annotations

import logging
from pathlib import Path

from rad.models.layers import attention_layer_indices
from rad.search.config import SearchSettings, resolve_space
from rad.search.report import RESULT_FILE as SEARCH_FILE
from rad.search.report import SearchResult
from rad.search.run import load_matching_search, run_search

logger = logging.getLogger(__name__)


def search_stage(teacher, settings: SearchSettings, out: Path, *, seed: int) -> SearchResult:
    """RAD step 1 into `out` (resuming its study), or the finished result already there."""
    out = Path(out)
    if (out / SEARCH_FILE).is_file():
        result = load_matching_search(teacher, settings.stage_config(seed=seed, out=out), out)
        logger.info("search: %s exists (same settings), skipped", out / SEARCH_FILE)
        return result
    run_search(teacher, settings.stage_config(seed=seed, out=out))
    return SearchResult.load(out)


def check_search_fits(settings: SearchSettings, model, seed: int) -> None:
    """The search's model-dependent checks (k against the layers), so an orchestrator refuses before writing."""
    resolve_space(settings.stage_config(seed=seed, out=None), model.config.num_hidden_layers,
                  attention_layer_indices(model))
