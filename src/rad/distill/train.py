"""The distillation loop (`rad distill`): one process or many under `accelerate launch`.

Determinism is by construction: the rows of optimiser step s are a fixed function of (s, seed), every
rank computes the global token count of the step itself, and each micro-batch's loss is its token sum
divided by that count. So one process with gradient accumulation and N processes with the same global
batch optimise the same objective, and a resumed run needs only its step number to find its data.

`run_distill` reads top to bottom: `_setup` (models, data, optimiser), `_resume` (the newest checkpoint),
`_train` (the loop over `_train_step`, with held-out evaluation and checkpoints), `_finish` (the student).

Resume identity: every checkpoint records `resume_settings` (the init student's and the teacher's content
fingerprints, the tokenised data's content, and every setting that changes the trained weights or the
held-out curve); `--resume` under anything else is refused, naming each change. What may change on resume
(`ALLOWED_ON_RESUME`) is used from the resumed step on and recorded in config.json.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from rad.config import settings
from rad.data import SOURCES
from rad.distill.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from rad.distill.data import DataConfig, DistillData, Sequences, batch_indices, build_data
from rad.distill.loss import mean_metrics
from rad.distill.modules import (
    TRAIN_CHOICES,
    check_same_vocabulary,
    count_parameters,
    enable_gradient_checkpointing,
    replaced_attention_layers,
    select_trainable,
    share_frozen_weights,
)
from rad.distill.objective import DistillObjective, LossWeights
from rad.errors import RadError
from rad.models.convert import ConversionRecord
from rad.utils.artefacts import load_artefact
from rad.utils.atomic import atomic_directory, atomic_write_json, atomic_write_text
from rad.utils.identity import check_same_settings, model_fingerprint, tensor_sha256
from rad.utils.jsonl import read_log

logger = logging.getLogger(__name__)


# The distillation defaults, the one place `rad distill`, `rad run` and `rad ablate` take them from.
# Measured on SmolLM2-135M, uniform:8, 16 steps of 4 x 128 tokens (docs/distill.md): held-out KL
# 0.84 -> 0.30 at lr 3e-4 with 10% warm-up (KL + alignment), -> 0.42 at lr 1e-3 with 1% warm-up; training
# every parameter wants a smaller lr (2e-4: 2.89 vs 1e-4: 3.55 for the `mil` baseline).
DEFAULT_LR = {"mixers": 3e-4, "mixers+mlp": 3e-4, "all": 2e-4}
DEFAULT_WARMUP_RATIO = 0.1
# Layer-local alignment (MSE to the replaced attention's output) on top of KL, in self-distillation. It helped the
# earlier inits (gain 0: held-out KL 0.272 vs 0.294 after 32 steps; the paper's: 0.30 vs 0.47) and neither helps
# nor hurts from the `rad` init (0.287 both ways after 16 steps, docs/distill.md). A separate teacher has other
# layers, so there it defaults to 0.
DEFAULT_ALIGN_WEIGHT = 1.0
SUMMARY_FILE = "summary.json"
# DistillConfig fields a resume may change: where and how the run is done and watched, never what it trains.
# micro_batch and grad_accum may change as long as the global batch (micro x accum x processes) stays: the
# loss of a step is normalised by its global token count, so the step's gradient is the same.
ALLOWED_ON_RESUME = ("out", "eval_every", "eval_at", "save_every", "keep_checkpoints", "log_every", "resume",
                     "share_weights", "gradient_checkpointing", "device", "progress", "tensorboard", "plots",
                     "micro_batch", "grad_accum", "hybrid", "teacher")  # the models by content, not by path


def default_loss(self_distillation: bool) -> LossWeights:
    return LossWeights(align=DEFAULT_ALIGN_WEIGHT if self_distillation else 0.0)


def names_hybrid_source(hybrid: str, teacher: str | None) -> bool:
    """Whether `teacher` is the model the hybrid was converted from, as its rad_conversion.json names it (the same
    spec, or the same local folder): `--teacher SOURCE` is self-distillation and gets its defaults. Reads one small
    file; an unreadable hybrid is reported later, where it is loaded."""
    if teacher is None:
        return True
    try:
        record = ConversionRecord.load(Path(hybrid)) if hybrid and Path(hybrid).is_dir() else None
    except (RadError, OSError):
        return False
    if record is None:
        return False
    source = record.source_model
    if source == teacher:
        return True
    a, b = Path(source).expanduser(), Path(teacher).expanduser()
    return a.is_dir() and b.is_dir() and a.resolve() == b.resolve()


@dataclass
class DistillConfig:
    """Everything a distillation run needs; `rad distill` fills it from its flags, the orchestrators from
    `DistillSettings`. `lr=None` and `loss=None` take the defaults above for what trains and who teaches."""

    hybrid: str
    out: str
    teacher: str | None = None  # None: the hybrid's source model (self-distillation)
    train: str = "mixers"  # mixers | mixers+mlp | all
    steps: int = 1000
    data: DataConfig = field(default_factory=DataConfig)
    micro_batch: int = 4
    grad_accum: int = 1
    lr: float | None = None  # None: DEFAULT_LR[train]
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_ratio: float = DEFAULT_WARMUP_RATIO
    max_grad_norm: float = 1.0
    loss: LossWeights | None = None  # None: default_loss(self-distillation or not)
    eval_every: int = 100  # 0: no held-out evaluation
    # lr multiplier of the mixers' gated-norm gains (see _param_groups); None: the init's (INIT_DEFAULTS) for a
    # freshly converted hybrid, 1 for anything already trained
    mixer_norm_lr_scale: float | None = None
    eval_at: tuple[int, ...] = ()  # more steps to evaluate at (e.g. 1, 2, 4, 8: the start of a run on a log scale)
    eval_sequences: int = 64
    save_every: int = 100  # 0: no checkpoints (no resume), only the final student
    keep_checkpoints: int = 2
    log_every: int = 1
    resume: bool = False
    share_weights: bool = True  # self-distillation: the teacher points at the student's frozen tensors
    gradient_checkpointing: bool = False
    mixed_precision: str = "auto"  # auto (bf16 on CUDA), no, bf16, fp16
    device: str | None = None  # None: accelerate's choice; "cpu" forces CPU
    dtype: str | None = None  # student weights; None: float32 (AdamW wants float32 master weights)
    teacher_dtype: str | None = None  # a separate teacher; None: like the student
    seed: int = 0
    progress: bool = True
    tensorboard: bool = True
    plots: bool = True

    def __post_init__(self):
        if self.train not in TRAIN_CHOICES:
            raise RadError(f"Unknown trainable set {self.train!r}; choose one of {', '.join(TRAIN_CHOICES)}.")
        if self.lr is None:
            self.lr = DEFAULT_LR[self.train]
        if self.loss is None:
            self.loss = default_loss(self_distillation=names_hybrid_source(self.hybrid, self.teacher))
        positive = {"steps": self.steps, "micro_batch": self.micro_batch, "grad_accum": self.grad_accum,
                    "eval_every": self.eval_every, "eval_sequences": self.eval_sequences,
                    "save_every": self.save_every}
        for name, value in positive.items():
            lowest = 0 if name in ("save_every", "eval_every") else 1  # 0: no checkpoints / no held-out evaluation
            if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
                raise RadError(f"{name} must be a whole number of at least {lowest}, got {value!r}.")
        if not self.lr > 0 or self.lr != self.lr or self.lr == float("inf"):
            raise RadError(f"The learning rate must be a positive number, got {self.lr!r}.")
        scale = self.mixer_norm_lr_scale
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                                  or not scale > 0 or scale == float("inf")):
            raise RadError(f"mixer_norm_lr_scale must be a positive number, got {self.mixer_norm_lr_scale!r}.")
        if not 0 <= self.warmup_ratio < 1:
            raise RadError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}.")
        _check_optimiser_settings(self)


def _check_optimiser_settings(config: DistillConfig) -> None:
    """The rest of DistillConfig's numbers and names, so a bad one stops before any model loads."""
    from rad.utils.devices import resolve_device, resolve_dtype

    checks = {
        "weight_decay": (config.weight_decay, lambda v: v >= 0, "a number of at least 0"),
        "max_grad_norm": (config.max_grad_norm, lambda v: v > 0, "a positive number"),
        "min_lr_ratio": (config.min_lr_ratio, lambda v: 0 <= v <= 1, "between 0 and 1"),
    }
    for name, (value, ok, what) in checks.items():
        if not (isinstance(value, (int, float)) and math.isfinite(value) and ok(value)):
            raise RadError(f"{name} must be {what}, got {value!r}.")
    if len(config.betas) != 2 or not all(0 <= b < 1 for b in config.betas):
        raise RadError(f"betas must be two numbers in [0, 1), got {config.betas!r}.")
    for name in ("keep_checkpoints", "log_every"):
        value = getattr(config, name)
        lowest = 1 if name == "log_every" else 0
        if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
            raise RadError(f"{name} must be a whole number of at least {lowest}, got {value!r}.")
    if config.mixed_precision not in ("auto", "no", "bf16", "fp16"):
        raise RadError(f"Unknown mixed precision {config.mixed_precision!r}; use auto, no, bf16 or fp16.")
    device = resolve_device(config.device)
    for dtype in (config.dtype, config.teacher_dtype):
        resolve_dtype(dtype, device)


