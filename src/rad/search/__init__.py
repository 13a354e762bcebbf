"""RAD step 1: find the attention layers whose skip the model minds least (Bayesian optimisation, top-k)."""

from rad.search.config import OBJECTIVES, SAMPLERS, SearchConfig, SearchSettings, SearchSpace, resolve_space
from rad.search.objectives import Evaluation, make_objective
from rad.search.prompts import DEFAULT_PROMPTS, read_prompt_file
from rad.search.report import BaselineRecord, SearchResult, TrialRecord, read_chosen_layers
from rad.search.run import ObjectiveComparison, compare_objectives, run_search

__all__ = [
    "DEFAULT_PROMPTS",
    "OBJECTIVES",
    "SAMPLERS",
    "BaselineRecord",
    "Evaluation",
    "ObjectiveComparison",
    "SearchConfig",
    "SearchResult",
    "SearchSettings",
    "SearchSpace",
    "TrialRecord",
    "compare_objectives",
    "make_objective",
    "read_chosen_layers",
    "read_prompt_file",
    "resolve_space",
    "run_search",
]
