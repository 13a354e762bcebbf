"""What an alignment run leaves behind besides its checkpoints and log.jsonl: summary.json (`AlignSummary`, with
the first and last held-out evaluations, `AlignEval`) and OUT/student (`save_student`). `AlignResult` is what
`run_align` returns to a caller in the same process."""

from __future__ import annotations

import dataclasses
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rad.align.config import AlignConfig
from rad.align.models import AlignModels
from rad.distill.data import DistillData
from rad.distill.summary import write_student
from rad.utils.artefacts import load_artefact
from rad.utils.atomic import atomic_write_json

SUMMARY_FILE = "summary.json"


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
    """What `run_align` returns: where it wrote, the steps done, the log's train and eval records, the summary."""

    out: Path
    student_dir: Path
    steps: int
    history: list[dict]
    evals: list[dict]
    summary: AlignSummary


def save_student(models: AlignModels, config: AlignConfig, dest: Path) -> Path:
    """A stock transformers checkpoint (loads with AutoModelForCausalLM, no rad), written atomically; its
    rad_conversion.json records the alignment, so `rad distill` treats the mixers as trained."""

    stage = {"stage": "align", "teacher": models.teacher_spec, "steps": config.total_steps,
             "epochs": config.epochs, "data": config.data.spec or "default"}
    return write_student(models.student, models.tokenizer, dest, models.record, stage)


def build_summary(config: AlignConfig, models: AlignModels, data: DistillData, precision: str, mixer_autocast: bool,
                  settings: dict, history: list[dict], evals: list[dict], student_dir: Path) -> AlignSummary:
    """What summary.json holds: what was aligned from what, the tokens and speed, the first and last evaluations."""
    return AlignSummary(
        hybrid=config.hybrid, teacher=models.teacher_spec, layers=list(models.layers), steps=config.total_steps,
        epochs=config.epochs, tokens=sum(r["tokens"] for r in history), data=data.source,
        train_sequences=len(data.train), eval_sequences=min(config.eval_sequences, len(data.eval)),
        seq_len=config.data.seq_len, precision=precision, mixer_autocast=mixer_autocast,
        tokens_per_s=statistics.median(r["tokens_per_s"] for r in history) if history else None,
        first_eval=AlignEval.from_json(evals[0]) if evals else None,
        final_eval=AlignEval.from_json(evals[-1]) if evals else None,
        student=str(student_dir), settings=settings,
    )
