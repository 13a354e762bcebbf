"""`rad ablate`: every arm of {searched, uniform} layers x {rad, mil} init x {mixers, all} trained, from one
teacher with the same data, steps and seed, then held-out KL curves, steps to the baseline's final KL, task
scores, `kl_curves.png` and `report.md`.

Layout under OUT: `config.yaml` (the resolved settings), `search/` (only when the ablation ran the search
itself), `arms/<layers>-<init>-<train>/` with `settings.json`, `hybrid/` (the converted teacher),
`distill/` (a `rad distill` folder: log.jsonl, curves.png, summary.json, student/) and `result.json` (an
`ArmResult`, the arm's finished record), `eval/<arm>/` (per-item task files), `ablate.json` (an
`AblateSummary`), `kl_curves.png`, `report.md`.
An arm whose result.json matches the settings is skipped; an interrupted one continues where it stopped
(its hybrid and student are written atomically, its distillation resumes from the newest checkpoint, its
task evaluation from the per-item files).
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from rad.ablate.config import AblateConfig, Arm
from rad.ablate.metrics import convergence, read_curve
from rad.distill.summary import SUMMARY_FILE, DistillSummary, EvalPoint
from rad.errors import RadError
from rad.evaluate.runner import TaskScore
from rad.models.convert import CONVERSION_FILE
from rad.outputs import ABLATE, check_output
from rad.preflight import check_inputs
from rad.utils.artefacts import load_artefact
from rad.utils.atomic import atomic_write_json, atomic_write_text
from rad.utils.identity import check_same_settings, model_fingerprint

logger = logging.getLogger(__name__)

RESULT_FILE = "ablate.json"
SETTINGS_FILE = "settings.json"
ARM_RESULT_FILE = "result.json"


def _json_object(data) -> dict:
    if not isinstance(data, dict):
        raise TypeError("not a JSON object")
    return data


def _scores_from_json(data: dict) -> dict[str, TaskScore]:
    return {task: TaskScore.from_json(score) for task, score in data.items()}


def _scores_to_json(scores: dict[str, TaskScore]) -> dict:
    return {task: {**asdict(score), "ci95": list(score.ci95)} for task, score in scores.items()}


@dataclass(frozen=True)
class ArmResult:
    """What an arm's result.json holds (its done marker): the held-out KL curve, sizes, task scores, timings,
    and the settings it was made with (an arm whose result was made with other settings is redone)."""

    name: str
    layer_set: str  # searched | uniform
    layers: list[int]
    init: str
    train: str
    lr: float
    trainable_parameters: int | None
    total_parameters: int | None
    data: str | None
    curve: list[EvalPoint]
    kl_at_init: float | None
    final_kl: float
    final_step: int
    scores: dict[str, TaskScore]
    timings: dict[str, float]
    folder: str
    settings: dict
    eval_settings: dict

    def to_json(self) -> dict:
        data = asdict(self)
        data["scores"] = _scores_to_json(self.scores)
        return data

    @classmethod
    def _fields_from_json(cls, data: dict) -> dict:
        names = {f.name for f in dataclasses.fields(cls)}
        data = {k: v for k, v in data.items() if k in names}
        data["curve"] = [EvalPoint.from_json(p) for p in data["curve"]]
        data["scores"] = _scores_from_json(data.get("scores") or {})
        return data

    @classmethod
    def from_json(cls, data: dict) -> ArmResult:
        return cls(**cls._fields_from_json(data))

    def save(self, folder: str | Path) -> Path:
        return atomic_write_json(Path(folder) / ARM_RESULT_FILE, self.to_json())

    @classmethod
    def load(cls, folder: str | Path) -> ArmResult:
        return load_artefact(
            Path(folder) / ARM_RESULT_FILE, cls.from_json, "a rad ablation arm result",
            f"delete it to redo the arm's record (its student is kept), or delete {folder} to redo the arm")


@dataclass(frozen=True)
class ArmSummary(ArmResult):
    """An arm in ablate.json: its result, the arm it coincides with, and how fast it reaches the baseline."""

    same_as: str | None = None
    steps_to_baseline_kl: int | None = None
    speedup: float | None = None
    reached_at_init: bool = False


@dataclass(frozen=True)
class AblateSummary:
    """What ablate.json holds; `config` is the resolved AblateConfig as saved (config.yaml has the same)."""

    model: str
    num_layers: int
    k: int
    layer_sets: dict[str, list[int]]
    searched_source: str
    layer_sets_coincide: bool
    baseline: str
    baseline_final_kl: float
    baseline_steps: int | None
    order: list[str]
    arms: dict[str, ArmSummary]
    teacher_scores: dict[str, TaskScore]
    statuses: dict[str, str]
    dropped_tasks: dict[str, str]
    timings: dict[str, float | None]
    command: str
    config: dict
    versions: dict

    def to_json(self) -> dict:
        data = asdict(self)
        data["arms"] = {name: arm.to_json() for name, arm in self.arms.items()}
        data["teacher_scores"] = _scores_to_json(self.teacher_scores)
        return data

    @classmethod
    def from_json(cls, data: dict) -> AblateSummary:
        data = dict(data)
        data["arms"] = {name: ArmSummary(**ArmSummary._fields_from_json(arm)) for name, arm in data["arms"].items()}
        data["teacher_scores"] = _scores_from_json(data.get("teacher_scores") or {})
        return cls(**data)

    def save(self, root: str | Path) -> Path:
        return atomic_write_json(Path(root) / RESULT_FILE, self.to_json())

    @classmethod
    def load(cls, root: str | Path) -> AblateSummary:
        return load_artefact(
            Path(root) / RESULT_FILE, cls.from_json, "a rad ablation summary",
            f"re-run `rad ablate --config {Path(root) / 'config.yaml'}` (finished arms are skipped)")


@dataclass
class AblateResult:
    out: Path
    report: Path
    summary: AblateSummary  # what ablate.json holds
    statuses: dict[str, str] = field(default_factory=dict)  # arm -> ran | resumed | skipped | same as <arm>


@dataclass
class _Plan:
    arm: Arm
    layers: list[int]
    folder: Path
    same_as: str | None = None

    @property
    def hybrid(self) -> Path:
        return self.folder / "hybrid"

    @property
    def distill(self) -> Path:
        return self.folder / "distill"

    @property
    def student(self) -> Path:
        return self.distill / "student"


def arm_folder(out: str | Path, arm: Arm) -> Path:
    return Path(out) / "arms" / arm.name


def run_ablation(config: AblateConfig) -> AblateResult:
    """Run (or continue) every arm and write ablate.json, kl_curves.png and report.md under `config.out`."""
    from rad.models.convert import package_versions
    from rad.models.layers import uniform_layers, validate_layers
    from rad.models.loading import load_model

    t_start = time.perf_counter()
    root = Path(config.out)
    check_output(root, ABLATE, inputs=[("model", config.model), ("distillation data", config.distill.data),
                                       ("searched_from folder", config.searched_from)],
                 allowed=[root / "search"])  # reading the search this ablation ran itself is its resume
    searched_file = _check_searched_from(config)
    # Model, data and each task's data are resolved now (the hub probed once), not after hours of training.
    inputs = check_inputs(config.model, config.eval.tasks, on_missing_task=config.eval.on_missing_data,
                          distill_data=config.distill.data, teacher_texts=False)
    eval_config = _eval_config(config, root, inputs)

    teacher = load_model(config.model, device=config.device)
    fingerprint = model_fingerprint(teacher)
    num_layers = teacher.model.config.num_hidden_layers
    if config.k is not None and not 1 <= config.k <= num_layers:
        raise RadError(f"k = {config.k} is out of range: {config.model} has {num_layers} layers (1..{num_layers}).")
    if config.searched_layers is not None:
        validate_layers(list(config.searched_layers), num_layers)
    elif searched_file is None and not (root / "search" / "search.json").is_file():
        from rad.pipeline import check_search_fits

        check_search_fits(_search_settings(config), teacher.model, config.seed)
    t0 = time.perf_counter()
    searched, source = _searched_layers(config, root, teacher, searched_file)
    search_s = time.perf_counter() - t0
    searched = validate_layers(searched, num_layers)
    k = len(searched)
    if config.k is not None and k != config.k:
        raise RadError(f"The searched layers ({source}) are {k}, not k = {config.k}; set k: {k} or give "
                       f"{config.k} layers.")
    if not 1 <= k <= num_layers:
        raise RadError(f"k = {k} is out of range: {config.model} has {num_layers} layers (1..{num_layers}).")
    layer_sets = {"searched": searched, "uniform": uniform_layers(k, num_layers)}
    coincide = layer_sets["searched"] == layer_sets["uniform"]
    if coincide:
        logger.warning("The searched layers %s are the uniform layers: each searched arm coincides with its "
                       "uniform twin and is run once (reported as 'same as').", searched)
    logger.info("Layers converted: searched %s (%s), uniform %s", layer_sets["searched"], source,
                layer_sets["uniform"])

    order, baseline = _arm_order(config)
    plans = _plans(config, order, baseline, layer_sets)
    # Run the baseline first (its final KL is the target), then the others in display order.
    runnable = sorted((p for p in plans.values() if p.same_as is None), key=lambda p: p.arm != baseline)
    logger.info("%d arms (%d to run%s); baseline %s", len(plans), len(runnable),
                f", {len(plans) - len(runnable)} coincide" if len(runnable) < len(plans) else "", baseline.name)

    # Phase 1, with the teacher in memory: check (or write) each arm's settings, convert the missing hybrids.
    for plan in runnable:
        _check_settings(plan.folder, _arm_settings(config, plan, fingerprint), write=False)
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(root / "config.yaml", yaml.safe_dump(asdict(config), sort_keys=False))
    inputs.save(root)
    done: dict[str, ArmResult] = {}
    timings: dict[str, dict] = {p.arm.name: {} for p in runnable}
    for plan in runnable:
        settings = _arm_settings(config, plan, fingerprint)
        _check_settings(plan.folder, settings)
        record = _finished(plan, settings, _eval_settings(config))
        if record is not None:
            done[plan.arm.name] = record
            logger.info("arm %s: done, skipped", plan.arm.name)
            continue
        if (plan.hybrid / CONVERSION_FILE).is_file():
            logger.info("arm %s: hybrid %s exists, skipped", plan.arm.name, plan.hybrid)
            continue
        t0 = time.perf_counter()
        _convert(teacher, config, plan)
        timings[plan.arm.name]["convert_s"] = time.perf_counter() - t0
    del teacher
    _free_memory()

    # Phase 2: distil and score each arm in turn (baseline first), one student in memory at a time.
    statuses: dict[str, str] = {}
    todo = [p for p in runnable if p.arm.name not in done]
    for i, plan in enumerate(todo, 1):
        name = plan.arm.name
        logger.info("arm %d/%d %s: layers %s, %s init, training %s", i, len(todo), name, plan.layers,
                    plan.arm.init, plan.arm.train)
        resumed = "convert_s" not in timings[name] or plan.distill.exists()
        done[name] = _run_arm(config, plan, eval_config, timings[name], inputs.sources, fingerprint)
        statuses[name] = "resumed" if resumed else "ran"
        _free_memory()
    for plan in runnable:
        statuses.setdefault(plan.arm.name, "skipped")

    teacher_scores, teacher_eval_s = {}, None
    if eval_config is not None and config.eval.teacher:
        t0 = time.perf_counter()
        teacher_scores = _score(load_model(config.model, device=config.device), "teacher", eval_config)
        teacher_eval_s = time.perf_counter() - t0
        _free_memory()

    records: dict[str, ArmResult] = {}
    for name, plan in plans.items():
        if plan.same_as is not None:
            records[name] = dataclasses.replace(done[plan.same_as], name=name, layer_set=plan.arm.layers)
            statuses[name] = f"same as {plan.same_as}"
        else:
            records[name] = done[name]
    conv = convergence({n: [asdict(p) for p in r.curve] for n, r in records.items()}, baseline.name)
    arms = {name: ArmSummary(**{f.name: getattr(r, f.name) for f in dataclasses.fields(ArmResult)},
                             same_as=plans[name].same_as, **conv["arms"][name]) for name, r in records.items()}
    summary = AblateSummary(
        model=config.model, num_layers=num_layers, k=k,
        layer_sets=layer_sets, searched_source=source, layer_sets_coincide=coincide,
        baseline=baseline.name, baseline_final_kl=conv["target_kl"], baseline_steps=conv["baseline_steps"],
        order=list(plans), arms=arms, teacher_scores=teacher_scores,
        statuses=statuses, dropped_tasks=dict(inputs.dropped_tasks),
        timings={"search_s": search_s, "teacher_eval_s": teacher_eval_s, "total_s": time.perf_counter() - t_start},
        command=f"rad ablate --config {root / 'config.yaml'}",
        config=asdict(config), versions=package_versions(),
    )
    summary.save(root)
    from rad.ablate.report import plot_kl_curves, write_report

    plot_kl_curves(summary, root / "kl_curves.png")
    report = write_report(summary, config, root)
    logger.info("Report: %s", report)
    return AblateResult(out=root, report=report, summary=summary, statuses=statuses)


def _check_searched_from(config: AblateConfig) -> Path | None:
    if config.searched_from is None:
        return None
    from rad.search.report import RESULT_FILE as SEARCH_FILE

    path = Path(config.searched_from) / SEARCH_FILE
    if not path.is_file():
        raise RadError(f"searched_from {config.searched_from} has no {SEARCH_FILE}; point it at a finished "
                       "`rad search --out DIR` folder (or give searched_layers).")
    return path


def _searched_layers(config: AblateConfig, root: Path, teacher, searched_file: Path | None) -> tuple[list[int], str]:
    if config.searched_layers is not None:
        return list(config.searched_layers), "given as searched_layers"
    if searched_file is not None:
        from rad.search.report import read_chosen_layers  # what `rad convert --layers-from` reads

        return read_chosen_layers(searched_file.parent), f"chosen by the search in {searched_file.parent}"
    from rad.stages import search_stage

    search = _search_settings(config)
    logger.info("No searched layers given: searching (%s objective, %d trials) into %s", search.objective,
                search.trials, root / "search")
    result = search_stage(teacher, search, root / "search", seed=config.seed)
    return result.layers, f"chosen by the search in {root / 'search'}"


def _search_settings(config: AblateConfig):
    """The search an ablation runs itself: `config.search` converting k layers when k is given."""
    return dataclasses.replace(config.search, k=config.k if config.k is not None else config.search.k)


def _eval_config(config: AblateConfig, root: Path, inputs):
    if not inputs.tasks:  # none asked for, or none has data here (the log said which and why)
        return None
    return config.eval.stage_config(root / "eval", inputs.tasks, teacher=None, sources=inputs.sources)


def _arm_order(config: AblateConfig) -> tuple[list[Arm], Arm]:
    grid = config.arms()
    baseline = config.baseline.arm()
    if baseline not in grid:
        logger.info("The baseline arm %s is not in the grid; it is added (the KL target comes from it).",
                    baseline.name)
        grid.append(baseline)
    return grid, baseline


def _plans(config: AblateConfig, order: list[Arm], baseline: Arm, layer_sets: dict) -> dict[str, _Plan]:
    """One plan per arm in display order; an arm equal to an earlier one in (layers, init, train) is marked
    `same_as` it. The baseline is claimed first, then uniform arms, so coinciding arms point at those."""
    priority = [baseline] + [a for a in order if a.layers == "uniform"] + [a for a in order if a.layers != "uniform"]
    owner: dict[tuple, str] = {}
    same_as: dict[str, str] = {}
    for arm in priority:
        key = (tuple(layer_sets[arm.layers]), arm.init, arm.train)
        if key in owner and owner[key] != arm.name:
            same_as[arm.name] = owner[key]
        else:
            owner.setdefault(key, arm.name)
    return {a.name: _Plan(a, list(layer_sets[a.layers]), arm_folder(config.out, a), same_as.get(a.name))
            for a in order}


def _arm_settings(config: AblateConfig, plan: _Plan, fingerprint: str) -> dict:
    """What makes an arm's training what it is; a folder made with other values is refused, not reused.
    The teacher is identified by content (`fingerprint`): a model re-made at the same path is another model."""
    d = asdict(config.distill)
    for key in ("lr", "tensorboard", "keep_checkpoints", "save_every"):
        d.pop(key)
    return {"model": config.model, "model_fingerprint": fingerprint, "layers": plan.layers, "init": plan.arm.init,
            "train": plan.arm.train, "seed": config.seed, "lr": config.distill.lr[plan.arm.train], "distill": d}


def _eval_settings(config: AblateConfig) -> dict:
    e = asdict(config.eval)
    e.pop("teacher")
    e.pop("on_missing_data")  # what happens to a task without data, not how a task is scored
    return e


def _check_settings(folder: Path, settings: dict, write: bool = True) -> None:
    path = folder / SETTINGS_FILE
    if path.is_file():
        saved = load_artefact(path, _json_object, "an ablation arm's settings", f"delete {folder} to redo the arm")
        check_same_settings(saved, settings, what=str(folder), advice="delete it or choose another out")
        return
    if write:
        atomic_write_json(path, settings)


def _finished(plan: _Plan, settings: dict, eval_settings: dict) -> ArmResult | None:
    if not (plan.folder / ARM_RESULT_FILE).is_file():
        return None
    record = ArmResult.load(plan.folder)
    if record.settings != settings or record.eval_settings != eval_settings:
        return None  # e.g. other eval tasks: redo the eval (per-item files are reused) and rewrite it
    return record


def _convert(teacher, config: AblateConfig, plan: _Plan) -> None:
    from rad.stages import convert_stage

    convert_stage(teacher, config.model, plan.layers, plan.arm.init, plan.hybrid, seed=config.seed)


def _run_arm(config: AblateConfig, plan: _Plan, eval_config, timings: dict, sources: tuple[str, ...],
             fingerprint: str) -> ArmResult:
    from rad.models.loading import load_model
    from rad.stages import distill_stage

    name, d = plan.arm.name, config.distill
    if (plan.distill / SUMMARY_FILE).is_file():
        logger.info("arm %s: distillation %s exists, skipped", name, plan.student)
    else:
        t0 = time.perf_counter()
        distill_stage(d, plan.hybrid, plan.distill, plan.arm.train, seed=config.seed, device=config.device,
                      sources=sources, progress=config.progress)
        timings["distill_s"] = time.perf_counter() - t0
    if not d.keep_checkpoints and (plan.distill / "checkpoints").exists():
        shutil.rmtree(plan.distill / "checkpoints", ignore_errors=True)
    curve = [EvalPoint.from_json(p) for p in read_curve(plan.distill / "log.jsonl")]
    if not curve:
        raise RadError(f"{plan.distill / 'log.jsonl'} has no held-out evaluations; delete {plan.distill} and rerun.")
    summary = DistillSummary.load(plan.distill)
    scores = {}
    if eval_config is not None:
        t0 = time.perf_counter()
        scores = _score(load_model(str(plan.student), device=config.device), name, eval_config)
        timings["eval_s"] = time.perf_counter() - t0
    old_timings = ArmResult.load(plan.folder).timings if (plan.folder / ARM_RESULT_FILE).is_file() else {}
    record = ArmResult(
        name=name, layer_set=plan.arm.layers, layers=plan.layers, init=plan.arm.init, train=plan.arm.train,
        lr=d.lr[plan.arm.train], trainable_parameters=summary.trainable_parameters,
        total_parameters=summary.total_parameters, data=summary.data,
        curve=curve, kl_at_init=curve[0].eval_kl if curve[0].step == 0 else None,
        final_kl=curve[-1].eval_kl, final_step=curve[-1].step, scores=scores,
        timings={**old_timings, **timings}, folder=str(plan.folder),
        settings=_arm_settings(config, plan, fingerprint), eval_settings=_eval_settings(config),
    )
    record.save(plan.folder)
    return record


def _score(loaded, name: str, eval_config) -> dict[str, TaskScore]:
    from rad.evaluate.runner import evaluate_model

    result = evaluate_model(dataclasses.replace(loaded, source=name), eval_config)
    return {t: TaskScore.of(r, eval_config.limit) for t, r in result.tasks.items()}


def _free_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass
