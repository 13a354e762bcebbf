"""Reading an append-only JSONL log that a killed writer may have cut mid-line.

Each record is appended as one `json.dumps(record) + "\\n"` write, so a kill mid-write leaves exactly one
torn line: the last, without its newline. That one is dropped (with a warning); any other unreadable line
is real damage and a clear RadError naming its line, never a traceback.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from rad.errors import RadError

logger = logging.getLogger(__name__)


def read_log(path: str | Path) -> list[dict]:
    """The records of the JSONL log at `path` (none when it is absent), tolerating a torn final line."""
    path = Path(path)
    if not path.is_file():
        return []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise RadError(f"{path} is unreadable ({getattr(err, 'strerror', None) or err}); restore it or delete "
                       "its folder and rerun.") from None
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):  # the last line, with no newline after it: a write cut short
                logger.warning("%s: dropping its last line, cut short by an interrupted write", path)
                break
            raise RadError(f"{path} line {number} is corrupt ({err.msg}), which an interrupted write cannot "
                           "cause; restore the file or delete its folder and rerun.") from None
        if not isinstance(record, dict):
            raise RadError(f"{path} line {number} is not a log record (a JSON object); restore the file or "
                           "delete its folder and rerun.")
        records.append(record)
    return records
