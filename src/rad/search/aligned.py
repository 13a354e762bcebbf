"""Selection after alignment: the mixers a `hybrid-agreement` search puts in place of the layers it tries.

RAD ranks layers by how little the model minds their attention being *skipped*. Once every layer has an aligned
mixer (`rad convert --layers first:L` then `rad align`: one teacher pass trains them all), a search can instead
ask how little it minds their attention being *replaced by those mixers*: the hybrid it would actually build.
This module reads those mixers from a hybrid folder and checks that they were made from the searched model.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from rad.errors import RadError
from rad.models.layers import decoder_layers
from rad.models.loading import load_model
from rad.models.mixers import mixer_layers
from rad.utils.identity import tensor_sha256

logger = logging.getLogger(__name__)


def aligned_folder(spec: str | Path) -> Path:
    """The hybrid folder of `spec`: itself, or the `student/` of a `rad align` / `rad distill` output."""
    folder = Path(spec)
    for candidate in (folder, folder / "student"):
        if (candidate / "config.json").is_file() and (candidate / "rad_conversion.json").is_file():
            return candidate
    raise RadError(f"{spec} is not a hybrid: give a `rad align` output (or the hybrid folder itself) whose "
                   "mixers the hybrid-agreement objective should try, e.g. rad align runs/all --out runs/all-align.")


def converted_in(spec: str | Path) -> list[int]:
    """The layers the hybrid at `spec` converted, from its record (no weights loaded)."""
    record = json.loads((aligned_folder(spec) / "rad_conversion.json").read_text())
    return [int(i) for i in record.get("converted_layers", [])]


def load_aligned_mixers(spec: str | Path, model: nn.Module) -> dict[int, nn.Module]:
    """{layer: mixer} of the hybrid at `spec`, on `model`'s device and dtype, refused unless the hybrid was made
    from `model`: same number of layers and hidden size, the same embeddings and the same input norm at every
    mixer layer (the mixer's input is that norm's output, so a mixer made for another model means nothing here)."""
    folder = aligned_folder(spec)
    param = next(model.parameters())
    hybrid = load_model(str(folder), device=param.device, dtype=param.dtype).model
    ours, theirs = decoder_layers(model), decoder_layers(hybrid)
    if len(ours) != len(theirs) or model.config.hidden_size != hybrid.config.hidden_size:
        raise RadError(f"The aligned hybrid {folder} has {len(theirs)} layers of width {hybrid.config.hidden_size}, "
                       f"the searched model {len(ours)} of width {model.config.hidden_size}; align mixers for this "
                       "model (rad convert MODEL --layers first:L, then rad align).")
    mixers = mixer_layers(hybrid)
    if not mixers:
        raise RadError(f"The hybrid {folder} has no mixers; convert the candidate layers first (--layers first:L).")
    same = tensor_sha256(model.get_input_embeddings().weight) == tensor_sha256(hybrid.get_input_embeddings().weight)
    same = same and all(torch.equal(ours[i].input_layernorm.weight, theirs[i].input_layernorm.weight) for i in mixers)
    if not same:
        raise RadError(f"The aligned hybrid {folder} was made from another model (its embeddings or input norms "
                       "differ from the searched model's); search the model it was converted from.")
    for mixer in mixers.values():
        mixer.requires_grad_(False)
    logger.info("Aligned mixers of layers %s from %s", ",".join(map(str, mixers)), folder)
    return dict(mixers)


def mixers_digest(mixers: dict[int, nn.Module]) -> str:
    """The identity of a set of mixers (layers and weights): what a resumed hybrid-agreement study must share."""
    return tensor_sha256(torch.tensor(sorted(mixers)), *(t for i in sorted(mixers)
                                                          for t in mixers[i].state_dict().values()))
