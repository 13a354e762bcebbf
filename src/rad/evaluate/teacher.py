"""How close a student stays to its teacher on held-out text: KL(teacher || student), perplexity, top-1 agreement.

The default text is the last `n` GSM8K *train* solutions ("Question: ...\nAnswer: ..." with calculator
annotations removed): in-domain for the paper's math claim, and never GSM8K test. Both models must share
a tokenizer, as a RAD hybrid and its source do. The sums behind the metrics are `rad.distill.loss`'s, so
`rad eval` and the held-out evaluation during `rad distill` measure the same thing the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from rad.data import load_rows
from rad.distill.loss import logit_sums, mean_metrics
from rad.errors import RadError
from rad.evaluate.tasks import _clean_rationale


@dataclass(frozen=True)
class TeacherConfig:
    n_texts: int = 32
    max_length: int = 512


def heldout_texts(n: int, data_dir: str | None = None, sources: tuple[str, ...] = ("file", "hub")) -> list[str]:
    rows = load_rows("gsm8k_train", data_dir, sources)
    return [f"Question: {r['question']}\nAnswer: {_clean_rationale(r['answer'])}" for r in rows[-n:]]


def _same_tokenizer(a, b) -> bool:
    return a.get_vocab() == b.get_vocab()


@torch.no_grad()
def teacher_metrics(student, teacher, texts: list[str], config: TeacherConfig | None = None) -> dict:
    """Token-weighted KL(teacher || student) in nats, both perplexities, and top-1 agreement over `texts`.

    `student` and `teacher` are LoadedModel-like (`.model`, `.tokenizer`).
    """
    config = config or TeacherConfig()
    if not texts:
        raise RadError("No held-out texts for the teacher metrics.")
    if not _same_tokenizer(student.tokenizer, teacher.tokenizer):
        raise RadError("The teacher and the model have different tokenizers; teacher metrics need a shared one.")
    tok = student.tokenizer
    s_dev = next(student.model.parameters()).device
    t_dev = next(teacher.model.parameters()).device
    sums = torch.zeros(4, dtype=torch.float64)  # KL, student NLL, teacher NLL, top-1 agreements
    tokens = 0
    for text in tqdm(texts, desc="teacher metrics", leave=False):
        ids = tok(text, return_tensors="pt", truncation=True, max_length=config.max_length).input_ids
        if ids.shape[1] < 2:
            continue
        s_logits = student.model(ids.to(s_dev)).logits[:, :-1].float().cpu()
        t_logits = teacher.model(ids.to(t_dev)).logits[:, :-1].float().cpu()
        vocab = min(s_logits.shape[-1], t_logits.shape[-1])  # checkpoints may pad the vocabulary differently
        target = ids[:, 1:]
        kl, s_nll, agree, t_nll = logit_sums(s_logits[..., :vocab], t_logits[..., :vocab],
                                             torch.ones(target.shape), labels=target)
        sums += torch.stack([kl, s_nll, t_nll, agree]).double()
        tokens += target.numel()
    if not tokens:
        raise RadError("The held-out texts are too short to score (fewer than 2 tokens each).")
    m = mean_metrics(*sums.tolist(), tokens=float(tokens))
    return {
        "kl_teacher_student": m["kl"],
        "perplexity": m["perplexity"],
        "teacher_perplexity": m["teacher_perplexity"],
        "top1_agreement": m["top1_agreement"],
        "tokens": tokens,
        "texts": len(texts),
    }
