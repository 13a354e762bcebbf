"""`rad eval`: score models on GSM8K / CRUXEval-O, resumably, and compare them in one table.

Layout under `out/`: one folder per model with `<task>.jsonl` (one line per finished item, appended
and fsynced as it goes, so a killed run resumes where it stopped), `<task>.meta.json` (a `TaskMeta`: what
determines the items' answers and verdicts, i.e. the model's content fingerprint and dtype, the prompt and
generation settings and the sandbox limits; a resume under anything else is refused) and `results.json`
(an `EvalResults`); plus `comparison.md` over all models evaluated into `out/`.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from pydantic import PositiveInt
from tqdm.auto import tqdm
from transformers import AutoConfig

from rad.config import default_of, settings
from rad.data import SOURCES, probe_hub, python_docstring_texts, usable_sources
from rad.errors import RadError, check_deadline
from rad.evaluate.generation import GenerationConfig, Generator, render_prompt, truncate_at
from rad.evaluate.inputs import MISSING_TASK_POLICIES, check_model, check_task_data
from rad.evaluate.passkey import PasskeyConfig, plot_recall, recall_grid
from rad.evaluate.position_loss import STDLIB_FILES, bucketed, plot_position_loss, position_losses, windows
from rad.evaluate.sandbox import SandboxLimits
from rad.evaluate.shards import Shard, merge_if_complete, merge_lock
from rad.evaluate.stats import McNemarResult, mcnemar_items, wilson_interval
from rad.evaluate.tasks import TASKS, TaskOptions, make_task
from rad.evaluate.teacher import TeacherConfig, heldout_texts, teacher_metrics
from rad.models.loading import LoadedModel, load_model
from rad.utils.artefacts import load_artefact
from rad.utils.atomic import atomic_write_json, atomic_write_text
from rad.utils.devices import default_device
from rad.utils.identity import check_same_settings, model_fingerprint
from rad.utils.locks import writer_lock
from rad.utils.precision import generation_dtype

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
META_SUFFIX = ".meta.json"
MissingDataPolicy = Literal[MISSING_TASK_POLICIES]  # pydantic reads the choices of eval.on_missing_data

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
    # The dtype answers are generated in (None: the loaded model's; auto: bf16 where the device has fast bf16,
    # rad.utils.precision.generation_dtype). bf16 on a CPU with AVX512-BF16: 1.84x per batched decode step, 1.3x
    # end to end on Qwen (docs/benchmarks.md); teacher metrics stay in the loaded dtype.
    generation_dtype: str | None = None
    passkey: PasskeyConfig = field(default_factory=PasskeyConfig)  # the passkey task's lengths, depths, repeats
    position_length: int = 0  # > 0: also the loss against position on windows of this many tokens (position_loss.py)
    position_windows: int = 2
    # This process's share of the items (shards.py): shard i of n scores items i, i+n, ...; the last to finish
    # merges the per-item files and writes results.json. Teacher metrics and the position curve are shard 0's.
    shard: Shard = field(default_factory=Shard)

    def __post_init__(self):
        generation_dtype(self.generation_dtype, default_device())  # refused before any work: unknown or emulated
        if self.position_length and not (isinstance(self.position_length, int) and self.position_length >= 16):
            raise RadError(f"--position-loss must be a window length of at least 16 tokens, got {self.position_length}.")
        if self.position_windows < 1:
            raise RadError(f"--position-windows must be at least 1, got {self.position_windows}.")
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or not (self.tasks or self.teacher or self.position_length):  # no task: teacher / position only
            raise RadError(f"Unknown task {unknown[0] if unknown else '(none)'!r}; choose from {', '.join(TASKS)}.")
        if self.limit is not None and self.limit < 1:
            raise RadError(f"--limit must be at least 1, got {self.limit}.")
        if self.batch_size < 1:
            raise RadError(f"--batch-size must be at least 1, got {self.batch_size}.")
        if self.overwrite and not self.shard.whole:
            raise RadError("--overwrite cannot be sharded (one shard would discard what another just wrote); run "
                           "`rad eval --overwrite` once without shards, or give a new --out.")


@settings
class EvalSettings:
    """The evaluation settings an orchestrator (`rad run`, `rad ablate`) exposes in its YAML; every default
    is `EvalConfig`'s (and so `rad eval`'s)."""

    tasks: list[str] | str = field(default_factory=lambda: default_of(EvalConfig, "tasks"))  # HumanEval: opt-in
    limit: PositiveInt | None = EvalConfig.limit
    max_new_tokens: PositiveInt | None = EvalConfig.max_new_tokens
    batch_size: PositiveInt = EvalConfig.batch_size
    teacher_texts: PositiveInt = TeacherConfig.n_texts
    # A task whose data is nowhere (no data folder, cache or hub): `skip` drops it with a note in the
    # report, `error` stops the run before its first stage.
    on_missing_data: MissingDataPolicy = "skip"
    generation_dtype: str | None = EvalConfig.generation_dtype
    passkey: PasskeyConfig = field(default_factory=PasskeyConfig)  # e.g. {lengths: [1024, 4096], repeats: 4}

    def __post_init__(self):
        generation_dtype(self.generation_dtype, default_device())
        if isinstance(self.tasks, str):
            self.tasks = [t.strip() for t in self.tasks.split(",") if t.strip()]
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise RadError(f"Unknown task {unknown[0]!r} in eval.tasks; choose from {', '.join(TASKS)}.")

    def stage_config(self, out, tasks: list[str], *, teacher: str | None, sources: tuple[str, ...]) -> EvalConfig:
        """The `EvalConfig` of this evaluation, scoring `tasks` (those whose data was found)."""
        return EvalConfig(tasks=list(tasks), out=str(out), limit=self.limit, max_new_tokens=self.max_new_tokens,
                          batch_size=self.batch_size, teacher=teacher, sources=tuple(sources),
                          teacher_config=TeacherConfig(n_texts=self.teacher_texts),
                          generation_dtype=self.generation_dtype, passkey=self.passkey)


@dataclass
class TaskResult:
    task: str
    correct: int
    total: int
    generated: int  # items generated in this call (the rest came from the per-item file)
    ci95: tuple[float, float]
    complete: bool = True  # False: a shard's own items only, while other shards still work

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


@dataclass(frozen=True)
class TeacherScores:
    """How close a model stays to the teacher on held-out text (`teacher_metrics`), and its settings."""

    teacher: str
    kl_teacher_student: float
    perplexity: float
    teacher_perplexity: float
    top1_agreement: float
    tokens: int
    texts: int
    settings: dict = field(default_factory=dict)  # the TeacherConfig the metrics were measured with

    def to_json(self) -> dict:  # flat, as results.json always held it
        data = dataclasses.asdict(self)
        settings = data.pop("settings")
        return {**data, **settings}

    @classmethod
    def from_json(cls, data: dict) -> TeacherScores:
        names = {f.name for f in dataclasses.fields(cls)} - {"settings"}
        return cls(**{k: v for k, v in data.items() if k in names},
                   settings={k: v for k, v in data.items() if k not in names})


@dataclass
class ModelResult:
    model: str
    folder: Path
    tasks: dict[str, TaskResult]
    teacher: TeacherScores | None = None

    @property
    def complete(self) -> bool:
        return all(getattr(t, "complete", True) for t in self.tasks.values())


@dataclass(frozen=True)
class TaskScore:
    """One task's line in results.json: accuracy over the first `limit` items with its 95% interval."""

    accuracy: float
    correct: int
    total: int
    ci95: tuple[float, float]
    interval: str = "wilson"
    limit: int | None = None

    @classmethod
    def of(cls, result: TaskResult, limit: int | None = None) -> TaskScore:
        return cls(result.accuracy, result.correct, result.total, tuple(result.ci95), limit=limit)

    @classmethod
    def from_json(cls, data: dict) -> TaskScore:
        return cls(**{**data, "ci95": tuple(data["ci95"])})


