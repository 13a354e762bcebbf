"""The search objectives: how good is the draft "the model with these layers' attention skipped"?

- `throughput`: tokens/s of greedy self-speculative decoding (SSD) over the prompts, the paper's objective.
  Honest timing: untimed warm-up, several timed repeats, median; CUDA is synchronised around each run.
- `acceptance`: mean accepted draft tokens per verification round of the same SSD runs; no clock, so it
  is deterministic and machine-independent.
- `agreement`: top-1 agreement of the draft with the full model, teacher-forced over sequences the full
  model generated once; one batched forward per mask, the cheapest of the three.
- `hybrid-agreement`: the same agreement of the *hybrid* that replaces the mask's attention by mixers already
  aligned for every candidate layer (`rad align`), instead of skipping it: selection after alignment.

Higher is better for all. docs/search.md explains why, with exactly k layers skipped, they rank
masks alike.

What the search needs to know about an objective (deterministic? timed? run by speculative decoding?)
is a property of its class (`SearchObjective`), never a test of its name: adding an objective is one
subclass here plus its entry in `OBJECTIVE_CLASSES`.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import ClassVar

import torch
from torch import nn

from rad.decoding.runner import FastDecoder
from rad.decoding.speculative import DraftConfig, speculative_generate
from rad.errors import RadError
from rad.models.skip import skip_attention, substitute_attention

logger = logging.getLogger(__name__)


@dataclass
class Evaluation:
    """One measurement of one mask: the objective value and what it was computed from (JSON-able)."""

    value: float
    details: dict = field(default_factory=dict)
    seconds: float = 0.0


@dataclass(frozen=True)
class ObjectiveOptions:
    """How to measure: the search settings an objective may read when it is prepared (`make_objective`)."""

    max_new_tokens: int
    eos_token_id: list[int] | int | None = None
    pad_token_id: int = 0
    max_draft: int = 8
    adaptive: bool = True
    repeats: int = 3
    warmup: int = 1
    agreement_batch: int = 8
    mixers: Mapping[int, nn.Module] | None = None  # {layer: aligned mixer}, for objectives that need them


class SearchObjective:
    """A selection objective: `evaluate(mask)` scores the draft that skips `mask`'s attention, higher is
    better. The class properties tell the search how to treat it, so run.py never tests a name."""

    name: ClassVar[str]
    # The same mask always scores the same: measured once, never re-measured, the sampler may trust values.
    deterministic: ClassVar[bool] = True
    # Measured by self-speculative decoding: max_draft and adaptive decide its value.
    speculative: ClassVar[bool] = False
    # Measured with a clock: repeats, warmup, final_repeats and the device decide its value.
    timed: ClassVar[bool] = False
    # Other objectives' values its details carry (objective -> details key): measured along with it for free.
    carries: ClassVar[Mapping[str, str]] = MappingProxyType({})
    # Scores a hybrid built from given aligned mixers (`ObjectiveOptions.mixers`, the search's `aligned` folder).
    needs_mixers: ClassVar[bool] = False

    @classmethod
    def create(cls, model: nn.Module, prompts: list[torch.Tensor], options: ObjectiveOptions) -> SearchObjective:
        raise NotImplementedError

    def evaluate(self, mask: Sequence[int], repeats: int | None = None) -> Evaluation:
        raise NotImplementedError


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


class AgreementObjective(SearchObjective):
    """Fraction of the full model's greedy tokens the draft also ranks first, teacher-forced.

    The full model generates a continuation of each prompt once (greedy); the reference is the full
    model's own teacher-forced argmax over prompt + continuation, so the empty mask scores exactly 1.
    Sequences are right-padded (causal models never look at later positions, so no mask is needed).
    """

    name = "agreement"
    deterministic = True

    def __init__(self, model: nn.Module, prompts: list[torch.Tensor], max_new_tokens: int, eos_token_id=None,
                 batch_size: int = 8, pad_token_id: int = 0):
        self.model = model
        self.batch_size = batch_size
        device = _device_of(model)
        sequences, starts = [], []
        with torch.no_grad():
            for ids in prompts:
                ids = ids.to(device)
                out = model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    eos_token_id=eos_token_id,
                    pad_token_id=pad_token_id,  # one sequence per call: never written, only required
                )
                sequences.append(out[0])
                starts.append(ids.shape[1])
        self.batches = []
        order = list(range(len(sequences)))
        for b in range(0, len(order), batch_size):
            rows = order[b : b + batch_size]
            width = max(sequences[i].numel() for i in rows)
            ids = torch.zeros(len(rows), width, dtype=torch.long, device=device)
            rows_idx, cols_idx = [], []
            for r, i in enumerate(rows):
                seq = sequences[i]
                ids[r, : seq.numel()] = seq
                # position t predicts token t + 1: score the positions that predict generated tokens
                for t in range(starts[i] - 1, seq.numel() - 1):
                    rows_idx.append(r)
                    cols_idx.append(t)
            where = (torch.tensor(rows_idx, device=device), torch.tensor(cols_idx, device=device))
            self.batches.append((ids, where))
        self.positions = sum(int(where[0].numel()) for _, where in self.batches)
        if self.positions == 0:
            raise RadError("The full model generated no tokens for the search prompts; raise --max-new-tokens.")
        self.reference = [self._argmax(ids, where) for ids, where in self.batches]

    @classmethod
    def create(cls, model: nn.Module, prompts: list[torch.Tensor], options: ObjectiveOptions) -> AgreementObjective:
        return cls(model, prompts, options.max_new_tokens, options.eos_token_id, batch_size=options.agreement_batch,
                   pad_token_id=options.pad_token_id)

    @torch.no_grad()
    def _argmax(self, ids: torch.Tensor, where) -> torch.Tensor:
        hidden = self.model.base_model(input_ids=ids, use_cache=False).last_hidden_state
        logits = self.model.get_output_embeddings()(hidden[where])
        return logits.argmax(dim=-1)

    def evaluate(self, mask: Sequence[int], repeats: int | None = None) -> Evaluation:
        del repeats  # deterministic: one pass says it all
        start = time.perf_counter()
        agree = 0
        with self._draft(mask):
            for (ids, where), ref in zip(self.batches, self.reference, strict=True):
                agree += int((self._argmax(ids, where) == ref).sum())
        value = agree / self.positions
        return Evaluation(value, {"agreement": value, "positions": self.positions}, time.perf_counter() - start)

    def _draft(self, mask: Sequence[int]):
        return skip_attention(self.model, mask)


class HybridAgreementObjective(AgreementObjective):
    """`agreement` of the hybrid whose mask layers run aligned mixers in place of their attention.

    The mixers come from a hybrid that converted (and `rad align`ed) every candidate layer; the value is what the
    student built from this mask scores before any KD, rather than what skipping the layers costs. The empty
    mask scores 1, as for `agreement`.
    """

    name = "hybrid-agreement"
    needs_mixers = True

    def __init__(self, model: nn.Module, prompts: list[torch.Tensor], max_new_tokens: int, mixers, **kwargs):
        super().__init__(model, prompts, max_new_tokens, **kwargs)
        self.mixers = dict(mixers)

    @classmethod
    def create(cls, model: nn.Module, prompts: list[torch.Tensor],
               options: ObjectiveOptions) -> HybridAgreementObjective:
        if not options.mixers:
            raise RadError("The hybrid-agreement objective needs aligned mixers: give --aligned DIR (a `rad align` "
                           "output of the model converted at every candidate layer).")
        return cls(model, prompts, options.max_new_tokens, options.mixers, eos_token_id=options.eos_token_id,
                   batch_size=options.agreement_batch, pad_token_id=options.pad_token_id)

    def _draft(self, mask: Sequence[int]):
        missing = [i for i in mask if i not in self.mixers]
        if missing:
            raise RadError(f"No aligned mixer for layer {missing[0]}; the aligned hybrid converted layers "
                           f"{','.join(map(str, sorted(self.mixers)))}.")
        return substitute_attention(self.model, {i: self.mixers[i] for i in mask})


class TieBrokenAgreement(SearchObjective):
    """`primary`'s agreement first; among masks it scores equal, the one `secondary` scores higher.

    `--recall` saturates where few layers are skipped (on Qwen2.5-Coder-0.5B at k = 4 most masks recall every
    digit), and a flat objective cannot rank. The value (primary agreements + secondary agreement) /
    (primary positions + 1) stays in [0, 1], the empty mask still scores 1, and one agreed primary position always
    outweighs any secondary difference: the order among masks the primary tells apart is never changed.
    """

    deterministic = True

    def __init__(self, primary: AgreementObjective, secondary: AgreementObjective):
        self.primary = primary
        self.secondary = secondary
        self.name = primary.name

    def evaluate(self, mask: Sequence[int], repeats: int | None = None) -> Evaluation:
        del repeats
        first = self.primary.evaluate(mask)
        second = self.secondary.evaluate(mask)
        positions = self.primary.positions
        value = (round(first.value * positions) + second.value) / (positions + 1)
        details = {"agreement": first.value, "positions": positions, "tie_break_agreement": second.value,
                   "tie_break_positions": self.secondary.positions}
        return Evaluation(value, details, first.seconds + second.seconds)


class _SpeculativeRuns:
    """Runs the project's SSD engine over the prompts with a given set of skipped layers."""

    def __init__(self, model: nn.Module, prompts: list[torch.Tensor], max_new_tokens: int, eos_token_id,
                 max_draft: int, adaptive: bool):
        self.generate = speculative_generate
        self.draft = DraftConfig(max_draft=max_draft, adaptive=adaptive)
        self.model = model
        self.device = _device_of(model)
        self.prompts = [ids.to(self.device) for ids in prompts]
        self.max_new_tokens = max_new_tokens
        self.eos_token_id = eos_token_id
        self.extra = {"decoder": FastDecoder(model)}  # built once, not once per run

    def run(self, mask: Sequence[int], ids: torch.Tensor):
        with torch.no_grad():
            return self.generate(
                self.model, ids, skip_layers=list(mask), max_new_tokens=self.max_new_tokens,
                draft=self.draft, eos_token_id=self.eos_token_id, **self.extra,
            )

    def timed_pass(self, mask: Sequence[int]) -> tuple[list, float]:
        """One run per prompt; wall-clock seconds of the whole pass, synchronised on CUDA."""
        results = []
        _sync(self.device)
        start = time.perf_counter()
        for ids in self.prompts:
            results.append(self.run(mask, ids))
        _sync(self.device)
        return results, time.perf_counter() - start