@settings
class DistillSettings:
    """The distillation settings an orchestrator (`rad run`, `rad ablate`) exposes in its YAML; every default
    is `DistillConfig`'s (and so `rad distill`'s). `stage_config` is the one translation into a run."""

    steps: int = DistillConfig.steps
    seq_len: int = DataConfig.seq_len
    micro_batch: int = DistillConfig.micro_batch
    grad_accum: int = DistillConfig.grad_accum
    # Per trainable set; a single number sets every one. Missing sets keep DEFAULT_LR.
    lr: dict[str, float] | float = field(default_factory=lambda: dict(DEFAULT_LR))
    warmup_ratio: float = DEFAULT_WARMUP_RATIO
    eval_every: int = DistillConfig.eval_every
    eval_sequences: int = DistillConfig.eval_sequences
    save_every: int = DistillConfig.save_every
    data: str | None = None  # None: GSM8K train where rad.data finds it, else Python's docs (noted)
    max_examples: int | None = None
    eval_examples: int | None = None  # held-out records; None: 2 %
    kl_weight: float = 1.0
    ce_weight: float = 0.0
    align_weight: float = DEFAULT_ALIGN_WEIGHT
    tensorboard: bool = DistillConfig.tensorboard

    def __post_init__(self):
        given = self.lr if isinstance(self.lr, dict) else {t: self.lr for t in TRAIN_CHOICES}
        unknown = sorted(set(given) - set(TRAIN_CHOICES))
        if unknown:
            raise RadError(f"Unknown trainable set {unknown[0]!r} in distill.lr; use {', '.join(TRAIN_CHOICES)}.")
        self.lr = {**DEFAULT_LR, **{k: float(v) for k, v in given.items()}}
        for key, value in self.lr.items():
            if not value > 0:
                raise RadError(f"distill.lr.{key} must be positive, got {value!r}.")
        for train in TRAIN_CHOICES:  # the stage's own checks, before any work
            self.stage_config("-", "-", train, seed=0, device=None)

    def stage_config(self, hybrid, out, train: str, *, seed: int, device: str | None,
                     sources: tuple[str, ...] = SOURCES, progress: bool = True, plots: bool = True) -> DistillConfig:
        """The `DistillConfig` of one student; resumes when `out` already exists."""
        return DistillConfig(
            hybrid=str(hybrid), out=str(out), train=train, steps=self.steps, lr=self.lr[train],
            micro_batch=self.micro_batch, grad_accum=self.grad_accum, warmup_ratio=self.warmup_ratio,
            eval_every=self.eval_every, eval_sequences=self.eval_sequences, save_every=self.save_every,
            seed=seed, device=device, resume=Path(out).exists(), progress=progress, plots=plots,
            tensorboard=self.tensorboard,
            data=DataConfig(spec=self.data, seq_len=self.seq_len, max_examples=self.max_examples,
                            eval_examples=self.eval_examples, seed=seed, sources=tuple(sources)),
            loss=LossWeights(kl=self.kl_weight, ce=self.ce_weight, align=self.align_weight),
        )


