"""`rad align`'s settings: `AlignConfig` (one run), `AlignSettings` (what an orchestrator's YAML exposes), the
defaults both take, what a resume may change, and every refusal that needs no model (`check_before_loading`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from rad.align.cache import cache_bytes, check_cache_folder
from rad.align.precision import check_precision
from rad.config import check_seed, settings
from rad.data import SOURCES
from rad.distill.checkpoint import list_checkpoints
from rad.distill.data import DataConfig
from rad.errors import RadError
from rad.models.convert import HYBRID_MODEL_TYPE, ConversionRecord
from rad.models.loading import resolve_to_folder
from rad.outputs import ALIGN, check_output
from rad.utils.atomic import remove_stale_temps
from rad.utils.devices import resolve_device

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
        check_seed(self.seed)
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
    keep_checkpoints: int = AlignConfig.keep_checkpoints  # 0: keep every one
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
            save_every=self.save_every, keep_checkpoints=self.keep_checkpoints, cache=self.cache, seed=seed,
            device=device, resume=Path(out).exists(), progress=progress, tensorboard=self.tensorboard,
            data=DataConfig(spec=self.data, seq_len=self.seq_len, max_examples=self.max_examples,
                            eval_examples=self.eval_examples, seed=seed, sources=tuple(sources)),
        )


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
        positions = hybrid_cfg.get("max_position_embeddings")
        if isinstance(positions, int) and config.data.seq_len > positions:
            raise RadError(f"--seq-len {config.data.seq_len} is longer than the hybrid's {positions} positions; use "
                           f"at most {positions}.")
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
    compare_shapes(teacher, cfg.get("hidden_size"), cfg.get("num_hidden_layers"), hidden, num_layers)


def compare_shapes(teacher: str, t_hidden, t_layers, hidden, num_layers) -> None:
    if t_hidden != hidden or t_layers != num_layers:
        raise RadError(f"The teacher {teacher} has hidden size {t_hidden} and {t_layers} layers, the hybrid "
                       f"{hidden} and {num_layers}; alignment needs the model the hybrid was converted from (or one "
                       "of the same shape).")
