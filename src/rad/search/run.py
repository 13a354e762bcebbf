"""`run_search`: RAD step 1, find the k attention layers whose skip the model minds least."""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rad.errors import RadError
from rad.models.layers import attention_layer_indices, decoder_layers
from rad.models.loading import LoadedModel, load_model
from rad.models.tokens import eos_token_ids, padding_token_id
from rad.search.aligned import load_aligned_mixers, mixers_digest
from rad.search.baselines import fixed_baselines, importance_mask
from rad.search.config import OBJECTIVES, SearchConfig, SearchSpace, resolve_space
from rad.search.objectives import (
    AgreementObjective,
    Evaluation,
    TieBrokenAgreement,
    make_objective,
    objective_class,
)
from rad.search.optimizer import make_sampler, optimise, worker_seed
from rad.search.prompts import (
    DEFAULT_PROMPTS,
    check_prompts_fit,
    encode_prompts,
    ids_from_lists,
    prompts_digest,
    recall_prompt_texts,
)
from rad.search.report import BaselineRecord, SearchResult, TrialRecord, top_frequency, write_outputs
from rad.search.storage import StudyStore, check_storage, mask_key, shown_url
from rad.utils.identity import check_same_settings

logger = logging.getLogger(__name__)

# `--recall` with an agreement objective breaks its ties by the agreement after the built-in chats, over this many
# generated tokens (the chats' own default, `SearchConfig.max_new_tokens`)
TIE_BREAK_NEW_TOKENS = SearchConfig.max_new_tokens


@dataclass
class _Prepared:
    loaded: LoadedModel
    space: SearchSpace
    prompts: list[torch.Tensor]
    eos_token_id: list[int] | None  # None: no end-of-turn token (tokenised prompts of a bare model)
    pad_token_id: int
    mixers: dict | None = None  # hybrid-agreement's aligned mixers {layer: mixer}
    # `--recall`: the built-in chats, whose agreement ranks masks that recall equally (agreement objectives)
    tie_break_prompts: list[torch.Tensor] | None = None

    def identity_prompts(self, objective: str) -> list[torch.Tensor]:
        """Every prompt the objective `objective` is measured on: what a resumed study must share."""
        return self.prompts + (self.tie_break_prompts if _tie_broken(objective, self) else [])


def _tie_broken(objective: str, prepared: _Prepared) -> bool:
    return prepared.tie_break_prompts is not None and issubclass(objective_class(objective), AgreementObjective)


def _prepare(model, config: SearchConfig, device, dtype) -> _Prepared:
    config.validate()
    if config.storage is not None:
        check_storage(config.storage)  # a wrong or unreachable URL is an error before the model loads
    if isinstance(model, (str, Path)):
        loaded = load_model(str(model), device=device, dtype=dtype)
    elif isinstance(model, LoadedModel):
        loaded = model
    elif isinstance(model, nn.Module):
        loaded = LoadedModel(model=model, tokenizer=None, source=type(model).__name__, path=None)
    else:
        raise RadError(f"Cannot search {type(model).__name__}: give a model spec, a LoadedModel or a causal LM.")
    hf = loaded.model
    mixers = load_aligned_mixers(config.aligned, hf) if config.aligned is not None else None
    space = resolve_space(config, len(decoder_layers(hf)), attention_layer_indices(hf),
                          list(mixers) if mixers is not None else None)
    if config.prompt_ids is not None:
        prompts = ids_from_lists(config.prompt_ids)
    else:
        if config.recall_length is not None:
            texts = recall_prompt_texts(loaded.tokenizer, config.recall_length)
        else:
            texts = list(DEFAULT_PROMPTS) if config.prompts is None else list(config.prompts)
        prompts = encode_prompts(loaded.tokenizer, texts, chat=config.chat)
    check_prompts_fit(prompts, config.max_new_tokens + config.max_draft,
                      getattr(hf.config, "max_position_embeddings", None), loaded.source)
    tie_break = None
    if config.recall_length is not None:
        tie_break = encode_prompts(loaded.tokenizer, list(DEFAULT_PROMPTS), chat=config.chat)
    return _Prepared(loaded, space, prompts, eos_token_ids(loaded.tokenizer, hf) or None,
                     padding_token_id(loaded.tokenizer, hf), mixers, tie_break)


