"""Initialisations of a Bamba Mamba2 mixer that replaces an attention layer.

Layout of `in_proj` rows (Bamba / mamba_ssm Mamba2): [z (d_inner) | x (d_inner) | B (G*N) | C (G*N) | dt (H)],
with x grouped per head (H heads of P channels) and B, C per group (G groups of N states).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class InitDefaults:
    """What an init wants around it, unless the user says otherwise: the mixer geometry `rad convert`
    builds for it, and the lr multiplier `rad distill` gives the new mixers' gated-norm gains."""

    n_groups: int | str  # "heads", "kv" or a number (models/geometry.py)
    norm_lr_scale: float
    d_state: int | str | None = None  # None: the attention head_dim; "half": half of it (models/geometry.py)


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