@dataclass(frozen=True)
class EvalResults:
    """What a model folder's results.json holds: the latest score of every task evaluated into it (a later
    `rad eval` of other tasks adds to it), and the teacher-relative metrics if they were asked for."""

    model: str
    tasks: dict[str, TaskScore] = field(default_factory=dict)
    teacher: TeacherScores | None = None

    def to_json(self) -> dict:
        data = {"model": self.model, "tasks": {name: {**dataclasses.asdict(t), "ci95": list(t.ci95)}
                                               for name, t in self.tasks.items()}}
        if self.teacher is not None:
            data["teacher"] = self.teacher.to_json()
        return data

    @classmethod
    def from_json(cls, data: dict) -> EvalResults:
        teacher = data.get("teacher")
        return cls(model=data["model"], tasks={n: TaskScore.from_json(t) for n, t in data["tasks"].items()},
                   teacher=TeacherScores.from_json(teacher) if teacher is not None else None)

    def save(self, folder: str | Path) -> Path:
        return atomic_write_json(Path(folder) / RESULTS_FILE, self.to_json())

    @classmethod
    def load(cls, folder: str | Path) -> EvalResults:
        return load_artefact(Path(folder) / RESULTS_FILE, cls.from_json, "a rad evaluation result",
                             f"re-run `rad eval` into this folder (--out {Path(folder).parent})",
                             missing=f"{folder} has no {RESULTS_FILE}")

    @classmethod
    def load_or_none(cls, folder: str | Path) -> EvalResults | None:
        return cls.load(folder) if (Path(folder) / RESULTS_FILE).is_file() else None


