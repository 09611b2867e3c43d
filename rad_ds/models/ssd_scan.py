"""Pure-PyTorch SSD (Mamba2) scan: a chunked fast path and a sequential reference.

Shapes follow mamba-ssm's ``mamba_chunk_scan_combined``:
``x (b, l, h, p)``, ``dt (b, l, h)`` (already softplus'ed and clamped), ``A (h,)`` (negative),
``B, C (b, l, g, n)`` with ``h % g == 0`` (head ``i`` reads group ``i // (h // g)``), ``D (h,)``,
states ``(b, h, p, n)``.

The recurrence, per head, is ``S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T`` and
``y_t = S_t C_t + D x_t`` (Dao & Gu 2024, eq. 1-2). The chunked form computes the same thing with
matmuls inside chunks and a short recurrence across chunk boundaries (their Listing 1).

This file is imported by the remote-code copy of the model, so it only imports torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _segsum(x: torch.Tensor) -> torch.Tensor:
    """Stable segment sum: ``out[..., i, j] = sum(x[..., j+1:i+1])`` for ``i >= j``, ``-inf`` above."""
    T = x.size(-1)
    x = x[..., None].expand(*x.shape, T)
    below = torch.tril(torch.ones(T, T, device=x.device, dtype=torch.bool), diagonal=-1)
    x = x.masked_fill(~below, 0)
    x_segsum = torch.cumsum(x, dim=-2)
    keep = torch.tril(torch.ones(T, T, device=x.device, dtype=torch.bool), diagonal=0)
    return x_segsum.masked_fill(~keep, float("-inf"))


def _expand_groups(t: torch.Tensor, nheads: int) -> torch.Tensor:
    """(b, l, g, n) -> (b, l, h, n): heads share their group's B/C like GQA."""
    g = t.size(2)
    if g == nheads:
        return t
    return t.repeat_interleave(nheads // g, dim=2)


def ssd_chunk_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int = 64,
    D: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    return_final_states: bool = False,
):
    """Chunked SSD scan for any length, with an optional state in and out; differentiable.

    Computation runs in float32 (or float64 if the inputs are float64); the output has ``x``'s dtype.
    """
    b, l, h, p = x.shape
    n = B.size(-1)
    out_dtype = x.dtype
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    x_, dt_, A_ = x.to(cdt), dt.to(cdt), A.to(cdt)
    B_ = _expand_groups(B, h).to(cdt)
    C_ = _expand_groups(C, h).to(cdt)

    pad = (-l) % chunk_size
    if pad:
        # padded steps have dt = 0: no decay (exp(0) = 1) and no input, so the final state is exact
        x_ = F.pad(x_, (0, 0, 0, 0, 0, pad))
        dt_ = F.pad(dt_, (0, 0, 0, pad))
        B_ = F.pad(B_, (0, 0, 0, 0, 0, pad))
        C_ = F.pad(C_, (0, 0, 0, 0, 0, pad))
    L = l + pad
    c = L // chunk_size
    Q = chunk_size

    X = (x_ * dt_[..., None]).reshape(b, c, Q, h, p)  # discretised input
    Adt = (A_[None, None, :] * dt_).reshape(b, c, Q, h).permute(0, 3, 1, 2)  # (b, h, c, Q)
    Bc = B_.reshape(b, c, Q, h, n)
    Cc = C_.reshape(b, c, Q, h, n)
    A_cum = torch.cumsum(Adt, dim=-1)  # (b, h, c, Q)

    # 1. within each chunk: y = (C B^T * decay mask) X
    decay = torch.exp(_segsum(Adt))  # (b, h, c, Q, Q)
    CB = torch.einsum("bclhn,bcshn->bhcls", Cc, Bc)
    Y_diag = torch.einsum("bhcls,bcshp->bclhp", CB * decay, X)

    # 2. the state each chunk leaves behind (from its own inputs only)
    decay_states = torch.exp(A_cum[..., -1:] - A_cum)  # (b, h, c, Q)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", Bc, decay_states, X)

    # 3. carry states across chunk boundaries (short recurrence over c chunks)
    if initial_states is None:
        init = torch.zeros(b, 1, h, p, n, device=x.device, dtype=cdt)
    else:
        init = initial_states.to(cdt)[:, None]
    states = torch.cat([init, states], dim=1)  # (b, c+1, h, p, n)
    chunk_decay = torch.exp(_segsum(F.pad(A_cum[..., -1], (1, 0))))  # (b, h, c+1, c+1)
    new_states = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, states)
    states, final_state = new_states[:, :-1], new_states[:, -1]

    # 4. what the carried-in state contributes to each position
    Y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", Cc, states, torch.exp(A_cum))

    y = (Y_diag + Y_off).reshape(b, L, h, p)[:, :l]
    if D is not None:
        y = y + x.to(cdt) * D.to(cdt)[None, None, :, None]
    y = y.to(out_dtype)
    if return_final_states:
        return y, final_state
    return y


def ssd_scan_ref(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    return_final_states: bool = False,
):
    """Step-by-step recurrence: the plain reference that the chunked scan is tested against."""
    b, l, h, p = x.shape
    n = B.size(-1)
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    Bh = _expand_groups(B, h).to(cdt)
    Ch = _expand_groups(C, h).to(cdt)
    state = (
        torch.zeros(b, h, p, n, device=x.device, dtype=cdt)
        if initial_states is None
        else initial_states.to(cdt)
    )
    ys = []
    for t in range(l):
        state = ssd_step(state, x[:, t].to(cdt), dt[:, t].to(cdt), A.to(cdt), Bh[:, t], Ch[:, t])
        ys.append(torch.einsum("bhpn,bhn->bhp", state, Ch[:, t]))
    y = torch.stack(ys, dim=1) if ys else x.new_zeros(b, 0, h, p, dtype=cdt)
    if D is not None:
        y = y + x.to(cdt) * D.to(cdt)[None, None, :, None]
    y = y.to(x.dtype)
    return (y, state) if return_final_states else y


def ssd_step(state, x_t, dt_t, A, B_t, C_t=None):
    """One recurrence step. ``state (b,h,p,n)``, ``x_t (b,h,p)``, ``dt_t (b,h)``, ``B_t (b,h,n)``."""
    dA = torch.exp(dt_t * A[None, :])  # (b, h)
    return state * dA[..., None, None] + (dt_t[..., None] * x_t)[..., None] * B_t[:, :, None, :]
