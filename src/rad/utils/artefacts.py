"""Reading a stage's JSON artefact back into its dataclass, with one error that says what to do.

Every artefact class (`DistillSummary`, `ArmResult`, `AblateSummary`, `SpeedResult`, ...) keeps its own
`from_json`; this is the one place that turns a missing, torn or foreign file into a sentence naming the
file, what it should have been and how to get it back, instead of a KeyError three frames down.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

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
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError) as err:
        raise RadError(f"{path} is not {what} ({type(err).__name__}: {str(err)[:120]}); {advice}.") from None
