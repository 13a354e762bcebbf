"""One RAD run's stage sequence, the unit `rad run` is and `rad sweep` repeats per k.

search → convert (RAD student: searched layers, `rad` init; baseline student: uniform layers, `mil` init) →
distil both (RAD: mixers only; baseline: all parameters, MambaInLlama's recipe) → evaluate the teacher, the
draft (searched layers skipped = the RAD hybrid before training), both students → speed → `report.md`. Every
stage writes its own folder under the run folder and is skipped when its output is already complete, so an
interrupted run continues where it stopped.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from rad.config import to_yaml
from rad.errors import check_deadline
from rad.models.layers import uniform_layers
from rad.models.loading import load_model
from rad.outputs import RUN, check_output
from rad.preflight import InputReport, check_inputs
from rad.stages.align import align_stage
from rad.stages.convert import convert_stage
from rad.stages.distill import distill_stage
from rad.stages.evaluate import eval_stage
from rad.stages.roles import BASELINE, RAD, ROLES
from rad.stages.run_config import BASELINE_TRAIN, CONFIG_FILE, RAD_TRAIN, RunConfig, RunPaths, check_same_run
from rad.stages.run_report import write_report
from rad.stages.search import check_search_fits, search_stage
from rad.stages.speed import speed_stage
from rad.utils.atomic import atomic_write_text
from rad.utils.locks import writer_lock

logger = logging.getLogger(__name__)


def run_stages(config: RunConfig, *, teacher=None, teacher_eval: Path | None = None,
               deadline: float | None = None) -> Path:
    """Run (or continue) every stage of `config`'s run; returns the path of report.md. `rad sweep` passes its
    already loaded `teacher`, `teacher_eval` (score the teacher in that folder, shared by its runs) and `deadline`
    (a time.monotonic() value: stop with TimeLimitReached before a stage, or between evaluation batches, once it
    has passed)."""
    paths = RunPaths(Path(config.out))
    # Every input and setting is checked before anything is written: a mistake costs seconds, not a
    # half-hour run (nor a folder half full of files).
    check_output(paths.root, RUN, inputs=[("model", config.model), ("distillation data", config.distill.data)])
    check_same_run(config, paths)
    with writer_lock(paths.root, "rad run"):
        inputs = check_inputs(config.model, config.eval.tasks, on_missing_task=config.eval.on_missing_data,
                              distill_data=config.distill.data)
        teacher = teacher or load_model(config.model, device=config.device)
        check_search_fits(config.search, teacher.model, config.seed)
        paths.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(paths.root / CONFIG_FILE, to_yaml(config))
        inputs.save(paths.root)
        report = _stage_sequence(config, paths, inputs, teacher, teacher_eval, deadline)
        logger.info("Report: %s", report)
        return report


def _stage_sequence(config: RunConfig, paths: RunPaths, inputs: InputReport, teacher, teacher_eval: Path | None,
                    deadline: float | None) -> Path:
    """search → convert → (align →) distil → evaluate → speed → report, each stage timed."""
    timings: dict[str, float] = {}
    check_deadline(deadline, f"the search of {paths.root}")
    t0 = time.perf_counter()
    search = search_stage(teacher, config.search, paths.search, seed=config.seed)
    timings["search"] = time.perf_counter() - t0
    uniform = uniform_layers(len(search.layers), teacher.model.config.num_hidden_layers)

    t0 = time.perf_counter()
    convert_stage(teacher, config.model, search.layers, "rad", paths.rad_hybrid, seed=config.seed)
    convert_stage(teacher, config.model, uniform, "mil", paths.baseline_hybrid, seed=config.seed)
    timings["convert"] = time.perf_counter() - t0

    common = dict(seed=config.seed, device=config.device, sources=inputs.sources)
    rad_start = paths.rad_hybrid
    if config.align is not None:
        check_deadline(deadline, f"the alignment of {paths.root}")
        t0 = time.perf_counter()
        rad_start = align_stage(config.align, paths.rad_hybrid, paths.rad_align, **common)
        timings["align"] = time.perf_counter() - t0

    check_deadline(deadline, f"the distillation of {paths.root}")
    t0 = time.perf_counter()
    rad_student = distill_stage(config.distill, rad_start, paths.rad_distill, RAD_TRAIN, **common)
    check_deadline(deadline, f"the baseline's distillation in {paths.root}")
    base_student = distill_stage(config.distill, paths.baseline_hybrid, paths.baseline_distill, BASELINE_TRAIN,
                                 **common)
    timings["distill"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    models = dict(zip(ROLES, (config.model, str(paths.rad_hybrid), str(rad_student), str(base_student)), strict=True))
    table = eval_stage(teacher, config.eval, models, paths.eval, model=config.model, tasks=inputs.tasks,
                       sources=inputs.sources, device=config.device, teacher_out=teacher_eval, deadline=deadline)
    timings["eval"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    speed = speed_stage(teacher, {RAD: rad_student, BASELINE: base_student}, search.layers, paths.root,
                        contexts=list(config.speed_contexts), seed=config.seed, device=config.device)
    timings["speed"] = time.perf_counter() - t0
    return write_report(config, paths, search, uniform, models, table, speed, timings, inputs)
