"""What a distillation run is: its settings (`DistillConfig`, the orchestrators' `DistillSettings`), their
defaults, and its resume identity (what a checkpoint records and a resume must match: `models.resume_settings` builds it).

Field types say what each number may be (`PositiveInt`, `Fraction`, ...); `check_fields` validates them
with pydantic when a config is made in Python, and `rad.config.build` when it comes from YAML, so the
hand-written checks left are the rules that join fields.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

from annotated_types import Ge, Gt, Le, Lt
from pydantic import AllowInfNan, TypeAdapter, ValidationError

from rad.config import check_seed, settings
from rad.data import SOURCES
from rad.distill.data import DataConfig, DistillData
from rad.distill.modules import TRAIN_CHOICES
from rad.distill.objective import LossWeights
from rad.errors import RadError
from rad.models.convert import ConversionRecord
from rad.models.mixers import INITS, init_defaults
from rad.utils.devices import resolve_device, resolve_dtype
from rad.utils.identity import tensor_sha256
from rad.utils.precision import PRECISIONS


class Says(str):
    """What a constrained field must be, in words: the end of its one-sentence error."""


PositiveInt = Annotated[int, Gt(0), Says("a whole number of at least 1")]
NonNegativeInt = Annotated[int, Ge(0), Says("a whole number of at least 0")]
PositiveFloat = Annotated[float, Gt(0), AllowInfNan(False), Says("a positive number")]
NonNegativeFloat = Annotated[float, Ge(0), AllowInfNan(False), Says("a number of at least 0")]
Fraction = Annotated[float, Ge(0), Le(1), Says("between 0 and 1")]
Ratio = Annotated[float, Ge(0), Lt(1), Says("in [0, 1)")]
Beta = Annotated[float, Ge(0), Lt(1), Says("two numbers in [0, 1)")]
TrainSet = Literal[TRAIN_CHOICES]
Precision = Literal[PRECISIONS]
# How a field is named in its error, where the field's name alone would not say it.
LABELS = {"lr": "The learning rate"}


@functools.cache
def _adapters(cls) -> dict[str, TypeAdapter]:
    """A validator per constrained field of the dataclass `cls` (the others are taken as given)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    return {f.name: TypeAdapter(hints[f.name]) for f in dataclasses.fields(cls) if _says(hints[f.name])}


def _says(hint) -> str | None:
    """The words of `hint`'s constraint (its Says, or a Literal's choices), searched through unions."""
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(hint)))
    for arg in getattr(hint, "__metadata__", ()):
        if isinstance(arg, Says):
            return str(arg)
    for arg in typing.get_args(hint):
        if (words := _says(arg)) is not None:
            return words
    return None


def check_fields(obj, *, strict: bool) -> None:
    """Every field of the dataclass `obj` against its type; the first bad one becomes one RadError sentence.

    `strict`: no conversions (the Python API: True is not 1, "3" is not 3)."""
    hints = typing.get_type_hints(type(obj), include_extras=True)
    for name, adapter in _adapters(type(obj)).items():
        value = getattr(obj, name)
        try:
            adapter.validate_python(value, strict=strict)
        except ValidationError as err:
            first = err.errors()[0]["msg"]
            what = _says(hints[name]) or first[:1].lower() + first[1:]
            raise RadError(f"{LABELS.get(name, name)} must be {what}, got {value!r}.") from None

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
    train: TrainSet = "mixers"
    steps: PositiveInt = 1000
    data: DataConfig = field(default_factory=DataConfig)
    micro_batch: PositiveInt = 4
    grad_accum: PositiveInt = 1
    lr: PositiveFloat | None = None  # None: DEFAULT_LR[train]
    min_lr_ratio: Fraction = 0.0
    weight_decay: NonNegativeFloat = 0.0
    betas: tuple[Beta, Beta] = (0.9, 0.98)
    warmup_ratio: Ratio = DEFAULT_WARMUP_RATIO
    max_grad_norm: PositiveFloat = 1.0
    loss: LossWeights | None = None  # None: default_loss(self-distillation or not)
    eval_every: NonNegativeInt = 100  # 0: no held-out evaluation
    # lr multiplier of the mixers' gated-norm gains (see _param_groups); None: the init's (INIT_DEFAULTS) for a
    # freshly converted hybrid, 1 for anything already trained
    mixer_norm_lr_scale: PositiveFloat | None = None
    eval_at: tuple[int, ...] = ()  # more steps to evaluate at (e.g. 1, 2, 4, 8: the start of a run on a log scale)
    eval_sequences: PositiveInt = 64
    save_every: NonNegativeInt = 100  # 0: no checkpoints (no resume), only the final student
    keep_checkpoints: NonNegativeInt = 2
    log_every: PositiveInt = 1
    resume: bool = False
    share_weights: bool = True  # self-distillation: the teacher points at the student's frozen tensors
    gradient_checkpointing: bool = False
    # auto: bf16 compute where the device multiplies bf16 fast (rad.utils.precision), else fp32
    precision: Precision = "auto"
    device: str | None = None  # None: accelerate's choice; "cpu" forces CPU
    dtype: str | None = None  # student weights; None: float32 (AdamW wants float32 master weights)
    teacher_dtype: str | None = None  # a separate teacher; None: like the student
    seed: int = 0
    progress: bool = True
    tensorboard: bool = True
    plots: bool = True

    def __post_init__(self):
        check_seed(self.seed)
        if self.lr is None and self.train in TRAIN_CHOICES:
            self.lr = DEFAULT_LR[self.train]
        if isinstance(self.betas, list):  # from JSON
            self.betas = tuple(self.betas)
        check_fields(self, strict=True)
        if self.loss is None:
            self.loss = default_loss(self_distillation=names_hybrid_source(self.hybrid, self.teacher))

        device = resolve_device(self.device)  # a bad device or dtype stops before any model loads
        for dtype in (self.dtype, self.teacher_dtype):
            resolve_dtype(dtype, device)


