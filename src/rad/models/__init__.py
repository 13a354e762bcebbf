"""Models: loading (aliases, GGUF, cache), skipping attention, and conversion to a Bamba hybrid."""

from rad.models.convert import ConversionConfig, convert_to_hybrid, save_hybrid
from rad.models.layers import attention_layer_indices, decoder_layers
from rad.models.loading import ALIASES, LoadedModel, load_model
from rad.models.mixers import converted_layers, mixer_layers, mixer_output
from rad.models.skip import skip_attention

__all__ = [
    "ALIASES",
    "ConversionConfig",
    "LoadedModel",
    "attention_layer_indices",
    "convert_to_hybrid",
    "converted_layers",
    "decoder_layers",
    "load_model",
    "mixer_layers",
    "mixer_output",
    "save_hybrid",
    "skip_attention",
]
