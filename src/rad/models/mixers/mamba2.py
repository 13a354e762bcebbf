"""Mamba2, as Bamba's mixer holds it: the one mixer kind rad converts attention layers into today.

Everything rad knows about this mixer lives here: its shape next to the attention it replaces, the BambaConfig
keys it sets, its inits, its parameter names, and its decode-time recurrence (`Mamba2.decode_step`, whose
reference twin is the model's own forward, and whose scan's is `rad.ops.ssd.ssd_reference`).

Geometry. Heads and head size are fixed by RAD's init (out_proj <- o_proj needs d_inner = heads x head_dim); the
free choices are the number of SSM groups (B and C are shared within a group, as keys and values are
shared within a GQA group) and the state size per group. Both set the width of in_proj and the conv:
`heads` groups with d_state = head_dim (what the `mil` init copies k and q into) make a mixer ~1.9x its
attention's weights on Llama-shaped models; `kv` groups with a smaller state are much lighter.

Layout of `in_proj` rows (Bamba / mamba_ssm Mamba2): [z (d_inner) | x (d_inner) | B (G*N) | C (G*N) | dt (H)],
with x grouped per head (H heads of P channels) and B, C per group (G groups of N states).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.bamba.modeling_bamba import BambaMixer

from rad.errors import RadError
from rad.models.attention import head_dim_of
from rad.models.mixers.base import InitDefaults, MixerKind, StateSpec
from rad.ops.ssd import ssd_scan_with_states
from rad.utils.devices import default_chunk_size


@dataclass(frozen=True)
class Mamba2Geometry:
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

    def record(self) -> dict:
        return {"n_groups": self.n_groups, "d_state": self.d_state, "d_conv": self.d_conv}


GROUP_CHOICES = ("heads", "kv")  # or a positive whole number
D_STATE_CHOICES = ("head_dim", "half")  # the attention head size or half of it; or a positive whole number


def _positive_whole(value) -> int | None:
    """`value` as a positive whole number (an int or its exact text), else None (a bool is not a number here)."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        return None
    if isinstance(value, bool) or number < 1 or str(value).strip() != str(number):
        return None
    return number


def parse_groups(value: int | str | None) -> int | str:
    """`heads`, `kv` or a positive whole number (also as text, from the CLI or a YAML file)."""
    if value is None:
        return "heads"
    if isinstance(value, str) and value in GROUP_CHOICES:
        return value
    number = _positive_whole(value)
    if number is None:
        raise RadError(f"Bad number of SSM groups {value!r}: use 'heads', 'kv' or a positive whole number.")
    return number


def parse_d_state(value: int | str | None) -> int | str | None:
    """`head_dim`, `half` or a positive whole number (also as text); None stays None (the caller's default)."""
    if value is None or (isinstance(value, str) and value in D_STATE_CHOICES):
        return value
    number = _positive_whole(value)
    if number is None:
        raise RadError(f"Bad d_state {value!r} (the SSM state size): expected head_dim, half or a positive whole "
                       "number.")
    return number


def resolve_geometry(config, n_groups: int | str | None = "heads", d_state: int | str | None = None,
                     d_conv: int = 4) -> Mamba2Geometry:
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
    return Mamba2Geometry(hidden=config.hidden_size, heads=heads, head_dim=hd, n_groups=groups, d_state=state,
                         d_conv=d_conv)


# The one table of per-init defaults (docs/distill.md has the measurements behind the `rad` row).
# `rad`: in_proj = 0 makes the output exactly 0; its gated-norm gains start at RAD_GATE_GAIN, and 100x lr on those
# few weights lets them grow in tens of steps (held-out KL monotone from step 0 at lr 3e-4 and at 1e-3).
# Its geometry, one SSM group per key/value head with half the head size as state, is the lightest whose held-out
# KL after 32 and 128 steps stays within 5% of one group per head with d_state = head_dim (docs/benchmarks.md;
# measured with the previous gain-0 init, not yet with this one).
# `rad-zero-in-proj` is the paper's literal init (gain 1), kept with its old geometry for the ablation.
INIT_DEFAULTS = {
    "rad": InitDefaults(n_groups="kv", d_state="half", norm_lr_scale=100.0),
    "rad-zero-in-proj": InitDefaults(n_groups="heads", norm_lr_scale=1.0),
    "mil": InitDefaults(n_groups="heads", norm_lr_scale=1.0),  # k -> B, q -> C needs a group per head
    "random": InitDefaults(n_groups="heads", norm_lr_scale=1.0),
}
INITS = tuple(INIT_DEFAULTS)



