"""Running an exported GGUF in llama.cpp (through llama-cpp-python, `make setup-serve`): logits and greedy tokens for
the exactness checks, and `rad generate --engine llama.cpp`."""

from __future__ import annotations

import ctypes
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rad.errors import RadError

KV_TYPES = {"f32": 0, "f16": 1}  # ggml_type ids
SETUP_HINT = "run `make setup-serve` (pip install llama-cpp-python, which builds llama.cpp from source)"


def llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def open_gguf(path: str | Path, n_ctx: int = 2048, threads: int | None = None, logits_all: bool = False,
              kv_cache: str = "f16"):
    """A llama_cpp.Llama on `path`; a RadError with the remedy where the package or the file is missing.
    `kv_cache`: f16 (llama.cpp's default) or f32 (what an exactness check against float32 torch needs)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise RadError(f"GGUF file {path} does not exist; write one with `rad export MODEL --out {path.name}`.")
    try:
        from llama_cpp import Llama
    except ImportError:
        raise RadError(f"llama-cpp-python is not installed; {SETUP_HINT}.") from None
    threads = threads or min(os.cpu_count() or 1, 8)
    try:
        return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=min(n_ctx, 512), n_ubatch=min(n_ctx, 512),
                     n_threads=threads, n_threads_batch=threads, logits_all=logits_all, verbose=False,
                     type_k=KV_TYPES[kv_cache], type_v=KV_TYPES[kv_cache])
    except ValueError as err:  # llama.cpp refused the file (its log names why)
        raise RadError(f"llama.cpp could not load {path} ({err}); run with LLAMA_LOG_LEVEL=debug or check that it "
                       "came from `rad export`.") from None


def quantise(source: Path, out: Path, ftype: int, threads: int | None = None) -> None:
    """llama.cpp's own quantiser (what its llama-quantize runs) from `source` to `out`, for the k-quants."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads or min(os.cpu_count() or 1, 8)
    if llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params)) != 0:
        raise RadError(f"llama.cpp's quantiser failed on {source}; run with LLAMA_LOG_LEVEL=debug to see why.")


def logits_of(llm, ids: list[int]) -> np.ndarray:
    """Float32 logits [len(ids), vocab] of one sequence from a fresh state (the Llama needs logits_all=True)."""
    llm.reset()
    llm.eval(list(ids))
    return np.array(llm.scores[: len(ids)], dtype=np.float32, copy=True)


def greedy_ids(llm, ids: list[int], new_tokens: int, stop: set[int] = frozenset()) -> list[int]:
    """Up to `new_tokens` greedy continuations of `ids` (argmax of llama.cpp's logits; no sampler involved), ending
    after the first token in `stop`."""
    llm.reset()
    llm.eval(list(ids))
    out: list[int] = []
    for _ in range(new_tokens):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        if token in stop:
            break
        llm.eval([token])
    return out


@dataclass
class EngineResult:
    text: str
    new_tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


def generate_gguf(path: str | Path, prompt: str, *, chat: bool, max_new_tokens: int, temperature: float,
                  top_p: float, seed: int, threads: int | None = None) -> EngineResult:
    """`rad generate --engine llama.cpp`: one completion (the chat template from the GGUF's metadata with --chat)."""
    llm = open_gguf(path, n_ctx=4096, threads=threads)
    try:
        return _complete(llm, prompt, chat, max_new_tokens, temperature, top_p, seed)
    finally:
        llm.close()  # now, not at interpreter exit (where llama-cpp-python's finaliser fails noisily)


def _complete(llm, prompt: str, chat: bool, max_new_tokens: int, temperature: float, top_p: float,
              seed: int) -> EngineResult:
    start = time.perf_counter()
    if chat:
        out = llm.create_chat_completion([{"role": "user", "content": prompt}], max_tokens=max_new_tokens,
                                         temperature=temperature, top_p=top_p, seed=seed, top_k=0 if temperature
                                         else 1)
        text, usage = out["choices"][0]["message"]["content"], out["usage"]
    else:
        out = llm.create_completion(prompt, max_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                    seed=seed, top_k=0 if temperature else 1)
        text, usage = out["choices"][0]["text"], out["usage"]
    return EngineResult(text, int(usage["completion_tokens"]), time.perf_counter() - start)
