"""`rad run`: the whole RAD pipeline in one command, from one YAML file.

search → convert (RAD student: searched layers, `rad` init; baseline student: uniform layers, `mil`
init) → distil both (RAD: mixers only; baseline: all parameters, MambaInLlama's recipe) → evaluate the
teacher, the draft (searched layers skipped = the RAD hybrid before training), both students →
`report.md`. Every stage writes its own folder under the run folder and is skipped when its output is
already complete, so an interrupted run continues where it stopped. A run folder is only continued under the
settings it was made with (`config.yaml`; `ALLOWED_ON_RESUME` may change): a skipped stage must not stand for
other settings.
"""

from __future__ import annotations

import dataclasses
import logging
import shlex
import time
from dataclasses import field
from pathlib import Path

import yaml

from rad.config import load_settings, preset_file, read_yaml, settings, to_yaml
from rad.distill.config import DistillSettings
from rad.errors import RadError, check_deadline
from rad.evaluate.runner import EvalSettings
from rad.outputs import RUN, check_output
from rad.preflight import TASK_TITLES, InputReport
from rad.search.config import SearchSettings
from rad.search.report import SearchResult
from rad.utils.artefacts import load_artefact
from rad.utils.atomic import atomic_write_json, atomic_write_text
from rad.utils.identity import check_same_settings

logger = logging.getLogger(__name__)

RAD_TRAIN, BASELINE_TRAIN = "mixers", "all"  # what each student trains (RAD's targeted set; MambaInLlama's)
# The four models of a run, by the names its eval folders, speed rows and reports use.
TEACHER, DRAFT, RAD, BASELINE = ROLES = ("teacher", "draft (searched layers skipped)", "RAD student", "baseline student")
SPEED_FILE = "speed.json"
# RunConfig settings a continued run may change: they do not change what a finished stage stands for (the
# evaluation checks its own per-item identity, the speed table is re-measured for other contexts).
ALLOWED_ON_RESUME = ("out", "device", "eval", "speed_contexts", "distill.tensorboard", "distill.save_every",
                     "distill.eval_every")


