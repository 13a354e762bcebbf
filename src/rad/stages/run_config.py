"""The settings and folder layout of one RAD run, what `rad run` is and each k of `rad sweep` is.

A run folder is only continued under the settings it was made with (`config.yaml`; `ALLOWED_ON_RESUME` may
change): a skipped stage must not stand for other settings.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field
from pathlib import Path

import yaml

from rad.align.config import AlignSettings
from rad.config import read_yaml, settings, to_yaml
from rad.distill.config import DistillSettings
from rad.evaluate.runner import EvalSettings
from rad.search.config import SearchSettings
from rad.stages.settings import check_run_settings
from rad.utils.identity import check_same_settings

RAD_TRAIN, BASELINE_TRAIN = "mixers", "all"  # what each student trains (RAD's targeted set; MambaInLlama's)
CONFIG_FILE = "config.yaml"
# RunConfig settings a continued run may change: they do not change what a finished stage stands for (the
# evaluation checks its own per-item identity, the speed table is re-measured for other contexts).
ALLOWED_ON_RESUME = ("out", "device", "eval", "speed_contexts", "distill.tensorboard", "distill.save_every",
                     "distill.keep_checkpoints", "distill.eval_every")


@settings
class RunConfig:
    """One RAD run; the presets and `--config` YAML fill it, `--set a.b=c` overrides single fields. Each
    stage's group is that stage's own settings class, with that stage's defaults."""

    model: str = "smollm2-135m"
    out: str = "runs/rad"
    seed: int = 0
    device: str | None = None
    search: SearchSettings = field(default_factory=SearchSettings)
    # The layer-local stage before the RAD student's KD (RAD_METHOD §3, beyond the paper): None keeps the paper's
    # KD-only recipe; `align: {}` (or any of its settings) aligns the RAD hybrid's mixers first. The baseline keeps
    # MambaInLlama's recipe (KD only) either way.
    align: AlignSettings | None = None
    distill: DistillSettings = field(default_factory=DistillSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    speed_contexts: list[int] = field(default_factory=lambda: [256, 1024])

    def __post_init__(self):
        check_run_settings(self)


@dataclasses.dataclass
class RunPaths:
    """Where each stage of a run writes, under the run folder."""

    root: Path

    @property
    def search(self) -> Path:
        return self.root / "search"

    @property
    def rad_hybrid(self) -> Path:
        return self.root / "convert" / "rad"

    @property
    def baseline_hybrid(self) -> Path:
        return self.root / "convert" / "baseline"

    @property
    def rad_align(self) -> Path:
        return self.root / "align" / "rad"

    @property
    def rad_distill(self) -> Path:
        return self.root / "distill" / "rad"

    @property
    def baseline_distill(self) -> Path:
        return self.root / "distill" / "baseline"

    @property
    def eval(self) -> Path:
        return self.root / "eval"


def _without(data: dict, dotted: tuple[str, ...]) -> dict:
    """`data` without the dotted keys (`eval`, `distill.save_every`)."""
    data = dict(data)
    for name in dotted:
        head, _, rest = name.partition(".")
        if rest and isinstance(data.get(head), dict):
            data[head] = _without(data[head], (rest,))
        elif not rest:
            data.pop(head, None)
    return data


def check_same_run(config: RunConfig, paths: RunPaths) -> None:
    """Refuse to continue a run folder whose stages were made with other settings (its config.yaml), before
    any work: a finished stage is skipped, so it would silently stand for the old settings."""
    saved_path = paths.root / CONFIG_FILE
    if not saved_path.is_file() or not paths.search.exists():  # no stage has started there
        return
    saved = _without(read_yaml(saved_path, "saved run configuration"), ALLOWED_ON_RESUME)
    current = _without(yaml.safe_load(to_yaml(config)), ALLOWED_ON_RESUME)
    check_same_settings(saved, current, what=f"The run in {paths.root}",
                        advice="run with the same settings to continue it, or choose another --out for these")
