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

`run_ablation` reads as its phases: check every input, plan (`ablate/plan.py`: the layer sets and the arms, with
the teacher loaded), convert while the teacher is in memory, distil and score each arm, summarise.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
import yaml

from rad.ablate.config import AblateConfig
from rad.ablate.metrics import convergence, read_curve
from rad.ablate.plan import (
    AblationPlan,
    ArmPlan,
    arm_settings,
    as_json,
    check_searched_from,
    eval_settings,
    plan_ablation,
)
from rad.ablate.report import plot_kl_curves, write_report
from rad.ablate.results import ARM_RESULT_FILE, AblateResult, AblateSummary, ArmResult, ArmSummary
from rad.distill.summary import SUMMARY_FILE, DistillSummary, EvalPoint
from rad.errors import RadError
from rad.evaluate.runner import EvalConfig, TaskScore, evaluate_model
from rad.models.convert import CONVERSION_FILE, package_versions
from rad.models.loading import load_model
from rad.outputs import ABLATE, check_output
from rad.preflight import InputReport, check_inputs
from rad.stages.align import align_stage
from rad.stages.convert import convert_stage
from rad.stages.distill import distill_stage
from rad.utils.artefacts import load_artefact
from rad.utils.atomic import atomic_write_json, atomic_write_text
from rad.utils.identity import check_same_settings
from rad.utils.locks import writer_lock

logger = logging.getLogger(__name__)

SETTINGS_FILE = "settings.json"


def run_ablation(config: AblateConfig) -> AblateResult:
    """Run (or continue) every arm and write ablate.json, kl_curves.png and report.md under `config.out`."""
    t_start = time.perf_counter()
    root = Path(config.out)
    searched_file, inputs, eval_config = _check_before_work(config, root)
    with writer_lock(root, "rad ablate"):
        teacher = load_model(config.model, device=config.device)
        plan = plan_ablation(config, teacher, searched_file)
        _write_records(config, plan, inputs)
        done, timings = _convert_arms(config, plan, teacher)
        del teacher  # the students train one at a time without it
        _free_memory()
        statuses = _distill_and_score_arms(config, plan, eval_config, inputs.sources, done, timings)
        teacher_scores, teacher_eval_s = _score_teacher(config, eval_config)
        summary = _summarise(config, plan, done, statuses, teacher_scores, inputs,
                             timings={"search_s": plan.search_s, "teacher_eval_s": teacher_eval_s,
                                      "total_s": time.perf_counter() - t_start})
        summary.save(root)
        plot_kl_curves(summary, root / "kl_curves.png")
        report = write_report(summary, config, root)
        logger.info("Report: %s", report)
        return AblateResult(out=root, report=report, summary=summary, statuses=statuses)


def _check_before_work(config: AblateConfig, root: Path) -> tuple[Path | None, InputReport, EvalConfig | None]:
    """The output folder, the searched_from folder, the model, the data and each task's data, resolved now (the hub
    probed once), not after hours of training; returns the search file, the inputs and the arms' eval config."""
    check_output(root, ABLATE, inputs=[("model", config.model), ("distillation data", config.distill.data),
                                       ("searched_from folder", config.searched_from)],
                 allowed=[root / "search"])  # reading the search this ablation ran itself is its resume
    searched_file = check_searched_from(config)
    inputs = check_inputs(config.model, config.eval.tasks, on_missing_task=config.eval.on_missing_data,
                          distill_data=config.distill.data, teacher_texts=False)
    return searched_file, inputs, _eval_config(config, root, inputs)


def _eval_config(config: AblateConfig, root: Path, inputs: InputReport) -> EvalConfig | None:
    if not inputs.tasks:  # none asked for, or none has data here (the log said which and why)
        return None
    return config.eval.stage_config(root / "eval", inputs.tasks, teacher=None, sources=inputs.sources)


def _write_records(config: AblateConfig, plan: AblationPlan, inputs: InputReport) -> None:
    """Every arm's folder checked against its settings first (one made with others is refused before anything is
    written), then config.yaml and inputs.json."""
    for arm in plan.runnable:
        _check_settings(arm.folder, arm_settings(config, arm, plan.fingerprint), write=False)
    plan.root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(plan.root / "config.yaml", yaml.safe_dump(asdict(config), sort_keys=False))
    inputs.save(plan.root)


