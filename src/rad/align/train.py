"""The alignment stage (`rad align`): each converted layer's mixer learns the attention it replaced, layer-locally.

One teacher forward without gradients (bf16 where the hardware has it) gives, for every converted layer, the
teacher's normalised hidden state there and the output of the attention the mixer replaces (`align.teacher`); it
stops after the last converted layer. Every mixer is then trained on its own layer's pair, on the squared error
normalised by the target's mean square (`align.loss`): nothing is back-propagated through MLPs, later blocks or
the lm_head, and each layer's backward runs on its own, so memory holds one mixer's activations at a time (24
mixers from one pass fit). Mixer weights and AdamW state stay float32.

Like `rad distill`: the rows of step s are a fixed function of (s, seed), checkpoints are atomic and checksummed
(`distill.checkpoint`), `--resume` is refused under changed settings (`utils.identity`) and continues bitwise;
log.jsonl, TensorBoard when installed, summary.json (`AlignSummary`) and OUT/student, a stock Bamba checkpoint
that `rad distill OUT/student` continues from.

The settings and their checks live in rad.align.config, the models' loading and the resume identity in
rad.align.models, summary.json and OUT/student in rad.align.summary; the log writer, the learning-rate schedule and
the held-out KL are distill's own (rad.distill.summary.Logs, rad.distill.train.cosine_lambda and evaluate).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rad.align.cache import PairCache, open_cache
from rad.align.config import CONFIG_FILE, DEFAULT_MIXER_AUTOCAST, AlignConfig, check_before_loading
from rad.align.loss import relative_error, squared_sums
from rad.align.mixers import mixer_output, mixer_parameter_prefix
from rad.align.models import AlignModels, cache_identity, load_models, resume_settings
from rad.align.precision import resolve_precision
from rad.align.summary import AlignResult, build_summary, save_student
from rad.align.teacher import LayerPairs, teacher_pairs
from rad.distill.checkpoint import (
    checkpoint_bytes_still_needed,
    list_checkpoints,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from rad.distill.data import DistillData, Sequences, batch_indices, build_data
from rad.distill.objective import DistillObjective, LossWeights
from rad.distill.summary import Logs
from rad.distill.train import cosine_lambda, evaluate
from rad.errors import RadError
from rad.outputs import check_free_space
from rad.utils.atomic import atomic_write_json
from rad.utils.devices import resolve_device
from rad.utils.identity import check_same_settings
from rad.utils.launch import refuse_launcher
from rad.utils.locks import writer_lock

logger = logging.getLogger(__name__)


def run_align(config: AlignConfig, on_step: Callable[[int], None] | None = None) -> AlignResult:
    """Align every converted layer's mixer of `config.hybrid` to its teacher; write checkpoints, logs, summary.json
    and OUT/student. `on_step(step)` runs after each step's log and checkpoint (tests interrupt runs there)."""

    refuse_launcher("rad align")
    check_before_loading(config)
    with writer_lock(config.out, "rad align"):
        device = resolve_device(config.device)
        precision = resolve_precision(config.precision, device)
        mixer_autocast = precision == "bf16" and (DEFAULT_MIXER_AUTOCAST if config.mixer_autocast is None
                                                  else config.mixer_autocast)
        out = Path(config.out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / CONFIG_FILE, asdict(config), default=str)  # marks the folder as rad align's
        torch.manual_seed(config.seed)
        models = load_models(config, device, precision)
        models.student.train()
        data = build_data(config.data, models.tokenizer)
        mixer_params = {layer: [p for n, p in models.student.named_parameters()
                                if n.startswith(mixer_parameter_prefix(models.student, layer))] for layer in models.layers}
        params = [p for layer in models.layers for p in mixer_params[layer]]
        optimizer = torch.optim.AdamW(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
        total = config.total_steps
        warmup = max(1, round(config.warmup_ratio * total)) if config.warmup_ratio > 0 else 0
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_lambda(total, warmup, config.min_lr_ratio))
        run_settings = resume_settings(config, models, data, precision, mixer_autocast)
        cache = None
        if config.cache is not None:
            cache = open_cache(Path(config.cache).expanduser(), models.layers, cache_identity(run_settings))
        run = _Run(config, device, precision, mixer_autocast, models, data, optimizer, scheduler, mixer_params,
                   run_settings, cache)
        _check_disk(run)
        _resume(run)
        run.logs = Logs(out, True, config.tensorboard, run.step)
        try:
            _train(run, on_step)
        finally:
            run.logs.close()
        return _finish(run)


@dataclass
class _Run:
    """What the steps of one run share: made by `run_align`, moved on by `_train_step`."""

    config: AlignConfig
    device: torch.device
    precision: str
    mixer_autocast: bool
    models: AlignModels
    data: DistillData
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    mixer_params: dict[int, list[torch.nn.Parameter]]
    settings: dict
    cache: PairCache | None
    step: int = 0
    logs: Logs | None = None

    @property
    def out(self) -> Path:
        return Path(self.config.out)