@dataclass(frozen=True)
class EvalPoint:
    """One held-out evaluation (a `kind: eval` line of log.jsonl)."""

    step: int
    eval_kl: float
    eval_ppl: float
    teacher_ppl: float
    eval_top1_agreement: float
    eval_tokens: int

    @classmethod
    def from_json(cls, data: dict) -> EvalPoint:
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)})


@dataclass(frozen=True)
class DistillSummary:
    """What summary.json holds: the run's settings, sizes, first and last losses and held-out evaluations."""

    hybrid: str
    teacher: str | None
    self_distillation: bool
    shared_teacher_bytes: int
    train: str
    trainable_parameters: int
    total_parameters: int
    steps: int
    data: str
    train_sequences: int
    eval_sequences: int
    seq_len: int
    first_loss: float | None
    final_loss: float | None
    first_eval: EvalPoint | None
    final_eval: EvalPoint | None
    student: str
    settings: dict = field(default_factory=dict)  # resume_settings: what determined the result

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> DistillSummary:
        data = {**data, "settings": data.get("settings") or {}}
        for key in ("first_eval", "final_eval"):
            data[key] = EvalPoint.from_json(data[key]) if data.get(key) is not None else None
        return cls(**data)

    def save(self, out: str | Path) -> Path:
        return atomic_write_json(Path(out) / SUMMARY_FILE, self.to_json())

    @classmethod
    def load(cls, out: str | Path) -> DistillSummary:
        """The summary of the finished run in `out`; a clear RadError when there is none or it is malformed."""
        return load_artefact(
            Path(out) / SUMMARY_FILE, cls.from_json, "a rad distillation summary",
            f"re-run `rad distill ... --out {out}` (add --resume to continue from its checkpoints)",
            missing=f"{out} has no {SUMMARY_FILE} (the distillation did not finish)")


