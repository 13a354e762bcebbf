"""Self-speculative decoding: the draft is the model with some attention layers skipped, the verifier the full model.

One engine serves the search, `rad generate --speculative` and the benchmarks; plain greedy decoding
is the same loop with no draft. Greedy mode is lossless (the tokens of greedy decoding with the full
model); sampling mode uses speculative-sampling acceptance, so its output distribution is the
verifier's. The verifier may be a Bamba hybrid: its Mamba2 states cannot be cropped, so the draft
runs from a snapshot that is restored afterwards, and verification keeps the state after every
token so the accepted prefix's state is exact.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from rad.config import check_seed
from rad.decoding.cache import DecodeCache
from rad.decoding.runner import FastDecoder
from rad.errors import RadError
from rad.models.layers import decoder_layers
from rad.models.tokens import token_ids


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

    def __post_init__(self):
        check_seed(self.seed)
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise RadError(f"temperature must be 0 (greedy) or a positive number, got {self.temperature!r}.")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise RadError(f"top_p must be in (0, 1], got {self.top_p!r}.")


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

    def record_round(self, drafted: int, accepted: int) -> None:
        """Count one verification round of `drafted` proposals, `accepted` of them kept."""
        self.rounds += 1
        self.drafted += drafted
        self.accepted += accepted
        self.accepted_per_round.append(accepted)

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


@dataclass
class _Run:
    """What one call decodes with: the fast decoder and its cache, the draft's skip set, the sampling rule."""

    decoder: FastDecoder
    cache: DecodeCache
    skip: frozenset[int] | None
    sampling: SamplingConfig
    generator: torch.Generator | None  # None: greedy

    @property
    def greedy(self) -> bool:
        return self.generator is None

    def tensor(self, tokens: list[int]) -> torch.Tensor:
        return torch.tensor([tokens], device=self.decoder.device)

    def sample(self, probs: torch.Tensor) -> torch.Tensor:
        return torch.multinomial(probs, 1, generator=self.generator)

    def pick(self, logits: torch.Tensor) -> torch.Tensor:
        """The next token(s) of the verifier: argmax, or a sample of the tempered, top-p distribution."""
        if self.greedy:
            return logits.argmax(-1)
        return self.sample(_distribution(logits, self.sampling))[..., 0]


