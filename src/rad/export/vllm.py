"""`rad export --format vllm`: a hybrid folder vLLM's Bamba loads as it is, checked against what that code asserts.

vLLM's `models/bamba.py` (read at vllm-project/vllm #43119, May 2026; docs/loaders.md) differs from transformers in
three ways that matter: it never ties `lm_head` to the embeddings (a tied checkpoint has no `lm_head.weight`, and
its loader stops on a weight it could not fill), it has no q/k/v biases (Qwen2's are dropped without a word), and it
takes head_dim = hidden / heads. The export writes the head out, refuses what it cannot express, and checks every
shape rule vLLM asserts, for the tensor-parallel sizes asked. vLLM needs a GPU, so it has not been run here.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig

from rad.errors import RadError
from rad.export.config import ExportConfig
from rad.models.convert import CONVERSION_FILE, is_hybrid_config, write_loader_keys
from rad.models.loading import load_model, resolve_to_folder
from rad.outputs import EXPORT_VLLM, check_output
from rad.utils.atomic import atomic_directory

logger = logging.getLogger(__name__)

EXPORT_RECORD = "rad_export.json"
VLLM_DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
# vLLM's causal_conv1d prefill kernel has code paths for widths 2-5 (ops/causal_conv1d.py)
VLLM_CONV_WIDTHS = range(2, 6)


@dataclass
class VllmExport:
    """What `rad export --format vllm` wrote (also `rad_export.json` in the folder)."""

    path: str
    source: str
    dtype: str
    tensor_parallel_sizes: list[int] = field(default_factory=list)  # of 1, 2, 4, 8: those vLLM's asserts allow
    untied_head: bool = False


def vllm_problems(config, tensor_parallel_size: int = 1) -> list[str]:
    """Why vLLM's Bamba would refuse or mis-compute this hybrid config at `tensor_parallel_size`, one sentence each
    (empty: nothing known). Each rule is one of vLLM's asserts or silent differences, named after its code."""
    tp = tensor_parallel_size
    problems = []
    if getattr(config, "attention_bias", False):
        problems.append("its attention has q/k/v biases (Qwen2), which vLLM's Bamba does not have and drops without "
                        "an error")
    if getattr(config, "mlp_bias", False):
        problems.append("its MLP has biases, which vLLM's Bamba does not have")
    if config.hidden_act != "silu":
        problems.append(f"its activation is {config.hidden_act!r}; vLLM's Bamba MLP runs silu only")
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    if getattr(config, "head_dim", None) and config.head_dim * heads != config.hidden_size:
        problems.append(f"head_dim {config.head_dim} x {heads} heads != hidden size {config.hidden_size}; vLLM's "
                        "Bamba takes head_dim = hidden / heads")
    n_heads, d_head, groups = config.mamba_n_heads, config.mamba_d_head, config.mamba_n_groups
    inner = config.mamba_expand * config.hidden_size
    if n_heads * d_head != inner:
        problems.append(f"mamba heads x head size = {n_heads * d_head} != mamba_expand x hidden = {inner}, "
                        "the width vLLM gives the mixer")
    if n_heads % groups:
        problems.append(f"{n_heads} mamba heads are not a multiple of {groups} groups (vLLM's SSD kernel)")
    chunk = int(getattr(config, "mamba_chunk_size", 256))
    if chunk < 1 or chunk & (chunk - 1):
        problems.append(f"mamba_chunk_size {chunk} is not a power of 2 (vLLM's SSD kernel)")
    if config.mamba_d_conv not in VLLM_CONV_WIDTHS:
        problems.append(f"conv width {config.mamba_d_conv} is outside vLLM's causal_conv1d kernels (2-5)")
    if heads % tp:
        problems.append(f"{heads} attention heads do not split over {tp} GPUs")
    if (kv >= tp and kv % tp) or (kv < tp and tp % kv):
        problems.append(f"{kv} key/value heads neither split over nor replicate onto {tp} GPUs")
    if n_heads % tp:
        problems.append(f"{n_heads} mamba heads do not split over {tp} GPUs")
    if groups % tp and groups != 1:
        problems.append(f"{groups} mamba groups neither split over {tp} GPUs nor are 1 (replicated)")
    if inner % tp:
        problems.append(f"the mixer width {inner} does not split over {tp} GPUs")
    return problems


