"""The alignment stage (`rad align`): each converted layer's mixer learns the attention it replaced, layer-locally.

One teacher forward without gradients (bf16 where the hardware has it) gives, for every converted layer, the
teacher's normalised hidden state there and the output of the attention the mixer replaces (`align.teacher`); it
stops after the last converted layer. Every mixer is then trained on its own layer's pair, on the squared error
normalised by the target's mean square (`align.loss`): nothing is back-propagated through MLPs, later blocks or
the lm_head, and each layer's backward runs on its own, so memory holds one mixer's activations at a time (24
mixers from one pass fit). Mixer weights and AdamW state stay float32.

Like `rad distill`: the rows of step s are a fixed function of (s, seed), checkpoints are atomic and checksummed
(`distill.checkpoint`), `--resume` is refused under changed settings (`utils.identity`) and continues bitwise;
log.jsonl, TensorBoard when installed, summary.json (`AlignSummary`) and OUT/student, a stock Bamba checkpoint
that `rad distill OUT/student` continues from.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rad.align.cache import PairCache, cache_bytes, check_cache_folder, open_cache
from rad.align.loss import relative_error, squared_sums
from rad.align.mixers import converted_layers, mixer_output, mixer_parameter_prefix
from rad.align.precision import check_precision, resolve_precision
from rad.align.teacher import LayerPairs, teacher_pairs
from rad.config import settings
from rad.data import SOURCES
from rad.distill.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from rad.distill.config import data_fingerprint
from rad.distill.data import DataConfig, DistillData, Sequences, batch_indices, build_data
from rad.distill.modules import check_same_vocabulary, share_frozen_weights
from rad.distill.objective import DistillObjective, LossWeights
from rad.distill.train import cosine_lambda, evaluate
from rad.errors import RadError
from rad.models.convert import (
    CONVERSION_FILE,
    HYBRID_MODEL_TYPE,
    ConversionRecord,
    is_hybrid_config,
    read_conversion_record,
    write_loader_keys,
)
from rad.models.loading import load_model, resolve_to_folder
from rad.outputs import ALIGN, check_free_space, check_output
from rad.utils.artefacts import load_artefact
from rad.utils.atomic import atomic_directory, atomic_write_json, atomic_write_text, remove_stale_temps
from rad.utils.devices import resolve_device
from rad.utils.identity import check_same_settings, model_fingerprint
from rad.utils.jsonl import read_log

logger = logging.getLogger(__name__)

# Alignment's defaults, the one place `rad align` and `AlignSettings` take them from. Measured on
# Qwen2.5-Coder-0.5B, k = 8 (docs/align.md, "Defaults and how they were found"): lr 1e-3 vs 3e-4 over 16 steps of
# 4 x 256 tokens, held-out relative error 0.610 vs 0.618, KL 0.748 vs 0.720 (a close call); bf16 teacher pass 2.0x
# faster than fp32, bf16 autocast of the mixers 1.1x slower than fp32 (bench/align_step.py).
DEFAULT_LR = 1e-3
DEFAULT_WARMUP_RATIO = 0.0
DEFAULT_MIN_LR_RATIO = 0.0
DEFAULT_STEPS = 32  # 32,768 tokens: the prototype's measured point (not re-measured here)
DEFAULT_BATCH = 4
DEFAULT_SEQ_LEN = 256
DEFAULT_DATA = "gsm8k+mbpp"  # the claims preset's distillation data
# Mixer forward/backward under bf16 autocast when the teacher runs in bf16 (None in AlignConfig: this).
DEFAULT_MIXER_AUTOCAST = False
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "align_config.json"  # written first: the record that marks a folder as rad align's
# AlignConfig fields a resume may change: where and how the run is done and watched, never what it trains.
ALLOWED_ON_RESUME = ("out", "eval_every", "save_every", "keep_checkpoints", "log_every", "resume", "device",
                     "progress", "tensorboard", "hybrid", "teacher", "cache", "kl_eval")


def default_data() -> DataConfig:
    return DataConfig(spec=DEFAULT_DATA, seq_len=DEFAULT_SEQ_LEN)


def _positive_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@dataclass
class AlignConfig:
    """Everything an alignment run needs; `rad align` fills it from its flags, an orchestrator from `AlignSettings`."""

    hybrid: str
    out: str
    teacher: str | None = None  # None: the hybrid's source model (rad_conversion.json)
    steps: int = DEFAULT_STEPS  # optimiser steps per epoch; an epoch is steps x batch rows
    epochs: int = 1  # later epochs repeat the first epoch's rows (from --cache when given)
    batch: int = DEFAULT_BATCH  # rows per step
    data: DataConfig = field(default_factory=default_data)
    lr: float = DEFAULT_LR
    min_lr_ratio: float = DEFAULT_MIN_LR_RATIO
    warmup_ratio: float = DEFAULT_WARMUP_RATIO
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.98)
    max_grad_norm: float = 1.0  # per mixer: aligning many layers at once = aligning each alone
    precision: str = "auto"  # of the teacher pass: auto (bf16 where native), bf16, fp32
    mixer_autocast: bool | None = None  # mixers under bf16 autocast when the teacher is bf16; None: the default
    cache: str | None = None  # folder of (input, target) shards for epochs after the first
    eval_every: int = 0  # held-out relative error every N steps as well (0: at the start and the end only)
    eval_sequences: int = 16
    kl_eval: bool = True  # held-out KL of the hybrid to the teacher at the start and the end
    save_every: int = 16  # 0: no checkpoints (no resume), only the final student
    keep_checkpoints: int = 2
    log_every: int = 1
    resume: bool = False
    device: str | None = None
    seed: int = 0
    progress: bool = True
    tensorboard: bool = True

    def __post_init__(self):
        if not _positive_number(self.lr):
            raise RadError(f"The learning rate must be a positive number, got {self.lr!r}.")
        whole = {"steps": (self.steps, 1), "epochs": (self.epochs, 1), "batch": (self.batch, 1),
                 "eval_every": (self.eval_every, 0), "eval_sequences": (self.eval_sequences, 1),
                 "save_every": (self.save_every, 0), "keep_checkpoints": (self.keep_checkpoints, 0),
                 "log_every": (self.log_every, 1)}
        for name, (value, lowest) in whole.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
                raise RadError(f"{name} must be a whole number of at least {lowest}, got {value!r}.")
        if not (isinstance(self.warmup_ratio, (int, float)) and 0 <= self.warmup_ratio < 1):
            raise RadError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}.")
        if not (isinstance(self.min_lr_ratio, (int, float)) and 0 <= self.min_lr_ratio <= 1):
            raise RadError(f"min_lr_ratio must be between 0 and 1, got {self.min_lr_ratio!r}.")
        if not (isinstance(self.weight_decay, (int, float)) and math.isfinite(self.weight_decay)
                and self.weight_decay >= 0):
            raise RadError(f"weight_decay must be a number of at least 0, got {self.weight_decay!r}.")
        if not _positive_number(self.max_grad_norm):
            raise RadError(f"max_grad_norm must be a positive number, got {self.max_grad_norm!r}.")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise RadError(f"betas must be two numbers in [0, 1), got {self.betas!r}.")
        check_precision(self.precision)
        if self.cache is not None and not str(self.cache).strip():
            raise RadError("--cache is empty; give a folder (or leave it out).")

        resolve_device(self.device)

    @property
    def total_steps(self) -> int:
        return self.steps * self.epochs

    @property
    def tokens_per_step(self) -> int:
        return self.batch * self.data.seq_len


@settings
class AlignSettings:
    """The alignment settings an orchestrator (`rad run`, `rad sweep`, `rad ablate`) exposes in its YAML; every
    default is `AlignConfig`'s (and so `rad align`'s). `stage_config` is the one translation into a run."""

    steps: int = DEFAULT_STEPS
    epochs: int = 1
    batch: int = DEFAULT_BATCH
    seq_len: int = DEFAULT_SEQ_LEN
    lr: float = DEFAULT_LR
    warmup_ratio: float = DEFAULT_WARMUP_RATIO
    min_lr_ratio: float = DEFAULT_MIN_LR_RATIO
    precision: str = "auto"
    data: str | None = DEFAULT_DATA
    max_examples: int | None = None
    eval_examples: int | None = None
    eval_every: int = 0
    eval_sequences: int = 16
    kl_eval: bool = True
    save_every: int = 16
    cache: str | None = None
    tensorboard: bool = True

    def __post_init__(self):
        self.stage_config("-", "-", seed=0, device=None)  # the stage's own checks, before any work

    def stage_config(self, hybrid, out, *, seed: int, device: str | None, sources: tuple[str, ...] = SOURCES,
                     progress: bool = True) -> AlignConfig:
        """The `AlignConfig` of one hybrid; resumes when `out` already exists."""
        return AlignConfig(
            hybrid=str(hybrid), out=str(out), steps=self.steps, epochs=self.epochs, batch=self.batch, lr=self.lr,
            warmup_ratio=self.warmup_ratio, min_lr_ratio=self.min_lr_ratio, precision=self.precision,
            eval_every=self.eval_every, eval_sequences=self.eval_sequences, kl_eval=self.kl_eval,
            save_every=self.save_every, cache=self.cache, seed=seed, device=device, resume=Path(out).exists(),
            progress=progress, tensorboard=self.tensorboard,
            data=DataConfig(spec=self.data, seq_len=self.seq_len, max_examples=self.max_examples,
                            eval_examples=self.eval_examples, seed=seed, sources=tuple(sources)),
        )


@dataclass(frozen=True)
class AlignEval:
    """One held-out evaluation: each layer's relative error, and (when measured) the hybrid's KL to the teacher."""

    step: int
    relative_error: dict[int, float]
    mean_relative_error: float
    eval_kl: float | None = None
    eval_ppl: float | None = None
    teacher_ppl: float | None = None
    eval_top1_agreement: float | None = None

    @classmethod
    def from_json(cls, data: dict) -> AlignEval:
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        values["relative_error"] = {int(k): float(v) for k, v in data["relative_error"].items()}
        return cls(**values)


@dataclass(frozen=True)
class AlignSummary:
    """What summary.json holds: what was aligned from what, and the first and last held-out evaluations."""

    hybrid: str
    teacher: str
    layers: list[int]
    steps: int
    epochs: int
    tokens: int
    data: str
    train_sequences: int
    eval_sequences: int
    seq_len: int
    precision: str
    mixer_autocast: bool
    tokens_per_s: float | None  # median over the steps of this process (teacher + mixers)
    first_eval: AlignEval | None
    final_eval: AlignEval | None
    student: str
    settings: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> AlignSummary:
        data = dict(data)
        for key in ("first_eval", "final_eval"):
            data[key] = AlignEval.from_json(data[key]) if data.get(key) is not None else None
        return cls(**data)

    def save(self, out: str | Path) -> Path:
        return atomic_write_json(Path(out) / SUMMARY_FILE, self.to_json())

    @classmethod
    def load(cls, out: str | Path) -> AlignSummary:
        return load_artefact(Path(out) / SUMMARY_FILE, cls.from_json, "a rad alignment summary",
                             f"re-run `rad align ... --out {out}` (add --resume to continue from its checkpoints)",
                             missing=f"{out} has no {SUMMARY_FILE} (the alignment did not finish)")


@dataclass
class AlignResult:
    out: Path
    student_dir: Path
    steps: int
    history: list[dict]
    evals: list[dict]
    summary: AlignSummary


# ---------------------------------------------------------------- checks before any model loads


def _read_config(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _source_of(hybrid: str) -> str | None:
    folder = Path(hybrid).expanduser()
    record = ConversionRecord.load(folder) if folder.is_dir() else None
    return record.source_model if record else None


def check_before_loading(config: AlignConfig) -> None:
    """Every refusal that needs no model: the output folder, a hybrid without converted layers, a teacher of
    another shape, checkpoints without --resume, a cache folder without room. One sentence each; writes nothing."""

    source = _source_of(config.hybrid)
    teacher = config.teacher or source
    inputs = [("hybrid", config.hybrid), ("teacher", teacher), ("data", config.data.spec)]
    out = check_output(config.out, ALIGN, inputs=inputs)
    hybrid_cfg = _read_config(Path(config.hybrid).expanduser()) if Path(config.hybrid).expanduser().is_dir() else None
    layers: list[int] | None = None
    if hybrid_cfg is not None:
        if hybrid_cfg.get("model_type") != HYBRID_MODEL_TYPE:
            raise RadError(f"{config.hybrid} is not a rad hybrid (Bamba) checkpoint; make one with `rad convert`.")
        n = int(hybrid_cfg["num_hidden_layers"])
        attention = set(hybrid_cfg.get("attn_layer_indices") or [])
        layers = [i for i in range(n) if i not in attention]
        if not layers:
            raise RadError(f"{config.hybrid} has no converted layers (every layer is attention); convert some with "
                           "`rad convert MODEL --layers ...`.")
        if teacher is not None:
            _check_teacher_shape(teacher, hybrid_cfg.get("hidden_size"), n)
    if teacher is None:
        raise RadError(f"{config.hybrid} has no rad_conversion.json naming its source; pass --teacher MODEL.")
    if list_checkpoints(out / "checkpoints") and not config.resume:
        raise RadError(f"{config.out} already holds checkpoints; pass --resume to continue or choose a new --out.")
    if config.cache is not None and hybrid_cfg is not None and layers:
        needed = cache_bytes(config.steps, config.batch, config.data.seq_len, int(hybrid_cfg["hidden_size"]),
                             len(layers))
        check_cache_folder(config.cache, needed, inputs + [("output folder", config.out)])
    for folder in (out, out / "checkpoints"):
        remove_stale_temps(folder)


def _check_teacher_shape(teacher: str, hidden: int | None, num_layers: int) -> None:
    """The teacher must have the hybrid's hidden size and layer count (its layers are the hybrid's layers)."""

    folder = resolve_to_folder(teacher)
    cfg = _read_config(folder) if folder is not None else None
    if cfg is None:
        return  # a hub id: checked once loaded
    _compare_shapes(teacher, cfg.get("hidden_size"), cfg.get("num_hidden_layers"), hidden, num_layers)


def _compare_shapes(teacher: str, t_hidden, t_layers, hidden, num_layers) -> None:
    if t_hidden != hidden or t_layers != num_layers:
        raise RadError(f"The teacher {teacher} has hidden size {t_hidden} and {t_layers} layers, the hybrid "
                       f"{hidden} and {num_layers}; alignment needs the model the hybrid was converted from (or one "
                       "of the same shape).")


# ---------------------------------------------------------------- models


@dataclass
class AlignModels:
    student: torch.nn.Module
    target_teacher: torch.nn.Module  # gives the (input, target) pairs, in the resolved precision
    eval_teacher: torch.nn.Module | None  # float32, for the held-out KL (None: kl_eval off)
    tokenizer: object
    record: ConversionRecord | None
    teacher_spec: str
    layers: list[int]
    student_fingerprint: str
    teacher_fingerprint: str


def _same_model(a: str, b: str) -> bool:

    if a == b:
        return True
    try:
        fa, fb = resolve_to_folder(a), resolve_to_folder(b)
    except RadError:
        return False
    return fa is not None and fb is not None and fa.resolve() == fb.resolve()


def load_models(config: AlignConfig, device: torch.device, precision: str) -> AlignModels:
    """The hybrid (float32, only its mixers trainable) and its teacher: one in the pass's precision for the pairs,
    one in float32 for the held-out KL. A float32 source teacher shares the hybrid's frozen tensors (one copy)."""

    student_loaded = load_model(config.hybrid, device=device, dtype="float32")
    student = student_loaded.model
    if not is_hybrid_config(student.config):
        raise RadError(f"{config.hybrid} is not a rad hybrid (Bamba) checkpoint; make one with `rad convert`.")
    layers = converted_layers(student)
    if not layers:
        raise RadError(f"{config.hybrid} has no converted layers; convert some with `rad convert MODEL --layers ...`.")
    record = read_conversion_record(student_loaded.path) if student_loaded.path else None
    teacher_spec = config.teacher or (record.source_model if record else None)
    if teacher_spec is None:
        raise RadError(f"{config.hybrid} has no rad_conversion.json naming its source; pass --teacher MODEL.")
    prefixes = tuple(mixer_parameter_prefix(student, i) for i in layers)
    for name, param in student.named_parameters():
        param.requires_grad_(name.startswith(prefixes))
    self_teacher = record is not None and _same_model(teacher_spec, record.source_model)

    def load_teacher(dtype: str, share: bool):
        loaded = load_model(teacher_spec, device=device, dtype=dtype)
        model = loaded.model
        _compare_shapes(teacher_spec, model.config.hidden_size, model.config.num_hidden_layers,
                        student.config.hidden_size, student.config.num_hidden_layers)
        if share:
            share_frozen_weights(model, student)
        for p in model.parameters():
            p.requires_grad_(False)
        return loaded

    eval_loaded = load_teacher("float32", self_teacher) if config.kl_eval or precision == "fp32" else None
    if eval_loaded is not None:
        check_same_vocabulary(student_loaded.tokenizer, eval_loaded.tokenizer,
                              student.get_output_embeddings().weight.shape[0],
                              eval_loaded.model.get_output_embeddings().weight.shape[0])
    target_loaded = eval_loaded if precision == "fp32" else load_teacher("bfloat16", False)
    fingerprint = model_fingerprint(target_loaded)
    logger.info("Aligning %d mixers (layers %s) to %s, teacher pass in %s", len(layers),
                ",".join(map(str, layers)), teacher_spec, precision)
    return AlignModels(student=student, target_teacher=target_loaded.model.eval(),
                       eval_teacher=eval_loaded.model.eval() if eval_loaded is not None else None,
                       tokenizer=student_loaded.tokenizer, record=record, teacher_spec=teacher_spec, layers=layers,
                       student_fingerprint=model_fingerprint(student_loaded), teacher_fingerprint=fingerprint)


