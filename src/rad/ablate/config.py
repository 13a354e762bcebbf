"""The settings of `rad ablate`: one teacher, one data set, one seed, several arms.

An arm is (layer set, init, trainable set[, aligned]): `searched` or `uniform` layers, `rad` or `mil` init,
`mixers` or `all` parameters trained, and optionally `rad align` before its KD (an `-aligned` arm, with the
`align` settings). Every arm shares the `distill` settings, so the arms differ only in what the arm says; the
baseline arm (uniform, mil, all: MambaInLlama's recipe) sets the KL target the others race to.
"""

from __future__ import annotations

from dataclasses import field

from rad.align.config import AlignSettings
from rad.config import load_settings, preset_file, settings
from rad.distill.config import DistillSettings
from rad.distill.modules import TRAIN_CHOICES as TRAIN_SETS
from rad.errors import RadError
from rad.evaluate.runner import EvalSettings
from rad.models.mixers import INITS as INIT_CHOICES
from rad.search.config import SearchSettings
from rad.stages.settings import check_run_settings

LAYER_SETS = ("searched", "uniform")
ALIGNED = "-aligned"  # the suffix of an arm that runs `rad align` before its KD


@settings(frozen=True)
class Arm:
    layers: str  # searched | uniform
    init: str  # rad | rad-zero-in-proj | mil | random
    train: str  # mixers | mixers+mlp | all
    aligned: bool = False  # rad align (the ablation's `align` settings) before the KD

    @property
    def name(self) -> str:
        return f"{self.layers}-{self.init}-{self.train}{ALIGNED if self.aligned else ''}"

    @classmethod
    def parse(cls, name: str) -> Arm:
        """`searched-rad-zero-in-proj-mixers` -> Arm: the layer set first, the trainable set last, the init between
        (an init name may hold dashes; layer and trainable set names hold none); `...-mixers-aligned` aligns first."""
        aligned = str(name).endswith(ALIGNED)
        layers, _, rest = str(name).removesuffix(ALIGNED).partition("-")
        init, _, train = rest.rpartition("-")
        if layers not in LAYER_SETS or init not in INIT_CHOICES or train not in TRAIN_SETS:
            raise RadError(f"Bad arm {name!r}: write LAYERS-INIT-TRAIN[-aligned] with layers in "
                           f"{', '.join(LAYER_SETS)}, init in {', '.join(INIT_CHOICES)} and train in "
                           f"{', '.join(TRAIN_SETS)} (e.g. searched-rad-zero-in-proj-mixers, searched-rad-mixers-aligned).")
        return cls(layers, init, train, aligned)


@settings
class BaselineArm:
    """The reference arm; it is always run, also when the grid below does not contain it."""

    layers: str = "uniform"
    init: str = "mil"
    train: str = "all"

    def arm(self) -> Arm:
        return Arm(self.layers, self.init, self.train)


@settings
class AblateDistill(DistillSettings):
    """The distillation settings every arm shares: `rad run`'s and `rad distill`'s (one schema, one set of
    defaults), except that the ablation keeps no TensorBoard files and no checkpoints by default."""

    tensorboard: bool = False
    # False: delete an arm's checkpoints once its student is saved (they are GBs); `keep_checkpoints` (how many
    # a running arm keeps) is `rad distill`'s
    keep_arm_checkpoints: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.eval_every < 1:
            raise RadError("distill.eval_every must be at least 1: the ablation compares held-out KL curves.")


@settings
class AblateAlign(AlignSettings):
    """The alignment an `-aligned` arm runs before its KD: `rad align`'s settings and defaults, without TensorBoard
    files."""

    tensorboard: bool = False


@settings
class AblateEval(EvalSettings):
    """Task scores of each arm's final student (`tasks: []` skips them)."""

    teacher: bool = True  # also score the teacher, as the reference row