@dataclass
class DistillResult:
    out: Path
    student_dir: Path | None
    steps: int
    history: list[dict]
    evals: list[dict]
    summary: DistillSummary | None  # None on the other processes of a multi-process run


def _accelerator(config: DistillConfig):
    """An `Accelerator` for `config.device` and `config.mixed_precision` (auto: bf16 on CUDA)."""
    from accelerate import Accelerator

    precision = config.mixed_precision
    cpu = config.device is not None and torch.device(config.device).type == "cpu"
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and not cpu else "no"
    return Accelerator(cpu=cpu, mixed_precision=precision)


def _same_model(a: str, b: str) -> bool:
    """Whether two model specs name the same checkpoint (the same folder once resolved)."""
    from rad.models.loading import resolve_to_folder

    if a == b:
        return True
    try:
        fa, fb = resolve_to_folder(a), resolve_to_folder(b)
    except RadError:
        return False
    return fa is not None and fb is not None and fa.resolve() == fb.resolve()


@dataclass
class Models:
    """The student, its teacher and what was learnt loading them."""

    student: torch.nn.Module
    teacher: torch.nn.Module
    tokenizer: object
    record: ConversionRecord | None
    self_distill: bool
    shared_bytes: int
    trainable: list[str]
    student_fingerprint: str  # the content of the hybrid it starts from (rad.utils.identity)
    teacher_fingerprint: str


def load_models(config: DistillConfig, device: torch.device) -> Models:
    """Student (the hybrid), its trainable set, and the teacher (sharing frozen weights when it can)."""
    from rad.models.convert import read_conversion_record
    from rad.models.loading import load_model

    student_loaded = load_model(config.hybrid, device=device, dtype=config.dtype or "float32")
    student = student_loaded.model
    if getattr(student.config, "model_type", None) != "bamba":
        raise RadError(f"{config.hybrid} is not a rad hybrid (Bamba) checkpoint; make one with `rad convert`.")
    record = read_conversion_record(student_loaded.path) if student_loaded.path else None
    source = record.source_model if record else None
    teacher_spec = config.teacher or source
    if teacher_spec is None:
        raise RadError(f"{config.hybrid} has no rad_conversion.json naming its source; pass --teacher MODEL.")
    self_distill = source is not None and _same_model(teacher_spec, source)
    trainable = select_trainable(student, config.train)
    n_train, n_total = count_parameters(student)
    logger.info("Training %s: %s of %s student parameters (%.2f%%)", config.train, f"{n_train:,}",
                f"{n_total:,}", 100 * n_train / max(n_total, 1))
    share = self_distill and config.share_weights
    teacher_dtype = student.dtype if share else (config.teacher_dtype or student.dtype)
    teacher_loaded = load_model(teacher_spec, device=device, dtype=teacher_dtype)
    teacher = teacher_loaded.model
    check_same_vocabulary(student_loaded.tokenizer, teacher_loaded.tokenizer,
                          student.get_output_embeddings().weight.shape[0],
                          teacher.get_output_embeddings().weight.shape[0])
    shared_bytes = 0
    if share:
        report = share_frozen_weights(teacher, student)
        shared_bytes = report.shared_bytes
        logger.info("Self-distillation: the teacher shares %d frozen tensors (%.1f MB) with the student and "
                    "owns %.1f MB", report.shared_tensors, report.shared_bytes / 1e6, report.own_bytes / 1e6)
    else:
        for p in teacher.parameters():
            p.requires_grad_(False)
        logger.info("Teacher %s%s (own copy of its weights)", teacher_spec, " (self)" if self_distill else "")
    teacher.eval()
    return Models(student, teacher, student_loaded.tokenizer, record, self_distill, shared_bytes, trainable,
                  model_fingerprint(student_loaded), model_fingerprint(teacher_loaded))


def cosine_lambda(total: int, warmup: int, min_ratio: float):
    """The learning-rate factor at each step: linear warm-up, then cosine decay to `min_ratio`."""

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return fn


