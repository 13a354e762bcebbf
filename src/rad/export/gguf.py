"""`rad export --format gguf`: a hybrid as llama.cpp's `granitehybrid`, a plain model as `llama`, written with the
gguf package.

llama.cpp's granite-hybrid loader asserts d_inner = 2 x hidden, rad's mixers have d_inner = hidden (RAD's init
copies o_proj into out_proj), so every mixer is first padded with heads that contribute exactly nothing
(`rad.models.mixers.mamba2.pad_mixer_tensors`). The tensor layout follows llama.cpp's own converter for Bamba
(read, not copied): q and k rows are permuted from transformers' rotate-half RoPE to llama.cpp's interleaved
one, A is written as -exp(A_log), the gated norm as [groups, channels per group]. Granite's multipliers are left
out (llama.cpp then applies none, as the hybrid does). The tokenizer's metadata is copied verbatim from a GGUF
with the same vocabulary: the one the model came from for rad's aliases, or `--tokenizer-gguf`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import AutoConfig

from rad.errors import RadError
from rad.export.config import QUANTISER_TYPES, ExportConfig, check_out
from rad.export.llama_cpp import quantise
from rad.model_aliases import ALIASES
from rad.models.convert import CONVERSION_FILE, is_hybrid_config
from rad.models.loading import load_model, resolve_to_folder
from rad.models.mixers.mamba2 import geometry_of_config, pad_mixer_tensors, padded_geometry
from rad.outputs import check_free_space

logger = logging.getLogger(__name__)

HYBRID_ARCH = "granitehybrid"
PLAIN_ARCH = "llama"  # llama.cpp's llama graph takes optional q/k/v biases, so Qwen2 teachers fit it too
FAMILIES = ("llama", "qwen2", "mistral", "bamba")  # model_types whose layers these two graphs express
_QUANTISED_MIN_ROW = 32  # q8_0 blocks are 32 values wide


@dataclass
class ExportResult:
    path: Path
    arch: str
    type: str
    bytes: int
    tensors: int
    padded_heads: int  # per mixer; 0 for a plain model


def check_expressible(config) -> None:
    """Refuse, in one sentence, what llama.cpp's llama / granitehybrid graphs cannot compute exactly."""
    family = getattr(config, "model_type", None)
    if family not in FAMILIES:
        raise RadError(f"GGUF export covers {', '.join(FAMILIES)} models; {family!r} is not one of them.")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise RadError(f"llama.cpp's graphs use a SiLU-gated MLP; this model's activation is {config.hidden_act!r}.")
    if getattr(config, "mlp_bias", False):
        raise RadError("llama.cpp's granitehybrid graph reads MLP biases only in part; models with mlp_bias do not "
                       "export.")
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default":
        raise RadError(f"GGUF export writes plain RoPE only; this model uses {rope['rope_type']!r} scaling.")
    if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
        raise RadError("GGUF export needs RoPE on the whole head (partial_rotary_factor 1.0).")
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", False):
        raise RadError("GGUF export does not write sliding-window attention.")
    if is_hybrid_config(config):
        geometry = geometry_of_config(config)
        if geometry.d_inner > 2 * config.hidden_size:
            raise RadError(f"The mixers are wider ({geometry.d_inner}) than llama.cpp's 2 x hidden "
                           f"({2 * config.hidden_size}); such a hybrid does not export.")
        padded_geometry(geometry, 2 * config.hidden_size)  # raises where whole groups cannot pad it
        if config.mamba_d_conv != 4 or not getattr(config, "mamba_conv_bias", True) \
                or getattr(config, "mamba_proj_bias", False):
            raise RadError("GGUF export needs the mixers' conv width 4 with a bias and no projection biases.")
        limit = getattr(config, "time_step_limit", (0.0, float("inf")))
        if tuple(float(v) for v in limit) != (0.0, float("inf")):
            raise RadError(f"llama.cpp does not clamp dt; this hybrid's time_step_limit is {tuple(limit)}.")


