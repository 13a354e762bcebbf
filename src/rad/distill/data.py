"""Distillation data: load records, render them with the chat template, pack, split off a held-out set.

The default is GSM8K *train* (the evaluation uses GSM8K test and CRUXEval, so there is no overlap), found
where `rad.data` finds every dataset (data folder, cache, hub when reachable); with none of them, the
English text of Python's own reference documentation (`pydoc_data.topics`, part of every CPython
install): generic text, so self-distillation still runs anywhere, with a warning.

Named sources (`--data mbpp`, `--data gsm8k+mbpp`) are data sets `rad.data` finds like any other, rendered as
prompt/response pairs; a mix interleaves its parts in proportion. Whatever the source, a record holding a
CRUXEval function or a GSM8K test question is refused (`distill/overlap.py`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from rad.data import DATASETS, PYTHON_DOCS, SOURCES, Located, find_rows, python_docs_records
from rad.distill.overlap import check_no_overlap
from rad.errors import RadError
from rad.models.tokens import encode_chat, padding_token_id

logger = logging.getLogger(__name__)

DEFAULT_HUB = ("openai/gsm8k", "main", "train")
FORBIDDEN = ("gsm_symbolic",)  # built from GSM8K test: would leak the evaluation set
PAIR_FIELDS = (("prompt", "response"), ("question", "answer"), ("instruction", "output"),
               ("prompt", "completion"), ("input", "output"))


@dataclass
class DataConfig:
    """Where records come from and how they become fixed-length training sequences."""

    spec: str | None = None  # None: the default (GSM8K train); else a local file/folder or hub id[:config]
    split: str = "train"
    prompt_field: str | None = None  # None: detected (prompt/question/instruction ...)
    response_field: str | None = None
    seq_len: int = 512
    pack: bool = True
    mask_prompt: bool = False  # count only response tokens in the loss
    eval_fraction: float = 0.02
    eval_examples: int | None = None  # overrides eval_fraction
    max_examples: int | None = None
    seed: int = 0
    # Where the default data may come from (rad.data's sources); `rad run` drops the hub once it is found offline.
    sources: tuple[str, ...] = SOURCES
    check_overlap: bool = True  # refuse records that hold a CRUXEval function or a GSM8K test question

    def __post_init__(self):
        if isinstance(self.seq_len, bool) or not isinstance(self.seq_len, int) or self.seq_len < 2:
            raise RadError(f"seq_len must be a whole number of at least 2 tokens, got {self.seq_len!r}.")
        if not 0 < self.eval_fraction < 1:
            raise RadError(f"eval_fraction must be between 0 and 1, got {self.eval_fraction!r}.")
        for name in ("eval_examples", "max_examples"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise RadError(f"{name} must be a whole number of at least 1 (or left out), got {value!r}.")
        if self.spec is not None and not str(self.spec).strip():
            raise RadError("The data spec is empty; give a file, a folder or a hub id (or leave it out).")
        if self.spec is not None:
            check_mix_names(str(self.spec))  # a typo in a mix is said before any model loads


@dataclass
class Sequences:
    """Fixed-length rows: input ids, attention mask (1 = real token) and loss mask (1 = counted)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, index: torch.Tensor | list[int]) -> Sequences:
        return Sequences(self.input_ids[index], self.attention_mask[index], self.loss_mask[index])


OFFLINE_SOURCE = PYTHON_DOCS
MIX_SEPARATOR = "+"


def _gsm8k_pairs(rows: list[dict]) -> list[dict]:
    return [{"prompt": row["question"], "response": row["answer"]} for row in rows]


def _mbpp_pairs(rows: list[dict]) -> list[dict]:
    """MBPP's problem and its tests as the prompt (as MBPP's own prompt has them), the reference solution in a
    Python code block as the response (Windows line ends and trailing spaces dropped)."""
    out = []
    for row in rows:
        tests = "\n".join(row["test_list"])
        code = "\n".join(line.rstrip() for line in row["code"].replace("\r\n", "\n").split("\n")).strip("\n")
        out.append({"prompt": f"{row['text']}\nYour code should pass these tests:\n\n{tests}",
                    "response": f"```python\n{code}\n```"})
    return out


