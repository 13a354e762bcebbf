"""The distillation loop (`rad distill`): one process or many under `accelerate launch`.

Determinism is by construction: the rows of optimiser step s are a fixed function of (s, seed), every
rank computes the global token count of the step itself, and each micro-batch's loss is its token sum
divided by that count. So one process with gradient accumulation and N processes with the same global
batch optimise the same objective, and a resumed run needs only its step number to find its data.

`run_distill` reads top to bottom: `_setup` (models, data, optimiser), `_resume` (the newest checkpoint),
`_train` (the loop over `_train_step`, with held-out evaluation and checkpoints), `_finish` (the student).
The settings live in rad.distill.config, the models' loading in rad.distill.models, what is written in
rad.distill.summary.

Resume identity (rad.distill.models.resume_settings, rad.distill.config): every checkpoint records it (the init student's and
the teacher's content fingerprints, the tokenised data's content, and every setting that changes the
trained weights or the held-out curve); `--resume` under anything else is refused, naming each change. What may change on resume
(`ALLOWED_ON_RESUME`) is used from the resumed step on and recorded in config.json.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from rad.distill.checkpoint import (
    checkpoint_bytes_still_needed,
    list_checkpoints,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from rad.distill.config import DistillConfig, resolve_norm_lr_scale
from rad.distill.data import DistillData, Sequences, batch_indices, build_data
from rad.distill.loss import mean_metrics
from rad.distill.models import Models, load_models, resume_settings
from rad.distill.modules import enable_gradient_checkpointing, replaced_attention_layers
from rad.distill.objective import DistillObjective
from rad.distill.report import plot_curves
from rad.distill.summary import DistillResult, Logs, build_summary, save_student
from rad.errors import RadError
from rad.models.convert import ConversionRecord
from rad.models.loading import load_model
from rad.models.mixers import is_gain_parameter
from rad.outputs import DISTILL, check_free_space, check_output, input_location
from rad.utils.atomic import atomic_write_json, remove_stale_temps
from rad.utils.devices import resolve_dtype
from rad.utils.identity import check_same_settings, model_fingerprint
from rad.utils.launch import check_engine_device, check_launch
from rad.utils.locks import writer_lock
from rad.utils.precision import (
    compute_dtype,
    describe_precision,
    precision_name,
    resolve_precision,
    store_frozen,
)

logger = logging.getLogger(__name__)


def run_distill(config: DistillConfig, on_step: Callable[[int], None] | None = None) -> DistillResult:
    """Distil the hybrid in `config.hybrid` from its teacher; write checkpoints, logs and the final student.

    `on_step(step)` runs after each optimiser step, once that step's logs and checkpoint are written (the
    tests kill a run there); production leaves it None.
    """
    if config.steps < 1:
        raise RadError("--steps must be at least 1.")
    check_distill_out(config)
    accelerator = _accelerator(config)
    # one lock per run, held by the main process (every rank of a multi-GPU run writes into the same folder)
    lock = writer_lock(config.out, "rad distill") if accelerator.is_main_process else contextlib.nullcontext()
    with lock, _main_process_logs(accelerator.is_main_process):
        run = _setup(config, accelerator)
        _check_disk(run)
        _resume(run)
        _open_logs(run)
        _train(run, on_step)
        return _finish(run)


@dataclass
class _Run:
    """What the steps of one run share: made by `_setup`, moved on by `_train_step`."""

    config: DistillConfig
    accelerator: Any
    models: Models
    data: DistillData
    objective: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    params: list[torch.nn.Parameter]
    checkpoints: list[Path]  # on disk when the run started, oldest first
    settings: dict  # resume_settings: what a checkpoint of this run records and a resume must match
    compute: torch.dtype  # the forward passes' dtype (rad.utils.precision); trainable weights keep theirs
    step: int = 0  # optimiser steps done
    logs: Logs | None = None
    started: float = 0.0  # time.perf_counter() when the loop began

    @property
    def out(self) -> Path:
        return Path(self.config.out)

    @property
    def ckpt_root(self) -> Path:
        return self.out / "checkpoints"

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def per_rank(self) -> int:
        return self.config.micro_batch * self.config.grad_accum

    @property
    def global_batch(self) -> int:
        return self.per_rank * self.world


def _accelerator(config: DistillConfig):
    """An `Accelerator` for `config.device`; precision is rad's own (`compute_dtype`), not accelerate's, so the
    frozen weights can be stored in bf16 once and CPUs with bf16 matmuls get it too."""
    from accelerate import Accelerator

    cpu = config.device is not None and torch.device(config.device).type == "cpu"
    check_engine_device(cpu, "rad distill")
    accelerator = Accelerator(cpu=cpu, mixed_precision="no")
    check_launch(accelerator, "rad distill")  # the engine and processes the launch asked for, or exit 2
    return accelerator


def _check_disk(run) -> None:
    """Before the first step: room for the checkpoints this run writes (trainable weights + AdamW's two moments,
    as many at once as `keep_checkpoints` allows) and the final student."""

    cfg = run.config
    trainable = sum(p.numel() * p.element_size() for p in run.params)
    saved_size = torch.empty((), dtype=resolve_dtype(cfg.dtype or "float32", "cpu")).element_size()
    student = sum(p.numel() * saved_size for p in run.models.student.parameters())  # as loaded, not as stored
    checkpoints = checkpoint_bytes_still_needed(Path(cfg.out) / "checkpoints", 3 * trainable, steps=cfg.steps,
                                                save_every=cfg.save_every, keep=cfg.keep_checkpoints)
    check_free_space(cfg.out, checkpoints + student, "This distillation")


def check_distill_out(config: DistillConfig) -> Path:
    """`config.out` is writable, apart from every input (the hybrid, its teacher, the data) and empty or an
    earlier `rad distill` output; leftovers of a killed checkpoint write there are removed."""

    inputs = [("hybrid", config.hybrid), ("teacher", config.teacher), ("data", config.data.spec)]
    hybrid = input_location(config.hybrid)
    if hybrid is not None and hybrid.is_dir():
        record = ConversionRecord.load(hybrid)
        if record is not None and config.teacher is None:
            inputs.append(("teacher (the hybrid's source)", record.source_model))
    out = check_output(config.out, DISTILL, inputs=inputs)
    if hybrid is not None and (hybrid / "config.json").is_file():
        check_seq_len_fits(config.data.seq_len, hybrid / "config.json")
    for folder in (out, out / "checkpoints"):
        remove_stale_temps(folder)
    return out


def check_seq_len_fits(seq_len: int, config_json: Path) -> None:
    """Rows longer than the model's positions are refused before loading: `--seq-len 100000` on a 256-position
    model grew to 19 GB before the machine's OOM killer stopped it."""
    try:
        positions = json.loads(config_json.read_text()).get("max_position_embeddings")
    except (OSError, ValueError):
        return  # an unreadable config is the loader's to report, with its own sentence
    if isinstance(positions, int) and seq_len > positions:
        raise RadError(f"--seq-len {seq_len} is longer than the model's {positions} positions ({config_json}); "
                       f"use at most {positions}.")