def geometry_of_config(config) -> Mamba2Geometry:
    """The mixers' shape as a hybrid's BambaConfig holds it (the inverse of `Mamba2.hf_config_fields`)."""
    return Mamba2Geometry(hidden=config.hidden_size, heads=config.mamba_n_heads, head_dim=config.mamba_d_head,
                          n_groups=config.mamba_n_groups, d_state=config.mamba_d_state, d_conv=config.mamba_d_conv)


def padded_geometry(geometry: Mamba2Geometry, d_inner: int) -> Mamba2Geometry:
    """`geometry` widened to `d_inner` channels by whole heads of the same size in groups of their own, each new
    group as many heads as the old ones (what `pad_mixer_tensors` writes); a RadError where that is impossible."""
    extra = d_inner - geometry.d_inner
    per_group = geometry.heads // geometry.n_groups
    if extra < 0 or extra % geometry.head_dim or (extra // geometry.head_dim) % per_group:
        raise RadError(f"A mixer of {geometry.heads} heads x {geometry.head_dim} in {geometry.n_groups} groups cannot "
                       f"be padded to {d_inner} channels with whole groups of {per_group} heads.")
    heads = extra // geometry.head_dim
    return Mamba2Geometry(hidden=geometry.hidden, heads=geometry.heads + heads, head_dim=geometry.head_dim,
                          n_groups=geometry.n_groups + heads // per_group, d_state=geometry.d_state,
                          d_conv=geometry.d_conv)


@torch.no_grad()
def pad_mixer_tensors(tensors: dict[str, torch.Tensor], geometry: Mamba2Geometry, d_inner: int
                      ) -> dict[str, torch.Tensor]:
    """One mixer's tensors (Bamba names: in_proj.weight, conv1d.*, dt_bias, A_log, D, norm.weight, out_proj.weight)
    widened to `d_inner` channels so that the mixer computes exactly the same function.

    Every added head reads zero input (zero rows of in_proj for its z, x and dt, zero conv weights and bias), so
    its x after the conv is silu(0) = 0, its state stays 0 and its output y = 0 (D = 0 as well); its group's B
    and C are zero too, and being a group of its own, the gated RMSNorm never mixes it with real channels (0
    stays 0); zero out_proj columns drop it. llama.cpp's granite-hybrid asserts d_inner = 2 x hidden, which rad's
    mixers (d_inner = hidden) meet only this way."""
    new = padded_geometry(geometry, d_inner)
    old_heads, gn = geometry.heads, geometry.n_groups * geometry.d_state
    gn_new = new.n_groups * new.d_state
    w = tensors["in_proj.weight"]
    z, x, b, c, dt = torch.split(w, [geometry.d_inner, geometry.d_inner, gn, gn, old_heads])

    def grow(t: torch.Tensor, rows: int) -> torch.Tensor:
        return torch.cat([t, t.new_zeros((rows - t.shape[0], *t.shape[1:]))])

    out = dict(tensors)
    out["in_proj.weight"] = torch.cat([grow(z, d_inner), grow(x, d_inner), grow(b, gn_new), grow(c, gn_new),
                                       grow(dt, new.heads)])
    for name in ("conv1d.weight", "conv1d.bias"):  # channels [x (d_inner) | B (G*N) | C (G*N)]
        if name in tensors:
            cx, cb, cc = torch.split(tensors[name], [geometry.d_inner, gn, gn])
            out[name] = torch.cat([grow(cx, d_inner), grow(cb, gn_new), grow(cc, gn_new)])
    out["dt_bias"] = grow(tensors["dt_bias"], new.heads)
    out["A_log"] = grow(tensors["A_log"], new.heads)  # A = -exp(0) = -1 on a head whose state is always 0
    out["D"] = grow(tensors["D"], new.heads)
    out["norm.weight"] = torch.cat([tensors["norm.weight"], tensors["norm.weight"].new_ones(d_inner - geometry.d_inner)])
    o = tensors["out_proj.weight"]
    out["out_proj.weight"] = torch.cat([o, o.new_zeros((o.shape[0], d_inner - geometry.d_inner))], dim=1)
    return out


@torch.no_grad()
def standard_mamba2_init(
    mixer: nn.Module,
    generator: torch.Generator,
    dt_min: float = 1e-3,
    dt_max: float = 0.1,
    dt_floor: float = 1e-4,
    a_range: tuple[float, float] = (1.0, 16.0),
) -> None:
    """mamba_ssm's Mamba2 defaults: Linear/Conv1d default init, dt log-uniform in [dt_min, dt_max], A in a_range, D = 1."""

    def fill_like_default(module: nn.Module) -> None:
        # nn.Linear / nn.Conv1d reset_parameters, drawn from `generator` instead of the global RNG.
        weight = module.weight
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
        if module.bias is not None:
            fan_in = weight[0].numel()
            bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
            nn.init.uniform_(module.bias, -bound, bound, generator=generator)

    fill_like_default(mixer.in_proj)
    fill_like_default(mixer.conv1d)
    fill_like_default(mixer.out_proj)
    heads = mixer.num_heads
    device = mixer.dt_bias.device
    u = torch.rand(heads, generator=generator, device=generator.device).to(device)
    dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=dt_floor)
    inv_softplus_dt = dt + torch.log(-torch.expm1(-dt))
    mixer.dt_bias.copy_(inv_softplus_dt)
    a = torch.empty(heads, device=generator.device).uniform_(*a_range, generator=generator).to(device)
    mixer.A_log.copy_(torch.log(a))
    mixer.D.fill_(1.0)
    mixer.norm.weight.fill_(1.0)


