"""A run's report.md: the layers chosen and why, training curves, the evaluation, speed and cache memory, and
the stage commands that redo the run one stage at a time."""

from __future__ import annotations

import shlex
from pathlib import Path

from rad.evaluate.inputs import TASK_TITLES
from rad.preflight import InputReport
from rad.search.report import SearchResult
from rad.stages.run_config import BASELINE_TRAIN, CONFIG_FILE, RAD_TRAIN, RunConfig, RunPaths
from rad.stages.speed import SpeedResult
from rad.utils.atomic import atomic_write_text

REPORT_FILE = "report.md"


def write_report(config: RunConfig, paths: RunPaths, search: SearchResult, uniform, models, table,
                 speed: SpeedResult, timings, inputs: InputReport) -> Path:
    """report.md of the run in `paths.root`, from what its stages returned; returns its path."""
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
    return atomic_write_text(paths.root / REPORT_FILE, "\n".join(lines))


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
        f"rad run --config {paths.root / CONFIG_FILE}",
        f"rad search {config.model} --k {len(search.layers)} --objective {search.objective} "
        f"--trials {config.search.trials} --out {paths.search}",
        f"rad convert {config.model} --layers-from {paths.search} --init rad --out {paths.rad_hybrid}",
        f"rad convert {config.model} --layers {','.join(map(str, uniform))} --init mil --out {paths.baseline_hybrid}",
        *_align_lines(config, paths),
        f"rad distill {paths.rad_align / 'student' if config.align is not None else paths.rad_hybrid} "
        f"--train {RAD_TRAIN} --lr {d.lr[RAD_TRAIN]} {data} --out {paths.rad_distill}",
        f"rad distill {paths.baseline_hybrid} --train {BASELINE_TRAIN} --lr {d.lr[BASELINE_TRAIN]} {data} "
        f"--out {paths.baseline_distill}",
        f"rad eval {specs} --tasks {','.join(inputs.tasks or e.tasks)} "
        + _flags(limit=e.limit, max_new_tokens=e.max_new_tokens, batch_size=e.batch_size, teacher_texts=e.teacher_texts,
                 teacher=config.model, out=paths.eval),
    ]


def _align_lines(config: RunConfig, paths: RunPaths) -> list[str]:
    """The `rad align` command of a run that aligns before KD (none for the KD-only recipe)."""
    a = config.align
    if a is None:
        return []
    flags = _flags(steps=a.steps, epochs=a.epochs, batch=a.batch, seq_len=a.seq_len, lr=a.lr,
                   warmup_ratio=a.warmup_ratio, min_lr_ratio=a.min_lr_ratio, precision=a.precision, data=a.data,
                   max_examples=a.max_examples, eval_examples=a.eval_examples, cache=a.cache, seed=config.seed)
    return [f"rad align {paths.rad_hybrid} {flags} --out {paths.rad_align}"]