@dataclass(frozen=True)
class TaskMeta:
    """What `<task>.meta.json` holds: everything that determines a task's per-item answers and verdicts.

    `model` is the spec the user gave (informational); the model's identity is `model_fingerprint`, the
    content of what was loaded (`rad.utils.identity.model_fingerprint`), so a re-made folder or a moved
    symlink at the same path is refused and a copy of the same files is accepted. `scoring` is the whole
    `SandboxLimits`. Fields an older rad did not record are None: not checked (a warning says so)."""

    task: str
    prompt_version: str
    model: str
    chat: bool
    n_shot: int
    max_new_tokens: int
    decoding: str = "greedy"
    model_fingerprint: str | None = None
    dtype: str | None = None
    scoring: dict | None = None
    data_fingerprint: str | None = None  # the task's rows (rad.data.rows_fingerprint): which questions, which targets
    data_sources: list[str] | None = None  # where they came from (informational: the same rows from a copy match)
    score_version: str | None = None  # how answers become verdicts: a change re-scores the kept completions

    def identity(self) -> dict:
        """The settings a resume must match: everything but the spec, the data's location and the scorer (a newer
        scorer re-scores the items, `rescore_items`), and nothing an older rad did not record."""
        return {k: v for k, v in dataclasses.asdict(self).items()
                if k not in ("model", "data_sources", "score_version") and v is not None}

    def save(self, path: Path) -> Path:
        return atomic_write_json(path, dataclasses.asdict(self))

    @classmethod
    def load(cls, path: Path) -> TaskMeta:
        return load_artefact(path, lambda data: cls(**data), "a rad task metadata file",
                             "pass --overwrite to start the task again or choose another --out")


def model_slug(spec: str) -> str:
    """A folder name for a model: the folder's own name for paths, the alias or hub id otherwise."""
    path = Path(spec).expanduser()
    name = path.name if path.exists() else spec
    return re.sub(r"[^\w.-]+", "_", name).strip("_") or "model"


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


# Settings two models' items must share to be paired (the model, its fingerprint and dtype may differ).
PAIRING_KEYS = ("task", "prompt_version", "chat", "n_shot", "max_new_tokens", "decoding", "scoring", "data_fingerprint",
                "score_version")


def paired_test(folder_a: str | Path, folder_b: str | Path, task: str, limit: int | None = None) -> McNemarResult:
    """The exact McNemar test between two models' per-item results of `task` (each model's folder under a
    `rad eval --out`), on the first `limit` items (all when None). Refused unless both were scored on the same
    items under the same prompt, generation and scoring settings."""
    items, metas = [], []
    for folder in (Path(folder_a), Path(folder_b)):
        items_path, meta_path = folder / f"{task}.jsonl", folder / f"{task}{META_SUFFIX}"
        if not (items_path.is_file() and meta_path.is_file()):
            raise RadError(f"{folder} has no {task} results ({items_path.name} and {meta_path.name}); run "
                           f"`rad eval ... --tasks {task}` for that model first.")
        done = read_items(items_path)
        if limit is not None:
            done = {k: r for k, r in done.items() if r.get("index", 0) < limit}
        items.append(done)
        meta = dataclasses.asdict(TaskMeta.load(meta_path))
        metas.append({k: meta[k] for k in PAIRING_KEYS if meta.get(k) is not None})
    shared = metas[0].keys() & metas[1].keys()
    check_same_settings({k: metas[0][k] for k in shared}, {k: metas[1][k] for k in shared},
                        what=f"The {task} results of {folder_b} (paired with {folder_a})",
                        advice="evaluate both models with the same settings before a paired test")
    return mcnemar_items(items[0], items[1], names=(str(folder_a), str(folder_b)))