def _objective(prepared: _Prepared, config: SearchConfig, name: str | None = None):
    name = name or config.objective

    def measured_on(prompts, max_new_tokens):
        return make_objective(
            name, prepared.loaded.model, prompts, max_new_tokens=max_new_tokens,
            eos_token_id=prepared.eos_token_id, max_draft=config.max_draft, adaptive=config.adaptive,
            repeats=config.repeats, warmup=config.warmup, agreement_batch=config.agreement_batch,
            pad_token_id=prepared.pad_token_id, mixers=prepared.mixers,
        )

    objective = measured_on(prepared.prompts, config.max_new_tokens)
    if _tie_broken(name, prepared):
        objective = TieBrokenAgreement(objective, measured_on(prepared.tie_break_prompts, TIE_BREAK_NEW_TOKENS))
    return objective


def _settings(config: SearchConfig, prepared: _Prepared) -> dict:
    """What a resumed or joined study must share (keys starting with info_ are recorded, not checked)."""
    hf, space = prepared.loaded.model, prepared.space
    settings = {
        "objective": config.objective,
        "k": space.k,
        "candidates": list(space.candidates),
        "num_layers": space.num_layers,
        "prompts": prompts_digest(prepared.identity_prompts(config.objective)),
        "max_new_tokens": config.max_new_tokens,
        "model": {
            "model_type": getattr(hf.config, "model_type", type(hf).__name__),
            "parameters": sum(p.numel() for p in hf.parameters()),
            "dtype": str(next(hf.parameters()).dtype),
        },
        "info_model_source": prepared.loaded.source,
        "info_sampler": config.sampler,
        "info_seed": config.seed,
        "info_storage": shown_url(config.storage) if config.storage else "study.db",
    }
    objective = objective_class(config.objective)
    if objective.speculative:
        settings.update(max_draft=config.max_draft, adaptive=config.adaptive)
    if objective.timed:
        settings.update(repeats=config.repeats, warmup=config.warmup, device=str(next(hf.parameters()).device))
    if objective.needs_mixers:
        settings.update(aligned_mixers=mixers_digest(prepared.mixers))
    return settings


def _recorded_settings(config: SearchConfig, prepared: _Prepared) -> dict:
    """The settings search.json records: the config as given plus what it resolved to (k, prompt tokens)."""
    settings = {k: v for k, v in asdict(config).items() if k not in ("out", "prompt_ids", "aligned")}
    if prepared.mixers is not None:
        settings.update(aligned=str(config.aligned), aligned_mixers=mixers_digest(prepared.mixers))
    settings.update(k=prepared.space.k, candidates=list(prepared.space.candidates),
                    num_prompts=len(prepared.prompts),
                    prompts_digest=prompts_digest(prepared.identity_prompts(config.objective)),
                    tie_break_prompts=len(prepared.identity_prompts(config.objective)) - len(prepared.prompts),
                    model=prepared.loaded.source)
    return json.loads(json.dumps(settings))  # as search.json holds them (tuples become lists)


# What decides a search's answer, compared as resolved: k rather than ratio, the prompts' token ids rather than
# None or their texts. The speculative and timed ones are compared when the objective is (`SearchObjective`).
_DECISIVE = ("objective", "k", "candidates", "prompts_digest", "max_new_tokens", "trials", "sampler", "seed",
             "keep", "try_first", "startup_trials", "neighbour_on_repeat", "stall_patience", "remeasure_top")
_DECISIVE_SPECULATIVE = ("max_draft", "adaptive")
_DECISIVE_TIMED = ("repeats", "warmup", "final_repeats")
_DECISIVE_MIXERS = ("aligned_mixers",)