@contextlib.contextmanager
def _main_process_logs(is_main: bool) -> Iterator[None]:
    """rad's info lines from the main process only: every rank loads the same models and data."""
    rad_logger = logging.getLogger("rad")
    level = rad_logger.level
    if not is_main:
        rad_logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        rad_logger.setLevel(level)


def _setup(config: DistillConfig, accelerator) -> _Run:
    """Check the output folder, seed, load models and data, build the objective, optimiser and schedule."""
    from accelerate.utils import set_seed

    checkpoints = list_checkpoints(Path(config.out) / "checkpoints")
    if checkpoints and not config.resume:
        raise RadError(f"{config.out} already holds checkpoints; pass --resume to continue or choose a new --out.")
    set_seed(config.seed)
    compute = resolve_precision(config.precision, accelerator.device)
    logger.info(describe_precision(config.precision, compute, accelerator.device))
    models = load_models(config, accelerator.device)
    config = dataclasses.replace(config, mixer_norm_lr_scale=resolve_norm_lr_scale(config, models.record),
                                 precision=precision_name(compute))  # config.json records what ran
    student, teacher = models.student, models.teacher
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(student)
    student.train()
    data = build_data(config.data, models.tokenizer)
    settings = resume_settings(config, models, data, accelerator)
    if compute != torch.float32:  # frozen weights never change: one cast now instead of one per matmul
        saved = store_frozen([student, teacher], compute)
        logger.info("Frozen weights stored in %s: %.1f MB less", precision_name(compute), saved / 1e6)
    objective = DistillObjective(student, teacher, config.loss, replaced_attention_layers(teacher, student))
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(_param_groups(student, config), lr=config.lr, betas=config.betas,
                                  weight_decay=config.weight_decay)
    warmup = max(1, round(config.warmup_ratio * config.steps)) if config.warmup_ratio > 0 else 0
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_lambda(config.steps, warmup, config.min_lr_ratio))
    objective, optimizer = accelerator.prepare(objective, optimizer)
    teacher.to(accelerator.device)
    return _Run(config, accelerator, models, data, objective, optimizer, scheduler, params, checkpoints, settings,
                compute)