def _to(rows: Sequences, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, loss_mask) of `rows` on `device`."""
    return rows.input_ids.to(device), rows.attention_mask.to(device), rows.loss_mask.to(device)


class _Logs:
    """JSONL + TensorBoard writers on the main process; no-ops elsewhere."""

    def __init__(self, out: Path, enabled: bool, tensorboard: bool, start_step: int):
        self.enabled = enabled
        self.path = out / "log.jsonl"
        self.tb = None
        if not enabled:
            return
        if self.path.exists():  # a resumed run keeps what it logged up to its checkpoint; a fresh one nothing
            records = read_log(self.path) if start_step else []  # a torn last line (killed mid-write) is dropped
            kept = [r for r in records if r.get("step", 0) <= start_step]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1 if start_step else None)
            except ImportError:
                logger.warning("tensorboard is not installed; writing JSONL logs only.")

    def write(self, record: dict) -> None:
        """Append `record` to log.jsonl, and its numbers to TensorBoard under `record['kind']`."""
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            prefix = record.get("kind", "train")
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "kind"):
                    self.tb.add_scalar(f"{prefix}/{k}", v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()

    def read(self) -> list[dict]:
        """Every record in log.jsonl (the main process's, read from any rank)."""
        return read_log(self.path)


@torch.no_grad()
def evaluate(objective, rows: Sequences, micro_batch: int, accelerator) -> dict:
    """Held-out KL to the teacher, student and teacher perplexity, top-1 agreement (summed over ranks)."""
    n = len(rows)
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = list(range(rank, n, world))
    sums = torch.zeros(5, dtype=torch.float64, device=accelerator.device)
    # The unwrapped module: DDP's forward syncs buffers, a collective ranks with unequal shares would hang on.
    objective = accelerator.unwrap_model(objective)
    was_training = objective.training
    objective.eval()
    for start in range(0, len(mine), micro_batch):
        ids, att, lm = _to(rows.rows(mine[start:start + micro_batch]), accelerator.device)
        with accelerator.autocast():
            terms = objective(ids, att, lm, labels=True)
        sums += torch.stack([terms["kl_sum"], terms["ce_sum"], terms["teacher_ce_sum"], terms["agree_sum"],
                             lm[:, 1:].sum().float()]).double()
    objective.train(was_training)
    sums = accelerator.reduce(sums, reduction="sum") if world > 1 else sums
    kl, ce, tce, agree, tokens = sums.tolist()
    m = mean_metrics(kl, ce, tce, agree, tokens)
    return {"eval_kl": m["kl"], "eval_ppl": m["perplexity"], "teacher_ppl": m["teacher_perplexity"],
            "eval_top1_agreement": m["top1_agreement"], "eval_tokens": int(max(tokens, 1.0))}


@dataclass
class _Run:
    """What the steps of one run share: made by `_setup`, moved on by `_train_step`."""

    config: DistillConfig
    accelerator: Any
    models: Models
    data: DistillData
    objective: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    params: list[torch.nn.Parameter]
    checkpoints: list[Path]  # on disk when the run started, oldest first
    settings: dict  # resume_settings: what a checkpoint of this run records and a resume must match
    step: int = 0  # optimiser steps done
    logs: _Logs | None = None
    started: float = 0.0  # time.perf_counter() when the loop began

    @property
    def out(self) -> Path:
        return Path(self.config.out)

    @property
    def ckpt_root(self) -> Path:
        return self.out / "checkpoints"

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def per_rank(self) -> int:
        return self.config.micro_batch * self.config.grad_accum

    @property
    def global_batch(self) -> int:
        return self.per_rank * self.world


def run_distill(config: DistillConfig, on_step: Callable[[int], None] | None = None) -> DistillResult:
    """Distil the hybrid in `config.hybrid` from its teacher; write checkpoints, logs and the final student.

    `on_step(step)` runs after each optimiser step, once that step's logs and checkpoint are written (the
    tests kill a run there); production leaves it None.
    """
    if config.steps < 1:
        raise RadError("--steps must be at least 1.")
    check_distill_out(config)
    accelerator = _accelerator(config)
    with _main_process_logs(accelerator.is_main_process):
        run = _setup(config, accelerator)
        _check_disk(run)
        _resume(run)
        _open_logs(run)
        _train(run, on_step)
        return _finish(run)


def _check_disk(run) -> None:
    """Before the first step: room for the checkpoints kept at once (trainable weights + AdamW's two moments, the
    newest two plus the one being written) and the final student."""
    from rad.outputs import check_free_space

    trainable = sum(p.numel() * p.element_size() for p in run.params)
    student = sum(p.numel() * p.element_size() for p in run.models.student.parameters())
    needed = 3 * 3 * trainable + student
    needed -= sum(f.stat().st_size for c in list_checkpoints(Path(run.config.out) / "checkpoints")
                  for f in c.iterdir())  # already on disk (a resumed run)
    check_free_space(run.config.out, max(0, needed), "This distillation")


def check_distill_out(config: DistillConfig) -> Path:
    """`config.out` is writable, apart from every input (the hybrid, its teacher, the data) and empty or an
    earlier `rad distill` output; leftovers of a killed checkpoint write there are removed."""
    from rad.outputs import DISTILL, check_output, input_location
    from rad.utils.atomic import remove_stale_temps

    inputs = [("hybrid", config.hybrid), ("teacher", config.teacher), ("data", config.data.spec)]
    hybrid = input_location(config.hybrid)
    if hybrid is not None and hybrid.is_dir():
        record = ConversionRecord.load(hybrid)
        if record is not None and config.teacher is None:
            inputs.append(("teacher (the hybrid's source)", record.source_model))
    out = check_output(config.out, DISTILL, inputs=inputs)
    for folder in (out, out / "checkpoints"):
        remove_stale_temps(folder)
    return out


@contextlib.contextmanager
def _main_process_logs(is_main: bool) -> Iterator[None]:
    """rad's info lines from the main process only: every rank loads the same models and data."""
    rad_logger = logging.getLogger("rad")
    level = rad_logger.level
    if not is_main:
        rad_logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        rad_logger.setLevel(level)


def _setup(config: DistillConfig, accelerator) -> _Run:
    """Check the output folder, seed, load models and data, build the objective, optimiser and schedule."""
    from accelerate.utils import set_seed

    checkpoints = list_checkpoints(Path(config.out) / "checkpoints")
    if checkpoints and not config.resume:
        raise RadError(f"{config.out} already holds checkpoints; pass --resume to continue or choose a new --out.")
    set_seed(config.seed)
    models = load_models(config, accelerator.device)
    config = dataclasses.replace(config, mixer_norm_lr_scale=resolve_norm_lr_scale(config, models.record))
    student, teacher = models.student, models.teacher
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(student)
    student.train()
    data = build_data(config.data, models.tokenizer)
    objective = DistillObjective(student, teacher, config.loss, replaced_attention_layers(teacher, student))
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(_param_groups(student, config), lr=config.lr, betas=config.betas,
                                  weight_decay=config.weight_decay)
    warmup = max(1, round(config.warmup_ratio * config.steps)) if config.warmup_ratio > 0 else 0
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_lambda(config.steps, warmup, config.min_lr_ratio))
    objective, optimizer = accelerator.prepare(objective, optimizer)
    teacher.to(accelerator.device)
    settings = resume_settings(config, models, data, accelerator)
    return _Run(config, accelerator, models, data, objective, optimizer, scheduler, params, checkpoints, settings)


