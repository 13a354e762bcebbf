"""RAD's evaluation as a stage: every model of a run on the tasks, and their comparison table.

Skipping is per item: `evaluate.runner` keeps each model's per-item results keyed on the model's content and the
scoring settings (`TaskMeta`), so a finished evaluation under the same settings generates nothing again.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from rad.evaluate.runner import EvalSettings, comparison_table, evaluate_model
from rad.models.loading import load_model
from rad.utils.atomic import atomic_write_text

COMPARISON_FILE = "comparison.md"


def eval_stage(teacher, settings: EvalSettings, models: dict[str, str], out: Path, *, model: str,
               tasks: list[str], sources: tuple[str, ...], device: str | None, teacher_out: Path | None = None,
               deadline: float | None = None) -> str:
    """Score `models` (report name -> spec; the one whose spec is `model` is the already loaded `teacher`) on
    `tasks` into `out`, the teacher into `teacher_out` when given (a sweep scores it once for all its runs);
    `deadline` stops between evaluation batches. Returns the comparison table, also written to comparison.md."""
    out = Path(out)
    eval_config = settings.stage_config(out, tasks, teacher=model, sources=sources)
    results = []
    for name, spec in models.items():
        is_teacher = spec == model
        loaded = teacher if is_teacher else load_model(spec, device=device)
        where = dataclasses.replace(eval_config, out=str(teacher_out)) if is_teacher and teacher_out else eval_config
        # Report under the role's name (the result folder is named after `source`), without touching `teacher`.
        results.append(evaluate_model(dataclasses.replace(loaded, source=name), where, teacher=teacher,
                                      deadline=deadline))
    table = comparison_table(results)
    atomic_write_text(out / COMPARISON_FILE, table)
    return table