def _convert_arms(config: AblateConfig, plan: AblationPlan, teacher) -> tuple[dict[str, ArmResult], dict[str, dict]]:
    """With the teacher in memory: write each arm's settings, collect the finished arms, convert the missing
    hybrids. Returns the finished arms' results and each runnable arm's timings so far."""
    done: dict[str, ArmResult] = {}
    timings: dict[str, dict] = {arm.arm.name: {} for arm in plan.runnable}
    for arm in plan.runnable:
        settings = arm_settings(config, arm, plan.fingerprint)
        _check_settings(arm.folder, settings)
        record = _finished(arm, settings, eval_settings(config))
        if record is not None:
            done[arm.arm.name] = record
            logger.info("arm %s: done, skipped", arm.arm.name)
            continue
        if (arm.hybrid / CONVERSION_FILE).is_file():
            logger.info("arm %s: hybrid %s exists, skipped", arm.arm.name, arm.hybrid)
            continue
        t0 = time.perf_counter()
        convert_stage(teacher, config.model, arm.layers, arm.arm.init, arm.hybrid, seed=config.seed)
        timings[arm.arm.name]["convert_s"] = time.perf_counter() - t0
    return done, timings


def _distill_and_score_arms(config: AblateConfig, plan: AblationPlan, eval_config: EvalConfig | None,
                            sources: tuple[str, ...], done: dict[str, ArmResult], timings: dict[str, dict]
                            ) -> dict[str, str]:
    """Distil and score each unfinished arm in turn (baseline first), one student in memory at a time; adds their
    results to `done` and returns each runnable arm's status (ran, resumed, skipped)."""
    statuses: dict[str, str] = {}
    todo = [arm for arm in plan.runnable if arm.arm.name not in done]
    for i, arm in enumerate(todo, 1):
        name = arm.arm.name
        logger.info("arm %d/%d %s: layers %s, %s init, training %s", i, len(todo), name, arm.layers,
                    arm.arm.init, arm.arm.train)
        resumed = "convert_s" not in timings[name] or arm.distill.exists()
        done[name] = _run_arm(config, arm, eval_config, timings[name], sources, plan.fingerprint)
        statuses[name] = "resumed" if resumed else "ran"
        _free_memory()
    for arm in plan.runnable:
        statuses.setdefault(arm.arm.name, "skipped")
    return statuses


def _score_teacher(config: AblateConfig, eval_config: EvalConfig | None) -> tuple[dict[str, TaskScore], float | None]:
    """The teacher's task scores, the reference row (none when no task is scored or `eval.teacher` is off)."""
    if eval_config is None or not config.eval.teacher:
        return {}, None
    t0 = time.perf_counter()
    scores = _score(load_model(config.model, device=config.device), "teacher", eval_config)
    seconds = time.perf_counter() - t0
    _free_memory()
    return scores, seconds


def _summarise(config: AblateConfig, plan: AblationPlan, done: dict[str, ArmResult], statuses: dict[str, str],
               teacher_scores: dict[str, TaskScore], inputs: InputReport, timings: dict) -> AblateSummary:
    """ablate.json's content: every arm (a coinciding arm as its twin's result) with its convergence to the
    baseline's final KL; `statuses` gains the coinciding arms."""
    records: dict[str, ArmResult] = {}
    for name, arm in plan.arms.items():
        if arm.same_as is not None:
            records[name] = dataclasses.replace(done[arm.same_as], name=name, layer_set=arm.arm.layers)
            statuses[name] = f"same as {arm.same_as}"
        else:
            records[name] = done[name]
    conv = convergence({n: [asdict(p) for p in r.curve] for n, r in records.items()}, plan.baseline.name)
    arms = {name: ArmSummary(**{f.name: getattr(r, f.name) for f in dataclasses.fields(ArmResult)},
                             same_as=plan.arms[name].same_as, **conv["arms"][name]) for name, r in records.items()}
    return AblateSummary(
        model=config.model, num_layers=plan.num_layers, k=plan.k,
        layer_sets=plan.layer_sets, searched_source=plan.searched_source,
        layer_sets_coincide=plan.layer_sets_coincide,
        baseline=plan.baseline.name, baseline_final_kl=conv["target_kl"], baseline_steps=conv["baseline_steps"],
        order=list(plan.arms), arms=arms, teacher_scores=teacher_scores,
        statuses=statuses, dropped_tasks=dict(inputs.dropped_tasks), timings=timings,
        command=f"rad ablate --config {plan.root / 'config.yaml'}",
        config=as_json(asdict(config)), versions=package_versions(),
    )