def _permute_rope(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of q or k (or their bias) from rotate-half pairs (i, i + d/2) to llama.cpp's adjacent pairs (2i, 2i+1)."""
    return t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def gguf_tensors(model) -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF name, float32 tensor in numpy order) for every weight the llama.cpp graph reads."""
    config = model.config
    hybrid = is_hybrid_config(config)
    state = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    yield "token_embd.weight", state["model.embed_tokens.weight"]
    yield "output_norm.weight", state["model.final_layernorm.weight" if hybrid else "model.norm.weight"]
    if not config.tie_word_embeddings:
        yield "output.weight", state["lm_head.weight"]
    mixers = set(range(config.num_hidden_layers)) - set(config.attn_layer_indices or []) if hybrid else set()
    for i in range(config.num_hidden_layers):
        pre, blk = f"model.layers.{i}.", f"blk.{i}."
        yield blk + "attn_norm.weight", state[pre + "input_layernorm.weight"]
        yield blk + "ffn_norm.weight", state[pre + ("pre_ff_layernorm" if hybrid else "post_attention_layernorm")
                                             + ".weight"]
        mlp = pre + ("feed_forward." if hybrid else "mlp.")
        for part in ("gate", "up", "down"):
            yield f"{blk}ffn_{part}.weight", state[f"{mlp}{part}_proj.weight"]
        if i in mixers:
            yield from _mixer_tensors(state, pre + "mamba.", blk, config)
            continue
        attn = pre + "self_attn."
        for part, n in (("q", heads), ("k", kv_heads)):
            yield f"{blk}attn_{part}.weight", _permute_rope(state[f"{attn}{part}_proj.weight"], n)
            if f"{attn}{part}_proj.bias" in state:
                yield f"{blk}attn_{part}.bias", _permute_rope(state[f"{attn}{part}_proj.bias"], n)
        yield blk + "attn_v.weight", state[attn + "v_proj.weight"]
        if attn + "v_proj.bias" in state:
            yield blk + "attn_v.bias", state[attn + "v_proj.bias"]
        yield blk + "attn_output.weight", state[attn + "o_proj.weight"]
        if attn + "o_proj.bias" in state:
            yield blk + "attn_output.bias", state[attn + "o_proj.bias"]


def _mixer_tensors(state: dict, prefix: str, blk: str, config) -> Iterator[tuple[str, torch.Tensor]]:
    geometry = geometry_of_config(config)
    own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    padded = pad_mixer_tensors(own, geometry, 2 * config.hidden_size)
    wide = padded_geometry(geometry, 2 * config.hidden_size)
    yield blk + "ssm_in.weight", padded["in_proj.weight"]
    yield blk + "ssm_conv1d.weight", padded["conv1d.weight"].squeeze(1)
    yield blk + "ssm_conv1d.bias", padded["conv1d.bias"]
    yield blk + "ssm_dt.bias", padded["dt_bias"]
    yield blk + "ssm_a", -torch.exp(padded["A_log"]).reshape(-1, 1)
    yield blk + "ssm_d", padded["D"].reshape(-1, 1)
    yield blk + "ssm_norm.weight", padded["norm.weight"].reshape(wide.n_groups, -1)
    yield blk + "ssm_out.weight", padded["out_proj.weight"]


def _tensor_type(name: str, tensor: torch.Tensor, type_: str):
    """The GGUF type one tensor is stored in: matmul weights take `type_`, everything else stays float32 (the
    SSM's small tensors, norms and biases, as llama.cpp's converter keeps them)."""
    types = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}
    matmul = tensor.ndim == 2 and name.endswith(".weight") and not name.split(".")[-2].startswith(
        ("ssm_conv1d", "ssm_norm"))
    if not matmul or type_ == "f32":
        return types["f32"]
    if type_ == "q8_0" and tensor.shape[-1] % _QUANTISED_MIN_ROW:
        return types["f16"]
    return types[type_]


def _encode(tensor: torch.Tensor, qtype) -> np.ndarray:
    if qtype == gguf.GGMLQuantizationType.F32:
        return tensor.numpy()
    if qtype == gguf.GGMLQuantizationType.F16:
        return tensor.to(torch.float16).numpy()
    return gguf.quants.quantize(tensor.numpy(), qtype)


def metadata(config, name: str) -> dict[str, tuple]:
    """(value, GGUFValueType) of every architecture key, from the model's config."""
    V = gguf.GGUFValueType
    hybrid = is_hybrid_config(config)
    arch = HYBRID_ARCH if hybrid else PLAIN_ARCH
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = dict(getattr(config, "rope_parameters", None) or {})
    theta = float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    keys = {
        "general.name": (name, V.STRING),
        f"{arch}.context_length": (int(config.max_position_embeddings), V.UINT32),
        f"{arch}.embedding_length": (int(config.hidden_size), V.UINT32),
        f"{arch}.block_count": (int(config.num_hidden_layers), V.UINT32),
        f"{arch}.feed_forward_length": (int(config.intermediate_size), V.UINT32),
        f"{arch}.attention.head_count": (int(config.num_attention_heads), V.UINT32),
        f"{arch}.attention.key_length": (int(head_dim), V.UINT32),
        f"{arch}.attention.value_length": (int(head_dim), V.UINT32),
        f"{arch}.attention.layer_norm_rms_epsilon": (float(config.rms_norm_eps), V.FLOAT32),
        f"{arch}.rope.freq_base": (theta, V.FLOAT32),
        f"{arch}.rope.dimension_count": (int(head_dim), V.UINT32),
        f"{arch}.vocab_size": (int(config.vocab_size), V.UINT32),
    }
    if not hybrid:
        keys[f"{arch}.attention.head_count_kv"] = (int(config.num_key_value_heads), V.UINT32)
        return keys
    wide = padded_geometry(geometry_of_config(config), 2 * config.hidden_size)
    kept = set(config.attn_layer_indices or [])
    keys.update({
        # per layer: 0 marks a recurrent (Mamba2) layer in llama.cpp's hybrid memory
        f"{arch}.attention.head_count_kv": ([int(config.num_key_value_heads) if i in kept else 0
                                             for i in range(config.num_hidden_layers)], V.ARRAY),
        f"{arch}.ssm.conv_kernel": (int(wide.d_conv), V.UINT32),
        f"{arch}.ssm.state_size": (int(wide.d_state), V.UINT32),
        f"{arch}.ssm.group_count": (int(wide.n_groups), V.UINT32),
        f"{arch}.ssm.inner_size": (int(wide.d_inner), V.UINT32),
        f"{arch}.ssm.time_step_rank": (int(wide.heads), V.UINT32),
        f"{arch}.rope.scaling.finetuned": (True, V.BOOL),  # granite's switch for "use RoPE"
    })
    return keys


