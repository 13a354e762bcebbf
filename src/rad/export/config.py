"""`rad export`'s settings and the checks that run before any model is loaded."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rad.errors import RadError

FORMATS = ("gguf",)
# GGUF tensor types rad writes itself (with the gguf package); llama.cpp's quantiser makes the rest (docs/serve.md).
TYPES = ("f32", "f16", "bf16", "q8_0")


@dataclass
class ExportConfig:
    """What `rad export MODEL --out FILE` takes. `tokenizer_gguf`: a GGUF file whose tokenizer.* metadata the export
    copies (default: the GGUF the model came from, for rad's aliases and the hybrids converted from them)."""

    model: str
    out: str
    format: str = "gguf"
    type: str = "f32"
    overwrite: bool = False
    tokenizer_gguf: str | None = None

    def __post_init__(self):
        if self.format not in FORMATS:
            raise RadError(f"Unknown export format {self.format!r}; use one of {', '.join(FORMATS)}.")
        if self.type not in TYPES:
            raise RadError(f"Unknown GGUF type {self.type!r}; use one of {', '.join(TYPES)} (quantise further with "
                           "llama.cpp's llama-quantize, docs/serve.md).")


def check_out(config: ExportConfig) -> Path:
    """The output file, refused when it is a folder, exists without --overwrite, or its folder does not exist."""
    out = Path(config.out).expanduser()
    if out.is_dir():
        raise RadError(f"--out {out} is a folder; give the path of the .gguf file to write.")
    if out.exists() and not config.overwrite:
        raise RadError(f"{out} already exists; pass --overwrite to replace it, or choose another --out.")
    if not out.parent.is_dir():
        raise RadError(f"The folder of --out ({out.parent}) does not exist; create it first.")
    if config.tokenizer_gguf is not None and not Path(config.tokenizer_gguf).expanduser().is_file():
        raise RadError(f"--tokenizer-gguf {config.tokenizer_gguf} is not a file; give a .gguf file whose tokenizer "
                       "matches the model's.")
    return out