# ---------------------------------------------------------------- the run


class _Logs:
    """log.jsonl (cut back to the resumed step) and TensorBoard when installed."""

    def __init__(self, out: Path, tensorboard: bool, start_step: int):
        self.path = out / "log.jsonl"
        self.tb = None
        if self.path.exists():
            kept = [r for r in read_log(self.path) if r.get("step", 0) <= start_step] if start_step else []
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1 if start_step else None)
            except ImportError:
                logger.warning("tensorboard is not installed; writing JSONL logs only.")

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in _flat_numbers(record).items():
                self.tb.add_scalar(f"{record['kind']}/{key}", value, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _flat_numbers(record: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(_flat_numbers(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("step", "kind"):
            out[f"{prefix}{key}"] = value
    return out


@dataclass
class _Run:
    config: AlignConfig
    device: torch.device
    precision: str
    mixer_autocast: bool
    models: AlignModels
    data: DistillData
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    mixer_params: dict[int, list[torch.nn.Parameter]]
    settings: dict
    cache: PairCache | None
    step: int = 0
    logs: _Logs | None = None

    @property
    def out(self) -> Path:
        return Path(self.config.out)


def resume_settings(config: AlignConfig, models: AlignModels, data: DistillData, precision: str,
                    mixer_autocast: bool) -> dict:
    """Everything that determines the aligned weights and the held-out numbers: what a resume must match."""

    return {
        "student": models.student_fingerprint,
        "teacher": models.teacher_fingerprint,
        "layers": list(models.layers),
        "steps": config.steps,
        "epochs": config.epochs,
        "batch": config.batch,
        "seed": config.seed,
        "data": {"seed": config.data.seed, "seq_len": config.data.seq_len, "content": data_fingerprint(data)},
        "optimizer": {"lr": config.lr, "min_lr_ratio": config.min_lr_ratio, "weight_decay": config.weight_decay,
                      "betas": list(config.betas), "warmup_ratio": config.warmup_ratio,
                      "max_grad_norm": config.max_grad_norm},
        "precision": {"teacher": precision, "mixer_autocast": mixer_autocast},
        # A float32 teacher's pairs are rounded to bf16 in the cache: epochs after the first then differ.
        "cached_targets_rounded": bool(config.cache) and config.epochs > 1 and precision == "fp32",
        "eval_sequences": config.eval_sequences,
    }


def _cache_identity(run_settings: dict) -> dict:
    keys = ("teacher", "layers", "steps", "batch", "seed", "data")
    return {**{k: run_settings[k] for k in keys}, "precision": run_settings["precision"]["teacher"]}


def run_align(config: AlignConfig, on_step: Callable[[int], None] | None = None) -> AlignResult:
    """Align every converted layer's mixer of `config.hybrid` to its teacher; write checkpoints, logs, summary.json
    and OUT/student. `on_step(step)` runs after each step's log and checkpoint (tests interrupt runs there)."""

    check_before_loading(config)
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    mixer_autocast = precision == "bf16" and (DEFAULT_MIXER_AUTOCAST if config.mixer_autocast is None
                                              else config.mixer_autocast)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / CONFIG_FILE, asdict(config), default=str)  # marks the folder as rad align's
    torch.manual_seed(config.seed)
    models = load_models(config, device, precision)
    models.student.train()
    data = build_data(config.data, models.tokenizer)
    mixer_params = {layer: [p for n, p in models.student.named_parameters()
                            if n.startswith(mixer_parameter_prefix(models.student, layer))] for layer in models.layers}
    params = [p for layer in models.layers for p in mixer_params[layer]]
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    total = config.total_steps
    warmup = max(1, round(config.warmup_ratio * total)) if config.warmup_ratio > 0 else 0
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_lambda(total, warmup, config.min_lr_ratio))
    run_settings = resume_settings(config, models, data, precision, mixer_autocast)
    cache = None
    if config.cache is not None:
        cache = open_cache(Path(config.cache).expanduser(), models.layers, _cache_identity(run_settings))
    run = _Run(config, device, precision, mixer_autocast, models, data, optimizer, scheduler, mixer_params,
               run_settings, cache)
    _check_disk(run)
    _resume(run)
    run.logs = _Logs(out, config.tensorboard, run.step)
    try:
        _train(run, on_step)
    finally:
        run.logs.close()
    return _finish(run)


def _check_disk(run: _Run) -> None:
    """Room for the checkpoints kept at once (mixer weights + AdamW's two moments, three of them) and the student."""

    trainable = sum(p.numel() * p.element_size() for ps in run.mixer_params.values() for p in ps)
    student = sum(p.numel() * p.element_size() for p in run.models.student.parameters())
    check_free_space(run.config.out, 3 * 3 * trainable + student, "This alignment")


def _resume(run: _Run) -> None:
    checkpoints = list_checkpoints(run.out / "checkpoints")
    if not checkpoints:
        return
    latest = checkpoints[-1]
    ckpt = load_checkpoint(latest, run.device)
    check_same_settings(ckpt.state.settings, run.settings, what=f"The checkpoint {latest}",
                        advice="resume with the same settings, or choose a new --out to align with these")
    named = dict(run.models.student.named_parameters())
    with torch.no_grad():
        for name, value in ckpt.weights.items():
            if name not in named or not named[name].requires_grad:
                raise RadError(f"Checkpoint {latest} holds {name}, which is no mixer of this hybrid; wrong --out?")
            named[name].copy_(value)
    run.optimizer.load_state_dict(ckpt.optimizer)
    run.scheduler.load_state_dict(ckpt.scheduler)
    set_rng_state(ckpt.rng[0])
    run.step = ckpt.state.step
    logger.info("Resumed from %s (step %d of %d)", latest, run.step, run.config.total_steps)


def shard_of(step: int, steps_per_epoch: int, seed: int) -> int:
    """Which of the first epoch's batches step `step` trains on: epoch 1 in order, each later epoch a seeded
    reshuffle of the same batches (so a cache and the teacher give the same rows)."""
    epoch, position = divmod(step, steps_per_epoch)
    if epoch == 0:
        return position
    order = torch.randperm(steps_per_epoch, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    return order[position]


def _step_pairs(run: _Run) -> LayerPairs:
    """The (input, target) pairs of the current step: from the cache after the first epoch, else the teacher."""
    cfg = run.config
    shard = shard_of(run.step, cfg.steps, cfg.seed)
    first_epoch = run.step < cfg.steps
    # bf16 pairs round-trip the cache exactly, so a shard already there (another run's, or before a resume) stands
    # in for the teacher from the first epoch on; a float32 teacher's are rounded, so only later epochs read them.
    exact = run.precision == "bf16"
    if run.cache is not None and (not first_epoch or exact) and run.cache.has(shard):
        return run.cache.read(shard, run.device)
    rows = run.data.train.rows(batch_indices(shard, cfg.batch, len(run.data.train), cfg.data.seed))
    pairs = teacher_pairs(run.models.target_teacher, run.models.layers, rows.input_ids.to(run.device),
                          rows.attention_mask.to(run.device))
    if run.cache is not None:
        run.cache.write(shard, pairs)
    return pairs


def mixer_context(mixer_autocast: bool, device: torch.device):
    """bf16 autocast for the mixers' compute (weights and AdamW stay float32), or nothing."""
    if mixer_autocast:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _train(run: _Run, on_step: Callable[[int], None] | None) -> None:

    cfg = run.config
    total = cfg.total_steps
    with tqdm(total=total, initial=run.step, disable=not cfg.progress, desc="align", dynamic_ncols=True) as bar:
        if run.step == 0:
            _evaluate(run, with_kl=cfg.kl_eval)
        while run.step < total:
            record = _train_step(run)
            step, last = run.step, run.step == total
            if step % cfg.log_every == 0 or last:
                run.logs.write(record)
            bar.update(1)
            bar.set_postfix(rel_err=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
            if last or (cfg.eval_every and step % cfg.eval_every == 0):
                _evaluate(run, with_kl=cfg.kl_eval and last)
            if cfg.save_every and (step % cfg.save_every == 0 or last):
                _save(run)
            if on_step is not None:
                on_step(step)


def train_mixers(student, layers: list[int], pairs: LayerPairs, mixer_params: dict[int, list],
                 max_grad_norm: float, mixer_autocast: bool, device: torch.device) -> tuple[dict, dict]:
    """Each layer's relative error and backward on its own (one mixer's activations alive at a time), gradients
    clipped per mixer; returns ({layer: relative error}, {layer: gradient norm}). The optimiser step is the
    caller's. Shared by the run and bench/align_step.py."""
    mask = pairs.attention_mask
    errors: dict[int, float] = {}
    grad_norms: dict[int, float] = {}
    for layer in layers:
        with mixer_context(mixer_autocast, device):
            prediction = mixer_output(student, layer, pairs.inputs[layer].to(torch.float32), mask)
        loss = relative_error(*squared_sums(prediction, pairs.targets[layer], mask))
        loss.backward()
        errors[layer] = float(loss.detach())
        grad_norms[layer] = float(torch.nn.utils.clip_grad_norm_(mixer_params[layer], max_grad_norm))
    return errors, grad_norms


def _train_step(run: _Run) -> dict:
    """One optimiser step: one teacher pass (or cached pairs), then each mixer's loss and backward on its own."""
    cfg = run.config
    started = time.perf_counter()
    pairs = _step_pairs(run)
    teacher_s = time.perf_counter() - started
    errors, grad_norms = train_mixers(run.models.student, run.models.layers, pairs, run.mixer_params,
                                      cfg.max_grad_norm, run.mixer_autocast, run.device)
    mean_error = sum(errors.values()) / len(errors)
    if not math.isfinite(mean_error):
        good = list_checkpoints(run.out / "checkpoints")
        where = f"the last good checkpoint is {good[-1]}" if good else "no checkpoint was written yet"
        raise RadError(f"The alignment loss became {mean_error} at step {run.step + 1}; stopped ({where}). "
                       "Lower --lr or check the data.")
    lr = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    seconds = time.perf_counter() - started
    tokens = int(pairs.attention_mask.sum())
    return {"kind": "train", "step": run.step, "loss": mean_error,
            "relative_error": {str(k): v for k, v in errors.items()}, "lr": lr,
            "grad_norm": max(grad_norms.values()), "tokens": tokens, "tokens_per_s": tokens / max(seconds, 1e-9),
            "teacher_s": teacher_s, "step_s": seconds}


@torch.no_grad()
def held_out_relative_errors(student, teacher, layers: list[int], rows: Sequences, batch: int, device,
                             mixer_context=contextlib.nullcontext) -> dict[int, float]:
    """Each layer's relative error (sum over held-out tokens of |mixer - attention|^2 / |attention|^2)."""
    sums = {layer: torch.zeros(2, dtype=torch.float64) for layer in layers}
    was_training = student.training
    student.eval()
    try:
        for start in range(0, len(rows), batch):
            part = rows.rows(list(range(start, min(start + batch, len(rows)))))
            pairs = teacher_pairs(teacher, layers, part.input_ids.to(device), part.attention_mask.to(device))
            for layer in layers:
                with mixer_context():
                    prediction = mixer_output(student, layer, pairs.inputs[layer].to(torch.float32),
                                              pairs.attention_mask)
                err, energy = squared_sums(prediction, pairs.targets[layer], pairs.attention_mask)
                sums[layer] += torch.stack([err, energy]).double().cpu()
    finally:
        student.train(was_training)
    return {layer: float(relative_error(s[0], s[1])) for layer, s in sums.items()}


@dataclass
class _OneProcess:
    """What distill's held-out `evaluate` asks of its accelerator, for one process on `device` (no accelerate state)."""

    device: torch.device
    process_index: int = 0
    num_processes: int = 1

    def unwrap_model(self, model):
        return model

    def autocast(self):
        return contextlib.nullcontext()

    def reduce(self, tensor, reduction: str = "sum"):
        return tensor


def held_out_kl(student, teacher, rows: Sequences, batch: int, device: torch.device) -> dict:
    """The hybrid's held-out KL(teacher || hybrid), perplexities and top-1 agreement: distill's own evaluation."""

    objective = DistillObjective(student, teacher, LossWeights(kl=1.0), align_layers=[])
    return evaluate(objective, rows, batch, _OneProcess(device))


def _evaluate(run: _Run, with_kl: bool) -> None:
    cfg = run.config
    rows = run.data.eval.rows(list(range(min(cfg.eval_sequences, len(run.data.eval)))))
    errors = held_out_relative_errors(run.models.student, run.models.target_teacher, run.models.layers, rows,
                                      cfg.batch, run.device, lambda: mixer_context(run.mixer_autocast, run.device))
    record = {"kind": "eval", "step": run.step, "relative_error": {str(k): v for k, v in errors.items()},
              "mean_relative_error": sum(errors.values()) / len(errors)}
    if with_kl and run.models.eval_teacher is not None:
        record.update(held_out_kl(run.models.student, run.models.eval_teacher, rows, cfg.batch, run.device))
    run.logs.write(record)
    logger.info("step %d: held-out relative error %.4f%s", run.step, record["mean_relative_error"],
                f", KL {record['eval_kl']:.4f}" if "eval_kl" in record else "")


def _save(run: _Run) -> None:
    trainable = {n: p for n, p in run.models.student.named_parameters() if p.requires_grad}
    save_checkpoint(run.out / "checkpoints", run.step, trainable, run.optimizer.state_dict(),
                    run.scheduler.state_dict(), [rng_state()], settings=run.settings,
                    data_position=run.step * run.config.batch, train_sequences=len(run.data.train),
                    keep=run.config.keep_checkpoints)


def save_student(run: _Run, dest: Path) -> Path:
    """A stock transformers checkpoint (loads with AutoModelForCausalLM, no rad), written atomically; its
    rad_conversion.json records the alignment, so `rad distill` treats the mixers as trained."""

    student, record, cfg = run.models.student, run.models.record, run.config
    with atomic_directory(dest, overwrite=True) as tmp:
        student.save_pretrained(tmp)
        write_loader_keys(tmp, student.config)
        run.models.tokenizer.save_pretrained(tmp)
        if record is not None:
            stage = {"stage": "align", "teacher": run.models.teacher_spec, "steps": cfg.total_steps,
                     "epochs": cfg.epochs, "data": cfg.data.spec or "default"}
            (tmp / CONVERSION_FILE).write_text(dataclasses.replace(record, distillation=stage).to_json())
    return dest


def _finish(run: _Run) -> AlignResult:
    cfg = run.config
    records = read_log(run.out / "log.jsonl")
    history = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    student_dir = save_student(run, run.out / "student")
    summary = AlignSummary(
        hybrid=cfg.hybrid, teacher=run.models.teacher_spec, layers=list(run.models.layers), steps=cfg.total_steps,
        epochs=cfg.epochs, tokens=sum(r["tokens"] for r in history), data=run.data.source,
        train_sequences=len(run.data.train), eval_sequences=min(cfg.eval_sequences, len(run.data.eval)),
        seq_len=cfg.data.seq_len, precision=run.precision, mixer_autocast=run.mixer_autocast,
        tokens_per_s=statistics.median(r["tokens_per_s"] for r in history) if history else None,
        first_eval=AlignEval.from_json(evals[0]) if evals else None,
        final_eval=AlignEval.from_json(evals[-1]) if evals else None,
        student=str(student_dir), settings=run.settings,
    )
    summary.save(run.out)
    return AlignResult(out=run.out, student_dir=student_dir, steps=run.step, history=history, evals=evals,
                       summary=summary)