# `--data` names: (rad.data dataset, its rows -> prompt/response records). Licences: DATASETS[...].licence.
NAMED_DATA = {"gsm8k": ("gsm8k_train", _gsm8k_pairs), "mbpp": ("mbpp", _mbpp_pairs)}


def named_parts(spec: str) -> list[str] | None:
    """The names of a named spec (`mbpp`, `gsm8k+mbpp`), or None when `spec` is not one."""
    parts = [p.strip() for p in spec.split(MIX_SEPARATOR)]
    return parts if all(p in NAMED_DATA for p in parts) else None


def check_mix_names(spec: str) -> None:
    """Refuse `A+B` naming a data set rad does not know (unless it is an existing file's path)."""
    if MIX_SEPARATOR not in spec or named_parts(spec) or spec.startswith((".", "/", "~")) \
            or Path(spec).expanduser().exists():
        return
    unknown = [p.strip() for p in spec.split(MIX_SEPARATOR) if p.strip() not in NAMED_DATA]
    raise RadError(f"The data mix {spec} names {unknown[0]!r}, which is not a data set rad knows; combine "
                   f"{', '.join(NAMED_DATA)} (e.g. gsm8k{MIX_SEPARATOR}mbpp).")


def locate_named(spec: str, sources: tuple[str, ...]) -> list[tuple[str, list[dict], Located]]:
    """Each part of a named spec with its rows and where they were found; RadError when one is nowhere."""
    found = []
    for part in named_parts(spec) or []:
        dataset = NAMED_DATA[part][0]
        rows, located = find_rows(dataset, sources=sources)
        if rows is None:
            raise RadError(f"No {DATASETS[dataset].title} data for --data {spec} ({'; '.join(located.tried)}); "
                           f"{located.how_to_get()}.")
        found.append((part, rows, located))
    return found


def interleave(parts: list[list[dict]]) -> list[dict]:
    """The parts' records merged in proportion (each part's order kept), so any prefix, e.g. `max_examples`,
    holds every part in its share."""
    keyed = [((i + 0.5) / len(part), k, record) for k, part in enumerate(parts) for i, record in enumerate(part)]
    return [record for _, _, record in sorted(keyed, key=lambda x: (x[0], x[1]))]


def default_records(sources: tuple[str, ...] = SOURCES) -> tuple[list[dict] | None, str]:
    """GSM8K train from the first source that has it, else Python's reference documentation (None if stripped)."""
    rows, located = find_rows("gsm8k_train", sources=sources)
    if rows is not None:
        return rows, located.where
    records = python_docs_records()
    if not records:
        return None, "; ".join(located.tried)
    logger.warning("No GSM8K train data (%s); distilling on Python's reference documentation (pydoc_data) "
                   "instead. Pass --data for real training data.", "; ".join(located.tried)[:200])
    return records, OFFLINE_SOURCE


@dataclass(frozen=True)
class DataLocation:
    """What a `--data` spec names, decided without loading it (preflight and the loader share this rule)."""

    kind: str  # "default" (GSM8K train, else Python's docs) | "python-docs" | "named" | "file" | "hub"
    where: str  # the path, hub id[:config] or names (`gsm8k+mbpp`); "" for the default


def locate_data(spec: str | None, sources: tuple[str, ...] = SOURCES) -> DataLocation:
    """Classify a data spec; refuse a missing file, GSM8K-test-derived data and a hub id while offline."""
    if spec is None:
        return DataLocation("default", "")
    if spec == OFFLINE_SOURCE:
        return DataLocation("python-docs", spec)
    if any(bad in spec for bad in FORBIDDEN):
        raise RadError(f"{spec} is built from GSM8K test, which rad evaluates on; distil on other data.")
    if named_parts(spec):
        return DataLocation("named", MIX_SEPARATOR.join(named_parts(spec)))
    path = Path(spec).expanduser()
    if path.exists():
        return DataLocation("file", str(path))
    check_mix_names(spec)
    if spec.startswith((".", "/", "~")) or spec.endswith((".jsonl", ".json", ".parquet", ".txt")):
        raise RadError(f"The distillation data file {spec} does not exist; check the path.")
    if "hub" not in sources:
        raise RadError(f"The distillation data {spec!r} is a hub id, but the hub is offline; give a local file.")
    return DataLocation("hub", spec)


