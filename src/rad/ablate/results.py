"""What an ablation records: each arm's result.json (`ArmResult`, its done marker) and ablate.json
(`AblateSummary`), with their JSON layouts; `rad ablate` writes them, its report and the benchmarks read them."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rad.distill.summary import EvalPoint
from rad.evaluate.runner import TaskScore
from rad.utils.artefacts import load_artefact
from rad.utils.atomic import atomic_write_json

RESULT_FILE = "ablate.json"
ARM_RESULT_FILE = "result.json"


def _scores_from_json(data: dict) -> dict[str, TaskScore]:
    return {task: TaskScore.from_json(score) for task, score in data.items()}


def _scores_to_json(scores: dict[str, TaskScore]) -> dict:
    return {task: {**asdict(score), "ci95": list(score.ci95)} for task, score in scores.items()}


@dataclass(frozen=True)
class ArmResult:
    """What an arm's result.json holds (its done marker): the held-out KL curve, sizes, task scores, timings,
    and the settings it was made with (an arm whose result was made with other settings is redone)."""

    name: str
    layer_set: str  # searched | uniform
    layers: list[int]
    init: str
    train: str
    lr: float
    trainable_parameters: int | None
    total_parameters: int | None
    data: str | None
    curve: list[EvalPoint]
    kl_at_init: float | None
    final_kl: float
    final_step: int
    scores: dict[str, TaskScore]
    timings: dict[str, float]
    folder: str
    settings: dict
    eval_settings: dict

    def to_json(self) -> dict:
        data = asdict(self)
        data["scores"] = _scores_to_json(self.scores)
        return data

    @classmethod
    def _fields_from_json(cls, data: dict) -> dict:
        names = {f.name for f in dataclasses.fields(cls)}
        data = {k: v for k, v in data.items() if k in names}
        data["curve"] = [EvalPoint.from_json(p) for p in data["curve"]]
        data["scores"] = _scores_from_json(data.get("scores") or {})
        return data

    @classmethod
    def from_json(cls, data: dict) -> ArmResult:
        return cls(**cls._fields_from_json(data))

    def save(self, folder: str | Path) -> Path:
        return atomic_write_json(Path(folder) / ARM_RESULT_FILE, self.to_json())

    @classmethod
    def load(cls, folder: str | Path) -> ArmResult:
        return load_artefact(
            Path(folder) / ARM_RESULT_FILE, cls.from_json, "a rad ablation arm result",
            f"delete it to redo the arm's record (its student is kept), or delete {folder} to redo the arm")


@dataclass(frozen=True)
class ArmSummary(ArmResult):
    """An arm in ablate.json: its result, the arm it coincides with, and how fast it reaches the baseline."""

    same_as: str | None = None
    steps_to_baseline_kl: int | None = None
    speedup: float | None = None
    reached_at_init: bool = False


@dataclass(frozen=True)
class AblateSummary:
    """What ablate.json holds; `config` is the resolved AblateConfig as saved (config.yaml has the same)."""

    model: str
    num_layers: int
    k: int
    layer_sets: dict[str, list[int]]
    searched_source: str
    layer_sets_coincide: bool
    baseline: str
    baseline_final_kl: float
    baseline_steps: int | None
    order: list[str]
    arms: dict[str, ArmSummary]
    teacher_scores: dict[str, TaskScore]
    statuses: dict[str, str]
    dropped_tasks: dict[str, str]
    timings: dict[str, float | None]
    command: str
    config: dict
    versions: dict

    def to_json(self) -> dict:
        data = asdict(self)
        data["arms"] = {name: arm.to_json() for name, arm in self.arms.items()}
        data["teacher_scores"] = _scores_to_json(self.teacher_scores)
        return data

    @classmethod
    def from_json(cls, data: dict) -> AblateSummary:
        data = dict(data)
        data["arms"] = {name: ArmSummary(**ArmSummary._fields_from_json(arm)) for name, arm in data["arms"].items()}
        data["teacher_scores"] = _scores_from_json(data.get("teacher_scores") or {})
        return cls(**data)

    def save(self, root: str | Path) -> Path:
        return atomic_write_json(Path(root) / RESULT_FILE, self.to_json())

    @classmethod
    def load(cls, root: str | Path) -> AblateSummary:
        return load_artefact(
            Path(root) / RESULT_FILE, cls.from_json, "a rad ablation summary",
            f"re-run `rad ablate --config {Path(root) / 'config.yaml'}` (finished arms are skipped)")


@dataclass
class AblateResult:
    """What `run_ablation` returns: where it wrote, and what became of each arm in this invocation."""

    out: Path
    report: Path
    summary: AblateSummary  # what ablate.json holds
    statuses: dict[str, str] = field(default_factory=dict)  # arm -> ran | resumed | skipped | same as <arm>
