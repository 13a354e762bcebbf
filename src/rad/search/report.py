"""What a search returns and writes: `SearchResult`, search.json, trials.csv and two PNG plots."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import optuna

from rad.utils.artefacts import layer_indices, load_artefact
from rad.utils.atomic import atomic_write_bytes

logger = logging.getLogger(__name__)

RESULT_FILE = "search.json"
TRIALS_FILE = "trials.csv"
PROGRESS_PLOT = "progress.png"
REDUNDANCY_PLOT = "redundancy.png"


@dataclass
class TrialRecord:
    """One Optuna trial: its mask, value, and whether it measured the mask or reused a stored value."""

    number: int
    state: str
    layers: list[int] | None
    value: float | None
    cached: bool | None  # True: answered from an earlier trial; None: never got that far (pruned, failed)
    source: str  # "sampler" or "explore" (a random new mask after a stall)
    worker: int | None
    seconds: float | None
    cached_from: int | None = None
    skipped: str | None = None  # "busy" or "full" for pruned trials
    details: dict = field(default_factory=dict)

    @classmethod
    def from_trial(cls, trial: optuna.trial.FrozenTrial) -> TrialRecord:
        attrs = trial.user_attrs
        mask = attrs.get("mask")
        return cls(
            number=trial.number,
            state=trial.state.name,
            layers=list(mask) if mask is not None else None,
            value=trial.value,
            cached=attrs.get("cached"),
            source=attrs.get("source", "sampler"),
            worker=attrs.get("worker"),
            seconds=attrs.get("seconds"),
            cached_from=attrs.get("cached_from"),
            skipped=attrs.get("skipped"),
            details=attrs.get("details", {}),
        )

    @property
    def measured(self) -> bool:
        return self.state == "COMPLETE" and self.cached is False


@dataclass
class BaselineRecord:
    name: str
    layers: list[int]
    value: float
    details: dict = field(default_factory=dict)


@dataclass
class SearchResult:
    """The chosen layers and everything that led to them."""

    layers: list[int]
    value: float
    objective: str
    chosen_from: str  # "trial N" or "baseline NAME"
    k: int
    num_layers: int
    keep: list[int]
    evaluations: int  # masks the optimiser measured (all workers)
    trials: list[TrialRecord]
    baselines: list[BaselineRecord]
    single_layer_profile: dict[int, float] | None  # objective with only that layer skipped
    top_frequency: dict[int, float]  # how often each layer is in the best 10% of measured masks
    remeasured: list[dict]
    settings: dict
    out: Path | None = None

    def to_json(self) -> dict:
        data = asdict(self)
        data.pop("out")
        data["chosen_layers"] = data.pop("layers")
        if self.single_layer_profile is not None:
            data["single_layer_profile"] = {str(k): v for k, v in self.single_layer_profile.items()}
        data["top_frequency"] = {str(k): v for k, v in self.top_frequency.items()}
        return data

    @classmethod
    def from_json(cls, data: dict, out: Path | None = None) -> SearchResult:
        data = dict(data)
        data["layers"] = layer_indices(data.pop("chosen_layers"))
        data["trials"] = [TrialRecord(**t) for t in data.get("trials", [])]
        data["baselines"] = [BaselineRecord(**b) for b in data.get("baselines", [])]
        if data.get("single_layer_profile") is not None:
            data["single_layer_profile"] = {int(k): v for k, v in data["single_layer_profile"].items()}
        data["top_frequency"] = {int(k): v for k, v in data.get("top_frequency", {}).items()}
        return cls(**data, out=out)

    @classmethod
    def load(cls, folder: str | Path) -> SearchResult:
        """The finished search in `folder` (its search.json); a clear RadError when there is none."""
        return load_artefact(Path(folder) / RESULT_FILE, lambda data: cls.from_json(data, out=Path(folder)),
                             "a search result", *_search_result_advice(folder))

    def best_so_far(self) -> list[float]:
        curve, best = [], -math.inf
        for t in self.trials:
            if t.measured:
                best = max(best, t.value)
                curve.append(best)
        return curve


def top_frequency(trials: list[TrialRecord], num_layers: int, fraction: float = 0.1) -> dict[int, float]:
    measured = sorted((t for t in trials if t.measured), key=lambda t: -t.value)
    if not measured:
        return {i: 0.0 for i in range(num_layers)}
    top = measured[: max(1, math.ceil(fraction * len(measured)))]
    return {i: sum(i in t.layers for t in top) / len(top) for i in range(num_layers)}


def _atomic_write(path: Path, data: bytes) -> None:
    """Readers of the search folder see the old file or the new one, never half of it."""
    atomic_write_bytes(path, data)


def write_outputs(result: SearchResult, folder: Path, plots: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    _atomic_write(folder / RESULT_FILE, (json.dumps(result.to_json(), indent=2) + "\n").encode())
    _atomic_write(folder / TRIALS_FILE, _trials_csv(result.trials).encode())
    if plots:
        try:
            import matplotlib  # noqa: F401  (the `plot` extra)
        except ImportError:
            logger.warning("matplotlib is not installed (pip install -e '.[plot]'); the plots are skipped.")
            return
        _atomic_write(folder / PROGRESS_PLOT, _progress_png(result))
        _atomic_write(folder / REDUNDANCY_PLOT, _redundancy_png(result))


def _trials_csv(trials: list[TrialRecord]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["number", "state", "layers", "value", "measured", "cached_from", "source", "worker",
                     "seconds", "skipped"])
    for t in trials:
        writer.writerow([
            t.number, t.state, " ".join(map(str, t.layers or [])), "" if t.value is None else repr(t.value),
            int(t.measured), "" if t.cached_from is None else t.cached_from, t.source,
            "" if t.worker is None else t.worker, "" if t.seconds is None else t.seconds, t.skipped or "",
        ])
    return buffer.getvalue()


def _png(figure) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def _progress_png(result: SearchResult) -> bytes:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.5, 4.5), layout="constrained")
    ax = figure.add_subplot()
    measured = [t for t in result.trials if t.measured]
    xs = list(range(1, len(measured) + 1))
    ax.scatter(xs, [t.value for t in measured], s=12, color="0.6", label="each evaluation")
    ax.step(xs, result.best_so_far(), where="post", color="C0", linewidth=2,
            label=f"best so far ({result.settings.get('sampler', '?')})")
    for i, b in enumerate(result.baselines):
        ax.axhline(b.value, color=f"C{(i % 8) + 1}", linestyle="--", linewidth=1, label=f"{b.name}: {b.value:.4g}")
    ax.set_xlabel("evaluations (distinct masks measured)")
    ax.set_ylabel(result.objective)
    ax.set_title(f"Redundancy search: k = {result.k} of {result.num_layers} layers")
    ax.legend(fontsize=7, loc="lower right")
    return _png(figure)


def _redundancy_png(result: SearchResult) -> bytes:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 5.5), layout="constrained")
    top, bottom = figure.subplots(2, 1, sharex=True)
    layers = list(range(result.num_layers))
    chosen = set(result.layers)
    colours = ["C3" if i in chosen else "C0" for i in layers]
    if result.single_layer_profile:
        profile = result.single_layer_profile
        top.bar([i for i in layers if i in profile], [profile[i] for i in layers if i in profile],
                color=[c for i, c in zip(layers, colours, strict=True) if i in profile])
        top.set_ylabel(f"{result.objective}\n(only this layer skipped)")
    else:
        top.text(0.5, 0.5, "single-layer profile not measured (--no-baselines)", ha="center", va="center",
                 transform=top.transAxes)
    top.set_title("Per-layer redundancy (red: chosen layers)")
    bottom.bar(layers, [result.top_frequency.get(i, 0.0) for i in layers], color=colours)
    bottom.set_ylabel("share of the best\n10% of masks")
    bottom.set_xlabel("layer")
    for i in result.keep:
        bottom.axvspan(i - 0.5, i + 0.5, color="0.9", zorder=0)
    return _png(figure)


def read_chosen_layers(folder: str | Path) -> list[int]:
    """The layers a finished search chose (`search.json` in `folder`), for `rad convert --layers-from`; only
    `chosen_layers` is read, so a hand-written `{"chosen_layers": [...]}` works too."""
    return load_artefact(Path(folder) / RESULT_FILE, lambda data: layer_indices(data["chosen_layers"]),
                         "a search result (a list of chosen_layers)", *_search_result_advice(folder))


def _search_result_advice(folder: str | Path) -> tuple[str, str]:
    """(what to do, what a missing search.json means) for `load_artefact`: both search.json readers say it alike."""
    return f"run `rad search ... --out {folder}` to completion", f"{folder} has no {RESULT_FILE}"
