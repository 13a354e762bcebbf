"""Turn a Llama / Qwen2 / Mistral model into a stock transformers `BambaForCausalLM` hybrid: the HF-format writer.

Converted layers keep their MLP and both RMSNorms; their attention becomes a mixer (today Mamba2, with one SSM
head per attention head and head_dim channels each, so the attention's `o_proj` fits the mixer's
`out_proj`). This module knows the Bamba checkpoint format; how a mixer is shaped, configured and
initialised it asks the mixer seam (`rad.models.mixers`). The result loads with plain
`AutoModelForCausalLM.from_pretrained`, without rad.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import transformers
from transformers import BambaConfig, BambaForCausalLM, PreTrainedModel

import rad
from rad.config import check_seed
from rad.errors import RadError
from rad.models.attention import attention_parameters, head_dim_of
from rad.models.layers import decoder_layers, parse_layers, validate_layers
from rad.models.loading import load_model
from rad.models.mixers import (
    DEFAULT_MIXER,
    MixerGeometry,
    MixerKind,
    is_mixer_parameter,
    layer_mixer,
    mixer_kind,
)
from rad.models.naming import hybrid_name
from rad.outputs import CONVERT, check_free_space, check_output, write_failed
from rad.utils.artefacts import layer_indices, load_artefact, strict
from rad.utils.atomic import atomic_directory
from rad.utils.devices import check_fits_in_memory, default_chunk_size, resolve_device, resolve_dtype

logger = logging.getLogger(__name__)

SUPPORTED_FAMILIES = ("llama", "qwen2", "mistral")
HYBRID_MODEL_TYPE = "bamba"  # the `model_type` of every hybrid rad writes
CONVERSION_FILE = "rad_conversion.json"


@dataclass
class ConversionConfig:
    """Which layers to convert and how to initialise their mixers (of the seam's `DEFAULT_MIXER` kind).

    `n_groups` ("heads", "kv" or a number; None: the init's default in the kind's `init_defaults`) and
    `d_state` (None: the attention head_dim) set the mixer's size (see models/mixers/mamba2.py); `mil` needs a
    group per head and d_state = head_dim.
    """

    layers: list[int] = field(default_factory=list)
    init: str = "rad"
    chunk_size: int | None = None  # None: 256 on CUDA, 64 elsewhere
    d_state: int | str | None = None  # None: the init's default with default groups, else head_dim; or "half"
    n_groups: int | str | None = None  # "heads", "kv" (a group per key/value head), a number; None: the init's
    d_conv: int = 4
    seed: int = 0

    def __post_init__(self):
        check_seed(self.seed)
        kind = mixer_kind(DEFAULT_MIXER)
        if self.init not in kind.inits:
            raise RadError(f"Unknown init {self.init!r}; choose one of {', '.join(kind.inits)}.")
        self.n_groups, self.d_state = kind.settings(self.init, self.n_groups, self.d_state)
        for name in ("chunk_size", "d_conv"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise RadError(f"{name} must be a whole number of at least 1, got {value!r}.")


def convert_to_hybrid(model: PreTrainedModel, config: ConversionConfig) -> BambaForCausalLM:
    """A new Bamba hybrid computing what `model` computes, with `config.layers` turned into mixers."""
    src = model.config
    _check_supported(model)
    num_layers = src.num_hidden_layers
    layers = validate_layers(list(config.layers), num_layers)
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    kind = mixer_kind(DEFAULT_MIXER)
    geometry = kind.resolve_geometry(src, config.n_groups, config.d_state, config.d_conv)
    kind.check_init(config.init, geometry)
    check_fits_in_memory(hybrid_bytes(model, geometry, len(layers), dtype), device,
                         f"A hybrid with {len(layers)} mixers of d_state {geometry.d_state} and {geometry.n_groups} groups",
                         "use a smaller --d-state or fewer --n-groups (the default is the init's)")
    hybrid_config = hybrid_config_from(src, layers, config, device, geometry, kind)

    with torch.device(device):
        hybrid = BambaForCausalLM._from_config(
            hybrid_config, dtype=dtype, attn_implementation=src._attn_implementation
        )
    _copy_shared_weights(model, hybrid, set(layers))
    generator = torch.Generator(device=device).manual_seed(config.seed)
    src_blocks, dst_blocks = decoder_layers(model), decoder_layers(hybrid)
    for i in layers:
        kind.initialise(layer_mixer(dst_blocks[i]), src_blocks[i].self_attn, geometry, config.init, generator)
    hybrid.generation_config = model.generation_config
    hybrid.eval()
    return hybrid


def hybrid_config_from(src, layers: list[int], config: ConversionConfig, device: torch.device,
                       geometry: MixerGeometry, kind: MixerKind | None = None) -> BambaConfig:
    """The hybrid's BambaConfig: the source's shapes, `layers` as mixers whose keys the mixer kind adds."""
    kind = kind or mixer_kind(DEFAULT_MIXER)
    mixer_fields = kind.hf_config_fields(geometry, config.chunk_size or default_chunk_size(device))
    heads, head_dim, hidden = src.num_attention_heads, head_dim_of(src), src.hidden_size
    rope = dict(src.rope_parameters or {"rope_type": "default", "rope_theta": 10000.0})
    rope["partial_rotary_factor"] = 1.0  # Bamba rotates half of each head by default; the source rotates all
    kept = [i for i in range(src.num_hidden_layers) if i not in set(layers)]
    return BambaConfig(
        vocab_size=src.vocab_size,
        tie_word_embeddings=bool(getattr(src, "tie_word_embeddings", False)),
        hidden_size=hidden,
        intermediate_size=src.intermediate_size,
        num_hidden_layers=src.num_hidden_layers,
        num_attention_heads=heads,
        num_key_value_heads=src.num_key_value_heads,
        head_dim=head_dim,
        hidden_act=src.hidden_act,
        initializer_range=src.initializer_range,
        rms_norm_eps=src.rms_norm_eps,
        pad_token_id=src.pad_token_id,
        bos_token_id=src.bos_token_id,
        eos_token_id=src.eos_token_id,
        max_position_embeddings=src.max_position_embeddings,
        attention_dropout=float(getattr(src, "attention_dropout", 0.0) or 0.0),
        attention_bias=_has_qkv_bias(src),
        mlp_bias=bool(getattr(src, "mlp_bias", False)),
        rope_parameters=rope,
        attn_layer_indices=kept,
        **mixer_fields,
    )


# transformers 4.x's BambaConfig hard-codes rope_theta = 10000, rope_scaling = None and partial_rotary_factor = 0.5,
# then sets every config.json key its __init__ does not name as an attribute, so these top-level keys override
# the hard-coded values; vLLM's Bamba reads the same three names from the top level (10000 when absent).
# transformers 5 nests them in `rope_parameters` and, on load, consumes the top-level copies without change
# (`rope_scaling` replaces `rope_parameters`, hence the full dict). docs/loaders.md has the source lines.
LOADER_KEYS = ("rope_theta", "partial_rotary_factor", "rope_scaling")
LOADERS_DOC = "docs/loaders.md"


def loader_keys(config: BambaConfig) -> dict:
    """The top-level config.json keys older loaders read instead of `rope_parameters`, with the hybrid's values."""
    rope = dict(config.rope_parameters)
    keys = {"rope_theta": rope["rope_theta"], "partial_rotary_factor": rope.get("partial_rotary_factor", 1.0)}
    # Plain RoPE stays without rope_scaling: 4.x and vLLM then take their unscaled path.
    keys["rope_scaling"] = rope if rope.get("rope_type", "default") != "default" else None
    return keys


def write_loader_keys(folder: str | Path, config: BambaConfig) -> None:
    """Add `loader_keys` to the config.json that `save_pretrained` wrote in `folder` (a folder being written)."""
    path = Path(folder) / "config.json"
    data = json.loads(path.read_text())
    data.update({k: v for k, v in loader_keys(config).items() if v is not None})
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def loader_warnings(config: BambaConfig) -> list[str]:
    """What a loader other than transformers >= 5 computes differently for this hybrid (docs/loaders.md)."""
    notes = []
    mixers = config.num_hidden_layers - len(config.attn_layer_indices or [])
    if mixers and config.mamba_n_groups > 1:
        notes.append(
            f"transformers < 5 normalises the Mamba2 output over all {config.mamba_n_groups} groups at once "
            "(5.x: per group), so it computes other logits once a mixer's in_proj is non-zero"
        )
    if config.attention_bias:
        notes.append("vLLM's Bamba has no attention biases and skips the q/k/v biases without an error")
    if config.tie_word_embeddings:
        notes.append("vLLM's Bamba does not tie lm_head to the embeddings, and the checkpoint stores no lm_head")
    if config.head_dim * config.num_attention_heads != config.hidden_size:
        notes.append("vLLM's Bamba takes head_dim = hidden_size / heads, which this model's attention does not fit")
    return notes


def _has_qkv_bias(src) -> bool:
    """Qwen2 has q/k/v biases (and none on o_proj); Llama and Mistral say so in `attention_bias`."""
    return src.model_type == "qwen2" or bool(getattr(src, "attention_bias", False))


def is_hybrid_config(config) -> bool:
    """Whether a (loaded) config is a hybrid of the kind rad writes."""
    return getattr(config, "model_type", None) == HYBRID_MODEL_TYPE


def _check_supported(model: PreTrainedModel) -> None:
    src = model.config
    family = getattr(src, "model_type", type(model).__name__)
    if family not in SUPPORTED_FAMILIES:
        raise RadError(
            f"Cannot convert a {family!r} model: supported families are {', '.join(SUPPORTED_FAMILIES)} "
            "(Llama-style decoders with SwiGLU MLPs and RMSNorm)."
        )
    if src.hidden_act != "silu":
        raise RadError(f"Cannot convert: the MLP activation is {src.hidden_act!r}, Bamba's MLP needs 'silu'.")
    if getattr(src, "pretraining_tp", 1) not in (None, 1):
        raise RadError("Cannot convert a model with pretraining_tp > 1; set it to 1 first.")
    layer_types = getattr(src, "layer_types", None) or []
    uses_window = getattr(src, "use_sliding_window", True) and getattr(src, "sliding_window", None)
    if "sliding_attention" in layer_types or (
        family == "mistral" and uses_window and src.sliding_window < src.max_position_embeddings
    ):
        logger.warning(
            "The source uses sliding-window attention (window %s); Bamba's attention is full, so the hybrid "
            "matches the source only on contexts up to the window.",
            getattr(src, "sliding_window", None),
        )


@torch.no_grad()
def _copy_shared_weights(model: PreTrainedModel, hybrid: BambaForCausalLM, converted: set[int]) -> None:
    """Copy every source weight to its `hybrid_name` twin; fail if any hybrid weight but a mixer is left unset."""
    source = model.state_dict()
    target = hybrid.state_dict()
    copied: set[str] = set()
    for key, value in source.items():
        parts = key.split(".")
        if key.startswith("model.layers.") and parts[3] == "self_attn" and int(parts[2]) in converted:
            continue  # read by the mixer init instead
        new_key = hybrid_name(key)
        if new_key not in target:
            raise RadError(f"Conversion bug: source weight {key} has no place ({new_key}) in the hybrid.")
        target[new_key].copy_(value)
        copied.add(new_key)
    for key, value in target.items():
        if key in copied:
            continue
        if is_mixer_parameter(key):
            continue  # initialised by the chosen init
        if key.endswith("self_attn.o_proj.bias"):
            value.zero_()  # Qwen2 has q/k/v biases only; Bamba's attention_bias adds one to o_proj too
            continue
        if key == "lm_head.weight" and hybrid.config.tie_word_embeddings:
            continue
        raise RadError(f"Conversion bug: hybrid weight {key} was not filled from the source.")


@dataclass
class ConversionRecord:
    """What `rad_conversion.json` holds: enough to know how a hybrid was made, and to redo it."""

    source_model: str
    source_family: str
    num_layers: int
    converted_layers: list[int]
    kept_attention_layers: list[int]
    init: str
    config: dict
    versions: dict
    distillation: dict | None = None  # set on a distilled student: teacher, trainable set, steps, data
    # n_groups, d_state, d_conv as resolved, and the parameters of one mixer and of the attention it replaces
    geometry: dict | None = None

    def to_json(self) -> str:
        data = asdict(self)
        for optional in ("distillation", "geometry"):
            if data[optional] is None:
                data.pop(optional)
        return json.dumps(data, indent=2)

    @classmethod
    def load(cls, folder: str | Path) -> ConversionRecord | None:
        """The record in `folder` (None when the folder is no rad hybrid); a clear RadError when unreadable."""
        path = Path(folder) / CONVERSION_FILE
        if not path.is_file():
            return None
        return load_artefact(path, lambda data: _checked_record(strict(cls, data)), "a rad conversion record",
                             "re-create the hybrid")


def _checked_record(record: ConversionRecord) -> ConversionRecord:
    """A record whose layer lists are layer indices that split the model's layers between them."""
    converted, kept = layer_indices(record.converted_layers), layer_indices(record.kept_attention_layers)
    if sorted(converted + kept) != list(range(record.num_layers)):
        raise ValueError(f"converted {converted} and kept {kept} layers are not the model's {record.num_layers} layers")
    return record


def package_versions() -> dict:
    return {
        "rad": rad.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def conversion_record(source_model: str, model: PreTrainedModel, config: ConversionConfig) -> ConversionRecord:
    layers = sorted(config.layers)
    n = model.config.num_hidden_layers
    geometry = mixer_kind(DEFAULT_MIXER).resolve_geometry(model.config, config.n_groups, config.d_state,
                                                          config.d_conv)
    return ConversionRecord(
        source_model=source_model,
        source_family=model.config.model_type,
        num_layers=n,
        converted_layers=layers,
        kept_attention_layers=[i for i in range(n) if i not in set(layers)],
        init=config.init,
        config=asdict(config),
        versions=package_versions(),
        geometry={**geometry.record(), "mixer_parameters": geometry.parameters(),
                  "attention_parameters": attention_parameters(model.config, _has_qkv_bias(model.config))},
    )


def _check_size_before_loading(model: str, settings: ConversionConfig, layers, device, dtype) -> None:
    """For a local checkpoint folder: the mixers' shape from its config.json, so a hybrid that cannot fit in memory
    is refused before the model loads (`convert_to_hybrid` checks again, for every other source)."""
    folder = Path(str(model)).expanduser()
    if not (folder / "config.json").is_file():
        return
    try:
        from transformers import AutoConfig

        source = AutoConfig.from_pretrained(folder, local_files_only=True)
        n_mixers = len(parse_layers(layers, source.num_hidden_layers, allow_empty=False))
        geometry = mixer_kind(DEFAULT_MIXER).resolve_geometry(source, settings.n_groups, settings.d_state,
                                                              settings.d_conv)
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return  # the loader reports an unreadable config with its own sentence
    target = resolve_device(device)
    element = torch.empty((), dtype=resolve_dtype(dtype, target)).element_size()
    weights = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    check_fits_in_memory(weights + geometry.parameters() * n_mixers * element, target,
                         f"A hybrid with {n_mixers} mixers of d_state {geometry.d_state} and {geometry.n_groups} groups",
                         "use a smaller --d-state or fewer --n-groups (the default is the init's)")


def hybrid_bytes(model, geometry, n_mixers: int, dtype: torch.dtype) -> int:
    """The hybrid's weights: the source's (a mixer replaces an attention of about its size) plus the mixers."""
    element = torch.empty((), dtype=dtype).element_size()
    return sum(p.numel() * p.element_size() for p in model.parameters()) + geometry.parameters() * n_mixers * element


def save_hybrid(
    hybrid: BambaForCausalLM, tokenizer, out: str | Path, record: ConversionRecord, overwrite: bool = False
) -> Path:
    """Write checkpoint (safetensors), tokenizer and rad_conversion.json to `out`, atomically."""
    from safetensors import SafetensorError

    out = check_hybrid_out(out, overwrite)
    weights = sum(t.numel() * t.element_size() for t in hybrid.state_dict().values())
    check_free_space(out, weights + (64 << 20), "Saving the hybrid")  # + tokenizer and config files
    try:
        with atomic_directory(out, overwrite=True) as tmp:
            hybrid.save_pretrained(tmp)
            write_loader_keys(tmp, hybrid.config)
            tokenizer.save_pretrained(tmp)
            (tmp / CONVERSION_FILE).write_text(record.to_json())
    except (OSError, SafetensorError) as err:  # a disk that filled up meanwhile: nothing is left behind
        raise write_failed(out, err, "free some space and run the same command again.") from err
    return out


def check_hybrid_out(out: str | Path, overwrite: bool, inputs=()) -> Path:
    """`out` may receive a hybrid: new, empty, or (with `overwrite`) a hybrid `rad convert` wrote before.

    Anything else is refused, also with `overwrite`: a folder without rad_conversion.json holds someone
    else's files, and a distilled student is `rad distill`'s output, not a conversion to redo.
    """

    out = check_output(out, CONVERT, inputs=inputs)
    if out.is_dir() and any(out.iterdir()):
        record = ConversionRecord.load(out)
        if record is not None and record.distillation is not None:
            raise RadError(f"Output folder {out} holds a distilled student, which rad convert does not replace; "
                           "pick another folder.")
        if not overwrite:
            raise RadError(f"Output folder {out} already exists and is not empty; pass --overwrite or pick another.")
    return out


def log_loader_warnings(config: BambaConfig) -> None:
    """One warning naming what other loaders get wrong, where `rad convert` / `rad run` users read their log."""
    notes = loader_warnings(config)
    if notes:
        logger.warning("Exact with transformers >= 5; elsewhere: %s (see %s).", "; ".join(notes), LOADERS_DOC)


def read_conversion_record(folder: str | Path) -> ConversionRecord | None:
    return ConversionRecord.load(folder)


@dataclass
class ConversionResult:
    out: Path
    record: ConversionRecord
    hybrid: BambaForCausalLM


def convert_model(
    model: str,
    layers: str | list[int],
    out: str | Path,
    *,
    init: str = "rad",
    n_groups: int | str | None = None,
    d_state: int | str | None = None,
    chunk_size: int | None = None,
    seed: int = 0,
    device: str | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
) -> ConversionResult:
    """Load `model`, convert `layers` ('3,7,11', 'uniform:15', or a list) with `init`, save to `out`."""

    # Everything a user gave is checked before the model loads and before anything is written: the
    # settings by ConversionConfig itself (the layers' range and the geometry's fit need the model's config).
    if chunk_size is not None and (isinstance(chunk_size, bool) or chunk_size < 1):
        raise RadError(f"--chunk-size must be at least 1, got {chunk_size}.")
    settings = ConversionConfig(init=init, chunk_size=chunk_size, seed=seed, n_groups=n_groups, d_state=d_state)
    resolve_dtype(dtype, resolve_device(device))
    parse_layers(layers, 1 << 30, allow_empty=False)  # syntax, duplicates, negatives; the range once loaded
    out = check_hybrid_out(out, overwrite, inputs=[("model", model)])
    _check_size_before_loading(model, settings, layers, device, dtype)
    loaded = load_model(model, device=device, dtype=dtype)
    indices = parse_layers(layers, loaded.model.config.num_hidden_layers, allow_empty=False)
    config = dataclasses.replace(settings, layers=indices)
    hybrid = convert_to_hybrid(loaded.model, config)
    record = conversion_record(model, loaded.model, config)
    save_hybrid(hybrid, loaded.tokenizer, out, record, overwrite=overwrite)
    logger.info("Converted %d of %d layers (%s init) -> %s", len(indices), record.num_layers, init, out)
    log_loader_warnings(hybrid.config)
    return ConversionResult(out=out, record=record, hybrid=hybrid)