def data_fingerprint(data: DistillData) -> str:
    """The content of the tokenised training and held-out rows: covers the data's source and content, the
    fields, tokenizer, seq_len, packing, masking, held-out split and its seed in one digest."""
    rows = (data.train, data.eval)
    return tensor_sha256(*(t for r in rows for t in (r.input_ids, r.attention_mask, r.loss_mask)))


def resume_settings(config: DistillConfig, models: Models, data: DistillData, accelerator) -> dict:
    """Everything that determines the trained weights and the held-out curve: what a resume must match."""
    return {
        "student": models.student_fingerprint,
        "teacher": models.teacher_fingerprint,
        "train": config.train,
        "steps": config.steps,  # the warm-up and cosine decay span the whole run
        "global_batch": config.micro_batch * config.grad_accum * accelerator.num_processes,
        "seed": config.seed,
        "data": {"seed": config.data.seed, "seq_len": config.data.seq_len, "content": data_fingerprint(data)},
        "optimizer": {"lr": config.lr, "min_lr_ratio": config.min_lr_ratio, "weight_decay": config.weight_decay,
                      "betas": list(config.betas), "warmup_ratio": config.warmup_ratio,
                      "max_grad_norm": config.max_grad_norm, "mixer_norm_lr_scale": config.mixer_norm_lr_scale},
        # `chunk` only splits the same sum into pieces.
        "loss": {k: v for k, v in asdict(config.loss).items() if k != "chunk"},
        "precision": {"mixed_precision": str(accelerator.mixed_precision), "student": str(models.student.dtype),
                      "teacher": str(models.teacher.dtype)},
        "eval_sequences": config.eval_sequences,  # the held-out curve's points must be comparable
    }


def resolve_norm_lr_scale(config: DistillConfig, record: ConversionRecord | None) -> float:
    """The gated-norm gains' lr multiplier: the user's, else the init's for a hybrid fresh from `rad convert`
    (its gains sit where the init put them), else 1 (a trained student, or a model rad did not convert)."""
    from rad.models.mamba_init import INIT_DEFAULTS

    if config.mixer_norm_lr_scale is not None:
        return float(config.mixer_norm_lr_scale)
    if record is None or record.distillation is not None or record.init not in INIT_DEFAULTS:
        return 1.0
    return INIT_DEFAULTS[record.init].norm_lr_scale


def _param_groups(student, config: DistillConfig) -> list[dict]:
    """The trainable weights; the gated-norm gains of the Mamba2 mixers at `mixer_norm_lr_scale` x lr.

    Adam moves every weight by about lr per step whatever its gradient, so a gain that starts at 0 (the
    `rad` init's zero) would need ~1/lr steps to reach its working size; a larger step for these few
    weights (one per channel) lets the new mixers grow in tens of steps, still from exactly zero."""
    norms, rest = [], []
    for name, p in student.named_parameters():
        if p.requires_grad:
            (norms if ".mamba.norm." in name else rest).append(p)
    if config.mixer_norm_lr_scale == 1.0 or not norms:
        return [{"params": norms + rest}]
    return [{"params": rest}, {"params": norms, "lr": config.lr * config.mixer_norm_lr_scale}]