def check_fits_context(task, model_config, source: str) -> None:
    """A task whose prompts are longer than the model's positions is refused (one sentence), not truncated.
    `model_config` None: not known before loading (an alias, a hub id); checked again once loaded."""
    check_length_fits(task.max_length(), model_config, source, f"The {task.name} task", margin=64)


def check_length_fits(length: int, model_config, source: str, what: str, margin: int = 0) -> None:
    """`length` tokens (+ `margin` for a chat template and the answer) within the model's positions, or one sentence."""
    limit = getattr(model_config, "max_position_embeddings", None)
    if limit is not None and length + margin > limit:
        room = f" (+{margin} for the template and the answer)" if margin else ""
        raise RadError(f"{what} asks for {length} tokens of context{room}, but {source} has {limit} positions; ask "
                       "for less.")


def local_config(spec: str):
    """The config.json of a model folder, read without loading the weights; None for aliases and hub ids."""
    path = Path(spec).expanduser() / "config.json"
    return AutoConfig.from_pretrained(path.parent) if path.is_file() else None


def task_meta(task, config: EvalConfig, loaded: LoadedModel, max_new_tokens: int, fingerprint: str) -> TaskMeta:
    return TaskMeta(task=task.name, prompt_version=task.prompt_version, model=loaded.source, chat=config.chat,
                    n_shot=config.n_shot, max_new_tokens=max_new_tokens, decoding="greedy",
                    model_fingerprint=fingerprint, dtype=str(loaded.model.dtype),
                    scoring=dataclasses.asdict(config.sandbox), score_version=getattr(task, "score_version", None),
                    **task.data_identity())