def _json_object(data) -> dict:
    if not isinstance(data, dict):
        raise TypeError("not a JSON object")
    return data


def _check_settings(folder: Path, settings: dict, write: bool = True) -> None:
    """Refuse an arm folder made with other settings; write the settings into a new one (unless `write` is off)."""
    path = folder / SETTINGS_FILE
    if path.is_file():
        saved = load_artefact(path, _json_object, "an ablation arm's settings", f"delete {folder} to redo the arm")
        check_same_settings(saved, settings, what=str(folder), advice="delete it or choose another out")
        return
    if write:
        atomic_write_json(path, settings)


def _finished(arm: ArmPlan, settings: dict, scoring: dict) -> ArmResult | None:
    """The arm's result.json when it was made with these settings, else None."""
    if not (arm.folder / ARM_RESULT_FILE).is_file():
        return None
    record = ArmResult.load(arm.folder)
    if record.settings != settings or record.eval_settings != scoring:
        return None  # e.g. other eval tasks: redo the eval (per-item files are reused) and rewrite it
    return record


def _distil_arm(config: AblateConfig, arm: ArmPlan, sources: tuple[str, ...], timings: dict) -> None:
    """The arm's distillation (resumed from its newest checkpoint; skipped when finished), then its checkpoints
    deleted unless `keep_arm_checkpoints`."""
    if arm.arm.aligned and not (arm.distill / SUMMARY_FILE).is_file():
        t0 = time.perf_counter()
        align_stage(config.align, arm.hybrid, arm.align, seed=config.seed, device=config.device, sources=sources,
                    progress=config.progress)
        timings["align_s"] = time.perf_counter() - t0
    if (arm.distill / SUMMARY_FILE).is_file():
        logger.info("arm %s: distillation %s exists, skipped", arm.arm.name, arm.student)
    else:
        t0 = time.perf_counter()
        distill_stage(config.distill, arm.distill_start, arm.distill, arm.arm.train, seed=config.seed,
                      device=config.device, sources=sources, progress=config.progress)
        timings["distill_s"] = time.perf_counter() - t0
    if not config.distill.keep_arm_checkpoints:
        for stage in (arm.align, arm.distill):
            if (stage / "checkpoints").exists():
                shutil.rmtree(stage / "checkpoints", ignore_errors=True)


def _run_arm(config: AblateConfig, arm: ArmPlan, eval_config: EvalConfig | None, timings: dict,
             sources: tuple[str, ...], fingerprint: str) -> ArmResult:
    """Distil the arm, score its student, and write its result.json (the arm's done marker)."""
    _distil_arm(config, arm, sources, timings)
    curve = [EvalPoint.from_json(p) for p in read_curve(arm.distill / "log.jsonl")]
    if not curve:
        raise RadError(f"{arm.distill / 'log.jsonl'} has no held-out evaluations; delete {arm.distill} and rerun.")
    summary = DistillSummary.load(arm.distill)
    scores = {}
    if eval_config is not None:
        t0 = time.perf_counter()
        scores = _score(load_model(str(arm.student), device=config.device), arm.arm.name, eval_config)
        timings["eval_s"] = time.perf_counter() - t0
    old_timings = ArmResult.load(arm.folder).timings if (arm.folder / ARM_RESULT_FILE).is_file() else {}
    record = ArmResult(
        name=arm.arm.name, layer_set=arm.arm.layers, layers=arm.layers, init=arm.arm.init, train=arm.arm.train,
        lr=config.distill.lr[arm.arm.train], trainable_parameters=summary.trainable_parameters,
        total_parameters=summary.total_parameters, data=summary.data,
        curve=curve, kl_at_init=curve[0].eval_kl if curve[0].step == 0 else None,
        final_kl=curve[-1].eval_kl, final_step=curve[-1].step, scores=scores,
        timings={**old_timings, **timings}, folder=str(arm.folder),
        settings=arm_settings(config, arm, fingerprint), eval_settings=eval_settings(config),
    )
    record.save(arm.folder)
    return record


def _score(loaded, name: str, eval_config: EvalConfig) -> dict[str, TaskScore]:
    result = evaluate_model(dataclasses.replace(loaded, source=name), eval_config)
    return {t: TaskScore.of(r, eval_config.limit) for t, r in result.tasks.items()}


def _free_memory() -> None:
    """Release a dropped model's memory before the next one loads."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
