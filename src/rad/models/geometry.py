"""The shape of a Mamba2 mixer that replaces an attention layer, and what it weighs next to that attention.

Heads and head size are fixed by RAD's init (out_proj <- o_proj needs d_inner = heads x head_dim); the
free choices are the number of SSM groups (B and C are shared within a group, as keys and values are
shared within a GQA group) and the state size per group. Both set the width of in_proj and the conv:
`heads` groups with d_state = head_dim (what the `mil` init copies k and q into) make a mixer ~1.9x its
attention's weights on Llama-shaped models; `kv` groups with a smaller state are much lighter.
"""

from __future__ import annotations

from dataclasses import dataclass

from rad.errors import RadError

GROUP_CHOICES = ("heads", "kv")  # or a positive whole number
D_STATE_CHOICES = ("head_dim", "half")  # the attention head size or half of it; or a positive whole number


@dataclass(frozen=True)
class MixerGeometry:
    """Sizes of one Bamba Mamba2 mixer (names as in BambaConfig / mamba_ssm)."""

    hidden: int
    heads: int
    head_dim: int
    n_groups: int
    d_state: int
    d_conv: int = 4

    @property
    def d_inner(self) -> int:
        return self.heads * self.head_dim

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.n_groups * self.d_state

    def parameters(self) -> int:
        """in_proj [z | x | B | C | dt] + conv1d (with bias) + dt_bias, A_log, D + gated norm + out_proj."""
        in_proj = self.hidden * (2 * self.d_inner + 2 * self.n_groups * self.d_state + self.heads)
        conv = self.conv_dim * self.d_conv + self.conv_dim
        return in_proj + conv + 3 * self.heads + self.d_inner + self.d_inner * self.hidden

    def state_bytes(self, conv_element_bytes: int) -> int:
        """Per sequence: the SSM state (float32 in the chunked scan) plus the conv window."""
        return self.heads * self.head_dim * self.d_state * 4 + self.conv_dim * self.d_conv * conv_element_bytes


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def attention_parameters(config, bias: bool) -> int:
    """q, k, v, o of one attention layer of `config` (q/k/v biases when `bias`, none on o)."""
    hd, heads, kv, hidden = head_dim_of(config), config.num_attention_heads, config.num_key_value_heads, config.hidden_size
    weights = hidden * heads * hd + 2 * hidden * kv * hd + heads * hd * hidden
    return weights + ((heads + 2 * kv) * hd if bias else 0)


def parse_groups(value: int | str | None) -> int | str:
    """`heads`, `kv` or a positive whole number (also as text, from the CLI or a YAML file)."""
    if value is None:
        return "heads"
    if isinstance(value, str) and value in GROUP_CHOICES:
        return value
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if isinstance(value, bool) or number < 1 or str(value).strip() != str(number):
        raise RadError(f"Bad number of SSM groups {value!r}: use 'heads', 'kv' or a positive whole number.")
    return number


def parse_d_state(value: int | str | None) -> int | str | None:
    """`head_dim`, `half` or a positive whole number (also as text); None stays None (the caller's default)."""
    if value is None or (isinstance(value, str) and value in D_STATE_CHOICES):
        return value
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if isinstance(value, bool) or number < 1 or str(value).strip() != str(number):
        raise RadError(f"Bad d_state {value!r} (the SSM state size): expected head_dim, half or a positive whole "
                       "number.")
    return number


def resolve_geometry(config, n_groups: int | str | None = "heads", d_state: int | str | None = None,
                     d_conv: int = 4) -> MixerGeometry:
    """The mixer shape for a source model `config`: groups from `heads` / `kv` / a number, d_state a number,
    `head_dim` (the default) or `half`."""
    heads, hd = config.num_attention_heads, head_dim_of(config)
    groups = parse_groups(n_groups)
    groups = {"heads": heads, "kv": config.num_key_value_heads}.get(groups, groups)
    if heads % groups:
        raise RadError(f"{groups} SSM groups do not divide the {heads} mixer heads; pick a divisor of {heads}, "
                       "'heads' or 'kv'.")
    state = parse_d_state(d_state)
    state = {None: hd, "head_dim": hd, "half": hd // 2}.get(state, state)
    return MixerGeometry(hidden=config.hidden_size, heads=heads, head_dim=hd, n_groups=groups, d_state=state,
                         d_conv=d_conv)