def _param_groups(student, config: DistillConfig) -> list[dict]:
    """The trainable weights; the gated-norm gains of the Mamba2 mixers at `mixer_norm_lr_scale` x lr.

    Adam moves every weight by about lr per step whatever its gradient, so a gain that starts at 0 (the
    `rad` init's zero) would need ~1/lr steps to reach its working size; a larger step for these few
    weights (one per channel) lets the new mixers grow in tens of steps, still from exactly zero."""
    norms, rest = [], []
    for name, p in student.named_parameters():
        if p.requires_grad:
            (norms if is_gain_parameter(name) else rest).append(p)
    if config.mixer_norm_lr_scale == 1.0 or not norms:
        return [{"params": norms + rest}]
    return [{"params": rest}, {"params": norms, "lr": config.lr * config.mixer_norm_lr_scale}]


def cosine_lambda(total: int, warmup: int, min_ratio: float):
    """The learning-rate factor at each step: linear warm-up, then cosine decay to `min_ratio`."""

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return fn


def _resume(run: _Run) -> None:
    """Continue from the newest checkpoint, if any: trainable weights, optimiser, schedule, RNG and step."""
    if not run.checkpoints:
        return
    latest = run.checkpoints[-1]
    ckpt = load_checkpoint(latest, run.accelerator.device)
    check_same_settings(ckpt.state.settings, run.settings, what=f"The checkpoint {latest}",
                        advice="resume with the same settings, or choose a new --out to train with these")
    named = dict(run.accelerator.unwrap_model(run.objective).student.named_parameters())
    with torch.no_grad():
        for name, value in ckpt.weights.items():
            if name not in named:
                raise RadError(f"Checkpoint {latest} holds {name}, which the student lacks; wrong --out?")
            named[name].copy_(value)
    run.optimizer.load_state_dict(ckpt.optimizer)
    run.scheduler.load_state_dict(ckpt.scheduler)
    set_rng_state(ckpt.rng[run.accelerator.process_index])
    run.step = ckpt.state.step
    logger.info("Resumed from %s (step %d of %d)", latest, run.step, run.config.steps)


def _open_logs(run: _Run) -> None:
    """config.json, and the log cut back to the step the run starts from."""
    is_main = run.accelerator.is_main_process
    if is_main:
        atomic_write_json(run.out / "config.json", asdict(run.config), default=str)
    run.logs = Logs(run.out, is_main, run.config.tensorboard, run.step)


