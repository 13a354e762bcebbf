"""Mamba2 (SSD) recurrence for a few tokens at a time, keeping the state after every token.

Decoding feeds 1 token (plain greedy) or up to ~9 (a speculative verification round). For that few
tokens the closed form is cheap, exact, and gives the state after each position, which is what a
rollback to the last accepted token needs. Shapes: batch b, tokens t, heads h, head_dim p, state n.

    state_t = exp(dt_t * A) * state_{t-1} + dt_t * x_t (outer) B_t
    y_t     = C_t . state_t + D * x_t
"""

from __future__ import annotations

import torch


def ssd_scan_with_states(
    state: torch.Tensor,  # (b, h, p, n) float32, the state before the first token
    x: torch.Tensor,  # (b, t, h, p)
    dt: torch.Tensor,  # (b, t, h), already softplus-ed and clamped
    A: torch.Tensor,  # (h,), negative
    B: torch.Tensor,  # (b, t, h, n), already expanded from groups to heads
    C: torch.Tensor,  # (b, t, h, n)
    D: torch.Tensor,  # (h,)
) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs y (b, t, h, p) in float32 and the states after each token (b, t, h, p, n)."""
    x, dt, B, C = x.float(), dt.float(), B.float(), C.float()
    t = x.shape[1]
    if t == 1:
        decay = torch.exp(dt[:, 0] * A)  # (b, h)
        dtx = x[:, 0] * dt[:, 0, :, None]  # (b, h, p)
        new = state * decay[:, :, None, None] + dtx[..., None] * B[:, 0, :, None, :]
        y = torch.einsum("bhpn,bhn->bhp", new, C[:, 0]) + D[:, None] * x[:, 0]
        return y[:, None], new[:, None]
    log_a = dt * A  # (b, t, h)
    cum = torch.cumsum(log_a, dim=1)  # (b, t, h)
    # decay from token s (exclusive) to token r (inclusive), zero above the diagonal
    seg = cum[:, :, None, :] - cum[:, None, :, :]  # (b, r, s, h)
    causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
    weights = torch.exp(seg.masked_fill(~causal[None, :, :, None], float("-inf")))
    dtx = x * dt[..., None]  # (b, t, h, p)
    inputs = torch.einsum("bshp,bshn->bshpn", dtx, B)
    states = torch.einsum("brsh,bshpn->brhpn", weights, inputs)
    states = states + torch.exp(cum)[..., None, None] * state[:, None]
    y = torch.einsum("brhpn,brhn->brhp", states, C) + D[:, None] * x
    return y, states


def ssd_reference(state, x, dt, A, B, C, D):
    """The recurrence as written, token by token, in float64: the twin the fast path is tested against."""
    state = state.double()
    ys, states = [], []
    for i in range(x.shape[1]):
        decay = torch.exp(dt[:, i].double() * A.double())
        state = state * decay[:, :, None, None] + (dt[:, i, :, None].double() * x[:, i].double())[
            ..., None
        ] * B[:, i, :, None, :].double()
        ys.append(torch.einsum("bhpn,bhn->bhp", state, C[:, i].double()) + D.double()[:, None] * x[:, i].double())
        states.append(state)
    return torch.stack(ys, 1), torch.stack(states, 1)