# The `rad` init's gated-norm gain: the most that the first update can make of a mixer's output, as a fraction of
# the paper's (gain 1). 0.3 still overshoots at lr 1e-3 with 1% warm-up; 0.01 learns more slowly (docs/distill.md).
RAD_GATE_GAIN = 0.1


@torch.no_grad()
def rad_init(mixer: nn.Module, attention: nn.Module, generator: torch.Generator) -> None:
    """RAD: out_proj <- o_proj, in_proj = 0 (the gate z is 0, so the output is), gated-norm gain RAD_GATE_GAIN.

    As in the paper, the first update writes in_proj in the gradient's direction and the gated RMSNorm scales
    what it makes to full size; the small gain caps that first jump at a tenth of the paper's, and the gains
    (trained at 100x lr) then grow it as far as the loss wants. A gain of 0 with a random in_proj is exact too
    but starts from random features and learns more slowly (the comparison in docs/distill.md).
    """
    rad_zero_in_proj_init(mixer, attention, generator)
    mixer.norm.weight.fill_(RAD_GATE_GAIN)


@torch.no_grad()
def rad_zero_in_proj_init(mixer: nn.Module, attention: nn.Module, generator: torch.Generator) -> None:
    """The paper's literal RAD init: out_proj <- o_proj, in_proj = 0 (the gate z is 0, so the output is)."""
    standard_mamba2_init(mixer, generator)
    mixer.in_proj.weight.zero_()
    if mixer.in_proj.bias is not None:
        mixer.in_proj.bias.zero_()
    _copy_out_proj(mixer, attention)


@torch.no_grad()
def mil_init(mixer: nn.Module, attention: nn.Module, generator: torch.Generator, num_kv_heads: int) -> None:
    """MambaInLlama: per head v -> x, k -> B, q -> C, o -> out_proj; z and dt rows keep their random init.

    Needs one SSM group per attention head and d_state = head_dim; a key/value head is copied to every
    query head of its grouped-query group.
    """
    standard_mamba2_init(mixer, generator)
    heads, head_dim = mixer.num_heads, mixer.head_dim
    groups, d_state = mixer.n_groups, mixer.ssm_state_size
    if groups != heads or d_state != head_dim:
        raise ValueError(
            f"The 'mil' init needs mamba_n_groups = heads ({heads}) and mamba_d_state = head_dim ({head_dim}); "
            f"got {groups} and {d_state}."
        )
    d_inner = mixer.intermediate_size
    x_start, b_start = d_inner, 2 * d_inner
    c_start = b_start + groups * d_state
    q, k, v = attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight
    w = mixer.in_proj.weight
    per_group = heads // num_kv_heads
    for h in range(heads):
        kv = h // per_group
        src_kv = slice(kv * head_dim, (kv + 1) * head_dim)
        w[x_start + h * head_dim : x_start + (h + 1) * head_dim].copy_(v[src_kv])
        w[b_start + h * d_state : b_start + (h + 1) * d_state].copy_(k[src_kv])
        w[c_start + h * d_state : c_start + (h + 1) * d_state].copy_(q[h * head_dim : (h + 1) * head_dim])
    _copy_out_proj(mixer, attention)