def load_matching_search(model, config: SearchConfig, folder: str | Path) -> SearchResult:
    """The finished search in `folder`, if it was run with `config`'s settings; a clear RadError if not.

    An orchestrator that finds search.json skips its search; without this check a changed k, objective or
    budget would be ignored silently and the old layers converted.
    """
    result = SearchResult.load(folder)
    current = _recorded_settings(config, _prepare(model, config, None, None))
    objective = objective_class(config.objective)
    keys = list(_DECISIVE)
    if objective.speculative:
        keys += _DECISIVE_SPECULATIVE
    if objective.timed:
        keys += _DECISIVE_TIMED
    if objective.needs_mixers:
        keys += _DECISIVE_MIXERS
    check_same_settings({key: result.settings[key] for key in keys if key in result.settings},
                        {key: current[key] for key in keys}, what=f"The finished search in {Path(folder)}",
                        advice="give a new output folder, or the settings it was run with",
                        describe=lambda name, old, new: f"{name}: {old} there, {new} now")
    return result


@contextlib.contextmanager
def _study_folder(out) -> Iterator[Path]:
    if out is not None:
        yield Path(out)
        return
    with tempfile.TemporaryDirectory(prefix="rad-search-") as tmp:
        yield Path(tmp)


def run_search(model, config: SearchConfig, *, device=None, dtype=None) -> SearchResult:
    """Search the k-layer masks of `model` (a spec such as "smollm2-135m", a LoadedModel, or a causal LM).

    The study lives in `config.out`/study.db, or in the database `config.storage` names; several processes (on
    several hosts, with a server) may run this on one study (with `resume=True`) and share the budget. Each one
    then writes the same search.json, trials.csv and plots to its own `out`.
    """
    prepared = _prepare(model, config, device, dtype)
    space = prepared.space
    logger.info("Searching %d of %d layers (%d candidates, %d masks) with the %s objective, %s sampler, "
                "budget %d", space.k, space.num_layers, len(space.candidates), space.size, config.objective,
                config.sampler, config.trials)
    with _study_folder(config.out) as folder:
        store = StudyStore(folder, url=config.storage, study_name=config.study_name,
                           heartbeat_seconds=config.heartbeat_seconds)
        try:
            deterministic = objective_class(config.objective).deterministic
            study = store.open(make_sampler(config.sampler, config.seed, config.startup_trials, deterministic),
                               _settings(config, prepared), resume=config.resume)
            worker = store.register_worker()
            seed = worker_seed(config.seed, worker)
            study.sampler = make_sampler(config.sampler, seed, config.startup_trials, deterministic)
            objective = _objective(prepared, config)
            optimise(study, store, space, objective.evaluate, budget=config.trials, worker=worker, seed=seed,
                     stall_patience=config.stall_patience, neighbour_on_repeat=config.neighbour_on_repeat,
                     try_first=config.try_first)
            with store.finalising():
                result = _finalise(study, store, space, objective, config, prepared)
                if config.out is not None:
                    result.out = Path(config.out)
                    write_outputs(result, result.out, plots=config.plots)
        finally:
            store.close()
    logger.info("Chosen layers %s: %s = %.4f (%s)", mask_key(result.layers), config.objective, result.value,
                result.chosen_from)
    return result


