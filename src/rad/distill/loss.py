"""Distillation losses: forward KL(teacher || student), CE and layer-local alignment.

Logits for a 49k vocabulary dominate memory (batch x length x vocab x 4 bytes, for both models), so the
KL is computed from the final hidden states in chunks over the sequence: each chunk's logits exist only
inside a checkpointed function and are recomputed in the backward pass, so peak memory is set by the
chunk, not by the batch.

This module owns the teacher-agreement arithmetic (KL, perplexities, top-1 agreement): training, its
held-out evaluation and `rad eval`'s teacher metrics all use `logit_sums` / `mean_metrics` (or the fused
equivalent of `logit_sums`, tested against it).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def kl_sum(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Sum over masked positions of KL(teacher || student) at `temperature`, in float32.

    Scaled by temperature^2 (Hinton et al.) so gradient magnitudes do not depend on it.
    """
    t = float(temperature)
    s_logp = F.log_softmax(student_logits.float() / t, dim=-1)
    t_logp = F.log_softmax(teacher_logits.float() / t, dim=-1)
    per_token = (t_logp.exp() * (t_logp - s_logp)).sum(-1)
    return (per_token * mask.to(per_token.dtype)).sum() * (t * t)


def kl_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk: int | None = None,
) -> torch.Tensor:
    """Mean over real tokens of KL(teacher || student); `chunk` bounds the float32 working set per step."""
    if mask is None:
        mask = torch.ones(student_logits.shape[:-1], device=student_logits.device)
    total = student_logits.new_zeros((), dtype=torch.float32)
    length = student_logits.shape[1]
    step = chunk or length
    for start in range(0, length, step):
        sl = slice(start, start + step)
        total = total + kl_sum(student_logits[:, sl], teacher_logits[:, sl], mask[:, sl], temperature)
    return total / mask.sum().clamp_min(1)