@torch.no_grad()
def random_init(mixer: nn.Module, attention: nn.Module, generator: torch.Generator) -> None:
    del attention
    standard_mamba2_init(mixer, generator)


def _copy_out_proj(mixer: nn.Module, attention: nn.Module) -> None:
    mixer.out_proj.weight.copy_(attention.o_proj.weight)
    if mixer.out_proj.bias is not None:
        bias = attention.o_proj.bias
        mixer.out_proj.bias.copy_(bias if bias is not None else torch.zeros_like(mixer.out_proj.bias))


_INIT_FUNCTIONS = {"rad": rad_init, "rad-zero-in-proj": rad_zero_in_proj_init, "random": random_init}


class Mamba2(MixerKind):
    """Bamba's Mamba2 mixer (`BambaMixer`, at `layer.mamba`), shaped as RAD's inits need it."""

    name = "mamba2"
    title = "Mamba2"
    init_defaults = INIT_DEFAULTS
    layer_attribute = "mamba"

    # ------------------------------------------------------------ conversion

    def settings(self, init: str, n_groups: int | str | None, d_state: int | str | None
                 ) -> tuple[int | str, int | str | None]:
        if n_groups is None:
            n_groups = INIT_DEFAULTS[init].n_groups
            if d_state is None:
                d_state = INIT_DEFAULTS[init].d_state
        return parse_groups(n_groups), parse_d_state(d_state)

    def resolve_geometry(self, source_config, n_groups: int | str | None, d_state: int | str | None,
                         d_conv: int) -> Mamba2Geometry:
        return resolve_geometry(source_config, n_groups, d_state, d_conv)

    def check_init(self, init: str, geometry: Mamba2Geometry) -> None:
        if init == "mil" and (geometry.n_groups != geometry.heads or geometry.d_state != geometry.head_dim):
            raise RadError(f"The 'mil' init copies k and q into B and C, so it needs n_groups = heads "
                           f"({geometry.heads}) and d_state = head_dim ({geometry.head_dim}); got {geometry.n_groups} "
                           f"and {geometry.d_state}. Use --n-groups heads without --d-state, or another init.")

    def hf_config_fields(self, geometry: Mamba2Geometry, chunk_size: int) -> dict:
        if geometry.d_inner % geometry.hidden != 0:
            raise RadError(
                f"heads x head_dim = {geometry.d_inner} is not a multiple of hidden_size = {geometry.hidden}; "
                "Bamba's Mamba2 mixer needs d_inner = expand x hidden_size with an integer expand, so o_proj "
                "cannot be reused here."
            )
        return dict(
            mamba_n_heads=geometry.heads,
            mamba_d_head=geometry.head_dim,
            mamba_n_groups=geometry.n_groups,
            mamba_d_state=geometry.d_state,
            mamba_d_conv=geometry.d_conv,
            mamba_expand=geometry.d_inner // geometry.hidden,
            mamba_chunk_size=chunk_size,
            mamba_conv_bias=True,
            mamba_proj_bias=False,
        )

    def initialise(self, mixer: nn.Module, attention: nn.Module, geometry: Mamba2Geometry, init: str,
                   generator: torch.Generator) -> None:
        if init == "mil":
            kv_heads = attention.k_proj.weight.shape[0] // geometry.head_dim
            mil_init(mixer, attention, generator, num_kv_heads=kv_heads)
        else:
            _INIT_FUNCTIONS[init](mixer, attention, generator)

    def load_overrides(self, config, chunk_size: int | None, device: torch.device) -> dict:
        if getattr(config, "model_type", None) == "bamba":
            return {"mamba_chunk_size": chunk_size or default_chunk_size(device)}
        return {}

    # ------------------------------------------------------------ checkpoint and training

    def is_gain_parameter(self, name: str) -> bool:
        """The gated RMSNorm's weight, which scales the whole output (the `rad` init's small gain)."""
        return ".mamba.norm." in name

    # ------------------------------------------------------------ runtime

    def owns(self, mixer: nn.Module) -> bool:
        return isinstance(mixer, BambaMixer)

    def output(self, mixer: nn.Module, normed_hidden: torch.Tensor, attention_mask: torch.Tensor | None
               ) -> torch.Tensor:
        # What BambaDecoderLayer passes: the 2D padding mask, or None when nothing is padded.
        if attention_mask is not None and (normed_hidden.shape[1] == 1 or bool(attention_mask.all())):
            attention_mask = None
        return mixer(hidden_states=normed_hidden, attention_mask=attention_mask)

    def describe(self, mixer: nn.Module) -> dict:
        return {"n_groups": mixer.n_groups, "d_state": mixer.ssm_state_size}

    def describe_text(self, described: dict) -> str:
        return f"{described['n_groups']} SSM groups, d_state {described['d_state']}"

    # ------------------------------------------------------------ decoding

    def state_specs(self, mixer: nn.Module) -> tuple[StateSpec, ...]:
        """The last d_conv conv inputs (model dtype) and the SSM state (float32, as the chunked scan keeps it)."""
        return (
            StateSpec("conv", (mixer.conv_dim, mixer.conv_kernel_size)),
            StateSpec("ssm", (mixer.num_heads, mixer.head_dim, mixer.ssm_state_size), torch.float32),
        )

    def import_prefill_states(self, hf_cache_layer, states: tuple[torch.Tensor, ...]) -> None:
        conv, ssm = states
        conv.copy_(hf_cache_layer.conv_states[0][..., -conv.shape[-1] :])
        ssm.copy_(hf_cache_layer.recurrent_states[0])

    def decode_step(self, mixer: nn.Module, normed_hidden: torch.Tensor, states: tuple[torch.Tensor, ...]
                    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """The exact few-token recurrence; pending = (conv inputs (B, conv_dim, d_conv + T): the old window
        then the new inputs, SSM states after each token (B, T, heads, head_dim, d_state))."""
        h = normed_hidden
        conv_state, ssm_state = states
        b, t, _ = h.shape
        heads, p, n, groups = mixer.num_heads, mixer.head_dim, mixer.ssm_state_size, mixer.n_groups
        d_inner = mixer.intermediate_size
        zxbcdt = mixer.in_proj(h)
        z, xbc, dt = zxbcdt.split([d_inner, mixer.conv_dim, heads], dim=-1)
        inputs = torch.cat([conv_state, xbc.transpose(1, 2)], dim=-1)  # (b, conv_dim, d_conv + t)
        # Depthwise causal conv as a windowed multiply-add: for a few tokens this is far cheaper than
        # F.conv1d's oneDNN path (~0.3 ms per call here for 4 taps).
        windows = inputs[..., 1:].unfold(-1, mixer.conv_kernel_size, 1)  # (b, conv_dim, t, d_conv)
        conv = (windows * mixer.conv1d.weight[:, 0, None, :]).sum(-1)
        if mixer.conv1d.bias is not None:
            conv = conv + mixer.conv1d.bias[:, None]
        xbc = F.silu(conv).transpose(1, 2)  # (b, t, conv_dim)
        x, B, C = xbc.split([d_inner, groups * n, groups * n], dim=-1)
        dt = F.softplus(dt.float() + mixer.dt_bias.float())
        low, high = mixer.time_step_limit
        if low > 0.0 or high != float("inf"):
            dt = dt.clamp(low, high)
        B = B.reshape(b, t, groups, n)
        C = C.reshape(b, t, groups, n)
        if groups != heads:
            B = B.repeat_interleave(heads // groups, dim=2)
            C = C.repeat_interleave(heads // groups, dim=2)
        A = -torch.exp(mixer.A_log.float())
        y, ssm_states = ssd_scan_with_states(ssm_state, x.reshape(b, t, heads, p), dt, A, B, C, mixer.D.float())
        y = y.reshape(b, t, d_inner) * F.silu(z.float())
        norm = mixer.norm
        yg = y.view(b, t, groups, d_inner // groups) if norm.group_size != d_inner else y[..., None, :]
        yg = yg * torch.rsqrt(yg.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
        y = norm.weight * yg.reshape(b, t, d_inner)
        return mixer.out_proj(y.to(h.dtype)), (inputs, ssm_states)

    def commit(self, states: tuple[torch.Tensor, ...], pending: tuple[torch.Tensor, ...], n: int) -> None:
        conv_state, ssm_state = states
        inputs, ssm_states = pending
        d_conv = conv_state.shape[-1]
        conv_state.copy_(inputs[..., n : n + d_conv])
        ssm_state.copy_(ssm_states[:, n - 1])
