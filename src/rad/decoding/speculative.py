"""Self-speculative decoding: the draft is the model with some attention layers skipped, the verifier the full model.

One engine serves the search, `rad generate --speculative` and the benchmarks; plain greedy decoding
is the same loop with no draft. Greedy mode is lossless (the tokens of greedy decoding with the full
model); sampling mode uses speculative-sampling acceptance, so its output distribution is the
verifier's. The verifier may be a Bamba hybrid: its Mamba2 states cannot be cropped, so the draft
runs from a snapshot that is restored afterwards, and verification keeps the state after every
token so the accepted prefix's state is exact.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from rad.decoding.runner import FastDecoder
from rad.errors import RadError
from rad.models.layers import decoder_layers


@dataclass
class DraftConfig:
    """How many tokens the draft proposes per round (Draft & Verify's adaptive rule by default)."""

    max_draft: int = 8
    adaptive: bool = True
    threshold: float = 0.8  # gamma: stop drafting when the draft's top-1 probability falls below it
    threshold_step: float = 0.01
    target_acceptance: float = 0.9

    def __post_init__(self):
        if self.max_draft < 1:
            raise RadError(f"max_draft must be at least 1, got {self.max_draft}.")


@dataclass
class SamplingConfig:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0


@dataclass
class SpeculativeResult:
    tokens: torch.Tensor  # (new_tokens,) generated ids, without the prompt
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    prefill_seconds: float = 0.0
    seconds: float = 0.0  # decode time after prefill
    accepted_per_round: list[int] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted(self) -> float:
        """Accepted draft tokens per verification round: the search's deterministic objective."""
        return self.accepted / self.rounds if self.rounds else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens.numel() / self.seconds if self.seconds > 0 else 0.0


class _Clock:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


def _filter_top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(descending=True)
    keep = sorted_probs.cumsum(-1) - sorted_probs < top_p  # always keeps the top token
    filtered = torch.zeros_like(probs).scatter(-1, order, sorted_probs * keep)
    return filtered / filtered.sum(-1, keepdim=True)


def _distribution(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    return _filter_top_p(probs, sampling.top_p)


@torch.no_grad()
def speculative_generate(
    model,
    input_ids: torch.Tensor,
    skip_layers: Iterable[int] | None,
    max_new_tokens: int,
    *,
    draft: DraftConfig | None = None,
    sampling: SamplingConfig | None = None,
    eos_token_id: int | list[int] | None = None,
    decoder: FastDecoder | None = None,
) -> SpeculativeResult:
    """Generate up to `max_new_tokens` for one prompt (1, T); `skip_layers=None` is plain decoding."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise RadError(f"Speculative decoding takes one prompt of shape (1, T), got {tuple(input_ids.shape)}.")
    if max_new_tokens < 1:
        raise RadError("max_new_tokens must be at least 1.")
    decoder = decoder or FastDecoder(model)
    draft = draft or DraftConfig()
    sampling = sampling or SamplingConfig()
    greedy = sampling.temperature <= 0
    skip = frozenset(int(i) for i in skip_layers) if skip_layers is not None else None
    if skip is not None:
        n = len(decoder_layers(model))
        bad = [i for i in skip if not 0 <= i < n]
        if bad:
            raise RadError(f"Cannot skip layer {bad[0]}: the model has layers 0..{n - 1}.")
        mamba = [i for i in skip if decoder.is_mamba[i]]
        if mamba:
            raise RadError(f"Cannot skip layer {mamba[0]}: it is a Mamba2 mixer; only attention can be skipped.")
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    generator = None
    if not greedy:
        generator = torch.Generator(device=decoder.device).manual_seed(sampling.seed)

    def pick(logits: torch.Tensor) -> torch.Tensor:
        if greedy:
            return logits.argmax(-1)
        return torch.multinomial(_distribution(logits, sampling), 1, generator=generator)[..., 0]

    clock = _Clock(decoder.device)
    input_ids = input_ids.to(decoder.device)
    cache = decoder.new_cache(input_ids.shape[1] + max_new_tokens + draft.max_draft + 1)
    start = clock()
    last_logits = decoder.prefill(input_ids, cache)  # (1, V)
    result = SpeculativeResult(tokens=torch.empty(0, dtype=torch.long))
    result.prefill_seconds = clock() - start
    out: list[int] = []
    nxt = int(pick(last_logits)[0])
    out.append(nxt)
    threshold, recent = draft.threshold, 1.0
    decode_start = clock()

    def finished() -> bool:
        return len(out) >= max_new_tokens or out[-1] in eos

    while not finished():
        budget = max_new_tokens - len(out)  # tokens still to emit; the round emits accepted + 1
        proposals: list[int] = []
        draft_probs: list[torch.Tensor] = []
        if skip is not None and budget > 1:
            t0 = clock()
            snapshot = cache.snapshot_recurrent() if decoder.n_mamba else None
            base = cache.length
            token = nxt
            for _ in range(min(draft.max_draft, budget - 1)):
                logits, pending = decoder.forward(torch.tensor([[token]], device=decoder.device), cache, skip)
                decoder.commit(cache, pending, 1)
                logits = logits[0, -1]
                if greedy:
                    probs = torch.softmax(logits, -1)
                    token = int(logits.argmax())
                    confidence = float(probs[token])
                else:
                    probs = _distribution(logits, sampling)
                    token = int(torch.multinomial(probs, 1, generator=generator))
                    confidence = float(probs[token])
                    draft_probs.append(probs)
                proposals.append(token)
                if draft.adaptive and confidence < threshold:
                    break
            cache.length = base
            if snapshot is not None:
                cache.restore_recurrent(snapshot)
            result.draft_seconds += clock() - t0
        t0 = clock()
        feed = torch.tensor([[nxt, *proposals]], device=decoder.device)
        logits, pending = decoder.forward(feed, cache)  # (1, 1 + d, V)
        logits = logits[0]
        accepted = 0
        if greedy:
            targets = logits.argmax(-1).tolist()
            while accepted < len(proposals) and proposals[accepted] == targets[accepted]:
                accepted += 1
            bonus = targets[accepted]
        else:
            bonus = None
            for j, token in enumerate(proposals):
                p = _distribution(logits[j], sampling)
                q = draft_probs[j]
                if torch.rand((), generator=generator, device=decoder.device) < torch.clamp(p[token] / q[token], max=1):
                    accepted += 1
                    continue
                residual = torch.clamp(p - q, min=0)
                residual = residual / residual.sum() if residual.sum() > 0 else p
                bonus = int(torch.multinomial(residual, 1, generator=generator))
                break
            if bonus is None:
                bonus = int(torch.multinomial(_distribution(logits[accepted], sampling), 1, generator=generator))
        decoder.commit(cache, pending, accepted + 1)  # nxt and the accepted proposals are now in the cache
        result.verify_seconds += clock() - t0
        if skip is not None:
            result.rounds += 1
            result.drafted += len(proposals)
            result.accepted += accepted
            result.accepted_per_round.append(accepted)
            if draft.adaptive and proposals:
                # Draft & Verify: track recent acceptance, nudge the threshold towards the target rate.
                recent = 0.5 * recent + 0.5 * (accepted / len(proposals))
                nudged = threshold + draft.threshold_step if recent < draft.target_acceptance else threshold - draft.threshold_step
                threshold = 0.9 * threshold + 0.1 * nudged
        for token in [*proposals[:accepted], bonus]:
            out.append(token)
            if finished():
                break
        nxt = out[-1]
    result.seconds = clock() - decode_start
    result.tokens = torch.tensor(out[:max_new_tokens], dtype=torch.long)
    return result


def greedy_generate(model, input_ids: torch.Tensor, max_new_tokens: int, **kwargs) -> SpeculativeResult:
    """Plain greedy decoding on the fast path: the engine with no draft."""
    return speculative_generate(model, input_ids, None, max_new_tokens, **kwargs)
