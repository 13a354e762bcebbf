"""Decoding speed and cache memory as a stage: greedy tok/s and cache bytes per token of a run's models.

A quick look at what replacing attention buys (`bench/decode_speed.py` is the careful measurement). Its record,
speed.json, is a `SpeedResult`; its presence with the same contexts and models means the stage is done.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from rad.decoding.speculative import draft_generate, greedy_generate
from rad.models.info import model_info
from rad.models.loading import load_model
from rad.stages.roles import DRAFT, TEACHER
from rad.utils.artefacts import load_artefact
from rad.utils.atomic import atomic_write_json

logger = logging.getLogger(__name__)

SPEED_FILE = "speed.json"
GENERATED_TOKENS = 16  # per measurement
WARMUP_CONTEXT = 16  # the warm-up generates from the context's first tokens


@dataclasses.dataclass(frozen=True)
class SpeedRow:
    context: int
    model: str
    tok_s: float
    cache_MiB: float  # noqa: N815 (the JSON field's name)
    bytes_per_token: float | None = None  # KV + recurrent state at `context`, per token of context (None: older rad)


@dataclasses.dataclass(frozen=True)
class SpeedResult:
    """What speed.json holds (its presence means the speed stage is done): greedy tok/s, cache MiB and cache
    bytes per token of context, per context and model (teacher, draft, both students), and the contexts asked for."""

    contexts: list[int]
    rows: list[SpeedRow]

    @property
    def models(self) -> list[str]:
        return list(dict.fromkeys(r.model for r in self.rows))

    def row(self, model: str, context: int) -> SpeedRow | None:
        return next((r for r in self.rows if r.model == model and r.context == context), None)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data) -> SpeedResult:
        if isinstance(data, list):  # an older rad wrote the rows alone
            rows = [SpeedRow(**r) for r in data]
            return cls(contexts=list(dict.fromkeys(r.context for r in rows)), rows=rows)
        return cls(contexts=list(data["contexts"]), rows=[SpeedRow(**r) for r in data["rows"]])

    def save(self, root: str | Path) -> Path:
        return atomic_write_json(Path(root) / SPEED_FILE, self.to_json())

    @classmethod
    def load(cls, root: str | Path) -> SpeedResult:
        return load_artefact(Path(root) / SPEED_FILE, cls.from_json, "a rad speed table",
                             "delete it and re-run `rad run` to measure again")


def cache_bytes_per_token(info, context: int) -> float:
    """A model's decode cache per token of a `context`-token sequence: its KV bytes per token plus its constant
    recurrent state spread over the context (what a served sequence costs in memory, and what every decode step
    reads besides the weights)."""
    return info.kv_bytes_per_token + info.ssm_state_bytes / context


def _finished(out: Path, contexts: list[int], names: list[str]) -> SpeedResult | None:
    """speed.json when it measured these contexts and models (with bytes per token), else None."""
    if not (out / SPEED_FILE).is_file():
        return None
    done = SpeedResult.load(out)
    if done.contexts == list(contexts) and set(names) <= set(done.models) and all(
            r.bytes_per_token is not None for r in done.rows):
        return done
    logger.info("speed: %s measured contexts %s and models %s, not %s and %s: measuring again", SPEED_FILE,
                done.contexts, done.models, contexts, names)
    return None


def speed_stage(teacher, students: dict[str, Path], skipped: list[int], out: Path, *, contexts: list[int],
                seed: int, device: str | None) -> SpeedResult:
    """Greedy decode speed (rad's engine) and cache bytes per token of the teacher, the draft (the teacher with
    `skipped` attention layers skipped) and the students (name -> folder) at each of `contexts` (random prompts
    drawn with `seed`), into `out`/speed.json."""
    out = Path(out)
    names = [TEACHER, DRAFT, *students]
    done = _finished(out, contexts, names)
    if done is not None:
        return done
    loaded = {TEACHER: teacher.model,
              **{name: load_model(str(folder), device=device).model for name, folder in students.items()}}
    infos = {name: model_info(model) for name, model in loaded.items()}
    n_attention = infos[TEACHER].layer_map.count("attention")
    draft_kv = infos[TEACHER].kv_bytes_per_token * (n_attention - len(skipped)) / n_attention

    def measure(name, ids):
        if name == DRAFT:
            return draft_generate(teacher.model, ids, skipped, GENERATED_TOKENS)
        return greedy_generate(loaded[name], ids, GENERATED_TOKENS)

    rows = []
    gen = torch.Generator().manual_seed(seed)
    for context in contexts:
        ids = torch.randint(0, teacher.model.config.vocab_size, (1, context), generator=gen)
        for name in names:
            measure(name, ids[:, :WARMUP_CONTEXT])  # warm-up
            r = measure(name, ids)
            per_token = draft_kv if name == DRAFT else cache_bytes_per_token(infos[name], context)
            rows.append(SpeedRow(context=context, model=name, tok_s=r.tokens_per_second,
                                 cache_MiB=per_token * context / 2**20, bytes_per_token=per_token))
    result = SpeedResult(contexts=list(contexts), rows=rows)
    result.save(out)  # atomic: its presence means "stage done"
    return result