def _acceptance_summary(results) -> dict:
    per_prompt = [float(r.mean_accepted) for r in results if r.rounds > 0]
    drafted = sum(int(r.drafted) for r in results)
    accepted = sum(int(r.accepted) for r in results)
    return {
        "mean_accepted": statistics.fmean(per_prompt) if per_prompt else 0.0,
        "mean_accepted_per_prompt": per_prompt,
        "acceptance_rate": accepted / drafted if drafted else 0.0,
        "rounds": sum(int(r.rounds) for r in results),
        "new_tokens": sum(int(r.tokens.numel()) for r in results),
        "decode_seconds": sum(float(getattr(r, "seconds", 0.0)) for r in results),  # the engine's, no prefill
    }


def _speculative_runs(model: nn.Module, prompts: list[torch.Tensor], options: ObjectiveOptions) -> _SpeculativeRuns:
    return _SpeculativeRuns(model, prompts, options.max_new_tokens, options.eos_token_id, options.max_draft,
                            options.adaptive)


class AcceptanceObjective(SearchObjective):
    """Mean over prompts of the accepted draft tokens per verification round (SSD, greedy)."""

    name = "acceptance"
    deterministic = True
    speculative = True

    def __init__(self, runs: _SpeculativeRuns):
        self.runs = runs

    @classmethod
    def create(cls, model: nn.Module, prompts: list[torch.Tensor], options: ObjectiveOptions) -> AcceptanceObjective:
        return cls(_speculative_runs(model, prompts, options))

    def evaluate(self, mask: Sequence[int], repeats: int | None = None) -> Evaluation:
        del repeats
        results, seconds = self.runs.timed_pass(mask)
        summary = _acceptance_summary(results)
        return Evaluation(summary["mean_accepted"], summary, seconds)


