"""Reading a stage's JSON artefact back into its dataclass, with one error that says what to do.

Every artefact class (`DistillSummary`, `ArmResult`, `AblateSummary`, `SpeedResult`, ...) keeps its own
`from_json`; this is the one place that turns a missing, torn or foreign file into a sentence naming the
file, what it should have been and how to get it back, instead of a KeyError three frames down.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from pydantic import TypeAdapter

from rad.errors import RadError

T = TypeVar("T")


def load_artefact(path: str | Path, parse: Callable[[object], T], what: str, advice: str,
                  missing: str | None = None) -> T:
    """`parse(json.load(path))`; a RadError "PATH is not WHAT (...); ADVICE." when it cannot be read or parsed.

    `missing` replaces the sentence for an absent file (say, "the distillation did not finish")."""
    path = Path(path)
    if not path.is_file():
        raise RadError(f"{missing or f'{path} does not exist'}; {advice}.")
    try:
        return parse(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError, OverflowError) as err:
        detail = " ".join(str(err).split())[:160]  # pydantic's messages span lines
        raise RadError(f"{path} is not {what} ({type(err).__name__}: {detail}); {advice}.") from None


def strict(kind, data: object):
    """`data` as `kind` (a dataclass read from a JSON object, or a type such as list[int]), every field its declared
    type and nothing coerced: "13" is no layer list, 1.9 or true no layer, a dict no list (a pydantic
    ValidationError otherwise, which `load_artefact` turns into its one sentence)."""
    if not dataclasses.is_dataclass(kind):
        return TypeAdapter(kind).validate_python(data, strict=True)
    if not isinstance(data, dict):
        raise TypeError(f"expected a JSON object, got {type(data).__name__}")
    hints = typing.get_type_hints(kind)
    fields = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise KeyError(f"unexpected field {unknown[0]!r}")
    return kind(**{name: TypeAdapter(hints[name]).validate_python(value, strict=True)
                   for name, value in data.items()})


def layer_indices(data: object) -> list[int]:
    """Layer indices read strictly (`strict(list[int], ...)`), each at least 0 and none twice."""
    layers = strict(list[int], data)
    if any(i < 0 for i in layers) or len(set(layers)) != len(layers):
        raise ValueError(f"layer indices must be distinct and at least 0, got {layers}")
    return layers