def _check_inputs(model, input_ids: torch.Tensor, skip_layers, max_new_tokens: int,
                  decoder: FastDecoder | None) -> tuple[FastDecoder, frozenset[int] | None]:
    """The decoder and the layers the draft skips (None: no draft), after checking the prompt and the layers."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise RadError(f"Speculative decoding takes one prompt of shape (1, T), got {tuple(input_ids.shape)}.")
    if max_new_tokens < 1:
        raise RadError("max_new_tokens must be at least 1.")
    decoder = decoder or FastDecoder(model)
    if skip_layers is None:
        return decoder, None
    skip = frozenset(int(i) for i in skip_layers)
    n = len(decoder_layers(model))
    bad = [i for i in skip if not 0 <= i < n]
    if bad:
        raise RadError(f"Cannot skip layer {bad[0]}: the model has layers 0..{n - 1}.")
    mixers = [i for i in skip if decoder.is_mixer[i]]
    if mixers:
        raise RadError(f"Cannot skip layer {mixers[0]}: it is a {decoder.mixer_kind.title} mixer; only attention "
                       "can be skipped.")
    return decoder, skip


def _draft(run: _Run, token: int, steps: int, stop_below: float | None) -> tuple[list[int], list[torch.Tensor]]:
    """Up to `steps` draft tokens after `token`, and (sampling) the draft distribution of each.

    Stops early once the draft's probability of its own token falls below `stop_below`. The cache is left
    as it was: the KV length is reset and a hybrid's mixer states are restored from a snapshot.
    """
    decoder, cache = run.decoder, run.cache
    snapshot = cache.snapshot_recurrent() if decoder.n_mixer else None
    base = cache.length
    proposals: list[int] = []
    draft_probs: list[torch.Tensor] = []
    for _ in range(steps):
        logits, pending = decoder.forward(run.tensor([token]), cache, run.skip)
        decoder.commit(cache, pending, 1)
        logits = logits[0, -1]
        if run.greedy:
            probs = torch.softmax(logits, -1)
            token = int(logits.argmax())
        else:
            probs = _distribution(logits, run.sampling)
            token = int(run.sample(probs))
            draft_probs.append(probs)
        proposals.append(token)
        if stop_below is not None and float(probs[token]) < stop_below:
            break
    cache.length = base
    if snapshot is not None:
        cache.restore_recurrent(snapshot)
    return proposals, draft_probs


def _verify_greedy(logits: torch.Tensor, proposals: list[int]) -> tuple[int, int]:
    """(accepted, bonus): the proposals that match the verifier's argmax, then the verifier's next token."""
    targets = logits.argmax(-1).tolist()
    accepted = 0
    while accepted < len(proposals) and proposals[accepted] == targets[accepted]:
        accepted += 1
    return accepted, targets[accepted]


def _verify_sample(run: _Run, logits: torch.Tensor, proposals: list[int],
                   draft_probs: list[torch.Tensor]) -> tuple[int, int]:
    """(accepted, bonus) by speculative-sampling acceptance: keep token x with probability min(1, p(x)/q(x));
    at the first rejection, sample the residual max(p - q, 0); if all are kept, sample p after them."""
    for accepted, (token, q) in enumerate(zip(proposals, draft_probs, strict=True)):
        p = _distribution(logits[accepted], run.sampling)
        if torch.rand((), generator=run.generator, device=run.decoder.device) < torch.clamp(p[token] / q[token], max=1):
            continue
        residual = torch.clamp(p - q, min=0)
        residual = residual / residual.sum() if residual.sum() > 0 else p
        return accepted, int(run.sample(residual))
    accepted = len(proposals)
    return accepted, int(run.sample(_distribution(logits[accepted], run.sampling)))


def _verify(run: _Run, token: int, proposals: list[int], draft_probs: list[torch.Tensor]) -> tuple[int, int]:
    """One full-model pass over `token` and the proposals; commits the accepted prefix; (accepted, bonus)."""
    logits, pending = run.decoder.forward(run.tensor([token, *proposals]), run.cache)  # (1, 1 + d, V)
    if run.greedy:
        accepted, bonus = _verify_greedy(logits[0], proposals)
    else:
        accepted, bonus = _verify_sample(run, logits[0], proposals, draft_probs)
    run.decoder.commit(run.cache, pending, accepted + 1)  # `token` and the accepted proposals are now cached
    return accepted, bonus


def _adapt_threshold(draft: DraftConfig, threshold: float, recent: float, rate: float) -> tuple[float, float]:
    """Draft & Verify: track recent acceptance, nudge the threshold towards the target rate."""
    recent = 0.5 * recent + 0.5 * rate
    nudged = threshold + draft.threshold_step if recent < draft.target_acceptance else threshold - draft.threshold_step
    return 0.9 * threshold + 0.1 * nudged, recent


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
    decoder, skip = _check_inputs(model, input_ids, skip_layers, max_new_tokens, decoder)
    draft = draft or DraftConfig()
    sampling = sampling or SamplingConfig()
    generator = None
    if sampling.temperature > 0:
        generator = torch.Generator(device=decoder.device).manual_seed(sampling.seed)
    eos = set(token_ids(eos_token_id))
    clock = _Clock(decoder.device)
    input_ids = input_ids.to(decoder.device)
    cache = decoder.new_cache(input_ids.shape[1] + max_new_tokens + draft.max_draft + 1)
    run = _Run(decoder, cache, skip, sampling, generator)
    result = SpeculativeResult(tokens=torch.empty(0, dtype=torch.long))

    start = clock()
    last_logits = decoder.prefill(input_ids, cache)  # (1, V)
    result.prefill_seconds = clock() - start
    out = [int(run.pick(last_logits)[0])]
    threshold, recent = draft.threshold, 1.0
    decode_start = clock()

    def finished() -> bool:
        return len(out) >= max_new_tokens or out[-1] in eos

    while not finished():
        budget = max_new_tokens - len(out)  # tokens still to emit; the round emits accepted + 1
        proposals, draft_probs = [], []
        if skip is not None and budget > 1:
            t0 = clock()
            stop_below = threshold if draft.adaptive else None
            proposals, draft_probs = _draft(run, out[-1], min(draft.max_draft, budget - 1), stop_below)
            result.draft_seconds += clock() - t0
        t0 = clock()
        accepted, bonus = _verify(run, out[-1], proposals, draft_probs)
        result.verify_seconds += clock() - t0
        if skip is not None:
            result.record_round(len(proposals), accepted)
            if draft.adaptive and proposals:
                threshold, recent = _adapt_threshold(draft, threshold, recent, accepted / len(proposals))
        for token in [*proposals[:accepted], bonus]:
            out.append(token)
            if finished():
                break
    result.seconds = clock() - decode_start
    result.tokens = torch.tensor(out[:max_new_tokens], dtype=torch.long)
    return result


def greedy_generate(model, input_ids: torch.Tensor, max_new_tokens: int, **kwargs) -> SpeculativeResult:
    """Plain greedy decoding on the fast path: the engine with no draft."""
    return speculative_generate(model, input_ids, None, max_new_tokens, **kwargs)


@torch.no_grad()
def draft_generate(model, input_ids: torch.Tensor, skip_layers: Iterable[int], max_new_tokens: int, *,
                   eos_token_id: int | list[int] | None = None) -> SpeculativeResult:
    """Greedy decoding by the draft alone (the model with `skip_layers`' attention skipped), unverified: what the
    draft model itself writes and how fast, the attention-free end of the search's trade-off."""
    decoder, skip = _check_inputs(model, input_ids, skip_layers, max_new_tokens, None)
    eos = set(token_ids(eos_token_id))
    clock = _Clock(decoder.device)
    input_ids = input_ids.to(decoder.device)
    cache = decoder.new_cache(input_ids.shape[1] + max_new_tokens + 1)
    result = SpeculativeResult(tokens=torch.empty(0, dtype=torch.long))
    start = clock()
    # The prompt goes through the engine too (not the model's forward), so the skipped layers skip it as well.
    logits, pending = decoder.forward(input_ids, cache, skip)
    decoder.commit(cache, pending, input_ids.shape[1])
    out = [int(logits[0, -1].argmax())]
    result.prefill_seconds = clock() - start
    decode_start = clock()
    while len(out) < max_new_tokens and out[-1] not in eos:
        logits, pending = decoder.forward(torch.tensor([[out[-1]]], device=decoder.device), cache, skip)
        decoder.commit(cache, pending, 1)
        out.append(int(logits[0, -1].argmax()))
    result.seconds = clock() - decode_start
    result.tokens = torch.tensor(out, dtype=torch.long)
    return result
