"""What an ablation will do, decided with the teacher loaded and before any arm runs: the searched and uniform
layer sets, one `ArmPlan` per arm (its folder, its layers, the arm it coincides with), and each arm's identity
(`arm_settings`, `eval_settings`): a folder made with other values is refused, not reused."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from rad.ablate.config import AblateConfig, Arm
from rad.errors import RadError
from rad.models.layers import uniform_layers, validate_layers
from rad.search.config import SearchSettings
from rad.search.report import RESULT_FILE as SEARCH_FILE
from rad.search.report import read_chosen_layers
from rad.stages.search import check_search_fits, search_stage
from rad.utils.identity import model_fingerprint

logger = logging.getLogger(__name__)


@dataclass
class ArmPlan:
    """One arm's layers and folder: `hybrid/` (the converted teacher), `distill/` (its `rad distill` folder)."""

    arm: Arm
    layers: list[int]
    folder: Path
    same_as: str | None = None

    @property
    def hybrid(self) -> Path:
        return self.folder / "hybrid"

    @property
    def align(self) -> Path:
        """`rad align`'s folder, for an `-aligned` arm: its student/ is where the KD starts."""
        return self.folder / "align"

    @property
    def distill(self) -> Path:
        return self.folder / "distill"

    @property
    def distill_start(self) -> Path:
        """The hybrid the KD continues from: the aligned one for an `-aligned` arm, else the conversion."""
        return self.align / "student" if self.arm.aligned else self.hybrid

    @property
    def student(self) -> Path:
        return self.distill / "student"


@dataclass(frozen=True)
class AblationPlan:
    """The layer sets and the arms of one ablation; `fingerprint` is the teacher's content (part of every arm's
    identity: a model re-made at the same path is another model)."""

    root: Path
    fingerprint: str
    num_layers: int
    layer_sets: dict[str, list[int]]
    searched_source: str
    baseline: Arm
    arms: dict[str, ArmPlan]  # every arm, in display order
    search_s: float

    @property
    def k(self) -> int:
        return len(self.layer_sets["searched"])

    @property
    def layer_sets_coincide(self) -> bool:
        return self.layer_sets["searched"] == self.layer_sets["uniform"]

    @property
    def runnable(self) -> list[ArmPlan]:
        """The arms that run (not `same_as` another): the baseline first (its final KL is the target), then the
        others in display order."""
        return sorted((p for p in self.arms.values() if p.same_as is None), key=lambda p: p.arm != self.baseline)


def arm_folder(out: str | Path, arm: Arm) -> Path:
    return Path(out) / "arms" / arm.name


def check_searched_from(config: AblateConfig) -> Path | None:
    """The search.json of `searched_from` (None when not given); a folder without one is refused up front."""
    if config.searched_from is None:
        return None
    path = Path(config.searched_from) / SEARCH_FILE
    if not path.is_file():
        raise RadError(f"searched_from {config.searched_from} has no {SEARCH_FILE}; point it at a finished "
                       "`rad search --out DIR` folder (or give searched_layers).")
    return path


def plan_ablation(config: AblateConfig, teacher, searched_file: Path | None) -> AblationPlan:
    """The layer sets (running the search when none is given) and every arm's plan, from the loaded teacher."""
    root = Path(config.out)
    fingerprint = model_fingerprint(teacher)
    num_layers = teacher.model.config.num_hidden_layers
    t0 = time.perf_counter()
    layer_sets, source = _layer_sets(config, root, teacher, searched_file)
    search_s = time.perf_counter() - t0
    order, baseline = _arm_order(config)
    arms = _arm_plans(config, order, baseline, layer_sets)
    plan = AblationPlan(root=root, fingerprint=fingerprint, num_layers=num_layers, layer_sets=layer_sets,
                        searched_source=source, baseline=baseline, arms=arms, search_s=search_s)
    if plan.layer_sets_coincide:
        logger.warning("The searched layers %s are the uniform layers: each searched arm coincides with its "
                       "uniform twin and is run once (reported as 'same as').", layer_sets["searched"])
    logger.info("Layers converted: searched %s (%s), uniform %s", layer_sets["searched"], source,
                layer_sets["uniform"])
    runnable = plan.runnable
    logger.info("%d arms (%d to run%s); baseline %s", len(arms), len(runnable),
                f", {len(arms) - len(runnable)} coincide" if len(runnable) < len(arms) else "", baseline.name)
    return plan


