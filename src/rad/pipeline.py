"""`rad run`: the whole RAD pipeline in one command, from one YAML file.

search → convert (RAD student: searched layers, `rad` init; baseline student: uniform layers, `mil`
init) → distil both (RAD: mixers only; baseline: all parameters, MambaInLlama's recipe) → evaluate the
teacher, the draft (searched layers skipped = the RAD hybrid before training), both students →
`report.md`. Every stage writes its own folder under the run folder and is skipped when its output is
already complete, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from rad.errors import RadError

logger = logging.getLogger(__name__)

PRESETS_DIR = Path(__file__).resolve().parent / "presets"


@dataclass
class RunSearch:
    k: int | None = None
    ratio: float | None = 0.5
    objective: str = "acceptance"
    trials: int = 40
    sampler: str = "gp"
    max_new_tokens: int = 32
    prompts: int | None = None  # use the first N built-in search prompts (None: all)
    baselines: bool = True


@dataclass
class RunDistill:
    steps: int = 200
    seq_len: int = 256
    micro_batch: int = 4
    grad_accum: int = 1
    # Measured on SmolLM2-135M, uniform:8, 16 steps of 4 x 128 tokens (docs/distill.md): held-out KL
    # 0.84 -> 0.30 at lr 3e-4 with 10% warm-up, -> 0.42 at lr 1e-3 with 1% warm-up.
    lr: float = 3e-4
    baseline_lr: float = 2e-4
    warmup_ratio: float = 0.1
    eval_every: int = 50
    eval_sequences: int = 32
    save_every: int = 50
    max_examples: int | None = 4000
    # Layer-local alignment (MSE to the replaced attention's output) on top of KL: with KL alone a short
    # run from the rad init first gets worse (the gated norm turns the zero mixer output into a full-size one).
    align_weight: float = 1.0


@dataclass
class RunEval:
    tasks: list[str] = field(default_factory=lambda: ["gsm8k", "cruxeval"])
    limit: int | None = 20
    max_new_tokens: int | None = 256
    teacher_texts: int = 32
    batch_size: int = 8  # left-padded batches: same answers as one by one, 2.5x faster (docs/evaluate.md)


@dataclass
class RunConfig:
    """One RAD run; `configs/*.yaml` and the presets fill it, `--set a.b=c` overrides single fields."""

    model: str = "smollm2-135m"
    out: str = "runs/rad"
    seed: int = 0
    device: str | None = None
    search: RunSearch = field(default_factory=RunSearch)
    distill: RunDistill = field(default_factory=RunDistill)
    eval: RunEval = field(default_factory=RunEval)
    speed_contexts: list[int] = field(default_factory=lambda: [256, 1024])


def _build(cls, data: dict, where: str, what: str = "run config"):
    """`cls` from a nested dict: unknown keys are errors; a number written as text (YAML reads 1e-4 as a
    string) fills a float field as a float."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise RadError(f"Unknown setting {where}{unknown[0]} in the {what}; known: {', '.join(names)}.")
    kwargs = {}
    defaults = cls()
    for key, value in data.items():
        default = getattr(defaults, key)
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            kwargs[key] = _build(type(default), value, f"{where}{key}.", what)
        elif isinstance(default, float) and isinstance(value, (str, int)) and not isinstance(value, bool):
            try:
                kwargs[key] = float(value)
            except ValueError:
                raise RadError(f"Setting {where}{key} must be a number, got {value!r}.") from None
        else:
            kwargs[key] = value
    return cls(**kwargs)


def preset_path(preset: str) -> Path:
    """The file of a `rad run` preset (the `ablate*` presets belong to `rad ablate`)."""
    known = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml") if not p.stem.startswith("ablate"))
    if preset not in known:
        raise RadError(f"Unknown preset {preset!r}; choose one of {', '.join(known)}.")
    return PRESETS_DIR / f"{preset}.yaml"