def evaluate_task(loaded: LoadedModel, task_name: str, config: EvalConfig, folder: Path,
                  fingerprint: str | None = None, deadline: float | None = None) -> TaskResult:
    """Score `loaded` on the first `config.limit` items of a task, reusing items already in the per-item file
    when they were made by the same model (content `fingerprint`) under the same settings, else refusing."""
    options = TaskOptions(n_shot=config.n_shot, data_dir=config.data_dir, sources=config.sources,
                          sandbox=config.sandbox, passkey=config.passkey)
    task = make_task(task_name, options)
    if getattr(task, "needs_tokenizer", False):
        task.bind(loaded.tokenizer)
        check_fits_context(task, loaded.model.config, loaded.source)
    max_new = config.max_new_tokens or task.default_max_new_tokens
    meta = task_meta(task, config, loaded, max_new, fingerprint or model_fingerprint(loaded))
    items_path, meta_path = folder / f"{task.name}.jsonl", folder / f"{task.name}{META_SUFFIX}"
    shard = config.shard
    written = items_path if shard.whole else shard.path(items_path)  # the file this process appends to
    present = [p for p in (items_path, *([] if shard.whole else shard.all_paths(items_path))) if p.is_file()]
    if present and not meta_path.is_file():  # not rad's: never read, repaired or deleted
        raise RadError(f"{present[0]} was not written by rad eval (no {meta_path.name} beside it); move it away "
                       "or choose another --out.")
    if config.overwrite:
        items_path.unlink(missing_ok=True)
        present = []
    if meta_path.is_file() and present:
        before = TaskMeta.load(meta_path)
        check_same_settings(before.identity(), meta.identity(), what=str(items_path),
                            advice="pass --overwrite to discard its items and start again, or choose another --out")
        if before.score_version != meta.score_version:
            if not shard.whole:
                raise RadError(f"{items_path} was scored by an older {task.name} scorer; run this rad eval once "
                               "without --shard to re-score its items (no generation), then shard again.")
            rescore_items(task, items_path, chat=config.chat)
    folder.mkdir(parents=True, exist_ok=True)
    meta.save(meta_path)
    items = task.items(config.limit)
    done = read_items(items_path)
    if not shard.whole:
        done.update(read_items(written))
    pending = [(i, item) for i, item in enumerate(items) if item.id not in done and shard.owns(i)]
    if done:
        logger.info("%s: %d of %d items already done in %s; generating %d", task.name,
                    len(items) - len(pending), len(items), items_path, len(pending))
    generator = Generator(loaded.model, loaded.tokenizer,
                          GenerationConfig(max_new_tokens=max_new, batch_size=config.batch_size, chat=config.chat))
    desc = task.name if shard.whole else f"{task.name} (shard {shard})"
    with written.open("a", encoding="utf-8") as fh, tqdm(total=len(pending), desc=desc) as bar:
        for start in range(0, len(pending), config.batch_size):
            check_deadline(deadline, f"the next {task.name} batch of {loaded.source}")  # items so far are saved
            chunk = pending[start : start + config.batch_size]
            prompts = [render_prompt(loaded.tokenizer, item.messages, item.raw, config.chat, item.response_prefix)
                       for _, item in chunk]
            t0 = time.perf_counter()
            completions = generator.generate(prompts)
            seconds = (time.perf_counter() - t0) / len(chunk)
            for (index, item), prompt, completion in zip(chunk, prompts, completions, strict=True):
                answer = truncate_at((item.response_prefix if config.chat else "") + completion, task.stop)
                record = {"id": item.id, "index": index, **task.score(item, answer), "completion": completion,
                          "prompt": prompt, "seconds": round(seconds, 3), "finished_at": time.time()}
                fh.write(json.dumps(record) + "\n")
                done[item.id] = record
            fh.flush()
            os.fsync(fh.fileno())
            bar.update(len(chunk))
    if not shard.whole:
        merged = merge_if_complete(items_path, shard, [item.id for item in items], read_items)
        if merged is None:  # other shards still work: this shard's own items only
            mine = [done[item.id] for i, item in enumerate(items) if shard.owns(i)]
            correct = sum(bool(r["correct"]) for r in mine)
            logger.info("%s: shard %s scored its %d items; the shard that finishes last merges them", task.name,
                        shard, len(mine))
            return TaskResult(task.name, correct, len(mine), generator.calls, wilson_interval(correct, len(mine)),
                              complete=False)
        done = merged
    selected = [done[item.id] for item in items]
    correct = sum(bool(r["correct"]) for r in selected)
    return TaskResult(task.name, correct, len(selected), generator.calls, wilson_interval(correct, len(selected)))


def rescore_items(task, items_path: Path, *, chat: bool) -> None:
    """Verdicts again from the completions already generated, when the scorer changed since (a harness fix must
    not cost a model's whole generation again); rewritten atomically, the completions untouched."""
    records = read_items(items_path)
    by_id = {item.id: item for item in task.items()}
    if not records.keys() <= by_id.keys():
        return  # items of other data: check_same_settings has already refused such a file
    rescored = []
    for record in records.values():
        item = by_id[record["id"]]
        answer = truncate_at((item.response_prefix if chat else "") + record["completion"], task.stop)
        rescored.append({**record, **task.score(item, answer)})
    atomic_write_text(items_path, "".join(json.dumps(r) + "\n" for r in rescored))
    changed = sum(r["correct"] != records[r["id"]]["correct"] for r in rescored)
    logger.info("%s: re-scored the %d items in %s under the current scorer (%s); %d verdicts changed",
                task.name, len(rescored), items_path, getattr(task, "score_version", None), changed)


def generation_copy(loaded: LoadedModel, dtype: str | None) -> LoadedModel:
    """`loaded` itself when `dtype` resolves to None or to its dtype (`generation_dtype`), else a cast copy (the
    original, which may be a shared teacher, is left as it is). On CPU a bf16 copy uses eager attention: torch's CPU flash-attention
    kernel is ~3x slower in bf16 than in fp32 at decode, eager's bf16 matmuls are faster (docs/benchmarks.md)."""
    model = loaded.model
    target = generation_dtype(dtype, model.device) or model.dtype
    if target == model.dtype:
        return loaded
    cast = copy.deepcopy(model).to(target)
    if model.device.type == "cpu" and target == torch.bfloat16 and hasattr(cast, "set_attn_implementation"):
        cast.set_attn_implementation("eager")
    return dataclasses.replace(loaded, model=cast)


