"""`rad eval`: score models on GSM8K / CRUXEval-O, resumably, and compare them in one table.

Layout under `out/`: one folder per model with `<task>.jsonl` (one line per finished item, appended
and fsynced as it goes, so a killed run resumes where it stopped), `<task>.meta.json` (the settings
the items were produced with; a resume with other settings is refused) and `results.json`; plus
`comparison.md` over all models evaluated into `out/`.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from rad.config import settings
from rad.data import SOURCES, probe_hub, python_docstring_texts, usable_sources
from rad.errors import RadError
from rad.evaluate.generation import GenerationConfig, Generator, render_prompt, truncate_at
from rad.evaluate.sandbox import SandboxLimits
from rad.evaluate.stats import wilson_interval
from rad.evaluate.tasks import TASKS, TaskOptions, make_task
from rad.evaluate.teacher import TeacherConfig, heldout_texts, teacher_metrics
from rad.models.loading import LoadedModel, load_model
from rad.preflight import MISSING_TASK_POLICIES, check_model, check_task_data

logger = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    """Everything `rad eval` takes; `max_new_tokens=None` uses each task's default (GSM8K 384, CRUX 128)."""

    tasks: list[str] = field(default_factory=lambda: ["gsm8k", "cruxeval"])
    out: str = "runs/eval"
    limit: int | None = None
    max_new_tokens: int | None = None
    batch_size: int = 8  # left-padded batches: the same answers as one by one, 2.5x faster (docs/evaluate.md)
    chat: bool = True
    n_shot: int = 0
    data_dir: str | None = None
    sources: tuple[str, ...] = SOURCES  # rad.data's; evaluate_models drops the hub when it is offline
    sandbox: SandboxLimits = field(default_factory=SandboxLimits)
    teacher: str | None = None
    teacher_config: TeacherConfig = field(default_factory=TeacherConfig)
    overwrite: bool = False

    def __post_init__(self):
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or not (self.tasks or self.teacher):  # no task at all: only the teacher metrics
            raise RadError(f"Unknown task {unknown[0] if unknown else '(none)'!r}; choose from {', '.join(TASKS)}.")
        if self.limit is not None and self.limit < 1:
            raise RadError(f"--limit must be at least 1, got {self.limit}.")
        if self.batch_size < 1:
            raise RadError(f"--batch-size must be at least 1, got {self.batch_size}.")