def _resume(run: _Run) -> None:
    """Continue from the newest checkpoint, if any: trainable weights, optimiser, schedule, RNG and step."""
    if not run.checkpoints:
        return
    latest = run.checkpoints[-1]
    ckpt = load_checkpoint(latest, run.accelerator.device)
    check_same_settings(ckpt.state.settings, run.settings, what=f"The checkpoint {latest}",
                        advice="resume with the same settings, or choose a new --out to train with these")
    named = dict(run.accelerator.unwrap_model(run.objective).student.named_parameters())
    with torch.no_grad():
        for name, value in ckpt.weights.items():
            if name not in named:
                raise RadError(f"Checkpoint {latest} holds {name}, which the student lacks; wrong --out?")
            named[name].copy_(value)
    run.optimizer.load_state_dict(ckpt.optimizer)
    run.scheduler.load_state_dict(ckpt.scheduler)
    set_rng_state(ckpt.rng[run.accelerator.process_index])
    run.step = ckpt.state.step
    logger.info("Resumed from %s (step %d of %d)", latest, run.step, run.config.steps)


def _open_logs(run: _Run) -> None:
    """config.json, and the log cut back to the step the run starts from."""
    is_main = run.accelerator.is_main_process
    if is_main:
        atomic_write_json(run.out / "config.json", asdict(run.config), default=str)
    run.logs = _Logs(run.out, is_main, run.config.tensorboard, run.step)