def evaluate_model(
    model: str | LoadedModel, config: EvalConfig, teacher: LoadedModel | None = None,
    deadline: float | None = None, **load_kwargs
) -> ModelResult:
    """Evaluate one model (a spec for `load_model`, or an already loaded one) and write its results.json.
    `deadline` (time.monotonic()): stop with TimeLimitReached between batches once passed; a rerun resumes."""
    loaded = model if isinstance(model, LoadedModel) else load_model(model, **load_kwargs)
    folder = Path(config.out) / model_slug(loaded.source)  # made by the first task, once its data is known good
    result = ModelResult(loaded.source, folder, {})
    fingerprint = model_fingerprint(loaded) if config.tasks else None
    generating = generation_copy(loaded, config.generation_dtype) if config.tasks else loaded
    for name in config.tasks:
        result.tasks[name] = evaluate_task(generating, name, config, folder, fingerprint, deadline)
        r = result.tasks[name]
        logger.info("%s %s%s: %.1f%% (%d/%d, 95%% CI %.1f-%.1f)", loaded.source, name,
                    "" if r.complete else f" (shard {config.shard}'s items)", 100 * r.accuracy, r.correct, r.total,
                    100 * r.ci95[0], 100 * r.ci95[1])
    folder.mkdir(parents=True, exist_ok=True)
    lead = config.shard.index == 0  # the one shard that measures what is not split by items
    if config.position_length and lead:
        position_curve(loaded, config, folder, fingerprint or model_fingerprint(loaded))
    if teacher is not None and lead:
        previous = EvalResults.load_or_none(folder) or EvalResults(result.model)
        texts = _heldout_texts(config)
        # What the metrics depend on besides the settings, so that a resumed run reuses them (32 forwards of
        # model and teacher each, minutes on a CPU) only when model, teacher and texts are the same.
        settings = {**dataclasses.asdict(config.teacher_config), "model_fingerprint": fingerprint or
                    model_fingerprint(loaded), "teacher_fingerprint": model_fingerprint(teacher),
                    "texts_sha256": hashlib.sha256(json.dumps(texts).encode()).hexdigest()}
        saved = None if config.overwrite else previous.teacher
        if saved is not None and saved.teacher == teacher.source and saved.settings == settings:
            logger.info("%s: teacher metrics already in %s (same model, teacher, texts and settings)",
                        loaded.source, folder / RESULTS_FILE)
            result.teacher = saved
        else:
            metrics = teacher_metrics(loaded, teacher, texts, config.teacher_config)
            result.teacher = TeacherScores(teacher=teacher.source, **metrics, settings=settings)
    with merge_lock(folder / RESULTS_FILE):  # shards of one model update it in turn
        previous = EvalResults.load_or_none(folder) or EvalResults(result.model)
        EvalResults(
            model=result.model,
            tasks={**previous.tasks, **{n: TaskScore.of(r, config.limit) for n, r in result.tasks.items()
                                        if r.complete}},
            teacher=result.teacher if result.teacher is not None else previous.teacher,
        ).save(folder)
    return result


