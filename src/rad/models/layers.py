"""Finding the decoder layers of a Hugging Face causal LM, whatever its family."""

from __future__ import annotations

from torch import nn

from rad.errors import RadError


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks (`model.model.layers` for Llama, Qwen2, Mistral, Bamba)."""
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise RadError(
            f"{type(model).__name__} has no `model.layers` list of decoder blocks; "
            "rad works with Hugging Face decoder-only models (Llama, Qwen2, Mistral and their Bamba hybrids)."
        )
    return layers


def attention_layer_indices(model: nn.Module) -> list[int]:
    return [i for i, layer in enumerate(decoder_layers(model)) if hasattr(layer, "self_attn")]


def parse_layers(spec: str | list[int] | tuple[int, ...], num_layers: int, *, allow_empty: bool = True) -> list[int]:
    """Layer indices from '3,7,11', 'uniform:K', 'first:K', 'last:K', or a list; validated and sorted.

    `uniform:K` spaces K layers evenly, as MambaInLlama does (every other layer for K = L/2). A command
    that must act on some layer passes `allow_empty=False`: ' , ,' or 'uniform:0' is then an error.
    """
    indices = _parse_layers(spec, num_layers)
    if not indices and not allow_empty:
        raise RadError(f"The layer list {spec!r} names no layer; give at least one, e.g. 3,7,11 or uniform:8.")
    return indices


def _parse_layers(spec: str | list[int] | tuple[int, ...], num_layers: int) -> list[int]:
    if isinstance(spec, str):
        spec = spec.strip()
        if ":" in spec:
            kind, _, k_text = spec.partition(":")
            try:
                k = int(k_text)
            except ValueError:
                raise RadError(f"Bad layer spec {spec!r}: expected e.g. 'uniform:8'.") from None
            if not 0 <= k <= num_layers:
                raise RadError(f"Layer count {k} is out of range: the model has {num_layers} layers.")
            if kind == "uniform":
                indices = uniform_layers(k, num_layers)
            elif kind == "first":
                indices = list(range(k))
            elif kind == "last":
                indices = list(range(num_layers - k, num_layers))
            else:
                raise RadError(f"Unknown layer rule {kind!r}; use uniform:K, first:K, last:K or a list like 3,7,11.")
            return indices
        if spec == "":
            return []
        try:
            values = [int(part) for part in spec.split(",") if part.strip() != ""]
        except ValueError:
            raise RadError(f"Bad layer list {spec!r}: expected comma-separated integers like 3,7,11.") from None
    else:
        try:
            values = [int(v) for v in spec]
        except (TypeError, ValueError):
            raise RadError(f"Bad layer list {spec!r}: expected layer indices like [3, 7, 11].") from None
    return validate_layers(values, num_layers)


def validate_layers(layers: list[int], num_layers: int) -> list[int]:
    negative = [i for i in layers if i < 0]
    if negative:
        raise RadError(f"Layer index {negative[0]} is out of range: layers are counted from 0.")
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise RadError(f"Layer index {bad[0]} is out of range: the model has layers 0..{num_layers - 1}.")
    seen: set[int] = set()
    for i in layers:
        if i in seen:
            raise RadError(f"Layer {i} is listed twice; give each layer once.")
        seen.add(i)
    return sorted(layers)


def uniform_layers(k: int, num_layers: int) -> list[int]:
    """K evenly spaced layers, ending at the last layer's side: for K = L/2 this is 1, 3, 5, ..."""
    if k == 0:
        return []
    step = num_layers / k
    return sorted({min(num_layers - 1, int((j + 1) * step) - 1) for j in range(k)})