def _finalise(study, store: StudyStore, space: SearchSpace, objective, config: SearchConfig,
              prepared: _Prepared) -> SearchResult:
    """Baselines, re-measurement of the best few (noisy objectives), the choice; all measurements cached."""
    trials = [TrialRecord.from_trial(t) for t in study.get_trials(deepcopy=False)]
    measured = {mask_key(t.layers): t for t in trials if t.measured}

    def measure(mask, repeats: int | None = None) -> Evaluation:
        key = mask_key(mask)
        if repeats is None and key in measured:
            t = measured[key]
            return Evaluation(t.value, t.details, t.seconds or 0.0)
        cache_key = f"{key}|repeats={repeats or 'default'}"
        hit = store.get_evaluation(cache_key)
        if hit is None:
            hit = objective.evaluate(tuple(mask), repeats)
            store.put_evaluation(cache_key, hit)
        return hit

    baselines: list[BaselineRecord] = []
    profile = None
    if config.baselines:
        masks = fixed_baselines(space, config.random_baselines)
        profile = {layer: measure((layer,)).value for layer in attention_layer_indices(prepared.loaded.model)}
        masks["importance"] = importance_mask(profile, space)
        for name, mask in masks.items():
            evaluation = measure(mask)
            baselines.append(BaselineRecord(name, list(mask), evaluation.value, evaluation.details))
            logger.info("baseline %-20s skip %s -> %.4f", name, mask_key(mask), evaluation.value)

    pool: dict[str, tuple[float, str]] = {}
    for t in trials:
        if t.measured:
            pool.setdefault(mask_key(t.layers), (t.value, f"trial {t.number}"))
    for b in baselines:
        pool.setdefault(mask_key(b.layers), (b.value, f"baseline {b.name}"))
    if not pool:
        raise RadError("The search measured no masks; raise --trials.")
    ranked = sorted(pool.items(), key=lambda item: -item[1][0])  # stable: earlier trials win ties
    remeasured = []
    if not objective.deterministic and config.remeasure_top > 0:
        for key, (first, origin) in ranked[: config.remeasure_top]:
            evaluation = measure(tuple(int(i) for i in key.split(",")), config.final_repeats)
            remeasured.append({"layers": [int(i) for i in key.split(",")], "from": origin, "first_value": first,
                               "value": evaluation.value, "details": evaluation.details})
            logger.info("re-measured skip %s (%s): %.4f -> %.4f", key, origin, first, evaluation.value)
        best = max(remeasured, key=lambda r: r["value"])  # max keeps the first of equal values
        layers, value, origin = best["layers"], best["value"], best["from"]
    else:
        key, (value, origin) = ranked[0]
        layers = [int(i) for i in key.split(",")]
    return SearchResult(
        layers=layers, value=value, objective=config.objective, chosen_from=origin, k=space.k,
        num_layers=space.num_layers, keep=sorted(set(config.keep)),
        evaluations=sum(t.measured for t in trials), trials=trials, baselines=baselines,
        single_layer_profile=profile, top_frequency=top_frequency(trials, space.num_layers),
        remeasured=remeasured, settings=_recorded_settings(config, prepared),
    )


@dataclass
class ObjectiveComparison:
    """The same masks measured with each objective, and the Spearman rank correlation of every pair."""

    masks: list[list[int]]
    values: dict[str, list[float]]
    spearman: dict[str, float]


def compare_objectives(model, config: SearchConfig, masks: int = 20, *, objectives=None, device=None,
                       dtype=None) -> ObjectiveComparison:
    """Measure `masks` random k-masks (seeded by config.seed) with each objective; rank-correlate them.

    An objective another one carries (`SearchObjective.carries`: acceptance in the throughput runs, the same
    SSD runs and no clock) is read from that one's details when both are asked for: one pass per mask saved.
    """
    from scipy.stats import spearmanr

    if objectives is None:  # every registered one; those that need aligned mixers when config.aligned gives them
        objectives = [n for n in OBJECTIVES if config.aligned is not None or not objective_class(n).needs_mixers]
    prepared = _prepare(model, config, device, dtype)
    space = prepared.space
    rng = np.random.default_rng(config.seed)
    chosen: dict[str, tuple[int, ...]] = {}
    while len(chosen) < min(masks, space.size):
        mask = space.random_mask(rng)
        chosen.setdefault(mask_key(mask), mask)
    mask_list = list(chosen.values())
    values: dict[str, list[float]] = {}
    for name in objectives:
        if any(name in objective_class(other).carries for other in objectives if other != name):
            continue
        measure = _objective(prepared, config, name)
        carried = objective_class(name).carries
        values[name] = []
        for i, mask in enumerate(mask_list):
            evaluation = measure.evaluate(mask)
            values[name].append(evaluation.value)
            for other, key in carried.items():
                values.setdefault(other, []).append(evaluation.details[key])
            logger.info("%s %d/%d: skip %s -> %.4f", name, i + 1, len(mask_list), mask_key(mask), evaluation.value)
    names = [n for n in objectives if n in values]
    rho = {}
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            r = spearmanr(values[a], values[b]).statistic if len(mask_list) > 2 else float("nan")
            rho[f"{a}~{b}"] = float(r)
    return ObjectiveComparison([list(m) for m in mask_list], {n: values[n] for n in names}, rho)