@settings
class DistillSettings:
    """The distillation settings an orchestrator (`rad run`, `rad ablate`) exposes in its YAML; every default
    is `DistillConfig`'s (and so `rad distill`'s). `stage_config` is the one translation into a run."""

    steps: PositiveInt = DistillConfig.steps
    seq_len: int = DataConfig.seq_len
    micro_batch: PositiveInt = DistillConfig.micro_batch
    grad_accum: PositiveInt = DistillConfig.grad_accum
    # Per trainable set; a single number sets every one. Missing sets keep DEFAULT_LR.
    lr: dict[str, float] | float = field(default_factory=lambda: dict(DEFAULT_LR))
    warmup_ratio: Ratio = DEFAULT_WARMUP_RATIO
    eval_every: NonNegativeInt = DistillConfig.eval_every
    eval_sequences: PositiveInt = DistillConfig.eval_sequences
    save_every: NonNegativeInt = DistillConfig.save_every
    keep_checkpoints: NonNegativeInt = DistillConfig.keep_checkpoints  # 0: keep every one
    data: str | None = None  # None: GSM8K train where rad.data finds it, else Python's docs (noted)
    max_examples: int | None = None
    eval_examples: int | None = None  # held-out records; None: 2 %
    kl_weight: float = 1.0
    ce_weight: float = 0.0
    align_weight: float = DEFAULT_ALIGN_WEIGHT
    tensorboard: bool = DistillConfig.tensorboard
    precision: Precision = DistillConfig.precision

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
            keep_checkpoints=self.keep_checkpoints, seed=seed, device=device, resume=Path(out).exists(),
            progress=progress, plots=plots, tensorboard=self.tensorboard, precision=self.precision,
            data=DataConfig(spec=self.data, seq_len=self.seq_len, max_examples=self.max_examples,
                            eval_examples=self.eval_examples, seed=seed, sources=tuple(sources)),
            loss=LossWeights(kl=self.kl_weight, ce=self.ce_weight, align=self.align_weight),
        )


def data_fingerprint(data: DistillData) -> str:
    """The content of the tokenised training and held-out rows: covers the data's source and content, the
    fields, tokenizer, seq_len, packing, masking, held-out split and its seed in one digest."""
    rows = (data.train, data.eval)
    return tensor_sha256(*(t for r in rows for t in (r.input_ids, r.attention_mask, r.loss_mask)))


def resolve_norm_lr_scale(config: DistillConfig, record: ConversionRecord | None) -> float:
    """The gated-norm gains' lr multiplier: the user's, else the init's for a hybrid fresh from `rad convert`
    (its gains sit where the init put them), else 1 (a trained student, or a model rad did not convert)."""
    if config.mixer_norm_lr_scale is not None:
        return float(config.mixer_norm_lr_scale)
    if record is None or record.distillation is not None or record.init not in INITS:
        return 1.0
    return init_defaults(record.init).norm_lr_scale