def load_config(cls, preset_file: Path | None = None, config_path: str | None = None, overrides: list[str] = (),
                what: str = "run config"):
    """A preset file and/or a YAML file (merged), then `key.sub=value` overrides (YAML-parsed), into `cls`."""
    data: dict = {}
    if preset_file is not None:
        data = yaml.safe_load(Path(preset_file).read_text()) or {}
    if config_path:
        try:
            extra = yaml.safe_load(Path(config_path).read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise RadError(f"Cannot read the {what} {config_path}: {err}") from err
        if not isinstance(extra, dict):
            raise RadError(f"The {what} {config_path} is not a YAML mapping of settings.")
        data = _merge(data, extra)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise RadError(f"Bad override {item!r}: write key.sub=value.")
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise RadError(f"Bad override {item!r}: {p} is not a group of settings.")
        node[leaf] = yaml.safe_load(value)
    return _build(cls, data, "", what)


def load_run_config(preset: str | None = None, config_path: str | None = None, overrides: list[str] = ()) -> RunConfig:
    """Preset (smoke, default, paper) or a YAML file, then `key.sub=value` overrides (YAML-parsed values)."""
    return load_config(RunConfig, preset_path(preset) if preset else None, config_path, overrides)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@dataclass
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


def run_pipeline(config: RunConfig) -> Path:
    """Run (or continue) every stage; returns the path of report.md."""
    from rad.models.convert import convert_model
    from rad.models.layers import uniform_layers
    from rad.models.loading import load_model

    paths = RunPaths(Path(config.out))
    paths.root.mkdir(parents=True, exist_ok=True)
    (paths.root / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
    timings: dict[str, float] = {}
    teacher = load_model(config.model, device=config.device)
    num_layers = teacher.model.config.num_hidden_layers

    t0 = time.perf_counter()
    search = _stage_search(config, paths, teacher)
    timings["search"] = time.perf_counter() - t0
    searched = search["chosen_layers"]
    k = len(searched)
    uniform = uniform_layers(k, num_layers)

    t0 = time.perf_counter()
    for folder, layers, init in ((paths.rad_hybrid, searched, "rad"), (paths.baseline_hybrid, uniform, "mil")):
        if not (folder / "rad_conversion.json").is_file():
            convert_model(config.model, layers, folder, init=init, seed=config.seed, device=config.device,
                          overwrite=True)
        else:
            logger.info("convert: %s exists, skipped", folder)
    timings["convert"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    rad_student = _stage_distill(config, paths.rad_hybrid, paths.rad_distill, "mixers", config.distill.lr)
    base_student = _stage_distill(config, paths.baseline_hybrid, paths.baseline_distill, "all",
                                  config.distill.baseline_lr)
    timings["distill"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    models = {"teacher": config.model, "draft (searched layers skipped)": str(paths.rad_hybrid),
              "RAD student": str(rad_student), "baseline student": str(base_student)}
    table = _stage_eval(config, paths, teacher, models)
    timings["eval"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    speed = _stage_speed(config, paths, teacher, rad_student)
    timings["speed"] = time.perf_counter() - t0
    report = write_report(config, paths, search, uniform, models, table, speed, timings)
    logger.info("Report: %s", report)
    return report


def _stage_search(config: RunConfig, paths: RunPaths, teacher) -> dict:
    from rad.search.config import SearchConfig
    from rad.search.prompts import DEFAULT_PROMPTS
    from rad.search.run import run_search

    done = paths.search / "search.json"
    if done.is_file():
        logger.info("search: %s exists, skipped", done)
        return json.loads(done.read_text())
    s = config.search
    prompts = list(DEFAULT_PROMPTS[: s.prompts]) if s.prompts else None
    run_search(teacher, SearchConfig(k=s.k, ratio=None if s.k else s.ratio, objective=s.objective, trials=s.trials,
                                     sampler=s.sampler, seed=config.seed, prompts=prompts,
                                     max_new_tokens=s.max_new_tokens, baselines=s.baselines,
                                     out=paths.search, resume=paths.search.exists()))
    return json.loads(done.read_text())


def _stage_distill(config: RunConfig, hybrid: Path, out: Path, train: str, lr: float) -> Path:
    from rad.distill.data import DataConfig
    from rad.distill.objective import LossWeights
    from rad.distill.train import DistillConfig, run_distill

    student = out / "student"
    if (student / "config.json").is_file():
        logger.info("distill: %s exists, skipped", student)
        return student
    d = config.distill
    run_distill(DistillConfig(
        hybrid=str(hybrid), out=str(out), train=train, steps=d.steps, lr=lr, warmup_ratio=d.warmup_ratio,
        micro_batch=d.micro_batch,
        grad_accum=d.grad_accum, eval_every=d.eval_every, eval_sequences=d.eval_sequences,
        save_every=d.save_every, seed=config.seed, device=config.device, resume=out.exists(),
        data=DataConfig(seq_len=d.seq_len, max_examples=d.max_examples, seed=config.seed),
        loss=LossWeights(align=d.align_weight),
    ))
    return student


def _stage_eval(config: RunConfig, paths: RunPaths, teacher, models: dict[str, str]) -> str:
    from rad.evaluate.runner import EvalConfig, comparison_table, evaluate_model
    from rad.evaluate.teacher import TeacherConfig
    from rad.models.loading import load_model

    e = config.eval
    eval_config = EvalConfig(tasks=list(e.tasks), out=str(paths.eval), limit=e.limit, max_new_tokens=e.max_new_tokens,
                             batch_size=e.batch_size, teacher=config.model,
                             teacher_config=TeacherConfig(n_texts=e.teacher_texts))
    results = []
    for name, spec in models.items():
        loaded = teacher if spec == config.model else load_model(spec, device=config.device)
        # Report under the role's name (the result folder is named after `source`), without touching `teacher`.
        results.append(evaluate_model(dataclasses.replace(loaded, source=name), eval_config, teacher=teacher))
    table = comparison_table(results)
    (paths.eval / "comparison.md").write_text(table)
    return table


def _stage_speed(config: RunConfig, paths: RunPaths, teacher, student: Path) -> list[dict]:
    """Greedy decode speed (rad's engine) and cache bytes vs context, teacher vs RAD student: a quick look;
    `bench/decode_speed.py` is the careful measurement."""
    import torch

    from rad.decoding.speculative import greedy_generate
    from rad.models.info import model_info
    from rad.models.loading import load_model

    done = paths.root / "speed.json"
    if done.is_file():
        return json.loads(done.read_text())
    hybrid = load_model(str(student), device=config.device)
    rows = []
    gen = torch.Generator().manual_seed(config.seed)
    for context in config.speed_contexts:
        ids = torch.randint(0, teacher.model.config.vocab_size, (1, context), generator=gen)
        for name, model in (("teacher", teacher.model), ("RAD student", hybrid.model)):
            greedy_generate(model, ids[:, :16], 4)  # warm-up
            r = greedy_generate(model, ids, 16)
            info = model_info(model)
            rows.append({"context": context, "model": name, "tok_s": r.tokens_per_second,
                         "cache_MiB": (info.kv_bytes_per_token * context + info.ssm_state_bytes) / 2**20})
    done.write_text(json.dumps(rows, indent=2))
    return rows


def write_report(config, paths: RunPaths, search: dict, uniform, models, table, speed, timings) -> Path:
    layers = search["chosen_layers"]
    lines = [
        f"# RAD run: {config.model}",
        "",
        f"Replaced {len(layers)} of {search['num_layers']} attention layers by Mamba2 mixers: "
        f"**{', '.join(map(str, layers))}** (chosen by {search['settings'].get('sampler', config.search.sampler)} "
        f"search on the `{search['objective']}` objective, value {search['value']:.3f}, {search['chosen_from']}).",
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
    for b in search.get("baselines", []):
        lines.append(f"| {b['name']} | {','.join(map(str, b['layers']))} | {b['value']:.3f} |")
    lines.append(f"| **search** | {','.join(map(str, layers))} | **{search['value']:.3f}** |")
    lines += ["", "## Search history", "", "![search progress](search/progress.png)", "",
              "## Training curves", "", "RAD student (mixers only):", "",
              "![rad curves](distill/rad/curves.png)", "", "Baseline student (all parameters):", "",
              "![baseline curves](distill/baseline/curves.png)", "", "## Results", "", table, "",
              "## Decoding speed and cache memory (greedy, rad engine, this machine)", "",
              "| context | model | tok/s | cache MiB |", "|---:|---|---:|---:|"]
    for r in speed:
        lines.append(f"| {r['context']} | {r['model']} | {r['tok_s']:.1f} | {r['cache_MiB']:.1f} |")
    lines += ["", "`bench/decode_speed.py` measures this carefully (interleaved, repeated, with the bandwidth bound).",
              "", "## Reproduce", "", "```bash"]
    lines.append(f"rad run --config {paths.root / 'config.yaml'}")
    lines.append(f"rad search {config.model} --k {len(layers)} --objective {search['objective']} "
                 f"--trials {config.search.trials} --out {paths.search}")
    lines.append(f"rad convert {config.model} --layers-from {paths.search} --init rad --out {paths.rad_hybrid}")
    lines.append(f"rad convert {config.model} --layers {','.join(map(str, uniform))} --init mil "
                 f"--out {paths.baseline_hybrid}")
    d = config.distill
    flags = (f"--steps {d.steps} --seq-len {d.seq_len} --micro-batch {d.micro_batch} --align-weight {d.align_weight} "
             f"--warmup-ratio {d.warmup_ratio} --max-examples {d.max_examples}")
    lines.append(f"rad distill {paths.rad_hybrid} --train mixers --lr {d.lr} {flags} --out {paths.rad_distill}")
    lines.append(f"rad distill {paths.baseline_hybrid} --train all --lr {d.baseline_lr} {flags} "
                 f"--out {paths.baseline_distill}")
    specs = " ".join(shlex.quote(s) for s in models.values())
    lines.append(f"rad eval {specs} --tasks {','.join(config.eval.tasks)} --limit {config.eval.limit} "
                 f"--max-new-tokens {config.eval.max_new_tokens} --batch-size {config.eval.batch_size} "
                 f"--teacher {config.model} --out {paths.eval}")
    lines += ["```", "", "Stage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()), ""]
    report = paths.root / "report.md"
    report.write_text("\n".join(lines))
    return report
