"""The distillation loop (`rad distill`): one process or many under `accelerate launch`.

Determinism is by construction: the rows of optimiser step s are a fixed function of (s, seed), every
rank computes the global token count of the step itself, and each micro-batch's loss is its token sum
divided by that count. So one process with gradient accumulation and N processes with the same global
batch optimise the same objective, and a resumed run needs only its step number to find its data.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from rad.distill.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from rad.distill.data import DataConfig, DistillData, Sequences, batch_indices, build_data
from rad.distill.modules import (
    check_same_vocabulary,
    count_parameters,
    enable_gradient_checkpointing,
    replaced_attention_layers,
    select_trainable,
    share_frozen_weights,
)
from rad.distill.objective import DistillObjective, LossWeights
from rad.errors import RadError
from rad.utils.atomic import atomic_directory

logger = logging.getLogger(__name__)

KILL_ENV = "RAD_DISTILL_KILL_AT_STEP"  # tests: SIGKILL the process right after this optimiser step


@dataclass
class DistillConfig:
    """Everything a distillation run needs; `rad distill` fills it from its flags."""

    hybrid: str
    out: str
    teacher: str | None = None  # None: the hybrid's source model (self-distillation)
    train: str = "mixers"  # mixers | mixers+mlp | all
    steps: int = 1000
    data: DataConfig = field(default_factory=DataConfig)
    micro_batch: int = 4
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_ratio: float = 0.01
    max_grad_norm: float = 1.0
    loss: LossWeights = field(default_factory=LossWeights)
    eval_every: int = 100
    eval_sequences: int = 64
    save_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 1
    resume: bool = False
    share_weights: bool = True  # self-distillation: the teacher points at the student's frozen tensors
    gradient_checkpointing: bool = False
    mixed_precision: str = "auto"  # auto (bf16 on CUDA), no, bf16, fp16
    device: str | None = None  # None: accelerate's choice; "cpu" forces CPU
    dtype: str | None = None  # student weights; None: float32 (AdamW wants float32 master weights)
    teacher_dtype: str | None = None  # a separate teacher; None: like the student
    seed: int = 0
    progress: bool = True
    tensorboard: bool = True
    plots: bool = True


@dataclass
class DistillResult:
    out: Path
    student_dir: Path | None
    steps: int
    history: list[dict]
    evals: list[dict]
    summary: dict


def _accelerator(config: DistillConfig):
    from accelerate import Accelerator

    precision = config.mixed_precision
    cpu = config.device is not None and torch.device(config.device).type == "cpu"
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and not cpu else "no"
    return Accelerator(cpu=cpu, mixed_precision=precision)


def _same_model(a: str, b: str) -> bool:
    from rad.models.loading import resolve_to_folder

    if a == b:
        return True
    try:
        fa, fb = resolve_to_folder(a), resolve_to_folder(b)
    except RadError:
        return False
    return fa is not None and fb is not None and fa.resolve() == fb.resolve()


@dataclass
class Models:
    student: torch.nn.Module
    teacher: torch.nn.Module
    tokenizer: object
    record: dict | None
    self_distill: bool
    shared_bytes: int
    trainable: list[str]


def load_models(config: DistillConfig, device: torch.device) -> Models:
    """Student (the hybrid), its trainable set, and the teacher (sharing frozen weights when it can)."""
    from rad.models.convert import read_conversion_record
    from rad.models.loading import load_model

    student_loaded = load_model(config.hybrid, device=device, dtype=config.dtype or "float32")
    student = student_loaded.model
    if getattr(student.config, "model_type", None) != "bamba":
        raise RadError(f"{config.hybrid} is not a rad hybrid (Bamba) checkpoint; make one with `rad convert`.")
    record = read_conversion_record(student_loaded.path) if student_loaded.path else None
    source = record.get("source_model") if record else None
    teacher_spec = config.teacher or source
    if teacher_spec is None:
        raise RadError(f"{config.hybrid} has no rad_conversion.json naming its source; pass --teacher MODEL.")
    self_distill = source is not None and _same_model(teacher_spec, source)
    trainable = select_trainable(student, config.train)
    n_train, n_total = count_parameters(student)
    logger.info("Training %s: %s of %s student parameters (%.2f%%)", config.train, f"{n_train:,}",
                f"{n_total:,}", 100 * n_train / max(n_total, 1))
    share = self_distill and config.share_weights
    teacher_dtype = student.dtype if share else (config.teacher_dtype or student.dtype)
    teacher_loaded = load_model(teacher_spec, device=device, dtype=teacher_dtype)
    teacher = teacher_loaded.model
    check_same_vocabulary(student_loaded.tokenizer, teacher_loaded.tokenizer,
                          student.get_output_embeddings().weight.shape[0],
                          teacher.get_output_embeddings().weight.shape[0])
    shared_bytes = 0
    if share:
        report = share_frozen_weights(teacher, student)
        shared_bytes = report.shared_bytes
        logger.info("Self-distillation: the teacher shares %d frozen tensors (%.1f MB) with the student and "
                    "owns %.1f MB", report.shared_tensors, report.shared_bytes / 1e6, report.own_bytes / 1e6)
    else:
        for p in teacher.parameters():
            p.requires_grad_(False)
        logger.info("Teacher %s%s (own copy of its weights)", teacher_spec, " (self)" if self_distill else "")
    teacher.eval()
    return Models(student, teacher, student_loaded.tokenizer, record, self_distill, shared_bytes, trainable)


def cosine_lambda(total: int, warmup: int, min_ratio: float):
    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return fn


def _to(rows: Sequences, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return rows.input_ids.to(device), rows.attention_mask.to(device), rows.loss_mask.to(device)


class _Logs:
    """JSONL + TensorBoard writers on the main process; no-ops elsewhere."""

    def __init__(self, out: Path, enabled: bool, tensorboard: bool, start_step: int):
        self.enabled = enabled
        self.path = out / "log.jsonl"
        self.tb = None
        if not enabled:
            return
        if self.path.exists():  # keep what a resumed run already logged up to its checkpoint
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= start_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1 if start_step else None)
            except ImportError:
                logger.warning("tensorboard is not installed; writing JSONL logs only.")

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            prefix = record.get("kind", "train")
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "kind"):
                    self.tb.add_scalar(f"{prefix}/{k}", v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


@torch.no_grad()
def evaluate(objective, rows: Sequences, micro_batch: int, accelerator) -> dict:
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
        with accelerator.autocast():
            terms = objective(ids, att, lm, labels=True)
        sums += torch.stack([terms["kl_sum"], terms["ce_sum"], terms["teacher_ce_sum"], terms["agree_sum"],
                             lm[:, 1:].sum().float()]).double()
    objective.train(was_training)
    sums = accelerator.reduce(sums, reduction="sum") if world > 1 else sums
    kl, ce, tce, agree, tokens = sums.tolist()
    tokens = max(tokens, 1.0)
    return {"eval_kl": kl / tokens, "eval_ppl": math.exp(min(ce / tokens, 50.0)),
            "teacher_ppl": math.exp(min(tce / tokens, 50.0)), "eval_top1_agreement": agree / tokens,
            "eval_tokens": int(tokens)}


def run_distill(config: DistillConfig) -> DistillResult:
    """Distil the hybrid in `config.hybrid` from its teacher; write checkpoints, logs and the final student."""
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    if config.steps < 1:
        raise RadError("--steps must be at least 1.")
    accelerator = _accelerator(config)
    device = accelerator.device
    is_main = accelerator.is_main_process
    world = accelerator.num_processes
    out = Path(config.out)
    ckpt_root = out / "checkpoints"
    existing = list_checkpoints(ckpt_root)
    if existing and not config.resume:
        raise RadError(f"{out} already holds checkpoints; pass --resume to continue or choose a new --out.")
    set_seed(config.seed)

    models = load_models(config, device)
    student, teacher = models.student, models.teacher
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(student)
    student.train()
    data: DistillData = build_data(config.data, models.tokenizer)
    align_layers = replaced_attention_layers(teacher, student)
    objective = DistillObjective(student, teacher, config.loss, align_layers)

    params = [p for n, p in student.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    warmup = max(1, round(config.warmup_ratio * config.steps)) if config.warmup_ratio > 0 else 0
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_lambda(config.steps, warmup, config.min_lr_ratio))
    objective, optimizer = accelerator.prepare(objective, optimizer)
    teacher.to(device)

    start_step = 0
    if existing:
        latest = existing[-1]
        ckpt = load_checkpoint(latest, device)
        _check_compatible(ckpt["state"], config, world)
        named = dict(accelerator.unwrap_model(objective).student.named_parameters())
        with torch.no_grad():
            for name, value in ckpt["weights"].items():
                if name not in named:
                    raise RadError(f"Checkpoint {latest} holds {name}, which the student lacks; wrong --out?")
                named[name].copy_(value)
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"][accelerator.process_index])
        start_step = ckpt["state"]["step"]
        logger.info("Resumed from %s (step %d of %d)", latest, start_step, config.steps)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(asdict(config), indent=2, default=str))
    logs = _Logs(out, is_main, config.tensorboard, start_step)

    global_batch = config.micro_batch * config.grad_accum * world
    per_rank = config.micro_batch * config.grad_accum
    n_train = len(data.train)
    kill_at = int(os.environ.get(KILL_ENV, "0") or 0)
    bar = tqdm(total=config.steps, initial=start_step, disable=not (is_main and config.progress),
               desc="distill", dynamic_ncols=True)
    tokens_seen = 0
    t0 = time.perf_counter()
    step = start_step
    last_eval: dict = {}
    if start_step == 0 and config.eval_every:
        last_eval = evaluate(objective, data.eval.rows(list(range(min(config.eval_sequences, len(data.eval))))),
                             config.micro_batch, accelerator)
        logs.write({"kind": "eval", "step": 0, **last_eval})
    while step < config.steps:
        step_start = time.perf_counter()
        idx = batch_indices(step, global_batch, n_train, config.data.seed)
        total_tokens = float(data.train.loss_mask[idx][:, 1:].sum().clamp_min(1))
        mine = idx[accelerator.process_index * per_rank:(accelerator.process_index + 1) * per_rank]
        sums = torch.zeros(4, dtype=torch.float64, device=device)
        for j in range(config.grad_accum):
            ids, att, lm = _to(data.train.rows(mine[j * config.micro_batch:(j + 1) * config.micro_batch]), device)
            sync = contextlib.nullcontext() if j == config.grad_accum - 1 else accelerator.no_sync(objective)
            with sync:
                with accelerator.autocast():
                    terms = objective(ids, att, lm)
                loss = terms["loss_sum"] * (world / total_tokens)
                accelerator.backward(loss)
            sums += torch.stack([terms["loss_sum"], terms["kl_sum"], terms["ce_sum"], terms["align_sum"]]
                                ).detach().double()
        if world > 1:
            sums = accelerator.reduce(sums, reduction="sum")
        loss_v, kl_v, ce_v, align_v = (sums / total_tokens).tolist()
        if not math.isfinite(loss_v):
            bar.close()
            good = list_checkpoints(ckpt_root)
            where = f"the last good checkpoint is {good[-1]}" if good else "no checkpoint was written yet"
            raise RadError(f"The loss became {loss_v} at step {step + 1}; stopped ({where}). Lower --lr or "
                           "check the data.")
        grad_norm = accelerator.clip_grad_norm_(params, config.max_grad_norm)
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += int(total_tokens)
        dt = time.perf_counter() - step_start
        record = {"kind": "train", "step": step, "loss": loss_v, "kl": kl_v, "ce": ce_v, "align": align_v,
                  "lr": lr, "grad_norm": grad_norm, "tokens": int(total_tokens),
                  "tokens_per_s": total_tokens / max(dt, 1e-9), "elapsed_s": time.perf_counter() - t0}
        if step % config.log_every == 0 or step == config.steps:
            logs.write(record)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_v:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
        if config.eval_every and (step % config.eval_every == 0 or step == config.steps):
            last_eval = evaluate(objective, data.eval.rows(list(range(min(config.eval_sequences, len(data.eval))))),
                                 config.micro_batch, accelerator)
            logs.write({"kind": "eval", "step": step, **last_eval})
            logger.debug("step %d: %s", step, last_eval)
        if config.save_every and (step % config.save_every == 0 or step == config.steps):
            _save(accelerator, objective, optimizer, scheduler, ckpt_root, step, config, data)
        if kill_at and step == kill_at:
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
    bar.close()
    logs.close()
    accelerator.wait_for_everyone()

    history = [r for r in logs.read() if r.get("kind") == "train"]
    evals = [r for r in logs.read() if r.get("kind") == "eval"]
    summary = {}
    student_dir = None
    if is_main:
        unwrapped = accelerator.unwrap_model(objective).student
        student_dir = save_student(unwrapped, models.tokenizer, out / "student", models.record, config)
        summary = _summary(config, models, data, history, evals, student_dir)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        if config.plots:
            from rad.distill.report import plot_curves

            plot_curves(history, evals, out)
    accelerator.wait_for_everyone()
    return DistillResult(out=out, student_dir=student_dir, steps=step, history=history, evals=evals,
                         summary=summary)


def _check_compatible(state: dict, config: DistillConfig, world: int) -> None:
    want = {"train": config.train, "global_batch": config.micro_batch * config.grad_accum * world,
            "steps": config.steps, "seed": config.data.seed}
    for key, value in want.items():
        if key in state and state[key] != value:
            raise RadError(f"The checkpoint was made with {key}={state[key]}, this run has {key}={value}; "
                           "resume with the same settings.")


def _save(accelerator, objective, optimizer, scheduler, root: Path, step: int, config: DistillConfig,
          data: DistillData) -> None:
    """All ranks hand over their RNG state; the main process writes the folder atomically."""
    states = [rng_state()]
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        states = gather_object(states)
    if accelerator.is_main_process:
        student = accelerator.unwrap_model(objective).student
        trainable = {n: p for n, p in student.named_parameters() if p.requires_grad}
        meta = {"train": config.train, "global_batch": config.micro_batch * config.grad_accum *
                accelerator.num_processes, "steps": config.steps, "seed": config.data.seed,
                "data_position": step * config.micro_batch * config.grad_accum * accelerator.num_processes,
                "train_sequences": len(data.train)}
        save_checkpoint(root, step, trainable, optimizer.state_dict(), scheduler.state_dict(), states, meta,
                        keep=config.keep_checkpoints)
    accelerator.wait_for_everyone()


def save_student(student, tokenizer, dest: Path, record: dict | None, config: DistillConfig) -> Path:
    """A stock transformers checkpoint (loads with AutoModelForCausalLM, no rad), written atomically."""
    from rad.models.convert import CONVERSION_FILE

    with atomic_directory(dest, overwrite=True) as tmp:
        student.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if record is not None:
            rec = dict(record)
            rec["distillation"] = {"teacher": config.teacher or record.get("source_model"), "train": config.train,
                                   "steps": config.steps, "data": config.data.spec or "default"}
            (tmp / CONVERSION_FILE).write_text(json.dumps(rec, indent=2))
    return dest


def _summary(config, models: Models, data: DistillData, history, evals, student_dir) -> dict:
    n_train, n_total = count_parameters(models.student)
    return {
        "hybrid": config.hybrid, "teacher": config.teacher or (models.record or {}).get("source_model"),
        "self_distillation": models.self_distill, "shared_teacher_bytes": models.shared_bytes,
        "train": config.train, "trainable_parameters": n_train, "total_parameters": n_total,
        "steps": config.steps, "data": data.source, "train_sequences": len(data.train),
        "eval_sequences": len(data.eval), "seq_len": config.data.seq_len,
        "first_loss": history[0]["loss"] if history else None, "final_loss": history[-1]["loss"] if history else None,
        "first_eval": evals[0] if evals else None, "final_eval": evals[-1] if evals else None,
        "student": str(student_dir),
    }
