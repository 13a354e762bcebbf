"""The optimiser loop: Optuna proposes z in [0,1]^n, the top-k rule turns it into a mask, each mask is measured once.

A proposal whose mask is already measured is told the stored value (so the sampler learns that this z
maps there too) without measuring. Near its optimum a GP keeps proposing points whose top-k is a known
mask; so after such a repeat the loop enqueues the nearest point that gives a new mask (swap the z values
of the chosen and unchosen layer whose z are closest: the smallest move across a top-k boundary). A
proposal whose mask another worker is measuring right now is pruned. When `stall_patience` proposals in
a row bring nothing new, a random unmeasured mask is enqueued.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import optuna
import torch
from optuna.trial import TrialState

from rad.errors import RadError
from rad.search.config import SearchSpace
from rad.search.objectives import Evaluation
from rad.search.storage import StudyStore, mask_key, parse_mask_key

logger = logging.getLogger(__name__)

POLL_SECONDS = 0.5
ENUMERATE_LIMIT = 200_000  # below this many masks, pick unmeasured ones by listing them all


class SingleThreadSampler(optuna.samplers.BaseSampler):
    """Runs a sampler with one torch thread: the GP's matrices are tiny (trials x layers), and on a few
    shared cores the thread pool makes each proposal 2-3x slower (measured: 0.4 s vs 0.15 s per ask)."""

    def __init__(self, inner: optuna.samplers.BaseSampler):
        self.inner = inner

    @contextlib.contextmanager
    def _one_thread(self) -> Iterator[None]:
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    def infer_relative_search_space(self, study, trial):
        return self.inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        with self._one_thread():
            return self.inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self.inner.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial) -> None:
        self.inner.before_trial(study, trial)

    def after_trial(self, study, trial, state, values) -> None:
        self.inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.inner.reseed_rng()


def make_sampler(name: str, seed: int, startup_trials: int, deterministic: bool) -> optuna.samplers.BaseSampler:
    """GP (the paper's Bayesian optimisation), multivariate TPE, or random; all seeded."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if name == "gp":
            return SingleThreadSampler(optuna.samplers.GPSampler(
                seed=seed, n_startup_trials=startup_trials, deterministic_objective=deterministic
            ))
        if name == "tpe":
            return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup_trials, multivariate=True)
        if name == "random":
            return optuna.samplers.RandomSampler(seed=seed)
    raise RadError(f"Unknown sampler {name!r}; choose gp, tpe or random.")


def worker_seed(seed: int, worker: int) -> int:
    """Worker 0 uses the seed as given (a single-process search is reproducible); others get their own."""
    return seed + 7919 * worker


@dataclass
class LoopStats:
    evaluated: int = 0  # masks this worker measured
    cached: int = 0  # proposals answered from the study
    skipped: int = 0  # proposals pruned (mask busy elsewhere, or no budget left)
    explored: int = 0  # random unmeasured masks enqueued after a stall