def logit_sums(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    labels: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(KL, student CE, top-1 agreements, teacher CE), each summed over masked positions, in float32.

    The teacher metrics of training (held-out evaluation) and of `rad eval` both come from here. The CE
    sums are zero without `labels` (-100 marks a position that does not count).
    """
    s_logits, t_logits = student_logits.float(), teacher_logits.float()
    kl = kl_sum(s_logits, t_logits, mask, temperature)
    agree = ((s_logits.argmax(-1) == t_logits.argmax(-1)) & mask.bool()).sum().float()
    if labels is None:
        return kl, s_logits.new_zeros(()), agree, s_logits.new_zeros(())
    ce = F.cross_entropy(s_logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    teacher_ce = F.cross_entropy(t_logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    return kl, ce, agree, teacher_ce


def mean_metrics(kl: float, ce: float, teacher_ce: float, agree: float, tokens: float) -> dict[str, float]:
    """Per-token KL(teacher || student), student and teacher perplexity, top-1 agreement, from their sums.

    Perplexities are capped at e^50: an untrained student's are meaningless beyond that, and exp overflows.
    """
    tokens = max(tokens, 1.0)
    return {"kl": kl / tokens, "perplexity": math.exp(min(ce / tokens, 50.0)),
            "teacher_perplexity": math.exp(min(teacher_ce / tokens, 50.0)), "top1_agreement": agree / tokens}


def _chunk_terms(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    mask: torch.Tensor,
    labels: torch.Tensor,
    student_head: Callable[[torch.Tensor], torch.Tensor],
    teacher_head: Callable[[torch.Tensor], torch.Tensor],
    temperature: float,
    with_ce: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`logit_sums` of one chunk, from hidden states (its logits live only inside this call)."""
    s_logits = student_head(student_hidden)
    with torch.no_grad():
        t_logits = teacher_head(teacher_hidden)
    return logit_sums(s_logits, t_logits, mask, labels if with_ce else None, temperature)


def chunked_distill_terms(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    mask: torch.Tensor,
    student_head: Callable[[torch.Tensor], torch.Tensor],
    teacher_head: Callable[[torch.Tensor], torch.Tensor],
    *,
    labels: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk: int = 128,
) -> dict[str, torch.Tensor]:
    """Sums (not means) of KL, CE and top-1 agreements over masked positions, chunked over the sequence.

    Hidden states are the models' final-norm outputs at positions 0..T-2 aligned with next-token
    targets; `mask` marks the positions that count. Sums let the caller normalise by a global token
    count, which keeps gradient accumulation and multi-process runs exactly equal to one big batch.
    """
    with_ce = labels is not None
    if labels is None:
        labels = torch.full(mask.shape, -100, dtype=torch.long, device=mask.device)
    totals = [student_hidden.new_zeros((), dtype=torch.float32) for _ in range(4)]
    length = student_hidden.shape[1]
    use_ckpt = torch.is_grad_enabled() and student_hidden.requires_grad
    for start in range(0, length, chunk):
        sl = slice(start, start + chunk)
        # contiguous: a sliced [B, T, H] times a 2-D weight would run as a batched matmul that copies the
        # weight once per row in bf16 (6x slower on CPU, bench/distill_precision.py); a contiguous one folds to mm
        args = (student_hidden[:, sl].contiguous(), teacher_hidden[:, sl].contiguous(), mask[:, sl], labels[:, sl],
                student_head, teacher_head, temperature, with_ce)
        terms = checkpoint(_chunk_terms, *args, use_reentrant=False) if use_ckpt else _chunk_terms(*args)
        totals = [a + b for a, b in zip(totals, terms, strict=True)]
    kl, ce, agree, teacher_ce = totals
    return {"kl_sum": kl, "ce_sum": ce, "agree_sum": agree, "teacher_ce_sum": teacher_ce}


class _FusedHeadKL(torch.autograd.Function):
    """Chunked lm_head + KL (+ CE) whose backward needs no recomputation.

    The gradient of KL(p || softmax(s)) w.r.t. the logits is (softmax(s) - p) / T * T^2, known in the
    forward pass; it is pushed through the head right away, so only the small gradient w.r.t. the hidden
    states (batch x length x hidden) is kept. Each head runs once per model instead of twice.
    """

    @staticmethod
    def forward(ctx, s_hidden, t_hidden, mask, labels, s_weight, t_weight, temperature, chunk, with_ce, compute):
        with torch.autocast(s_hidden.device.type, enabled=False):  # the dtypes below are explicit
            return _FusedHeadKL._forward(ctx, s_hidden, t_hidden, mask, labels, s_weight, t_weight, temperature,
                                         chunk, with_ce, compute)

    @staticmethod
    def _forward(ctx, s_hidden, t_hidden, mask, labels, s_weight, t_weight, temperature, chunk, with_ce, compute):
        """Logits and gradient products in `compute` (bf16; None: each weight's own dtype); softmax, KL, CE
        and every sum in float32."""
        t = float(temperature)
        s_w, t_w = s_weight.to(compute or s_weight.dtype), t_weight.to(compute or t_weight.dtype)  # once per call
        compute = s_w.dtype
        need_h = s_hidden.requires_grad
        need_w = s_weight.requires_grad
        sums = torch.zeros(4, dtype=torch.float32, device=s_hidden.device)
        g_h = [torch.zeros_like(s_hidden, dtype=torch.float32) for _ in range(2)] if need_h else None
        g_w = [torch.zeros_like(s_weight, dtype=torch.float32) for _ in range(2)] if need_w else None
        for start in range(0, s_hidden.shape[1], chunk):
            sl = slice(start, start + chunk)
            # contiguous slices fold to one mm; a strided [B, T, H] runs as a batched matmul that copies the
            # weight per row (in bf16 on CPU 6x slower, half of a Qwen KD step before this)
            hs, m, lab = s_hidden[:, sl].contiguous(), mask[:, sl].float(), labels[:, sl]
            s_logits = (hs.to(compute) @ s_w.t()).float()
            t_logits = (t_hidden[:, sl].contiguous().to(t_w.dtype) @ t_w.t()).float()
            # in place where a value is not needed again: each [B, chunk, vocab] float32 temporary is ~300 MB
            # of fresh pages on Qwen's 152k vocabulary, and on CPU their first touch costs as much as the op
            s_logp = F.log_softmax(s_logits if t == 1.0 else s_logits / t, dim=-1)
            t_logp = F.log_softmax(t_logits if t == 1.0 else t_logits / t, dim=-1)
            t_p = t_logp.exp()
            sums[0] += ((t_logp.sub_(s_logp).mul_(t_p)).sum(-1) * m).sum() * (t * t)
            sums[2] += ((s_logits.argmax(-1) == t_logits.argmax(-1)) & m.bool()).sum()
            del t_logp
            valid = lab != -100
            safe = lab.clamp_min(0)
            if with_ce:
                s_logp1 = F.log_softmax(s_logits, dim=-1)
                sums[1] += -(s_logp1.gather(-1, safe[..., None])[..., 0] * valid).sum()
                t_logp1 = F.log_softmax(t_logits, dim=-1)
                sums[3] += -(t_logp1.gather(-1, safe[..., None])[..., 0] * valid).sum()
            if need_h or need_w:
                grads = [s_logp.exp_().sub_(t_p).mul_(t * m[..., None])]  # d KL_sum / d logits
                if with_ce:
                    g_ce = s_logp1.exp()
                    g_ce.scatter_add_(-1, safe[..., None], -torch.ones_like(g_ce[..., :1]))
                    grads.append(g_ce * valid[..., None])
                for k, g in enumerate(grads):
                    g = g.to(compute)
                    if need_h:
                        g_h[k][:, sl] = (g @ s_w).float()
                    if need_w:
                        g_w[k] += (g.flatten(0, 1).t() @ hs.flatten(0, 1).to(compute)).float()
        ctx.save_for_backward(*(g_h or []), *(g_w or []))
        ctx.need = (need_h, need_w)
        ctx.dtypes = (s_hidden.dtype, s_weight.dtype)
        return sums[0], sums[1], sums[2], sums[3]

    @staticmethod
    def backward(ctx, go_kl, go_ce, _go_agree, _go_tce):
        need_h, need_w = ctx.need
        saved = list(ctx.saved_tensors)
        gh = gw = None
        if need_h:
            h_kl, h_ce = saved[:2]
            saved = saved[2:]
            gh = (go_kl * h_kl + go_ce * h_ce).to(ctx.dtypes[0])
        if need_w:
            w_kl, w_ce = saved[:2]
            gw = (go_kl * w_kl + go_ce * w_ce).to(ctx.dtypes[1])
        return gh, None, None, None, gw, None, None, None, None, None


def fused_distill_terms(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    mask: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    labels: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk: int = 128,
) -> dict[str, torch.Tensor]:
    """Like `chunked_distill_terms` for bias-free linear heads given by their weights, ~40% cheaper."""
    with_ce = labels is not None
    if labels is None:
        labels = torch.full(mask.shape, -100, dtype=torch.long, device=mask.device)
    kind = student_hidden.device.type
    # Under autocast (rad.utils.precision.compute_dtype) the heads multiply in its dtype, as nn.Linear would.
    compute = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
    kl, ce, agree, teacher_ce = _FusedHeadKL.apply(
        student_hidden, teacher_hidden.detach(), mask, labels, student_weight, teacher_weight.detach(),
        temperature, chunk, with_ce, compute,
    )
    return {"kl_sum": kl, "ce_sum": ce, "agree_sum": agree.detach(), "teacher_ce_sum": teacher_ce.detach()}