def _check_disk(run: _Run) -> None:
    """Room for the checkpoints this run writes (mixer weights + AdamW's two moments, as many at once as
    `keep_checkpoints` allows) and the student."""

    cfg = run.config
    trainable = sum(p.numel() * p.element_size() for ps in run.mixer_params.values() for p in ps)
    student = sum(p.numel() * p.element_size() for p in run.models.student.parameters())
    checkpoints = checkpoint_bytes_still_needed(run.out / "checkpoints", 3 * trainable, steps=cfg.total_steps,
                                                save_every=cfg.save_every, keep=cfg.keep_checkpoints)
    check_free_space(cfg.out, checkpoints + student, "This alignment")


def _resume(run: _Run) -> None:
    checkpoints = list_checkpoints(run.out / "checkpoints")
    if not checkpoints:
        return
    latest = checkpoints[-1]
    ckpt = load_checkpoint(latest, run.device)
    check_same_settings(ckpt.state.settings, run.settings, what=f"The checkpoint {latest}",
                        advice="resume with the same settings, or choose a new --out to align with these")
    named = dict(run.models.student.named_parameters())
    with torch.no_grad():
        for name, value in ckpt.weights.items():
            if name not in named or not named[name].requires_grad:
                raise RadError(f"Checkpoint {latest} holds {name}, which is no mixer of this hybrid; wrong --out?")
            named[name].copy_(value)
    run.optimizer.load_state_dict(ckpt.optimizer)
    run.scheduler.load_state_dict(ckpt.scheduler)
    set_rng_state(ckpt.rng[0])
    run.step = ckpt.state.step
    logger.info("Resumed from %s (step %d of %d)", latest, run.step, run.config.total_steps)