def optimise(
    study: optuna.Study,
    store: StudyStore,
    space: SearchSpace,
    evaluate: Callable[[tuple[int, ...]], Evaluation],
    *,
    budget: int,
    worker: int = 0,
    seed: int = 0,
    stall_patience: int = 5,
    neighbour_on_repeat: bool = True,
    max_trials: int | None = None,
    stop_at: float | None = None,
    try_first: Sequence[Sequence[int]] = (),
) -> LoopStats:
    """Run trials until the study holds `budget` measured masks (all workers together), or all masks are.

    `stop_at`: also stop once some measured mask scores at least this (benchmarks of the samplers).
    `try_first`: masks queued before the sampler proposes any (those the study has not measured yet).
    The multi-worker claims live in `store`; this is the ask (`objective`) / tell (`run_trial`) loop.
    """
    target = min(budget, space.size)
    if budget > space.size:
        logger.warning("Only %d distinct masks exist; the search measures each of them once.", space.size)
    max_trials = max_trials or 20 * target + 100
    rng = np.random.default_rng([seed, worker, 1])
    stats = LoopStats()
    stall = 0
    if try_first and store.refresh(study).evaluated < target:
        claimed = store.claimed_masks(study)
        for mask in try_first:
            if mask_key(mask) not in claimed:
                study.enqueue_trial(space.z_for(tuple(sorted(mask)), rng), user_attrs={"source": "try"})
    last: dict = {}  # what the latest trial did, set inside the objective

    def objective(trial: optuna.Trial) -> float:
        z = [trial.suggest_float(space.param_name(c), 0.0, 1.0) for c in space.candidates]
        mask = space.top_k(z)
        claim = store.claim_next(study, trial, mask, worker, target)
        last.update(kind=claim.kind, number=trial.number, z=z)
        if claim.kind == "cached":
            return float(claim.value)
        if claim.kind != "claimed":
            raise optuna.TrialPruned(f"mask {mask_key(mask)}: {claim.reason}")
        return store.finish(trial, evaluate(mask))

    while True:
        status = store.refresh(study)
        if status.evaluated >= target or _reached(study, stop_at):
            break
        if status.trials >= max_trials:
            logger.warning("Stopping after %d trials with %d of %d masks measured: the sampler keeps "
                           "proposing known masks.", status.trials, status.evaluated, target)
            break
        if status.evaluated + status.in_flight >= target:
            time.sleep(POLL_SECONDS)  # the last slots are being measured elsewhere (or by a dead worker)
            continue
        if stall_patience and stall >= stall_patience:
            stats.explored += _enqueue_unclaimed(study, space, status.claimed, rng)
            stall = 0
        last.clear()
        if not store.run_trial(study, objective):
            continue
        kind = last.get("kind", "failed")
        if kind == "claimed":
            stats.evaluated += 1
            stall = 0
            _log_progress(study, last["number"], status.evaluated + 1, target)
            continue
        stats.cached += kind == "cached"
        stats.skipped += kind in ("busy", "full")
        stall += 1
        if kind == "cached" and neighbour_on_repeat:
            z = nearest_new_mask_point(space, last["z"], store.claimed_masks(study))
            if z is not None:
                study.enqueue_trial(z, user_attrs={"source": "neighbour"})
        elif kind == "busy":
            time.sleep(POLL_SECONDS / 5)
    return stats


def _reached(study: optuna.Study, stop_at: float | None) -> bool:
    """Whether some finished trial scores at least `stop_at` (never, without one)."""
    if stop_at is None:
        return False
    return any(t.value >= stop_at for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def _enqueue_unclaimed(study: optuna.Study, space: SearchSpace, claimed: frozenset[str],
                       rng: np.random.Generator) -> int:
    """After a stall, enqueue a random unmeasured mask; 1 if there was one, else 0."""
    fresh = _unclaimed_mask(space, claimed, rng)
    if fresh is None:
        return 0
    study.enqueue_trial(space.z_for(fresh, rng), user_attrs={"source": "explore"})
    return 1


def nearest_new_mask_point(space: SearchSpace, z: list[float], claimed: frozenset[str]) -> dict | None:
    """The point nearest to z whose top-k mask is not claimed yet, among single swaps; None if none is."""
    values = dict(zip(space.candidates, z, strict=True))
    mask = space.top_k(z)
    outside = [c for c in space.candidates if c not in mask]
    swaps = sorted((values[a] - values[b], a, b) for a in mask for b in outside)
    for _, a, b in swaps:
        moved = dict(values)
        moved[a], moved[b] = values[b], values[a]
        new = space.top_k(moved)
        if new != mask and mask_key(new) not in claimed:
            return {space.param_name(c): moved[c] for c in space.candidates}
    return None


def _unclaimed_mask(space: SearchSpace, claimed: frozenset[str], rng: np.random.Generator):
    if space.size <= ENUMERATE_LIMIT:
        free = [m for m in itertools.combinations(space.candidates, space.k) if mask_key(m) not in claimed]
        return tuple(free[int(rng.integers(len(free)))]) if free else None
    for _ in range(1000):
        mask = space.random_mask(rng)
        if mask_key(mask) not in claimed:
            return mask
    return None


def _log_progress(study: optuna.Study, number: int, done: int, target: int) -> None:
    trials = study.get_trials(deepcopy=False)
    trial = trials[number]
    if trial.state != TrialState.COMPLETE:
        return
    best = max(t.value for t in trials if t.state == TrialState.COMPLETE)
    logger.info("evaluation %d/%d (trial %d): skip %s -> %.4f (best %.4f)", done, target, number,
                mask_key(trial.user_attrs.get("mask", ())) or "-", trial.value, best)


def measured_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The trials that measured their mask (not answered from the cache), in trial order."""
    return [
        t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if t.user_attrs.get("cached") is False
    ]


def trial_mask(trial: optuna.trial.FrozenTrial) -> tuple[int, ...]:
    return parse_mask_key(mask_key(trial.user_attrs.get("mask", ())))