def _layer_sets(config: AblateConfig, root: Path, teacher, searched_file: Path | None
                ) -> tuple[dict[str, list[int]], str]:
    """The searched layers (checked against the model and k) and the uniform ones, and where the searched came from."""
    num_layers = teacher.model.config.num_hidden_layers
    if config.k is not None and not 1 <= config.k <= num_layers:
        raise RadError(f"k = {config.k} is out of range: {config.model} has {num_layers} layers (1..{num_layers}).")
    if config.searched_layers is not None:
        validate_layers(list(config.searched_layers), num_layers)
    elif searched_file is None and not (root / "search" / SEARCH_FILE).is_file():
        check_search_fits(_search_settings(config), teacher.model, config.seed)
    searched, source = _searched_layers(config, root, teacher, searched_file)
    searched = validate_layers(searched, num_layers)
    k = len(searched)
    if config.k is not None and k != config.k:
        raise RadError(f"The searched layers ({source}) are {k}, not k = {config.k}; set k: {k} or give "
                       f"{config.k} layers.")
    if not 1 <= k <= num_layers:
        raise RadError(f"k = {k} is out of range: {config.model} has {num_layers} layers (1..{num_layers}).")
    return {"searched": searched, "uniform": uniform_layers(k, num_layers)}, source


def _searched_layers(config: AblateConfig, root: Path, teacher, searched_file: Path | None) -> tuple[list[int], str]:
    if config.searched_layers is not None:
        return list(config.searched_layers), "given as searched_layers"
    if searched_file is not None:  # read as `rad convert --layers-from` reads it
        return read_chosen_layers(searched_file.parent), f"chosen by the search in {searched_file.parent}"
    search = _search_settings(config)
    logger.info("No searched layers given: searching (%s objective, %d trials) into %s", search.objective,
                search.trials, root / "search")
    result = search_stage(teacher, search, root / "search", seed=config.seed)
    return result.layers, f"chosen by the search in {root / 'search'}"


def _search_settings(config: AblateConfig) -> SearchSettings:
    """The search an ablation runs itself: `config.search` converting k layers when k is given."""
    return dataclasses.replace(config.search, k=config.k if config.k is not None else config.search.k)


def _arm_order(config: AblateConfig) -> tuple[list[Arm], Arm]:
    grid = config.arms()
    baseline = config.baseline.arm()
    if baseline not in grid:
        logger.info("The baseline arm %s is not in the grid; it is added (the KL target comes from it).",
                    baseline.name)
        grid.append(baseline)
    return grid, baseline


def _arm_plans(config: AblateConfig, order: list[Arm], baseline: Arm, layer_sets: dict) -> dict[str, ArmPlan]:
    """One plan per arm in display order; an arm equal to an earlier one in (layers, init, train) is marked
    `same_as` it. The baseline is claimed first, then uniform arms, so coinciding arms point at those."""
    priority = [baseline] + [a for a in order if a.layers == "uniform"] + [a for a in order if a.layers != "uniform"]
    owner: dict[tuple, str] = {}
    same_as: dict[str, str] = {}
    for arm in priority:
        key = (tuple(layer_sets[arm.layers]), arm.init, arm.train, arm.aligned)
        if key in owner and owner[key] != arm.name:
            same_as[arm.name] = owner[key]
        else:
            owner.setdefault(key, arm.name)
    return {a.name: ArmPlan(a, list(layer_sets[a.layers]), arm_folder(config.out, a), same_as.get(a.name))
            for a in order}


def arm_settings(config: AblateConfig, plan: ArmPlan, fingerprint: str) -> dict:
    """What makes an arm's training what it is; a folder made with other values is refused, not reused.
    The teacher is identified by content (`fingerprint`): a model re-made at the same path is another model."""
    d = asdict(config.distill)
    for key in ("lr", "tensorboard", "keep_checkpoints", "keep_arm_checkpoints", "save_every"):
        d.pop(key)
    settings = {"model": config.model, "model_fingerprint": fingerprint, "layers": plan.layers,
                "init": plan.arm.init, "train": plan.arm.train, "seed": config.seed,
                "lr": config.distill.lr[plan.arm.train], "distill": d}
    if plan.arm.aligned:
        a = asdict(config.align)
        for key in ("tensorboard", "save_every", "keep_checkpoints", "cache"):  # where and how it is watched and saved
            a.pop(key)
        settings["align"] = a
    return as_json(settings)


def as_json(data: dict) -> dict:
    """`data` as its JSON file will hold it (tuples become lists), so a settings dict compares equal to its saved
    copy (result.json, ablate.json) and a finished arm is recognised."""
    return json.loads(json.dumps(data))


def eval_settings(config: AblateConfig) -> dict:
    """What makes an arm's task scores what they are (a change redoes the scores, not the training)."""
    e = asdict(config.eval)
    e.pop("teacher")
    e.pop("on_missing_data")  # what happens to a task without data, not how a task is scored
    return as_json(e)