def shard_of(step: int, steps_per_epoch: int, seed: int) -> int:
    """Which of the first epoch's batches step `step` trains on: epoch 1 in order, each later epoch a seeded
    reshuffle of the same batches (so a cache and the teacher give the same rows)."""
    epoch, position = divmod(step, steps_per_epoch)
    if epoch == 0:
        return position
    order = torch.randperm(steps_per_epoch, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    return order[position]


def _step_pairs(run: _Run) -> LayerPairs:
    """The (input, target) pairs of the current step: from the cache after the first epoch, else the teacher."""
    cfg = run.config
    shard = shard_of(run.step, cfg.steps, cfg.seed)
    first_epoch = run.step < cfg.steps
    # bf16 pairs round-trip the cache exactly, so a shard already there (another run's, or before a resume) stands
    # in for the teacher from the first epoch on; a float32 teacher's are rounded, so only later epochs read them.
    exact = run.precision == "bf16"
    if run.cache is not None and (not first_epoch or exact) and run.cache.has(shard):
        return run.cache.read(shard, run.device)
    rows = run.data.train.rows(batch_indices(shard, cfg.batch, len(run.data.train), cfg.data.seed))
    pairs = teacher_pairs(run.models.target_teacher, run.models.layers, rows.input_ids.to(run.device),
                          rows.attention_mask.to(run.device))
    if run.cache is not None:
        run.cache.write(shard, pairs)
    return pairs


def mixer_context(mixer_autocast: bool, device: torch.device):
    """bf16 autocast for the mixers' compute (weights and AdamW stay float32), or nothing."""
    if mixer_autocast:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _train(run: _Run, on_step: Callable[[int], None] | None) -> None:

    cfg = run.config
    total = cfg.total_steps
    with tqdm(total=total, initial=run.step, disable=not cfg.progress, desc="align", dynamic_ncols=True) as bar:
        if run.step == 0:
            _evaluate(run, with_kl=cfg.kl_eval)
        while run.step < total:
            record = _train_step(run)
            step, last = run.step, run.step == total
            if step % cfg.log_every == 0 or last:
                run.logs.write(record)
            bar.update(1)
            bar.set_postfix(rel_err=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
            if last or (cfg.eval_every and step % cfg.eval_every == 0):
                _evaluate(run, with_kl=cfg.kl_eval and last)
            if cfg.save_every and (step % cfg.save_every == 0 or last):
                _save(run)
            if on_step is not None:
                on_step(step)


def train_mixers(student, layers: list[int], pairs: LayerPairs, mixer_params: dict[int, list],
                 max_grad_norm: float, mixer_autocast: bool, device: torch.device) -> tuple[dict, dict]:
    """Each layer's relative error and backward on its own (one mixer's activations alive at a time), gradients
    clipped per mixer; returns ({layer: relative error}, {layer: gradient norm}). The optimiser step is the
    caller's. Shared by the run and bench/align_step.py."""
    mask = pairs.attention_mask
    errors: dict[int, float] = {}
    grad_norms: dict[int, float] = {}
    for layer in layers:
        with mixer_context(mixer_autocast, device):
            prediction = mixer_output(student, layer, pairs.inputs[layer].to(torch.float32), mask)
        loss = relative_error(*squared_sums(prediction, pairs.targets[layer], mask))
        loss.backward()
        errors[layer] = float(loss.detach())
        grad_norms[layer] = float(torch.nn.utils.clip_grad_norm_(mixer_params[layer], max_grad_norm))
    return errors, grad_norms


def _train_step(run: _Run) -> dict:
    """One optimiser step: one teacher pass (or cached pairs), then each mixer's loss and backward on its own."""
    cfg = run.config
    started = time.perf_counter()
    pairs = _step_pairs(run)
    teacher_s = time.perf_counter() - started
    errors, grad_norms = train_mixers(run.models.student, run.models.layers, pairs, run.mixer_params,
                                      cfg.max_grad_norm, run.mixer_autocast, run.device)
    mean_error = sum(errors.values()) / len(errors)
    if not math.isfinite(mean_error):
        good = list_checkpoints(run.out / "checkpoints")
        where = f"the last good checkpoint is {good[-1]}" if good else "no checkpoint was written yet"
        raise RadError(f"The alignment loss became {mean_error} at step {run.step + 1}; stopped ({where}). "
                       "Lower --lr or check the data.")
    lr = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    seconds = time.perf_counter() - started
    tokens = int(pairs.attention_mask.sum())
    return {"kind": "train", "step": run.step, "loss": mean_error,
            "relative_error": {str(k): v for k, v in errors.items()}, "lr": lr,
            "grad_norm": max(grad_norms.values()), "tokens": tokens, "tokens_per_s": tokens / max(seconds, 1e-9),
            "teacher_s": teacher_s, "step_s": seconds}


@torch.no_grad()
def held_out_relative_errors(student, teacher, layers: list[int], rows: Sequences, batch: int, device,
                             mixer_context=contextlib.nullcontext) -> dict[int, float]:
    """Each layer's relative error (sum over held-out tokens of |mixer - attention|^2 / |attention|^2)."""
    sums = {layer: torch.zeros(2, dtype=torch.float64) for layer in layers}
    was_training = student.training
    student.eval()
    try:
        for start in range(0, len(rows), batch):
            part = rows.rows(list(range(start, min(start + batch, len(rows)))))
            pairs = teacher_pairs(teacher, layers, part.input_ids.to(device), part.attention_mask.to(device))
            for layer in layers:
                with mixer_context():
                    prediction = mixer_output(student, layer, pairs.inputs[layer].to(torch.float32),
                                              pairs.attention_mask)
                err, energy = squared_sums(prediction, pairs.targets[layer], pairs.attention_mask)
                sums[layer] += torch.stack([err, energy]).double().cpu()
    finally:
        student.train(was_training)
    return {layer: float(relative_error(s[0], s[1])) for layer, s in sums.items()}


@dataclass
class _OneProcess:
    """What distill's held-out `evaluate` asks of its accelerator, for one process on `device` (no accelerate state)."""

    device: torch.device
    process_index: int = 0
    num_processes: int = 1

    def unwrap_model(self, model):
        return model

    def autocast(self):
        return contextlib.nullcontext()

    def reduce(self, tensor, reduction: str = "sum"):
        return tensor


def held_out_kl(student, teacher, rows: Sequences, batch: int, device: torch.device) -> dict:
    """The hybrid's held-out KL(teacher || hybrid), perplexities and top-1 agreement: distill's own evaluation."""

    objective = DistillObjective(student, teacher, LossWeights(kl=1.0), align_layers=[])
    return evaluate(objective, rows, batch, _OneProcess(device))


def _evaluate(run: _Run, with_kl: bool) -> None:
    cfg = run.config
    rows = run.data.eval.rows(list(range(min(cfg.eval_sequences, len(run.data.eval)))))
    errors = held_out_relative_errors(run.models.student, run.models.target_teacher, run.models.layers, rows,
                                      cfg.batch, run.device, lambda: mixer_context(run.mixer_autocast, run.device))
    record = {"kind": "eval", "step": run.step, "relative_error": {str(k): v for k, v in errors.items()},
              "mean_relative_error": sum(errors.values()) / len(errors)}
    if with_kl and run.models.eval_teacher is not None:
        record.update(held_out_kl(run.models.student, run.models.eval_teacher, rows, cfg.batch, run.device))
    run.logs.write(record)
    logger.info("step %d: held-out relative error %.4f%s", run.step, record["mean_relative_error"],
                f", KL {record['eval_kl']:.4f}" if "eval_kl" in record else "")


def _save(run: _Run) -> None:
    trainable = {n: p for n, p in run.models.student.named_parameters() if p.requires_grad}
    save_checkpoint(run.out / "checkpoints", run.step, trainable, run.optimizer.state_dict(),
                    run.scheduler.state_dict(), [rng_state()], settings=run.settings,
                    data_position=run.step * run.config.batch, train_sequences=len(run.data.train),
                    keep=run.config.keep_checkpoints)

def _finish(run: _Run) -> AlignResult:
    """OUT/student and summary.json, from the log the run wrote."""
    records = run.logs.read()
    history = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    student_dir = save_student(run.models, run.config, run.out / "student")
    summary = build_summary(run.config, run.models, run.data, run.precision, run.mixer_autocast, run.settings,
                            history, evals, student_dir)
    summary.save(run.out)
    return AlignResult(out=run.out, student_dir=student_dir, steps=run.step, history=history, evals=evals,
                       summary=summary)
