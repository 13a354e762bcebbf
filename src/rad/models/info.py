"""What a model is made of: layer map, parameter counts, and cache bytes per token vs its source."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from rad.models.attention import attention_parameters, head_dim_of
from rad.models.convert import LOADER_KEYS, LOADERS_DOC, is_hybrid_config, loader_keys, loader_warnings
from rad.models.layers import decoder_layers
from rad.models.mixers import MIXER_KINDS, mixer_kind, mixer_kind_of, mixer_layers


@dataclass
class ModelInfo:
    family: str
    num_layers: int
    layer_map: list[str]  # "attention" or the mixer kind's name ("mamba2"), per layer
    parameters: dict[str, int]  # total, embeddings, attention, one per mixer kind (mamba2), mlp, norms
    dtype: str
    kv_bytes_per_token: int  # grows with context
    ssm_state_bytes: int  # per sequence, constant in context length
    all_attention_kv_bytes_per_token: int  # the same model with every layer attention (the source)
    # One mixer's geometry and parameters next to one attention layer's (None on a plain Transformer)
    mixer: dict | None = None
    loader_notes: list[str] = field(default_factory=list)  # what loaders other than transformers >= 5 get wrong

    def to_dict(self) -> dict:
        return asdict(self)

    def kv_fraction(self) -> float:
        return self.kv_bytes_per_token / max(1, self.all_attention_kv_bytes_per_token)


def model_info(model: nn.Module) -> ModelInfo:
    config = model.config
    blocks = decoder_layers(model)
    mixers = mixer_layers(model)
    kinds = {i: mixer_kind_of(mixer) for i, mixer in mixers.items()}
    layer_map = [kinds[i].name if i in kinds else "attention" for i in range(len(blocks))]
    counts = {"embeddings": 0, "attention": 0, **{name: 0 for name in MIXER_KINDS}, "mlp": 0, "norms": 0,
              "lm_head": 0}
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=True):
        if id(p) in seen:
            continue
        seen.add(id(p))
        if "embed_tokens" in name:
            counts["embeddings"] += p.numel()
        elif ".self_attn." in name:
            counts["attention"] += p.numel()
        elif (kind := next((k for k in MIXER_KINDS.values() if k.is_mixer_parameter(name)), None)) is not None:
            counts[kind.name] += p.numel()
        elif ".mlp." in name or ".feed_forward." in name:
            counts["mlp"] += p.numel()
        elif name.startswith("lm_head"):
            counts["lm_head"] += p.numel()
        else:
            counts["norms"] += p.numel()
    counts["total"] = sum(counts.values())
    dtype = next(model.parameters()).dtype
    elem = torch.empty((), dtype=dtype).element_size()
    kv_per_layer = 2 * config.num_key_value_heads * head_dim_of(config) * elem
    n_attn = layer_map.count("attention")
    ssm_bytes = 0
    for i, mixer in mixers.items():
        for spec in kinds[i].state_specs(mixer):  # each state in its own dtype, else the model's
            size = torch.empty((), dtype=spec.dtype).element_size() if spec.dtype is not None else elem
            ssm_bytes += math.prod(spec.shape) * size
    return ModelInfo(
        mixer=_mixer_summary(model),
        family=config.model_type,
        num_layers=len(blocks),
        layer_map=layer_map,
        parameters=counts,
        dtype=str(dtype).replace("torch.", ""),
        kv_bytes_per_token=n_attn * kv_per_layer,
        ssm_state_bytes=ssm_bytes,
        all_attention_kv_bytes_per_token=len(blocks) * kv_per_layer,
        loader_notes=_loader_notes(config),
    )


def _mixer_summary(model: nn.Module) -> dict | None:
    """Measured on the first mixer (all mixers of a hybrid share one geometry), against the formula's attention."""
    mixers = list(mixer_layers(model).values())
    if not mixers:
        return None
    mixer, config = mixers[0], model.config
    return {
        **mixer_kind_of(mixer).describe(mixer),
        "parameters": sum(p.numel() for p in mixer.parameters()),
        "attention_parameters": attention_parameters(config, bias=bool(getattr(config, "attention_bias", False))),
    }


def _loader_notes(config) -> list[str]:
    """For a Bamba hybrid: `convert.loader_warnings`, plus whether the folder it was loaded from lacks the
    top-level RoPE keys older loaders read (a folder re-saved by plain transformers 5 drops them)."""

    if not is_hybrid_config(config):
        return []

    notes = loader_warnings(config)
    path = Path(str(getattr(config, "_name_or_path", "") or "")) / "config.json"
    if path.is_file():
        written = json.loads(path.read_text())
        wanted = {k: v for k, v in loader_keys(config).items() if v is not None}
        wrong = [k for k in LOADER_KEYS if k in wanted and written.get(k) != wanted[k]]
        if wrong:
            notes.append(
                f"{path} lacks the top-level {', '.join(wrong)} that transformers < 5 and vLLM read (they assume "
                "rope_theta 10000 and half-rotary heads); re-save it with rad (rad.models.convert.write_loader_keys)"
            )
    return notes


def format_info(info: ModelInfo, conversion=None) -> str:  # conversion: a ConversionRecord
    kinds = [mixer_kind(name) for name in MIXER_KINDS if name in info.layer_map]
    marks = "".join("A" if name == "attention" else mixer_kind(name).title[0] for name in info.layer_map)
    legend = ", ".join(f"{kind.title[0]} = {kind.title}" for kind in kinds or [mixer_kind()])
    lines = [
        f"family       {info.family}  ({info.num_layers} layers, {info.dtype})",
        f"layer map    {marks}   (A = attention, {legend})",
    ]
    for kind in kinds:
        converted = [i for i, name in enumerate(info.layer_map) if name == kind.name]
        lines.append(f"{kind.name:<12} layers {','.join(map(str, converted))}")
    if conversion:
        lines.append(f"converted    from {conversion.source_model} with init '{conversion.init}'")
    if info.mixer:
        m = info.mixer
        lines.append(
            f"mixer        {(kinds or [mixer_kind()])[0].describe_text(m)}: {m['parameters'] / 1e6:.3f}M parameters "
            f"each vs {m['attention_parameters'] / 1e6:.3f}M in the attention it replaces "
            f"({m['parameters'] / m['attention_parameters']:.2f}x)"
        )
    p = info.parameters
    lines.append(
        "parameters   "
        + f"{p['total'] / 1e6:.2f}M total: "
        + ", ".join(f"{k} {p[k] / 1e6:.2f}M" for k in ("embeddings", "attention", *MIXER_KINDS, "mlp", "norms", "lm_head"))
    )
    lines.append(
        f"KV cache     {info.kv_bytes_per_token:,} B/token "
        f"({100 * info.kv_fraction():.0f}% of the all-attention source's {info.all_attention_kv_bytes_per_token:,})"
    )
    lines.append(f"SSM state    {info.ssm_state_bytes:,} B per sequence (constant in context length)")
    for ctx in (2048, 8192, 32768):
        hybrid = info.kv_bytes_per_token * ctx + info.ssm_state_bytes
        source = info.all_attention_kv_bytes_per_token * ctx
        lines.append(f"  cache at {ctx:>5} tokens: {hybrid / 2**20:8.1f} MiB vs source {source / 2**20:8.1f} MiB")
    if info.loader_notes:

        lines.append(f"loaders      exact with transformers >= 5; see {LOADERS_DOC} for the others:")
        lines.extend(f"  - {note}" for note in info.loader_notes)
    return "\n".join(lines)