def load_records(config: DataConfig) -> tuple[list[dict], str]:
    """The raw records and a description of where they came from."""
    location = locate_data(config.spec, tuple(config.sources))
    if location.kind == "default":
        records, source = default_records(tuple(config.sources))
        if records is None:
            raise RadError(f"No default distillation data ({source}) and no pydoc_data in this Python; "
                           "pass --data FILE_OR_HUB_ID.")
        return records, source
    if location.kind == "python-docs":
        return python_docs_records(), OFFLINE_SOURCE
    if location.kind == "named":
        found = locate_named(location.where, tuple(config.sources))
        records = interleave([NAMED_DATA[part][1](rows) for part, rows, _ in found])
        return records, location.where + " (" + ", ".join(f"{part}: {loc.where}" for part, _, loc in found) + ")"
    if location.kind == "file":
        return _load_local(Path(location.where), config.split), location.where
    name, _, subset = location.where.partition(":")
    return _load_hub(name, subset or None, config.split), f"hub:{location.where}"


def _load_local(path: Path, split: str) -> list[dict]:
    import datasets

    datasets.disable_progress_bars()
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    kinds = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text", ".text": "text"}
    builders = {kinds.get(p.suffix) for p in files}
    if len(builders) != 1 or None in builders:
        raise RadError(f"Cannot read {path}: give .jsonl, .json, .parquet or .txt files (one kind).")
    builder = builders.pop()
    if builder == "json" and all(p.stat().st_size == 0 for p in files):
        return []
    try:
        ds = datasets.load_dataset(builder, data_files=[str(p) for p in files], split="train")
    except Exception as err:  # datasets raises many types for malformed files
        raise RadError(f"Could not read {path} as {builder} ({type(err).__name__}: {str(err)[:160]}).") from err
    del split  # local files have one split
    return ds.to_list()


def _load_hub(name: str, subset: str | None, split: str) -> list[dict]:
    import datasets

    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(name, subset, split=split)
    except Exception as err:
        raise RadError(f"Could not load dataset {name!r} from the hub ({type(err).__name__}: {str(err)[:160]})") from err
    return ds.to_list()


def _pick_fields(record: dict, config: DataConfig) -> tuple[str, str | None, str | None]:
    """('chat'|'pair'|'text', prompt field, response field) for the records' shape."""
    if config.prompt_field or config.response_field:
        p, r = config.prompt_field, config.response_field
        missing = [f for f in (p, r) if f and f not in record]
        if missing:
            raise RadError(f"The data has no field {missing[0]!r}; its fields are {', '.join(sorted(record))}.")
        return ("pair" if p and r else "text"), p or r, r if p else None
    if isinstance(record.get("messages"), list):
        return "chat", "messages", None
    for p, r in PAIR_FIELDS:
        if p in record and r in record:
            return "pair", p, r
    if "text" in record:
        return "text", "text", None
    raise RadError(
        f"The data records have fields {', '.join(sorted(record)) or '(none)'}; rad needs 'messages', a "
        "prompt/response pair (prompt/response, question/answer, instruction/output) or 'text'; "
        "or name them with --prompt-field/--response-field."
    )


def render(records: list[dict], tokenizer, config: DataConfig) -> list[tuple[list[int], list[int]]]:
    """Token ids and a loss mask per record; chats and pairs by `encode_chat` (the chat template, or its
    plain-text fallback), so the prompt's ids are a prefix of the record's and `mask_prompt` can drop them."""

    if not records:
        raise RadError("The distillation dataset is empty; pass --data with some records.")
    kind, pf, rf = _pick_fields(records[0], config)
    if config.mask_prompt and kind == "text":
        raise RadError(f"--mask-prompt needs records with a prompt and a response (chat 'messages' or a pair such as "
                       f"question/answer); this data is plain text (the field {pf!r}), so nothing could be masked: "
                       "leave --mask-prompt out, or name the fields with --prompt-field/--response-field.")
    out, unmasked = [], 0
    for rec in records:
        if kind == "text":
            ids = tokenizer(str(rec[pf]), add_special_tokens=True).input_ids
            out.append((ids, [1] * len(ids)))
            continue
        if kind == "chat":
            messages = rec[pf]
        else:
            messages = [{"role": "user", "content": str(rec[pf])}, {"role": "assistant", "content": str(rec[rf])}]
        ids = encode_chat(tokenizer, messages, add_generation_prompt=False)
        prompt_ids = encode_chat(tokenizer, messages[:-1], add_generation_prompt=True)
        n_prompt = len(prompt_ids) if config.mask_prompt and ids[: len(prompt_ids)] == prompt_ids else 0
        unmasked += config.mask_prompt and n_prompt == 0
        out.append((ids, [0] * n_prompt + [1] * (len(ids) - n_prompt)))
    if unmasked:
        raise RadError(f"--mask-prompt: for {unmasked} of {len(records)} records the prompt's tokens are not the start "
                       "of the whole record's (this tokenizer's chat template renders the prompt differently alone), "
                       "so their prompts cannot be masked; leave --mask-prompt out for this data and model.")
    return out