def tokenizer_fields(path: Path, vocab_size: int) -> list:
    """The tokenizer.* fields of the GGUF at `path`, checked against the model's vocabulary size."""
    reader = gguf.GGUFReader(path)
    fields = [f for k, f in reader.fields.items() if k.startswith("tokenizer.")]
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise RadError(f"{path} holds no tokenizer (no tokenizer.ggml.tokens); give --tokenizer-gguf a GGUF that "
                       "does.")
    if len(tokens.data) != vocab_size:
        raise RadError(f"The tokenizer in {path} has {len(tokens.data)} tokens but the model's vocabulary is "
                       f"{vocab_size}; give --tokenizer-gguf the GGUF of the model this one came from.")
    return fields


@contextlib.contextmanager
def tokenizer_source(spec: str, config: ExportConfig) -> Iterator[Path]:
    """The GGUF whose tokenizer the export copies: --tokenizer-gguf, the model itself if it is a GGUF, the alias's
    file, or the alias a hybrid (or its student) was converted from."""
    if config.tokenizer_gguf:
        yield Path(config.tokenizer_gguf).expanduser()
        return
    path = Path(spec).expanduser()
    alias = spec if spec in ALIASES else None
    if path.suffix == ".gguf":
        yield path
        return
    record = path / CONVERSION_FILE
    if alias is None and record.is_file():
        source = json.loads(record.read_text()).get("source_model")
        alias = source if source in ALIASES else None
        if alias is None and source and str(source).endswith(".gguf") and Path(source).is_file():
            yield Path(source)
            return
    if alias is None:
        raise RadError(f"No GGUF tokenizer is known for {spec}; pass --tokenizer-gguf with a GGUF of the model it "
                       "came from (its tokenizer metadata is copied as it is).")
    with tempfile.TemporaryDirectory(prefix="rad-export-") as tmp:
        yield ALIASES[alias].locate_gguf(Path(tmp))


