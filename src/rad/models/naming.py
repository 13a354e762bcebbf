"""The one map from Llama-family parameter names to their Bamba names.

Conversion copies the source's weights into the hybrid by it, and self-distillation points the teacher's
frozen tensors at the student's by it. Written twice, the two copies could drift: the conversion would
still fail loudly, but the sharing would silently stop (the teacher would keep its own copy of every
tensor the map no longer finds).
"""

from __future__ import annotations

# (Llama-family fragment, Bamba fragment), applied in this order. Attention, embeddings, the input norm
# and lm_head keep their names; a converted layer's attention has no twin (its mixer replaces it).
RENAMES: tuple[tuple[str, str], ...] = (
    (".post_attention_layernorm.", ".pre_ff_layernorm."),
    (".mlp.", ".feed_forward."),
    ("model.norm.", "model.final_layernorm."),
)


def hybrid_name(name: str) -> str:
    """The hybrid's (Bamba's) name of a Llama / Qwen2 / Mistral parameter or state-dict key."""
    for old, new in RENAMES:
        name = name.replace(old, new)
    return name


def hybrid_mlp_prefix(layer: int) -> str:
    """The state-dict prefix of layer `layer`'s MLP in a hybrid, e.g. 'model.layers.3.feed_forward.'."""
    return hybrid_name(f"model.layers.{layer}.mlp.")