def to_sequences(examples: list[tuple[list[int], list[int]]], seq_len: int, pack: bool, pad_id: int) -> Sequences:
    """Pack examples end to end into rows of `seq_len` (the last partial row padded), or pad each one."""
    rows: list[tuple[list[int], list[int], list[int]]] = []
    if pack:
        ids_all = [t for ids, _ in examples for t in ids]
        mask_all = [m for _, mask in examples for m in mask]
        for start in range(0, len(ids_all), seq_len):
            ids, mask = ids_all[start:start + seq_len], mask_all[start:start + seq_len]
            if len(ids) < 2:
                continue
            rows.append((ids, [1] * len(ids), mask))
    else:
        for ids, mask in examples:
            ids, mask = ids[:seq_len], mask[:seq_len]
            if len(ids) >= 2:
                rows.append((ids, [1] * len(ids), mask))
    if not rows:
        raise RadError("The distillation dataset has no sequence of two or more tokens.")
    n = len(rows)
    input_ids = torch.full((n, seq_len), pad_id, dtype=torch.long)
    attention = torch.zeros((n, seq_len), dtype=torch.long)
    loss = torch.zeros((n, seq_len), dtype=torch.long)
    for i, (ids, att, mask) in enumerate(rows):
        k = len(ids)
        input_ids[i, :k] = torch.tensor(ids)
        attention[i, :k] = torch.tensor(att)
        loss[i, :k] = torch.tensor(mask)
    return Sequences(input_ids, attention, loss)


@dataclass
class DistillData:
    train: Sequences
    eval: Sequences
    source: str
    examples: int


def build_data(config: DataConfig, tokenizer) -> DistillData:
    """Records -> (train, held-out) sequences; the split is by record, before packing, so they never overlap."""
    records, source = load_records(config)
    if not records:
        raise RadError(f"The distillation dataset {source} is empty; pass --data with some records.")
    if config.max_examples:
        records = records[: config.max_examples]
    if config.check_overlap:
        check_no_overlap(records, source, tuple(config.sources))
    examples = render(records, tokenizer, config)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(config.seed)).tolist()
    n_eval = config.eval_examples if config.eval_examples is not None else round(config.eval_fraction * len(order))
    n_eval = max(1, min(n_eval, len(order) - 1)) if len(order) > 1 else 0
    if n_eval == 0:
        raise RadError("The distillation dataset needs at least two records (one is held out for evaluation).")
    eval_ex = [examples[i] for i in order[:n_eval]]
    train_ex = [examples[i] for i in order[n_eval:]]

    pad = padding_token_id(tokenizer)
    train = to_sequences(train_ex, config.seq_len, config.pack, pad)
    held = to_sequences(eval_ex, config.seq_len, config.pack, pad)
    logger.info("Data %s: %d records -> %d train / %d held-out sequences of %d tokens",
                source, len(records), len(train), len(held), config.seq_len)
    return DistillData(train=train, eval=held, source=source, examples=len(records))


def batch_indices(step: int, global_batch: int, n: int, seed: int) -> list[int]:
    """Rows of the global batch at optimiser step `step`: a fixed function of (step, seed), so the data
    position of a resumed run is just its step number. Epochs are seeded reshuffles."""
    out = []
    perms: dict[int, list[int]] = {}
    start = step * global_batch
    for pos in range(start, start + global_batch):
        epoch, offset = divmod(pos, n)
        if epoch not in perms:
            perms[epoch] = _permutation(n, seed + epoch)
        out.append(perms[epoch][offset])
    return out


def _permutation(n: int, seed: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
