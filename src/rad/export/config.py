"""`rad export`'s settings and the checks that run before any model is loaded."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rad.errors import RadError
from rad.export.llama_cpp import SETUP_HINT, llama_cpp_available

FORMATS = ("gguf", "vllm")  # a .gguf file for llama.cpp; a folder for vLLM (export/vllm.py)
# GGUF tensor types rad writes itself (with the gguf package), and the k-quants llama.cpp's own quantiser makes from
# rad's f32 file (llama-cpp-python, `make setup-serve`; the values are llama.cpp's llama_ftype numbers).
WRITTEN_TYPES = ("f32", "f16", "bf16", "q8_0")
QUANTISER_TYPES = {"q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}
TYPES = (*WRITTEN_TYPES, *QUANTISER_TYPES)


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
    tensor_parallel_size: int = 1  # vllm: the GPUs whose shape rules the folder is checked against

    def __post_init__(self):
        if self.format not in FORMATS:
            raise RadError(f"Unknown export format {self.format!r}; use one of {', '.join(FORMATS)}.")
        if self.type not in TYPES:
            raise RadError(f"Unknown GGUF type {self.type!r}; use one of {', '.join(TYPES)}.")


def check_out(config: ExportConfig) -> Path:
    """The output file, refused when it is a folder, exists without --overwrite, or its folder does not exist."""
    out = Path(config.out).expanduser()
    if out.is_dir():
        raise RadError(f"--out {out} is a folder; give the path of the .gguf file to write.")
    if out.exists() and not config.overwrite:
        raise RadError(f"{out} already exists; pass --overwrite to replace it, or choose another --out.")
    if not out.parent.is_dir():
        raise RadError(f"The folder of --out ({out.parent}) does not exist; create it first.")
    if config.type in QUANTISER_TYPES and not llama_cpp_available():
        raise RadError(f"--type {config.type} is made by llama.cpp's quantiser, and llama-cpp-python is not "
                       f"installed; {SETUP_HINT}, or use one of {', '.join(WRITTEN_TYPES)}.")
    if config.tokenizer_gguf is not None and not Path(config.tokenizer_gguf).expanduser().is_file():
        raise RadError(f"--tokenizer-gguf {config.tokenizer_gguf} is not a file; give a .gguf file whose tokenizer "
                       "matches the model's.")
    return out