def check_vllm(config, tensor_parallel_size: int = 1) -> list[int]:
    """Refuse (one sentence) a hybrid vLLM cannot serve at `tensor_parallel_size`; return the sizes of 1, 2, 4, 8 it
    can."""
    if not is_hybrid_config(config):
        raise RadError("vLLM export writes rad hybrids (a rad convert / rad align / rad distill folder); a plain "
                       "Transformer already loads in vLLM as it is.")
    problems = vllm_problems(config, tensor_parallel_size)
    if problems:
        where = f" on {tensor_parallel_size} GPUs" if tensor_parallel_size > 1 else ""
        raise RadError(f"vLLM's Bamba cannot serve this hybrid{where}: {'; '.join(problems)}. Serve it with "
                       "llama.cpp (rad export --format gguf) or transformers instead.")
    return [tp for tp in (1, 2, 4, 8) if not vllm_problems(config, tp)]


def check_vllm_out(out: str | Path, overwrite: bool, source: Path) -> Path:
    """A new folder, or (with --overwrite) one this export wrote before; never someone else's files."""
    out = check_output(out, EXPORT_VLLM, inputs=[("model", source)])
    if out.exists() and not out.is_dir():
        raise RadError(f"--out {out} is a file; vLLM reads a folder: give a new folder path.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise RadError(f"{out} already exists; pass --overwrite to replace it, or choose another --out.")
    return out


def export_vllm(config: ExportConfig) -> VllmExport:
    """`rad export --format vllm`: check everything from config.json first, then load the hybrid, write
    `lm_head.weight` out when it was tied, and save it with its tokenizer and records, atomically."""
    model, out, dtype, tensor_parallel_size = config.model, config.out, config.type, config.tensor_parallel_size
    if dtype not in VLLM_DTYPES:
        raise RadError(f"--type {dtype} is a GGUF type; a vLLM folder holds one of {', '.join(VLLM_DTYPES)}.")
    if isinstance(tensor_parallel_size, bool) or not isinstance(tensor_parallel_size, int) or tensor_parallel_size < 1:
        raise RadError(f"--tensor-parallel-size must be a whole number of GPUs, got {tensor_parallel_size!r}.")
    folder = resolve_to_folder(model)
    if folder is None or not (Path(folder) / "config.json").is_file():
        raise RadError(f"{model} is not a local hybrid folder; export the output of rad convert / rad distill.")
    sizes = check_vllm(AutoConfig.from_pretrained(folder), tensor_parallel_size)
    out = check_vllm_out(out, config.overwrite, Path(folder))
    loaded = load_model(str(folder), device="cpu", dtype=VLLM_DTYPES[dtype])
    hybrid = loaded.model
    tied = bool(hybrid.config.tie_word_embeddings)
    if tied:  # vLLM's ParallelLMHead is always its own tensor: write it
        hybrid.config.tie_word_embeddings = False
        hybrid.lm_head.weight = torch.nn.Parameter(hybrid.get_input_embeddings().weight.detach().clone())
    hybrid.config.attn_rotary_emb = hybrid.config.hidden_size // hybrid.config.num_attention_heads  # whole heads
    result = VllmExport(path=str(out), source=str(model), dtype=dtype, tensor_parallel_sizes=sizes, untied_head=tied)
    with atomic_directory(out, overwrite=True) as tmp:
        hybrid.save_pretrained(tmp)
        write_loader_keys(tmp, hybrid.config)
        loaded.tokenizer.save_pretrained(tmp)
        record = Path(folder) / CONVERSION_FILE
        if record.is_file():
            (tmp / CONVERSION_FILE).write_bytes(record.read_bytes())
        (tmp / EXPORT_RECORD).write_text(json.dumps({"format": "vllm", **asdict(result)}, indent=2) + "\n")
    logger.info("Wrote %s for vLLM (%s%s; tensor-parallel sizes %s). Untested at run time here: vLLM needs a GPU "
                "(docs/serve.md).", out, dtype, ", lm_head written out" if tied else "",
                ",".join(map(str, sizes)) or "none")
    return result