def _finished_results(results: list[ModelResult], config: EvalConfig) -> list[ModelResult] | None:
    """Every model's results as its results.json holds them, once all shards have written theirs; else None."""
    finished = []
    for r in results:
        saved = EvalResults.load_or_none(r.folder)
        if saved is None or any(name not in saved.tasks or saved.tasks[name].limit != config.limit
                                for name in config.tasks):
            return None
        if (config.teacher and saved.teacher is None) or (
                config.position_length and not (r.folder / POSITION_FILE).is_file()):
            return None
        finished.append(ModelResult(r.model, r.folder, dict(saved.tasks), saved.teacher))
    return finished


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
            m = r.teacher
            row += [f"{m.kl_teacher_student:.4f}", f"{m.perplexity:.2f}",
                    f"{100 * m.top1_agreement:.1f}%"] if m else ["–"] * 3
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def evaluate_models(specs: list[str], config: EvalConfig, **load_kwargs) -> tuple[list[ModelResult], str]:
    """Evaluate each model in turn (one in memory at a time, plus the teacher) and write `out/comparison.md`."""
    if not specs:
        raise RadError("Give at least one model to evaluate.")
    slugs = [model_slug(s) for s in specs]
    if len(set(slugs)) != len(slugs):
        raise RadError(f"Two models would share an output folder ({slugs}); rename one of the folders.")
    shard = config.shard
    with writer_lock(config.out, "rad eval" if shard.whole else f"rad eval --shard {shard}",
                     part=None if shard.whole else f"shard-{shard.index}-of-{shard.count}"):
        # Every model and task's data is checked (the hub probed once) before spending time on loading models.
        hub = probe_hub()
        config = dataclasses.replace(config, sources=usable_sources(hub, config.sources))
        for spec in dict.fromkeys([*specs, *([config.teacher] if config.teacher else [])]):
            check_model(spec, hub)
        check_task_data(config.tasks, config.sources, config.data_dir, on_missing="error")
        options = TaskOptions(n_shot=config.n_shot, data_dir=config.data_dir, sources=config.sources,
                              passkey=config.passkey)
        for name in config.tasks:
            task = make_task(name, options)
            if getattr(task, "needs_tokenizer", False):  # built per model; its lengths checked against each one
                for spec in specs:
                    check_fits_context(task, local_config(spec), spec)
            else:
                task.items(config.limit)
        if config.position_length:
            for spec in specs:
                check_length_fits(config.position_length, local_config(spec), spec, "--position-loss")
        teacher = load_model(config.teacher, **load_kwargs) if config.teacher else None
        results = []
        for spec in specs:
            loaded = teacher if teacher is not None and spec == config.teacher else load_model(spec, **load_kwargs)
            results.append(evaluate_model(loaded, config, teacher=teacher))
            del loaded
            gc.collect()
        out = Path(config.out)
        if not shard.whole:
            with merge_lock(out / "comparison.md"):
                finished = _finished_results(results, config)
            if finished is None:
                logger.info("Shard %s is done; the shard that finishes last writes comparison.md", shard)
                return results, ""
            results = finished
        table = comparison_table(results)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "comparison.md", table)
        if "passkey" in config.tasks:
            write_recall(results, out)
        if config.position_length:
            curves = {r.model: load_artefact(r.folder / POSITION_FILE, dict, "a position-loss file", "rerun")["curve"]
                      for r in results}
            plot_position_loss(curves, out / "position_loss.png")
        return results, table


POSITION_FILE = "position_loss.json"


def position_curve(loaded: LoadedModel, config: EvalConfig, folder: Path, fingerprint: str) -> list[dict]:
    """The model's loss against position (`position_loss.py`), saved as `position_loss.json`; reused when that file
    was made by the same model with the same windows."""
    settings = {"length": config.position_length, "windows": config.position_windows, "model_fingerprint": fingerprint,
                "text": "cpython-stdlib:" + ",".join(STDLIB_FILES)}
    path = folder / POSITION_FILE
    if path.is_file() and not config.overwrite:
        saved = load_artefact(path, dict, "a position-loss file", f"delete {path} to measure again")
        if saved.get("settings") == settings:
            return saved["curve"]
    check_length_fits(config.position_length, loaded.model.config, loaded.source, "--position-loss")
    losses = position_losses(loaded.model, windows(loaded.tokenizer, config.position_length, config.position_windows))
    curve = bucketed(losses)
    atomic_write_json(path, {"settings": settings, "curve": curve, "mean_loss": float(losses.mean())})
    logger.info("%s: loss %.3f over positions 1-%d (%d windows)", loaded.source, float(losses.mean()),
                config.position_length - 1, config.position_windows)
    return curve


def write_recall(results: list[ModelResult], out: Path) -> None:
    """`passkey_recall.json` (each model's {length: {depth: [correct, total]}}) and its heat maps beside it."""
    grids = {r.model: recall_grid(list(read_items(r.folder / "passkey.jsonl").values())) for r in results}
    atomic_write_json(out / "passkey_recall.json", grids)
    plot_recall(grids, out / "passkey_recall.png")