def _copy_field(writer, field) -> None:
    kind = field.types[0]
    if kind == gguf.GGUFValueType.ARRAY:
        writer.add_key_value(field.name, field.contents(), kind, sub_type=field.types[-1])
    else:
        writer.add_key_value(field.name, field.contents(), kind)


def write_gguf(model, out: Path, config: ExportConfig, tokenizer: list) -> ExportResult:
    """Write `model` (a loaded hybrid or plain model) with `tokenizer` (`tokenizer_fields`) to `out`, through a
    temporary file in the same folder."""
    check_expressible(model.config)
    planned = [(n, t, _tensor_type(n, t, config.type)) for n, t in gguf_tensors(model)]
    need = sum(gguf.quant_shape_to_byte_shape(t.shape, q)[-1] * int(np.prod(t.shape[:-1]))
               for _, t, q in planned) + (64 << 20)  # the tokenizer and metadata: a few MB
    check_free_space(out.parent, need, "The GGUF file")
    hybrid = is_hybrid_config(model.config)
    arch = HYBRID_ARCH if hybrid else PLAIN_ARCH
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        for key, (value, vtype) in metadata(model.config, out.stem).items():
            if vtype == gguf.GGUFValueType.ARRAY:
                writer.add_key_value(key, value, vtype, sub_type=gguf.GGUFValueType.UINT32)
            else:
                writer.add_key_value(key, value, vtype)
        file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                      "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
        writer.add_file_type(file_types[config.type])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for field in tokenizer:
            _copy_field(writer, field)
        for name, tensor, qtype in planned:
            writer.add_tensor(name, _encode(tensor.contiguous(), qtype), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make the export unreadable to other users
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    padded = padded_geometry(geometry_of_config(model.config), 2 * model.config.hidden_size).heads - \
        model.config.mamba_n_heads if hybrid else 0
    return ExportResult(out, arch, config.type, out.stat().st_size, len(planned), padded)


def _write_through_quantiser(model, out: Path, config: ExportConfig, tokenizer: list) -> ExportResult:
    """A k-quant: rad's f32 file beside `out` (its room checked by write_gguf), then llama.cpp's quantiser into a
    temporary name, renamed at the end; the f32 file is removed either way."""
    f32 = out.with_name(f".{out.name}.f32.partial")
    tmp = out.with_name(f".{out.name}.partial")
    try:
        f32_result = write_gguf(model, f32, dataclasses.replace(config, type="f32"), tokenizer)
        check_free_space(out.parent, f32_result.bytes // 3, "The quantised GGUF file")
        quantise(f32, tmp, QUANTISER_TYPES[config.type])
        os.replace(tmp, out)
    finally:
        f32.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
    return dataclasses.replace(f32_result, path=out, type=config.type, bytes=out.stat().st_size)


def export_gguf(config: ExportConfig) -> ExportResult:
    """`rad export`: check the output, the model's config and the tokenizer, then load the model (float32, CPU)
    and write the GGUF."""
    out = check_out(config)
    folder = resolve_to_folder(config.model)
    if folder is None:
        raise RadError(f"{config.model} is neither a local model nor one of rad's aliases; export needs the model "
                       "on disk (rad convert / rad distill write one).")
    model_config = AutoConfig.from_pretrained(folder)
    check_expressible(model_config)
    with tokenizer_source(config.model, config) as tokenizer_gguf:
        # parsed once (15 s for Qwen's 152k tokens), and refused before the weights are loaded
        tokenizer = tokenizer_fields(tokenizer_gguf, model_config.vocab_size)
        loaded = load_model(config.model, device="cpu", dtype="float32")
        write = _write_through_quantiser if config.type in QUANTISER_TYPES else write_gguf
        result = write(loaded.model, out, config, tokenizer)
    logger.info("Wrote %s (%s, %s, %d tensors, %.1f MB%s)", result.path, result.arch, result.type, result.tensors,
                result.bytes / 1e6, f", mixers padded by {result.padded_heads} heads" if result.padded_heads else "")
    return result