class ThroughputObjective(SearchObjective):
    """SSD tokens per second over all prompts: median of `repeats` timed passes after `warmup` runs."""

    name = "throughput"
    deterministic = False
    speculative = True
    timed = True
    carries = MappingProxyType({"acceptance": "mean_accepted"})  # the same SSD runs; acceptance has no clock

    def __init__(self, runs: _SpeculativeRuns, repeats: int, warmup: int):
        self.runs = runs
        self.repeats = repeats
        self.warmup = warmup

    @classmethod
    def create(cls, model: nn.Module, prompts: list[torch.Tensor], options: ObjectiveOptions) -> ThroughputObjective:
        return cls(_speculative_runs(model, prompts, options), repeats=options.repeats, warmup=options.warmup)

    def evaluate(self, mask: Sequence[int], repeats: int | None = None) -> Evaluation:
        start = time.perf_counter()
        for _ in range(self.warmup):
            self.runs.run(mask, self.runs.prompts[0])
        rates, summary = [], {}
        for _ in range(repeats or self.repeats):
            results, seconds = self.runs.timed_pass(mask)
            summary = _acceptance_summary(results)
            rates.append(summary["new_tokens"] / seconds if seconds > 0 else 0.0)
        value = statistics.median(rates)
        details = {"tokens_per_second": value, "repeats": rates, **summary}
        return Evaluation(value, details, time.perf_counter() - start)


# The registry: the objectives the search offers (`OBJECTIVES` in search/config.py is its keys, in this order).
OBJECTIVE_CLASSES: Mapping[str, type[SearchObjective]] = MappingProxyType(
    {cls.name: cls for cls in (ThroughputObjective, AcceptanceObjective, AgreementObjective,
                               HybridAgreementObjective)})


def objective_class(name: str) -> type[SearchObjective]:
    """The objective registered as `name`; a RadError naming the choices otherwise."""
    if name not in OBJECTIVE_CLASSES:
        raise RadError(f"Unknown objective {name!r}; choose one of {', '.join(OBJECTIVE_CLASSES)}.")
    return OBJECTIVE_CLASSES[name]


def make_objective(name: str, model: nn.Module, prompts: list[torch.Tensor], *, max_new_tokens: int,
                   eos_token_id=None, max_draft: int = 8, adaptive: bool = True, repeats: int = 3,
                   warmup: int = 1, agreement_batch: int = 8, pad_token_id: int = 0,
                   mixers: Mapping[int, nn.Module] | None = None) -> SearchObjective:
    """The objective `name`, prepared for `model` and the prompts (agreement generates its references here)."""
    options = ObjectiveOptions(max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                               max_draft=max_draft, adaptive=adaptive, repeats=repeats, warmup=warmup,
                               agreement_batch=agreement_batch, mixers=mixers)
    return objective_class(name).create(model, prompts, options)