@settings
class AblateConfig:
    """One ablation; `src/rad/presets/ablate*.yaml`, `--config` and `--set a.b=c` fill it."""

    model: str = "smollm2-135m"
    out: str = "runs/ablate"
    seed: int = 0
    device: str | None = None
    k: int | None = 8  # layers converted in every arm; None: as many as the searched set has
    # Where the searched layers come from: a `rad search` folder (search.json), an explicit list, or
    # (neither given) a search run with the settings below into OUT/search.
    searched_from: str | None = None
    searched_layers: list[int] | None = None
    search: SearchSettings = field(default_factory=SearchSettings)
    layers: list[str] | str = field(default_factory=lambda: list(LAYER_SETS))
    inits: list[str] | str = field(default_factory=lambda: ["rad", "mil"])
    train: list[str] | str = field(default_factory=lambda: ["mixers", "all"])
    # Arms beyond the grid, as LAYERS-INIT-TRAIN names (e.g. the paper's literal init: searched-rad-zero-in-proj-mixers)
    extra_arms: list[str] | str = field(default_factory=list)
    baseline: BaselineArm = field(default_factory=BaselineArm)
    distill: AblateDistill = field(default_factory=AblateDistill)
    align: AblateAlign = field(default_factory=AblateAlign)  # for `-aligned` arms only
    eval: AblateEval = field(default_factory=AblateEval)
    progress: bool = True

    def __post_init__(self):
        check_run_settings(self)
        self.layers = _choices(self.layers, LAYER_SETS, "layers", "layer set")
        self.inits = _choices(self.inits, INIT_CHOICES, "inits", "init")
        self.train = _choices(self.train, TRAIN_SETS, "train", "trainable set")
        extra = [Arm.parse(name) for name in _names(self.extra_arms, "extra_arms")]
        self.extra_arms = [a.name for a in extra]
        if len(set(self.extra_arms)) != len(self.extra_arms):
            raise RadError(f"extra_arms lists an arm twice: {self.extra_arms}.")
        b = self.baseline
        _choices([b.layers], LAYER_SETS, "baseline.layers", "layer set")
        _choices([b.init], INIT_CHOICES, "baseline.init", "init")
        _choices([b.train], TRAIN_SETS, "baseline.train", "trainable set")
        if self.k is not None and (isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1):
            raise RadError(f"k must be a positive number of layers, got {self.k!r}.")
        if self.searched_from is not None and self.searched_layers is not None:
            raise RadError("Give the searched layers either as searched_from (a search folder) or as "
                           "searched_layers (a list), not both.")
        if self.searched_layers is not None:
            if isinstance(self.searched_layers, str):
                self.searched_layers = [p for p in self.searched_layers.split(",") if p.strip()]
            try:
                self.searched_layers = [int(i) for i in self.searched_layers]
            except (TypeError, ValueError):
                raise RadError(f"searched_layers must be a list of layer indices, got {self.searched_layers!r}."
                               ) from None
            if self.k is not None and len(self.searched_layers) != self.k:
                raise RadError(f"searched_layers has {len(self.searched_layers)} layers but k = {self.k}; "
                               "every arm converts k layers.")

    def arms(self) -> list[Arm]:
        """The grid, in order (layer set, then init, then trainable set), then the extra arms not in it."""
        grid = [Arm(lay, init, train) for lay in self.layers for init in self.inits for train in self.train]
        return grid + [a for a in map(Arm.parse, self.extra_arms) if a not in grid]


def _names(value, what: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    if not isinstance(value, (list, tuple)):
        raise RadError(f"{what} must be a list, got {value!r}.")
    return [str(v) for v in value]


def _choices(value, allowed: tuple[str, ...], what: str, kind: str) -> list[str]:
    names = _names(value, what)
    if not names:
        raise RadError(f"{what} is empty; give at least one of {', '.join(allowed)}.")
    for name in names:
        if name not in allowed:
            raise RadError(f"Unknown {kind} {name!r} in {what}; choose from {', '.join(allowed)}.")
    if len(set(names)) != len(names):
        raise RadError(f"{what} lists a {kind} twice: {names}.")
    return names


def load_ablate_config(preset: str | None = None, config_path: str | None = None,
                       overrides: list[str] = ()) -> AblateConfig:
    """Preset (smoke, default) and/or a YAML file, then `key.sub=value` overrides, like `rad run`."""
    return load_settings(AblateConfig, preset_file(preset, prefix="ablate") if preset else None, config_path,
                         overrides, what="ablation config")