def _train(run: _Run, on_step: Callable[[int], None] | None) -> None:
    """The loop: held-out metrics at step 0, then step, log, evaluate and save until `config.steps`."""
    from tqdm.auto import tqdm

    cfg = run.config
    show = run.accelerator.is_main_process and cfg.progress
    with tqdm(total=cfg.steps, initial=run.step, disable=not show, desc="distill", dynamic_ncols=True) as bar:
        run.started = time.perf_counter()
        if run.step == 0 and (cfg.eval_every or 0 in cfg.eval_at):
            _evaluate(run)
        while run.step < cfg.steps:
            record = _train_step(run)
            step, last = run.step, run.step == cfg.steps
            if step % cfg.log_every == 0 or last:
                run.logs.write(record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            if (cfg.eval_every and (step % cfg.eval_every == 0 or last)) or step in cfg.eval_at:
                _evaluate(run)
            if cfg.save_every and (step % cfg.save_every == 0 or last):
                _save(run)
            if on_step is not None:
                on_step(step)


def _train_step(run: _Run) -> dict:
    """One optimiser step on global batch number `run.step`; returns its log record."""
    cfg, accelerator = run.config, run.accelerator
    started = time.perf_counter()
    idx = batch_indices(run.step, run.global_batch, len(run.data.train), cfg.data.seed)
    total_tokens = float(run.data.train.loss_mask[idx][:, 1:].sum().clamp_min(1))
    rank = accelerator.process_index
    sums = _accumulate_gradients(run, idx[rank * run.per_rank:(rank + 1) * run.per_rank], total_tokens)
    loss, kl, ce, align = (sums / total_tokens).tolist()
    _stop_unless_finite(loss, run.step + 1, run.ckpt_root)
    grad_norm = accelerator.clip_grad_norm_(run.params, cfg.max_grad_norm)
    lr = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    seconds = time.perf_counter() - started
    return {"kind": "train", "step": run.step, "loss": loss, "kl": kl, "ce": ce, "align": align, "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "tokens": int(total_tokens), "tokens_per_s": total_tokens / max(seconds, 1e-9),
            "elapsed_s": time.perf_counter() - run.started}


def _accumulate_gradients(run: _Run, mine: list[int], total_tokens: float) -> torch.Tensor:
    """Forward and backward over this rank's rows `mine`; the (loss, KL, CE, align) sums of all ranks.

    Each micro-batch's loss is its token sum over the step's global token count, times the world size
    that DDP's gradient averaging divides out again: the step's gradient is the one big batch's.
    """
    cfg, accelerator = run.config, run.accelerator
    sums = torch.zeros(4, dtype=torch.float64, device=accelerator.device)
    for j in range(cfg.grad_accum):
        rows = run.data.train.rows(mine[j * cfg.micro_batch:(j + 1) * cfg.micro_batch])
        ids, att, lm = _to(rows, accelerator.device)
        last = j == cfg.grad_accum - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(run.objective):
            with accelerator.autocast():
                terms = run.objective(ids, att, lm)
            accelerator.backward(terms["loss_sum"] * (run.world / total_tokens))
        sums += torch.stack([terms["loss_sum"], terms["kl_sum"], terms["ce_sum"], terms["align_sum"]]
                            ).detach().double()
    return accelerator.reduce(sums, reduction="sum") if run.world > 1 else sums


def _stop_unless_finite(loss: float, step: int, ckpt_root: Path) -> None:
    """A NaN or infinite loss stops the run before the optimiser applies it, naming the last good checkpoint."""
    if math.isfinite(loss):
        return
    good = list_checkpoints(ckpt_root)
    where = f"the last good checkpoint is {good[-1]}" if good else "no checkpoint was written yet"
    raise RadError(f"The loss became {loss} at step {step}; stopped ({where}). Lower --lr or check the data.")


def _evaluate(run: _Run) -> None:
    """Held-out metrics of the first `eval_sequences` held-out rows, logged at the current step."""
    cfg = run.config
    rows = run.data.eval.rows(list(range(min(cfg.eval_sequences, len(run.data.eval)))))
    metrics = evaluate(run.objective, rows, cfg.micro_batch, run.accelerator)
    run.logs.write({"kind": "eval", "step": run.step, **metrics})
    logger.debug("step %d: %s", run.step, metrics)


def _finish(run: _Run) -> DistillResult:
    """Close the logs; the main process writes the final student, summary.json and the curves."""
    accelerator, cfg = run.accelerator, run.config
    run.logs.close()
    accelerator.wait_for_everyone()
    records = run.logs.read()
    history = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    summary = None
    student_dir = None
    if accelerator.is_main_process:
        student = accelerator.unwrap_model(run.objective).student
        student_dir = save_student(student, run.models.tokenizer, run.out / "student", run.models.record, cfg)
        summary = _summary(cfg, run, history, evals, student_dir)
        summary.save(run.out)
        if cfg.plots:
            from rad.distill.report import plot_curves

            plot_curves(history, evals, run.out)
    accelerator.wait_for_everyone()
    return DistillResult(out=run.out, student_dir=student_dir, steps=run.step, history=history, evals=evals,
                         summary=summary)


def _save(run: _Run) -> None:
    """A checkpoint of the current step: every rank hands over its RNG state, the main process writes it."""
    accelerator, cfg = run.accelerator, run.config
    states = [rng_state()]
    if run.world > 1:
        from accelerate.utils import gather_object

        states = gather_object(states)
    if accelerator.is_main_process:
        student = accelerator.unwrap_model(run.objective).student
        trainable = {n: p for n, p in student.named_parameters() if p.requires_grad}
        save_checkpoint(run.ckpt_root, run.step, trainable, run.optimizer.state_dict(), run.scheduler.state_dict(),
                        states, settings=run.settings, data_position=run.step * run.global_batch,
                        train_sequences=len(run.data.train), keep=cfg.keep_checkpoints)
    accelerator.wait_for_everyone()


def save_student(student, tokenizer, dest: Path, record: ConversionRecord | None, config: DistillConfig) -> Path:
    """A stock transformers checkpoint (loads with AutoModelForCausalLM, no rad), written atomically."""
    from rad.models.convert import CONVERSION_FILE, write_loader_keys

    with atomic_directory(dest, overwrite=True) as tmp:
        student.save_pretrained(tmp)
        write_loader_keys(tmp, student.config)  # else transformers 4.x and vLLM read rope_theta 10000
        tokenizer.save_pretrained(tmp)
        if record is not None:
            distillation = {"teacher": config.teacher or record.source_model, "train": config.train,
                            "steps": config.steps, "data": config.data.spec or "default"}
            (tmp / CONVERSION_FILE).write_text(dataclasses.replace(record, distillation=distillation).to_json())
    return dest


def _summary(config: DistillConfig, run: _Run, history, evals, student_dir) -> DistillSummary:
    """What summary.json holds: the run's settings, sizes and first and last losses and evaluations."""
    models, data = run.models, run.data
    n_train, n_total = count_parameters(models.student)
    return DistillSummary(
        hybrid=config.hybrid, teacher=config.teacher or (models.record.source_model if models.record else None),
        self_distillation=models.self_distill, shared_teacher_bytes=models.shared_bytes,
        train=config.train, trainable_parameters=n_train, total_parameters=n_total,
        steps=config.steps, data=data.source, train_sequences=len(data.train),
        eval_sequences=len(data.eval), seq_len=config.data.seq_len,
        first_loss=history[0]["loss"] if history else None, final_loss=history[-1]["loss"] if history else None,
        first_eval=EvalPoint.from_json(evals[0]) if evals else None,
        final_eval=EvalPoint.from_json(evals[-1]) if evals else None,
        student=str(student_dir), settings=run.settings,
    )