@settings
class RunConfig:
    """One RAD run; the presets and `--config` YAML fill it, `--set a.b=c` overrides single fields. Each
    stage's group is that stage's own settings class, with that stage's defaults."""

    model: str = "smollm2-135m"
    out: str = "runs/rad"
    seed: int = 0
    device: str | None = None
    search: SearchSettings = field(default_factory=SearchSettings)
    distill: DistillSettings = field(default_factory=DistillSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    speed_contexts: list[int] = field(default_factory=lambda: [256, 1024])

    def __post_init__(self):
        check_run_settings(self)


def check_run_settings(config) -> None:
    """What `rad run` and `rad ablate` share beyond each stage's own checks: the model, out, device, seed."""
    from rad.utils.devices import resolve_device

    if not str(config.model).strip():
        raise RadError("The model setting is empty; give an alias (smollm2-135m), a folder or a hub id.")
    if not str(config.out).strip():
        raise RadError("The out setting is empty; give the folder the run writes to.")
    if config.seed < 0:
        raise RadError(f"seed must be 0 or more, got {config.seed}.")
    resolve_device(config.device)
    for context in getattr(config, "speed_contexts", []):
        if context < 1:
            raise RadError(f"speed_contexts must be positive token counts, got {context}.")


def load_run_config(preset: str | None = None, config_path: str | None = None, overrides=()) -> RunConfig:
    """Preset (smoke, default, paper) and/or a YAML file, then `key.sub=value` overrides (YAML-parsed)."""
    return load_settings(RunConfig, preset_file(preset) if preset else None, config_path, overrides)


@dataclasses.dataclass
class RunPaths:
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
    def rad_distill(self) -> Path:
        return self.root / "distill" / "rad"

    @property
    def baseline_distill(self) -> Path:
        return self.root / "distill" / "baseline"

    @property
    def eval(self) -> Path:
        return self.root / "eval"


def run_pipeline(config: RunConfig, *, teacher_eval: Path | None = None, deadline: float | None = None,
                 teacher=None) -> Path:
    """Run (or continue) every stage; returns the path of report.md. `rad sweep` passes `teacher_eval` (score the
    teacher in that folder, shared by its runs), `deadline` (a time.monotonic() value: stop with TimeLimitReached
    before a stage, or between evaluation batches, once it has passed) and its already loaded `teacher`."""
    from rad.models.layers import uniform_layers
    from rad.models.loading import load_model
    from rad.preflight import check_inputs
    from rad.stages import convert_stage, distill_stage, search_stage

    paths = RunPaths(Path(config.out))
    # Every input and setting is checked before anything is written: a mistake costs seconds, not a
    # half-hour run (nor a folder half full of files).
    check_output(paths.root, RUN, inputs=[("model", config.model), ("distillation data", config.distill.data)])
    check_same_run(config, paths)
    inputs = check_inputs(config.model, config.eval.tasks, on_missing_task=config.eval.on_missing_data,
                          distill_data=config.distill.data)
    teacher = teacher or load_model(config.model, device=config.device)
    num_layers = teacher.model.config.num_hidden_layers
    check_search_fits(config.search, teacher.model, config.seed)
    paths.root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(paths.root / "config.yaml", to_yaml(config))
    inputs.save(paths.root)
    timings: dict[str, float] = {}

    check_deadline(deadline, f"the search of {paths.root}")
    t0 = time.perf_counter()
    search = search_stage(teacher, config.search, paths.search, seed=config.seed)
    timings["search"] = time.perf_counter() - t0
    uniform = uniform_layers(len(search.layers), num_layers)

    t0 = time.perf_counter()
    convert_stage(teacher, config.model, search.layers, "rad", paths.rad_hybrid, seed=config.seed)
    convert_stage(teacher, config.model, uniform, "mil", paths.baseline_hybrid, seed=config.seed)
    timings["convert"] = time.perf_counter() - t0

    check_deadline(deadline, f"the distillation of {paths.root}")
    t0 = time.perf_counter()
    common = dict(seed=config.seed, device=config.device, sources=inputs.sources)
    rad_student = distill_stage(config.distill, paths.rad_hybrid, paths.rad_distill, RAD_TRAIN, **common)
    check_deadline(deadline, f"the baseline's distillation in {paths.root}")
    base_student = distill_stage(config.distill, paths.baseline_hybrid, paths.baseline_distill, BASELINE_TRAIN,
                                 **common)
    timings["distill"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    models = dict(zip(ROLES, (config.model, str(paths.rad_hybrid), str(rad_student), str(base_student)), strict=True))
    table = _stage_eval(config, inputs, paths, teacher, models, teacher_eval, deadline)
    timings["eval"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    speed = _stage_speed(config, paths, teacher, {RAD: rad_student, BASELINE: base_student}, search.layers)
    timings["speed"] = time.perf_counter() - t0
    report = write_report(config, paths, search, uniform, models, table, speed, timings, inputs)
    logger.info("Report: %s", report)
    return report


def check_search_fits(settings: SearchSettings, model, seed: int) -> None:
    """The search's model-dependent checks (k against the layers) before anything is written."""
    from rad.models.layers import attention_layer_indices
    from rad.search.config import resolve_space

    resolve_space(settings.stage_config(seed=seed, out=None), model.config.num_hidden_layers,
                  attention_layer_indices(model))


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
    saved_path = paths.root / "config.yaml"
    if not saved_path.is_file() or not paths.search.exists():  # no stage has started there
        return
    saved = _without(read_yaml(saved_path, "saved run configuration"), ALLOWED_ON_RESUME)
    current = _without(yaml.safe_load(to_yaml(config)), ALLOWED_ON_RESUME)
    check_same_settings(saved, current, what=f"The run in {paths.root}",
                        advice="run with the same settings to continue it, or choose another --out for these")


@dataclasses.dataclass(frozen=True)
class SpeedRow:
    context: int
    model: str
    tok_s: float
    cache_MiB: float  # noqa: N815 (the JSON field's name)
    bytes_per_token: float | None = None  # KV + recurrent state at `context`, per token of context (None: older rad)


@dataclasses.dataclass(frozen=True)
class SpeedResult:
    """What speed.json holds (its presence means the speed stage is done): greedy tok/s, cache MiB and cache
    bytes per token of context, per context and model (teacher, draft, both students), and the contexts asked for."""

    contexts: list[int]
    rows: list[SpeedRow]

    @property
    def models(self) -> list[str]:
        return list(dict.fromkeys(r.model for r in self.rows))

    def row(self, model: str, context: int) -> SpeedRow | None:
        return next((r for r in self.rows if r.model == model and r.context == context), None)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data) -> SpeedResult:
        if isinstance(data, list):  # an older rad wrote the rows alone
            rows = [SpeedRow(**r) for r in data]
            return cls(contexts=list(dict.fromkeys(r.context for r in rows)), rows=rows)
        return cls(contexts=list(data["contexts"]), rows=[SpeedRow(**r) for r in data["rows"]])

    def save(self, root: str | Path) -> Path:
        return atomic_write_json(Path(root) / SPEED_FILE, self.to_json())

    @classmethod
    def load(cls, root: str | Path) -> SpeedResult:
        return load_artefact(Path(root) / SPEED_FILE, cls.from_json, "a rad speed table",
                             "delete it and re-run `rad run` to measure again")


def _stage_eval(config: RunConfig, inputs: InputReport, paths: RunPaths, teacher, models: dict[str, str],
                teacher_eval: Path | None = None, deadline: float | None = None) -> str:
    """Every model of the run on the tasks; the teacher into `teacher_eval` when given (a sweep scores it once)."""
    from rad.evaluate.runner import comparison_table, evaluate_model
    from rad.models.loading import load_model

    eval_config = config.eval.stage_config(paths.eval, inputs.tasks, teacher=config.model, sources=inputs.sources)
    results = []
    for name, spec in models.items():
        is_teacher = spec == config.model
        loaded = teacher if is_teacher else load_model(spec, device=config.device)
        where = dataclasses.replace(eval_config, out=str(teacher_eval)) if is_teacher and teacher_eval else eval_config
        # Report under the role's name (the result folder is named after `source`), without touching `teacher`.
        results.append(evaluate_model(dataclasses.replace(loaded, source=name), where, teacher=teacher,
                                      deadline=deadline))
    table = comparison_table(results)
    atomic_write_text(paths.eval / "comparison.md", table)
    return table


def cache_bytes_per_token(info, context: int) -> float:
    """A model's decode cache per token of a `context`-token sequence: its KV bytes per token plus its constant
    recurrent state spread over the context (what a served sequence costs in memory, and what every decode step
    reads besides the weights)."""
    return info.kv_bytes_per_token + info.ssm_state_bytes / context


def _stage_speed(config: RunConfig, paths: RunPaths, teacher, students: dict[str, Path],
                 skipped: list[int]) -> SpeedResult:
    """Greedy decode speed (rad's engine) and cache bytes per token of the teacher, the draft (the teacher with
    `skipped` attention layers skipped) and the students (`students`: name -> folder) at each context: a quick
    look; `bench/decode_speed.py` is the careful measurement."""
    import torch

    from rad.decoding.speculative import draft_generate, greedy_generate
    from rad.models.info import model_info
    from rad.models.loading import load_model

    names = [TEACHER, DRAFT, *students]
    if (paths.root / SPEED_FILE).is_file():
        done = SpeedResult.load(paths.root)
        if done.contexts == list(config.speed_contexts) and set(names) <= set(done.models) and all(
                r.bytes_per_token is not None for r in done.rows):
            return done
        logger.info("speed: %s measured contexts %s and models %s, not %s and %s: measuring again", SPEED_FILE,
                    done.contexts, done.models, config.speed_contexts, names)
    loaded = {TEACHER: teacher.model,
              **{name: load_model(str(folder), device=config.device).model for name, folder in students.items()}}
    infos = {name: model_info(model) for name, model in loaded.items()}
    n_attention = infos[TEACHER].layer_map.count("attention")
    draft_kv = infos[TEACHER].kv_bytes_per_token * (n_attention - len(skipped)) / n_attention

    def measure(name, ids):
        if name == DRAFT:
            return draft_generate(teacher.model, ids, skipped, 16)
        return greedy_generate(loaded[name], ids, 16)

    rows = []
    gen = torch.Generator().manual_seed(config.seed)
    for context in config.speed_contexts:
        ids = torch.randint(0, teacher.model.config.vocab_size, (1, context), generator=gen)
        for name in names:
            measure(name, ids[:, :16])  # warm-up
            r = measure(name, ids)
            per_token = draft_kv if name == DRAFT else cache_bytes_per_token(infos[name], context)
            rows.append(SpeedRow(context=context, model=name, tok_s=r.tokens_per_second,
                                 cache_MiB=per_token * context / 2**20, bytes_per_token=per_token))
    result = SpeedResult(contexts=list(config.speed_contexts), rows=rows)
    result.save(paths.root)  # atomic: its presence means "stage done"
    return result


def write_report(config: RunConfig, paths: RunPaths, search: SearchResult, uniform, models, table,
                 speed: SpeedResult, timings, inputs: InputReport) -> Path:
    layers = search.layers
    sampler = search.settings.get("sampler", config.search.sampler)
    lines = [
        f"# RAD run: {config.model}",
        "",
        f"Replaced {len(layers)} of {search.num_layers} attention layers by Mamba2 mixers: "
        f"**{', '.join(map(str, layers))}** (chosen by {sampler} search on the `{search.objective}` objective, "
        f"value {search.value:.3f}, {search.chosen_from}).",
        f"The baseline student replaces the evenly spaced layers {', '.join(map(str, uniform))} "
        "(MambaInLlama's choice) with its `mil` init and trains all parameters.",
        "",
        "## Why these layers",
        "",
        "![redundancy map](search/redundancy.png)",
        "",
        "Baselines under the same objective:",
        "",
        "| mask | layers | objective |",
        "|---|---|---:|",
    ]
    for b in search.baselines:
        lines.append(f"| {b.name} | {','.join(map(str, b.layers))} | {b.value:.3f} |")
    lines.append(f"| **search** | {','.join(map(str, layers))} | **{search.value:.3f}** |")
    lines += ["", "## Search history", "", "![search progress](search/progress.png)", "",
              "## Training curves", "", "RAD student (mixers only):", "",
              "![rad curves](distill/rad/curves.png)", "", "Baseline student (all parameters):", "",
              "![baseline curves](distill/baseline/curves.png)", "", "## Results", "", table, ""]
    for task, why in inputs.dropped_tasks.items():
        lines += [f"**{TASK_TITLES.get(task, task)}: not scored.** {why[0].upper() + why[1:]}.", ""]
    lines += ["## Decoding speed and cache memory (greedy, rad engine, this machine)", "",
              "| context | model | tok/s | cache MiB | cache bytes per token |", "|---:|---|---:|---:|---:|"]
    for r in speed.rows:
        per_token = "" if r.bytes_per_token is None else f"{r.bytes_per_token:,.0f}"
        lines.append(f"| {r.context} | {r.model} | {r.tok_s:.1f} | {r.cache_MiB:.1f} | {per_token} |")
    lines += ["", "`bench/decode_speed.py` measures this carefully (interleaved, repeated, with the bandwidth bound).",
              "", "## Reproduce", "", "```bash", *_reproduce(config, paths, search, uniform, models, inputs),
              "```", "", "Stage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()), "",
              "## Inputs", "", inputs.markdown()]
    return atomic_write_text(paths.root / "report.md", "\n".join(lines))


def _flags(**values) -> str:
    """`--name value` for every value that is set (None: the command's own default)."""
    return " ".join(f"--{k.replace('_', '-')} {v}" for k, v in values.items() if v is not None)


def _reproduce(config: RunConfig, paths: RunPaths, search: SearchResult, uniform, models, inputs) -> list[str]:
    """The stage commands that redo this run one stage at a time."""
    d, e = config.distill, config.eval
    data = _flags(steps=d.steps, seq_len=d.seq_len, micro_batch=d.micro_batch, grad_accum=d.grad_accum,
                  warmup_ratio=d.warmup_ratio, eval_every=d.eval_every, eval_sequences=d.eval_sequences,
                  save_every=d.save_every, kl_weight=d.kl_weight, ce_weight=d.ce_weight,
                  align_weight=d.align_weight, data=d.data, max_examples=d.max_examples,
                  eval_examples=d.eval_examples, seed=config.seed)
    specs = " ".join(shlex.quote(s) for s in models.values())
    return [
        f"rad run --config {paths.root / 'config.yaml'}",
        f"rad search {config.model} --k {len(search.layers)} --objective {search.objective} "
        f"--trials {config.search.trials} --out {paths.search}",
        f"rad convert {config.model} --layers-from {paths.search} --init rad --out {paths.rad_hybrid}",
        f"rad convert {config.model} --layers {','.join(map(str, uniform))} --init mil --out {paths.baseline_hybrid}",
        f"rad distill {paths.rad_hybrid} --train {RAD_TRAIN} --lr {d.lr[RAD_TRAIN]} {data} --out {paths.rad_distill}",
        f"rad distill {paths.baseline_hybrid} --train {BASELINE_TRAIN} --lr {d.lr[BASELINE_TRAIN]} {data} "
        f"--out {paths.baseline_distill}",
        f"rad eval {specs} --tasks {','.join(inputs.tasks or e.tasks)} "
        + _flags(limit=e.limit, max_new_tokens=e.max_new_tokens, batch_size=e.batch_size, teacher_texts=e.teacher_texts,
                 teacher=config.model, out=paths.eval),
    ]