@settings
class EvalSettings:
    """The evaluation settings an orchestrator (`rad run`, `rad ablate`) exposes in its YAML; every default
    is `EvalConfig`'s (and so `rad eval`'s)."""

    tasks: list[str] | str = field(default_factory=lambda: list(TASKS))
    limit: int | None = EvalConfig.limit
    max_new_tokens: int | None = EvalConfig.max_new_tokens
    batch_size: int = EvalConfig.batch_size
    teacher_texts: int = TeacherConfig.n_texts
    # A task whose data is nowhere (no data folder, cache or hub): `skip` drops it with a note in the
    # report, `error` stops the run before its first stage.
    on_missing_data: str = "skip"

    def __post_init__(self):
        if isinstance(self.tasks, str):
            self.tasks = [t.strip() for t in self.tasks.split(",") if t.strip()]
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise RadError(f"Unknown task {unknown[0]!r} in eval.tasks; choose from {', '.join(TASKS)}.")
        if self.on_missing_data not in MISSING_TASK_POLICIES:
            raise RadError(f"eval.on_missing_data must be {' or '.join(MISSING_TASK_POLICIES)}, got "
                           f"{self.on_missing_data!r}.")
        for name in ("limit", "max_new_tokens", "batch_size", "teacher_texts"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise RadError(f"eval.{name} must be at least 1, got {value}.")

    def stage_config(self, out, tasks: list[str], *, teacher: str | None, sources: tuple[str, ...]) -> EvalConfig:
        """The `EvalConfig` of this evaluation, scoring `tasks` (those whose data was found)."""
        return EvalConfig(tasks=list(tasks), out=str(out), limit=self.limit, max_new_tokens=self.max_new_tokens,
                          batch_size=self.batch_size, teacher=teacher, sources=tuple(sources),
                          teacher_config=TeacherConfig(n_texts=self.teacher_texts))


@dataclass
class TaskResult:
    task: str
    correct: int
    total: int
    generated: int  # items generated in this call (the rest came from the per-item file)
    ci95: tuple[float, float]

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


@dataclass
class ModelResult:
    model: str
    folder: Path
    tasks: dict[str, TaskResult]
    teacher: dict | None = None


def model_slug(spec: str) -> str:
    """A folder name for a model: the folder's own name for paths, the alias or hub id otherwise."""
    path = Path(spec).expanduser()
    name = path.name if path.exists() else spec
    return re.sub(r"[^\w.-]+", "_", name).strip("_") or "model"


def _write_json(path: Path, data: dict) -> None:
    """Readers see the old file or the new one, never half of it (rad.utils.atomic owns how)."""
    from rad.utils.atomic import atomic_write_json

    atomic_write_json(path, data)


def read_items(path: Path) -> dict[str, dict]:
    """Finished items by id; a torn last line (the process died mid-write) is dropped and the file repaired."""
    if not path.is_file():
        return {}
    done, good, torn = {}, [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
            done[record["id"]] = record
            good.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            torn = True
    if torn:
        logger.warning("Dropping an incomplete line from %s (interrupted write)", path)
        path.write_text("".join(g + "\n" for g in good), encoding="utf-8")
    return done


def _task_meta(task, config: EvalConfig, loaded: LoadedModel, max_new_tokens: int) -> dict:
    return {
        "task": task.name,
        "prompt_version": task.prompt_version,
        "model": loaded.source,
        "chat": config.chat,
        "n_shot": config.n_shot,
        "max_new_tokens": max_new_tokens,
        "decoding": "greedy",
    }


def evaluate_task(loaded: LoadedModel, task_name: str, config: EvalConfig, folder: Path) -> TaskResult:
    """Score `loaded` on the first `config.limit` items of a task, reusing items already in the per-item file."""
    options = TaskOptions(n_shot=config.n_shot, data_dir=config.data_dir, sources=config.sources,
                          sandbox=config.sandbox)
    task = make_task(task_name, options)
    max_new = config.max_new_tokens or task.default_max_new_tokens
    meta = _task_meta(task, config, loaded, max_new)
    items_path, meta_path = folder / f"{task.name}.jsonl", folder / f"{task.name}.meta.json"
    if items_path.is_file() and not meta_path.is_file():  # not rad's: never read, repaired or deleted
        raise RadError(f"{items_path} was not written by rad eval (no {meta_path.name} beside it); move it away "
                       "or choose another --out.")
    if config.overwrite:
        items_path.unlink(missing_ok=True)
    if meta_path.is_file() and items_path.is_file():
        old = json.loads(meta_path.read_text())
        if old != meta:
            changed = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
            raise RadError(
                f"{items_path} was produced with other settings ({', '.join(changed)} differ); "
                "pass --overwrite to start again or choose another --out."
            )
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(meta_path, meta)
    items = task.items(config.limit)
    done = read_items(items_path)
    pending = [(i, item) for i, item in enumerate(items) if item.id not in done]
    if done:
        logger.info("%s: %d of %d items already done in %s; generating %d", task.name,
                    len(items) - len(pending), len(items), items_path, len(pending))
    generator = Generator(loaded.model, loaded.tokenizer,
                          GenerationConfig(max_new_tokens=max_new, batch_size=config.batch_size, chat=config.chat))
    with items_path.open("a", encoding="utf-8") as fh, tqdm(total=len(pending), desc=f"{task.name}") as bar:
        for start in range(0, len(pending), config.batch_size):
            chunk = pending[start : start + config.batch_size]
            prompts = [render_prompt(loaded.tokenizer, item.messages, item.raw, config.chat) for _, item in chunk]
            t0 = time.perf_counter()
            completions = generator.generate(prompts)
            seconds = (time.perf_counter() - t0) / len(chunk)
            for (index, item), prompt, completion in zip(chunk, prompts, completions, strict=True):
                answer = truncate_at(completion, task.stop)
                record = {"id": item.id, "index": index, **task.score(item, answer), "completion": completion,
                          "prompt": prompt, "seconds": round(seconds, 3), "finished_at": time.time()}
                fh.write(json.dumps(record) + "\n")
                done[item.id] = record
            fh.flush()
            os.fsync(fh.fileno())
            bar.update(len(chunk))
    selected = [done[item.id] for item in items]
    correct = sum(bool(r["correct"]) for r in selected)
    return TaskResult(task.name, correct, len(selected), generator.calls, wilson_interval(correct, len(selected)))


def _results_json(result: ModelResult, config: EvalConfig, previous: dict) -> dict:
    tasks = dict(previous.get("tasks", {}))
    for name, r in result.tasks.items():
        tasks[name] = {"accuracy": r.accuracy, "correct": r.correct, "total": r.total,
                       "ci95": list(r.ci95), "interval": "wilson", "limit": config.limit}
    data = {"model": result.model, "tasks": tasks}
    teacher = result.teacher if result.teacher is not None else previous.get("teacher")
    if teacher is not None:
        data["teacher"] = teacher
    return data


def evaluate_model(
    model: str | LoadedModel, config: EvalConfig, teacher: LoadedModel | None = None, **load_kwargs
) -> ModelResult:
    """Evaluate one model (a spec for `load_model`, or an already loaded one) and write its results.json."""
    loaded = model if isinstance(model, LoadedModel) else load_model(model, **load_kwargs)
    folder = Path(config.out) / model_slug(loaded.source)
    folder.mkdir(parents=True, exist_ok=True)
    result = ModelResult(loaded.source, folder, {})
    for name in config.tasks:
        result.tasks[name] = evaluate_task(loaded, name, config, folder)
        r = result.tasks[name]
        logger.info("%s %s: %.1f%% (%d/%d, 95%% CI %.1f-%.1f)", loaded.source, name, 100 * r.accuracy,
                    r.correct, r.total, 100 * r.ci95[0], 100 * r.ci95[1])
    if teacher is not None:
        texts = _heldout_texts(config)
        metrics = teacher_metrics(loaded, teacher, texts, config.teacher_config)
        result.teacher = {"teacher": teacher.source, **metrics, **dataclasses.asdict(config.teacher_config)}
    results_path = folder / "results.json"
    previous = json.loads(results_path.read_text()) if results_path.is_file() else {}
    _write_json(results_path, _results_json(result, config, previous))
    return result


def _heldout_texts(config: EvalConfig) -> list[str]:
    """The tail of GSM8K train, else (no data anywhere) standard-library docstrings, said in the log."""
    n = config.teacher_config.n_texts
    try:
        return heldout_texts(n, config.data_dir, tuple(s for s in config.sources if s != "package"))
    except RadError as err:
        logger.warning("Teacher metrics on standard-library docstrings: %s", err)
        return python_docstring_texts(n)


def comparison_table(results: list[ModelResult]) -> str:
    """A markdown table: one row per model, accuracy with its 95% interval per task, teacher metrics if any."""
    tasks = list(dict.fromkeys(name for r in results for name in r.tasks))
    teacher_cols = any(r.teacher for r in results)
    header = ["model", *tasks] + (["KL(teacher‖model)", "perplexity", "top-1 agreement"] if teacher_cols else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        row = [r.model]
        for name in tasks:
            t = r.tasks.get(name)
            row.append(f"{100 * t.accuracy:.1f} [{100 * t.ci95[0]:.1f}, {100 * t.ci95[1]:.1f}] (n={t.total})"
                       if t else "–")
        if teacher_cols:
            m = r.teacher or {}
            row += [f"{m['kl_teacher_student']:.4f}", f"{m['perplexity']:.2f}",
                    f"{100 * m['top1_agreement']:.1f}%"] if m else ["–"] * 3
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def evaluate_models(specs: list[str], config: EvalConfig, **load_kwargs) -> tuple[list[ModelResult], str]:
    """Evaluate each model in turn (one in memory at a time, plus the teacher) and write `out/comparison.md`."""
    if not specs:
        raise RadError("Give at least one model to evaluate.")
    slugs = [model_slug(s) for s in specs]
    if len(set(slugs)) != len(slugs):
        raise RadError(f"Two models would share an output folder ({slugs}); rename one of the folders.")
    # Every model and task's data is checked (the hub probed once) before spending time on loading models.
    hub = probe_hub()
    config = dataclasses.replace(config, sources=usable_sources(hub, config.sources))
    for spec in dict.fromkeys([*specs, *([config.teacher] if config.teacher else [])]):
        check_model(spec, hub)
    check_task_data(config.tasks, config.sources, config.data_dir, on_missing="error")
    options = TaskOptions(n_shot=config.n_shot, data_dir=config.data_dir, sources=config.sources)
    for name in config.tasks:
        make_task(name, options).items(config.limit)
    teacher = load_model(config.teacher, **load_kwargs) if config.teacher else None
    results = []
    for spec in specs:
        loaded = teacher if teacher is not None and spec == config.teacher else load_model(spec, **load_kwargs)
        results.append(evaluate_model(loaded, config, teacher=teacher))
        del loaded
        gc.collect()
    table = comparison_table(results)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.md").write_text(table)
    return results, table
