"""The padded hybrid as a transformers model: what the GGUF holds, runnable in torch so its exactness is tested
before llama.cpp is involved."""

from __future__ import annotations

import torch
from transformers import BambaConfig, BambaForCausalLM

from rad.models.convert import is_hybrid_config
from rad.models.mixers import mixer_kind
from rad.models.mixers.mamba2 import geometry_of_config, pad_mixer_tensors, padded_geometry


@torch.no_grad()
def padded_hybrid(model, d_inner: int | None = None) -> BambaForCausalLM:
    """A copy of the hybrid `model` whose mixers are widened to `d_inner` channels (default 2 x hidden, llama.cpp's
    granite-hybrid) by heads that contribute nothing; the same function as `model`."""
    config = model.config
    assert is_hybrid_config(config), "padded_hybrid takes a hybrid"
    d_inner = d_inner or 2 * config.hidden_size
    geometry = geometry_of_config(config)
    wide = padded_geometry(geometry, d_inner)
    fields = {**config.to_dict(), **mixer_kind("mamba2").hf_config_fields(wide, config.mamba_chunk_size)}
    padded = BambaForCausalLM(BambaConfig(**fields)).to(model.dtype)
    state = dict(model.state_dict())
    mixers = sorted({k.split(".mamba.")[0] for k in state if ".mamba." in k})
    for prefix in mixers:
        own = {k[len(prefix) + len(".mamba."):]: state.pop(k) for k in list(state) if k.startswith(prefix + ".mamba.")}
        state.update({f"{prefix}.mamba.{k}": v for k, v in pad_mixer_tensors(own, geometry, d_inner).items()})
    padded.load_state_dict(state, strict=True)
    return padded.eval()
