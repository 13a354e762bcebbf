"""What a distillation run leaves behind: log.jsonl (and TensorBoard), summary.json, the final student.

`DistillSummary` is the file other stages read (`rad run`, `rad ablate`); `DistillResult` is what
`run_distill` returns to a caller in the same process.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from rad.distill.modules import count_parameters
from rad.models.convert import CONVERSION_FILE, ConversionRecord, write_loader_keys
from rad.utils.artefacts import load_artefact
from rad.utils.atomic import atomic_directory, atomic_write_json, atomic_write_text
from rad.utils.jsonl import read_log

if TYPE_CHECKING:
    from rad.distill.config import DistillConfig
    from rad.distill.data import DistillData
    from rad.distill.models import Models

logger = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"


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


class Logs:
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
        """Append `record` to log.jsonl, and its numbers to TensorBoard under `record['kind']` (a nested dict's
        as `kind/key/inner`, e.g. align's per-layer `train/relative_error/3`)."""
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            prefix = record.get("kind", "train")
            for k, v in _flat_numbers(record).items():
                self.tb.add_scalar(f"{prefix}/{k}", v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()

    def read(self) -> list[dict]:
        """Every record in log.jsonl (the main process's, read from any rank)."""
        return read_log(self.path)


def _flat_numbers(record: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of a log record by their TensorBoard name (nested dicts as `key/inner`); not step, kind, bools."""
    out = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(_flat_numbers(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("step", "kind"):
            out[f"{prefix}{key}"] = value
    return out


def save_student(student, tokenizer, dest: Path, record: ConversionRecord | None, config: DistillConfig) -> Path:
    """A stock transformers checkpoint (loads with AutoModelForCausalLM, no rad), written atomically."""
    distillation = None
    if record is not None:
        distillation = {"teacher": config.teacher or record.source_model, "train": config.train,
                        "steps": config.steps, "data": config.data.spec or "default"}
    return write_student(student, tokenizer, dest, record, distillation)


def write_student(student, tokenizer, dest: Path, record: ConversionRecord | None, distillation: dict | None) -> Path:
    """The student and its tokenizer in `dest`, atomically; with a conversion record, its rad_conversion.json too,
    `distillation` saying what trained it (`rad distill` here, `rad align` in rad.align.summary)."""
    with atomic_directory(dest, overwrite=True) as tmp:
        student.save_pretrained(tmp)
        write_loader_keys(tmp, student.config)  # else transformers 4.x and vLLM read rope_theta 10000
        tokenizer.save_pretrained(tmp)
        if record is not None:
            (tmp / CONVERSION_FILE).write_text(dataclasses.replace(record, distillation=distillation).to_json())
    return dest


def build_summary(config: DistillConfig, models: Models, data: DistillData, settings: dict, history: list[dict],
                  evals: list[dict], student_dir) -> DistillSummary:
    """What summary.json holds: the run's settings, sizes and first and last losses and evaluations."""
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
        student=str(student_dir), settings=settings,
    )
