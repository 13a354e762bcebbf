"""What a search is asked to do (`SearchConfig`) and the set of masks it may choose from (`SearchSpace`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import PositiveInt

from rad.config import check_seed, settings
from rad.errors import RadError
from rad.search.aligned import aligned_folder
from rad.search.objectives import OBJECTIVE_CLASSES
from rad.search.prompts import DEFAULT_PROMPTS, MIN_RECALL_LENGTH

OBJECTIVES = tuple(OBJECTIVE_CLASSES)  # the registered selection objectives (search/objectives.py)
SAMPLERS = ("gp", "tpe", "random")
ObjectiveName = Literal[OBJECTIVES]  # pydantic reads the choices (a YAML settings field's type)
SamplerName = Literal[SAMPLERS]


@dataclass
class SearchConfig:
    """Settings of one redundancy search; every default can be overridden from the CLI.

    `trials` is the budget of *evaluations*: distinct masks measured with the objective. A proposal whose
    mask was already measured is answered from the study (a cheap, cached trial) and does not count.
    """

    k: int | None = None  # attention layers to skip; or give `ratio`
    ratio: float | None = None  # k = round(ratio * L)
    objective: str = "throughput"
    trials: int = 60
    sampler: str = "gp"
    seed: int = 0
    keep: list[int] = field(default_factory=list)  # layers whose attention is never skipped
    # masks measured before the sampler proposes any (another search's choice, a paper's layers): a known good
    # mask is then in the running whatever the budget; they count against `trials`
    try_first: list[list[int]] = field(default_factory=list)
    prompts: list[str] | None = None  # None: the built-in chat prompts
    prompt_ids: list[list[int]] | None = None  # already tokenised prompts (overrides `prompts`)
    # The prompts are passkey haystacks of this many tokens (one per depth 0-25-50-75-100%, `rad.haystack`) instead
    # of chats: the draft is scored on recalling a key from far back, the search keeps the layers retrieval needs
    recall_length: int | None = None
    chat: bool = True  # wrap each prompt in the tokenizer's chat template when it has one
    max_new_tokens: int = 32
    max_draft: int = 8  # self-speculative decoding: draft tokens per round at most
    adaptive: bool = True  # Draft & Verify's adaptive stop threshold
    repeats: int = 3  # throughput: timed runs per mask (median), after `warmup` untimed ones
    warmup: int = 1
    final_repeats: int = 7  # throughput: repeats when re-measuring the best few
    remeasure_top: int = 3
    startup_trials: int = 10  # random proposals before the GP / TPE model is fitted
    neighbour_on_repeat: bool = True  # after a proposal repeats a known mask, try the nearest new one
    stall_patience: int = 5  # proposals in a row that bring no new mask before a random new one is tried
    baselines: bool = True
    random_baselines: int = 3  # random-k baseline masks (seeds 0..n-1)
    agreement_batch: int = 8  # sequences per batched forward of the agreement objective
    # hybrid-agreement: the hybrid (or `rad align` output) whose mixers replace the tried layers' attention
    aligned: str | Path | None = None
    out: str | Path | None = None  # None: a temporary study, no files kept
    resume: bool = False  # continue (or join) the study in `out` (or in `storage`)
    # where the study lives: any SQLAlchemy URL of SQLite, PostgreSQL or MySQL (workers on many hosts join one
    # study on a server); None: `out`/study.db
    storage: str | None = None
    study_name: str = "rad-search"  # tells studies in one database apart
    heartbeat_seconds: int = 10  # a worker silent for 2x this long is dead; its trial is redone
    plots: bool = True

    def validate(self) -> None:
        check_seed(self.seed)
        if self.objective not in OBJECTIVES:
            raise RadError(f"Unknown objective {self.objective!r}; choose one of {', '.join(OBJECTIVES)}.")
        if self.sampler not in SAMPLERS:
            raise RadError(f"Unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}.")
        if self.k is not None and self.ratio is not None:
            raise RadError("Give either k (--k) or ratio (--ratio), not both.")
        if self.k is None and self.ratio is None:
            raise RadError("Say how many attention layers to skip with --k N or --ratio R.")
        if self.ratio is not None and not 0 < self.ratio < 1:
            raise RadError(f"ratio must be strictly between 0 and 1, got {self.ratio}.")
        for name in ("trials", "max_new_tokens", "max_draft", "repeats", "final_repeats", "heartbeat_seconds"):
            if getattr(self, name) < 1:
                raise RadError(f"{name} must be at least 1, got {getattr(self, name)}.")
        for name in ("warmup", "remeasure_top", "startup_trials", "random_baselines", "stall_patience"):
            if getattr(self, name) < 0:
                raise RadError(f"{name} must not be negative, got {getattr(self, name)}.")
        if not 0 < len(self.study_name) <= 255 or not self.study_name.isprintable():
            raise RadError(f"--study must be a printable name of 1 to 255 characters, got {self.study_name!r}.")
        if self.recall_length is not None:
            if isinstance(self.recall_length, bool) or not isinstance(self.recall_length, int) \
                    or self.recall_length < MIN_RECALL_LENGTH:
                raise RadError(f"--recall is a prompt length in tokens, at least {MIN_RECALL_LENGTH}; got "
                               f"{self.recall_length!r}.")
            if self.prompts is not None or self.prompt_ids is not None:
                raise RadError("--recall makes the search prompts (passkey haystacks); leave out --prompts.")
        if self.agreement_batch < 1:
            raise RadError(f"agreement_batch must be at least 1, got {self.agreement_batch}.")
        needs_mixers = OBJECTIVE_CLASSES[self.objective].needs_mixers
        if needs_mixers and self.aligned is None:
            raise RadError(f"The {self.objective} objective scores the hybrid built from aligned mixers: give "
                           "--aligned DIR (rad convert MODEL --layers first:L, then rad align it into DIR).")
        if self.aligned is not None and not needs_mixers:
            raise RadError(f"--aligned is read only by the hybrid-agreement objective, not by {self.objective}; "
                           "leave it out or choose --objective hybrid-agreement.")
        if self.aligned is not None:
            aligned_folder(self.aligned)  # a hybrid (or an align output with its student) is there


@settings
class SearchSettings:
    """The search settings an orchestrator (`rad run`, `rad ablate`) exposes in its YAML; every default is
    `SearchConfig`'s (and so `rad search`'s), except that a size is always given (half the layers)."""

    k: int | None = None
    ratio: float | None = 0.5  # used when k is None (so checked only then, by `SearchConfig.validate`)
    objective: ObjectiveName = SearchConfig.objective
    trials: PositiveInt = SearchConfig.trials
    sampler: SamplerName = SearchConfig.sampler
    max_new_tokens: PositiveInt = SearchConfig.max_new_tokens
    prompts: PositiveInt | None = None  # the first N built-in search prompts (None: all)
    recall_length: PositiveInt | None = SearchConfig.recall_length  # passkey haystacks of this length as prompts
    try_first: list[list[int]] = field(default_factory=list)  # masks measured first, e.g. [[4, 7, 18, 22]]
    baselines: bool = SearchConfig.baselines
    aligned: str | None = None  # hybrid-agreement's aligned hybrid (a `rad align` output)

    def __post_init__(self):
        if self.recall_length is not None and self.prompts is not None:  # one would silently replace the other
            raise RadError("search.recall_length makes the search prompts (passkey haystacks), so search.prompts "
                           "cannot be used beside it; remove search.prompts (--set search.prompts=null).")
        self.stage_config(seed=0, out=None).validate()  # k or ratio, and what they resolve to, before any work

    def stage_config(self, *, seed: int, out: str | Path | None) -> SearchConfig:
        """The `SearchConfig` of this search; resumes the study when `out` already exists."""

        prompts = list(DEFAULT_PROMPTS[: self.prompts]) if self.prompts else None
        return SearchConfig(k=self.k, ratio=None if self.k else self.ratio, objective=self.objective,
                            trials=self.trials, sampler=self.sampler, seed=seed,
                            prompts=prompts, recall_length=self.recall_length,
                            try_first=[list(m) for m in self.try_first],
                            max_new_tokens=self.max_new_tokens, baselines=self.baselines, aligned=self.aligned,
                            out=out,
                            resume=out is not None and Path(out).exists())


@dataclass(frozen=True)
class SearchSpace:
    """Masks of exactly `k` skipped layers drawn from `candidates` (attention layers not kept)."""

    num_layers: int
    k: int
    candidates: tuple[int, ...]

    @property
    def size(self) -> int:
        return math.comb(len(self.candidates), self.k)

    def param_name(self, layer: int) -> str:
        return f"z{layer:03d}"

    def top_k(self, z: dict[int, float] | list[float] | np.ndarray) -> tuple[int, ...]:
        """The mask of the k largest coordinates of z (one per candidate; ties go to the lower layer)."""
        values = np.asarray([z[c] for c in self.candidates] if isinstance(z, dict) else z, dtype=float)
        if values.shape != (len(self.candidates),):
            raise ValueError(f"z has {values.size} coordinates, the space has {len(self.candidates)} candidates")
        order = np.lexsort((np.arange(values.size), -values))  # by -z, then by position
        return tuple(sorted(self.candidates[i] for i in order[: self.k]))

    def z_for(self, mask: tuple[int, ...], rng: np.random.Generator) -> dict[str, float]:
        """A random point of the cube whose top-k mask is `mask` (chosen layers above 0.5, the rest below)."""
        chosen = set(mask)
        return {
            self.param_name(c): float(rng.uniform(0.5, 1.0) if c in chosen else rng.uniform(0.0, 0.5))
            for c in self.candidates
        }

    def random_mask(self, rng: np.random.Generator) -> tuple[int, ...]:
        return tuple(sorted(int(c) for c in rng.choice(self.candidates, size=self.k, replace=False)))


def resolve_space(config: SearchConfig, num_layers: int, attention_layers: list[int],
                  mixer_layers: list[int] | None = None) -> SearchSpace:
    """Check k and keep against the model; the candidates are attention layers that are not kept (and, for an
    objective that tries aligned mixers, have one: `mixer_layers`)."""
    if config.k is not None:
        k = int(config.k)
    else:
        k = round(config.ratio * num_layers)
        if k < 1:
            raise RadError(f"ratio {config.ratio} of {num_layers} layers rounds to 0 layers; raise the ratio.")
    if k <= 0:
        raise RadError(f"k must be at least 1 (got {k}): the search needs some attention layers to skip.")
    if k >= num_layers:
        raise RadError(f"k = {k} would skip all {num_layers} layers' attention; choose k below {num_layers}.")
    keep = sorted(set(int(i) for i in config.keep))
    bad = [i for i in keep if not 0 <= i < num_layers]
    if bad:
        raise RadError(f"Kept layer {bad[0]} is out of range: the model has layers 0..{num_layers - 1}.")
    candidates = tuple(i for i in attention_layers if i not in set(keep)
                       and (mixer_layers is None or i in set(mixer_layers)))
    if mixer_layers is not None and k > len(candidates):
        raise RadError(f"k = {k} is more than the {len(candidates)} candidate layers with an aligned mixer "
                       f"({','.join(map(str, candidates))}); align more layers (--layers first:{num_layers}).")
    if k > len(candidates):
        raise RadError(
            f"k = {k} is more than the {len(candidates)} attention layers that may be skipped "
            f"({num_layers} layers, {num_layers - len(attention_layers)} without attention, {len(keep)} kept)."
        )
    for mask in config.try_first:
        layers = sorted(set(int(i) for i in mask))
        if len(layers) != k or len(mask) != k:
            raise RadError(f"--try {','.join(map(str, mask))} names {len(mask)} layers; each tried mask needs "
                           f"exactly k = {k} distinct layers.")
        outside = [i for i in layers if i not in set(candidates)]
        if outside:
            raise RadError(f"--try {','.join(map(str, mask))}: layer {outside[0]} is not a candidate (kept, out of "
                           f"range or without attention); the candidates are {','.join(map(str, candidates))}.")
    return SearchSpace(num_layers=num_layers, k=k, candidates=candidates)