def _train(run: _Run, on_step: Callable[[int], None] | None) -> None:
    """The loop: held-out metrics at step 0, then step, log, evaluate and save until `config.steps`."""
    from tqdm.auto import tqdm

    cfg = run.config
    show = run.accelerator.is_main_process and cfg.progress
    with tqdm(total=cfg.steps, initial=run.step, disable=not show, desc="distill", dynamic_ncols=True) as bar:
        run.started = time.perf_counter()
        if run.step == 0 and (cfg.eval_every or 0 in cfg.eval_at):
            _evaluate(run)
        while run.step < cfg.steps:
            record = _train_step(run)
            step, last = run.step, run.step == cfg.steps
            if step % cfg.log_every == 0 or last:
                run.logs.write(record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            if (cfg.eval_every and (step % cfg.eval_every == 0 or last)) or step in cfg.eval_at:
                _evaluate(run)
            if cfg.save_every and (step % cfg.save_every == 0 or last):
                _save(run)
            if on_step is not None:
                on_step(step)


def _train_step(run: _Run) -> dict:
    """One optimiser step on global batch number `run.step`; returns its log record."""
    cfg, accelerator = run.config, run.accelerator
    started = time.perf_counter()
    idx = batch_indices(run.step, run.global_batch, len(run.data.train), cfg.data.seed)
    total_tokens = float(run.data.train.loss_mask[idx][:, 1:].sum().clamp_min(1))
    rank = accelerator.process_index
    sums = _accumulate_gradients(run, idx[rank * run.per_rank:(rank + 1) * run.per_rank], total_tokens)
    loss, kl, ce, align = (sums / total_tokens).tolist()
    _stop_unless_finite(loss, run.step + 1, run.ckpt_root)
    grad_norm = accelerator.clip_grad_norm_(run.params, cfg.max_grad_norm)
    lr = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    seconds = time.perf_counter() - started
    return {"kind": "train", "step": run.step, "loss": loss, "kl": kl, "ce": ce, "align": align, "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "tokens": int(total_tokens), "tokens_per_s": total_tokens / max(seconds, 1e-9),
            "elapsed_s": time.perf_counter() - run.started}


def _accumulate_gradients(run: _Run, mine: list[int], total_tokens: float) -> torch.Tensor:
    """Forward and backward over this rank's rows `mine`; the (loss, KL, CE, align) sums of all ranks.

    Each micro-batch's loss is its token sum over the step's global token count, times the world size
    that DDP's gradient averaging divides out again: the step's gradient is the one big batch's.
    """
    cfg, accelerator = run.config, run.accelerator
    sums = torch.zeros(4, dtype=torch.float64, device=accelerator.device)
    for j in range(cfg.grad_accum):
        rows = run.data.train.rows(mine[j * cfg.micro_batch:(j + 1) * cfg.micro_batch])
        ids, att, lm = _to(rows, accelerator.device)
        last = j == cfg.grad_accum - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(run.objective):
            with compute_dtype(run.compute, accelerator.device):
                terms = run.objective(ids, att, lm)
            accelerator.backward(terms["loss_sum"] * (run.world / total_tokens))
        sums += torch.stack([terms["loss_sum"], terms["kl_sum"], terms["ce_sum"], terms["align_sum"]]
                            ).detach().double()
    return accelerator.reduce(sums, reduction="sum") if run.world > 1 else sums


def _stop_unless_finite(loss: float, step: int, ckpt_root: Path) -> None:
    """A NaN or infinite loss stops the run before the optimiser applies it, naming the last good checkpoint."""
    if math.isfinite(loss):
        return
    good = list_checkpoints(ckpt_root)
    where = f"the last good checkpoint is {good[-1]}" if good else "no checkpoint was written yet"
    raise RadError(f"The loss became {loss} at step {step}; stopped ({where}). Lower --lr or check the data.")


def _to(rows: Sequences, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, loss_mask) of `rows` on `device`."""
    return rows.input_ids.to(device), rows.attention_mask.to(device), rows.loss_mask.to(device)


def _evaluate(run: _Run) -> None:
    """Held-out metrics of the first `eval_sequences` held-out rows, logged at the current step."""
    cfg = run.config
    rows = run.data.eval.rows(list(range(min(cfg.eval_sequences, len(run.data.eval)))))
    metrics = evaluate(run.objective, rows, cfg.micro_batch, run.accelerator, run.compute)
    run.logs.write({"kind": "eval", "step": run.step, **metrics})
    logger.debug("step %d: %s", run.step, metrics)


@torch.no_grad()
def evaluate(objective, rows: Sequences, micro_batch: int, accelerator, compute: torch.dtype = torch.float32) -> dict:
    """Held-out KL to the teacher, student and teacher perplexity, top-1 agreement (summed over ranks)."""
    n = len(rows)
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = list(range(rank, n, world))
    sums = torch.zeros(5, dtype=torch.float64, device=accelerator.device)
    # The unwrapped module: DDP's forward syncs buffers, a collective ranks with unequal shares would hang on.
    objective = accelerator.unwrap_model(objective)
    was_training = objective.training
    objective.eval()
    for start in range(0, len(mine), micro_batch):
        ids, att, lm = _to(rows.rows(mine[start:start + micro_batch]), accelerator.device)
        with compute_dtype(compute, accelerator.device):
            terms = objective(ids, att, lm, labels=True)
        sums += torch.stack([terms["kl_sum"], terms["ce_sum"], terms["teacher_ce_sum"], terms["agree_sum"],
                             lm[:, 1:].sum().float()]).double()
    objective.train(was_training)
    sums = accelerator.reduce(sums, reduction="sum") if world > 1 else sums
    kl, ce, tce, agree, tokens = sums.tolist()
    m = mean_metrics(kl, ce, tce, agree, tokens)
    return {"eval_kl": m["kl"], "eval_ppl": m["perplexity"], "teacher_ppl": m["teacher_perplexity"],
            "eval_top1_agreement": m["top1_agreement"], "eval_tokens": int(max(tokens, 1.0))}


def _finish(run: _Run) -> DistillResult:
    """Close the logs; the main process writes the final student, summary.json and the curves."""
    accelerator, cfg = run.accelerator, run.config
    run.logs.close()
    accelerator.wait_for_everyone()
    records = run.logs.read()
    history = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    summary = None
    student_dir = None
    if accelerator.is_main_process:
        student = accelerator.unwrap_model(run.objective).student
        if run.compute != torch.float32:
            _restore_frozen(run, student)
        student_dir = save_student(student, run.models.tokenizer, run.out / "student", run.models.record, cfg)
        summary = build_summary(cfg, run.models, run.data, run.settings, history, evals, student_dir)
        summary.save(run.out)
        if cfg.plots:

            plot_curves(history, evals, run.out)
    accelerator.wait_for_everyone()
    return DistillResult(out=run.out, student_dir=student_dir, steps=run.step, history=history, evals=evals,
                         summary=summary)


def _save(run: _Run) -> None:
    """A checkpoint of the current step: every rank hands over its RNG state, the main process writes it."""
    accelerator, cfg = run.accelerator, run.config
    states = [rng_state()]
    if run.world > 1:
        from accelerate.utils import gather_object

        states = gather_object(states)
    if accelerator.is_main_process:
        student = accelerator.unwrap_model(run.objective).student
        trainable = {n: p for n, p in student.named_parameters() if p.requires_grad}
        save_checkpoint(run.ckpt_root, run.step, trainable, run.optimizer.state_dict(), run.scheduler.state_dict(),
                        states, settings=run.settings, data_position=run.step * run.global_batch,
                        train_sequences=len(run.data.train), keep=cfg.keep_checkpoints)
    accelerator.wait_for_everyone()


@torch.no_grad()
def _restore_frozen(run: _Run, student: torch.nn.Module) -> None:
    """The frozen weights as the hybrid holds them (they ran in bf16, stored once): the saved student is the
    hybrid plus what trained, whatever the precision. Reads the hybrid again rather than keeping a copy."""

    loaded = load_model(run.config.hybrid, device="cpu", dtype=run.config.dtype or "float32")
    if model_fingerprint(loaded) != run.models.student_fingerprint:
        raise RadError(f"{run.config.hybrid} changed during the run; its frozen weights cannot be restored "
                       "for the final student (the checkpoints hold what trained).")
    original = dict(loaded.model.named_parameters())
    for name, p in student.named_parameters():
        if not p.requires_grad and p.dtype != original[name].dtype:
            p.data = original[name].to(p.device)
