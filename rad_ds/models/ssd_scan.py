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


def _pad_to_chunks(chunk_size: int, x, dt, B, C, seq_idx):
    """Pad the length to a multiple of ``chunk_size``. Padded steps have dt = 0: no decay (exp(0) = 1) and
    no input, so the final state is exact; they belong to the last document."""
    pad = (-x.size(1)) % chunk_size
    if not pad:
        return x, dt, B, C, seq_idx
    if seq_idx is not None:
        seq_idx = torch.cat([seq_idx, seq_idx[:, -1:].expand(-1, pad)], dim=1)
    return (F.pad(x, (0, 0, 0, 0, 0, pad)), F.pad(dt, (0, 0, 0, pad)), F.pad(B, (0, 0, 0, 0, 0, pad)),
            F.pad(C, (0, 0, 0, 0, 0, pad)), seq_idx)


def _to_chunks(x, dt, A, B, C, chunk_size: int, seq_idx, cdt: torch.dtype):
    """The inputs in ``cdt``, padded and cut into ``c`` chunks of ``Q = chunk_size``: the discretised input
    ``X = x dt (b, c, Q, h, p)``, ``A dt (b, h, c, Q)``, ``B, C (b, c, Q, h, n)`` with heads expanded, and the
    document masks (None without ``seq_idx``)."""
    b, _, h, p = x.shape
    n = B.size(-1)
    x_, dt_, A_ = x.to(cdt), dt.to(cdt), A.to(cdt)
    B_ = _expand_groups(B, h).to(cdt)
    C_ = _expand_groups(C, h).to(cdt)
    x_, dt_, B_, C_, seq_idx = _pad_to_chunks(chunk_size, x_, dt_, B_, C_, seq_idx)
    Q = chunk_size
    c = x_.size(1) // Q
    same = _DocMasks(seq_idx, c, Q, cdt) if seq_idx is not None else None
    X = (x_ * dt_[..., None]).reshape(b, c, Q, h, p)
    Adt = (A_[None, None, :] * dt_).reshape(b, c, Q, h).permute(0, 3, 1, 2)
    return X, Adt, B_.reshape(b, c, Q, h, n), C_.reshape(b, c, Q, h, n), same


def _within_chunks(Adt, Bc, Cc, X, same):
    """Step 1, each chunk's output from its own inputs: ``y = (C B^T * decay mask) X``. A document start's decay is
    -inf here, so every pair across it decays to exactly 0 (_segsum adds, never subtracts, so no inf - inf)."""
    decay = torch.exp(_segsum(Adt if same is None else Adt.masked_fill(same.starts, float("-inf"))))
    CB = torch.einsum("bclhn,bcshn->bhcls", Cc, Bc)
    return torch.einsum("bhcls,bcshp->bclhp", CB * decay, X)


def _chunk_states(A_cum, Bc, X, same):
    """Step 2, the state each chunk leaves behind (from its own inputs only; with documents, its last one's):
    ``(b, c, h, p, n)``."""
    decay_states = torch.exp(A_cum[..., -1:] - A_cum)  # (b, h, c, Q)
    if same is not None:
        decay_states = decay_states * same.to_chunk_end
    return torch.einsum("bclhn,bhcl,bclhp->bchpn", Bc, decay_states, X)


def _carry_across_chunks(states, A_cum, initial_states, same):
    """Step 3, a short recurrence over the ``c`` chunk boundaries: (the state entering each chunk, the final
    state)."""
    if initial_states is None:
        init = states.new_zeros(states.size(0), 1, *states.shape[2:])
    else:
        init = initial_states.to(states.dtype)[:, None]
    states = torch.cat([init, states], dim=1)  # (b, c+1, h, p, n)
    chunk_decay = torch.exp(_segsum(F.pad(A_cum[..., -1], (1, 0))))  # (b, h, c+1, c+1)
    if same is not None:
        chunk_decay = chunk_decay * same.across
    new_states = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, states)
    return new_states[:, :-1], new_states[:, -1]


def _from_carried(A_cum, Cc, states, same):
    """Step 4, what the state carried into each chunk contributes to each of its positions."""
    carry = torch.exp(A_cum)
    if same is not None:
        carry = carry * same.from_chunk_start
    return torch.einsum("bclhn,bchpn,bhcl->bclhp", Cc, states, carry)


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
    seq_idx: torch.Tensor | None = None,
):
    """Chunked SSD scan for any length, with an optional state in and out; differentiable.

    ``seq_idx (b, l)``: the document index of each position in a packed row (non-decreasing); the state
    is reset where it changes, as mamba-ssm's kernels do: no position sees an earlier document.
    Computation runs in float32 (or float64 if the inputs are float64); the output has ``x``'s dtype.
    """
    b, l, h, p = x.shape
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    X, Adt, Bc, Cc, same = _to_chunks(x, dt, A, B, C, chunk_size, seq_idx, cdt)
    A_cum = torch.cumsum(Adt, dim=-1)  # (b, h, c, Q)
    Y_diag = _within_chunks(Adt, Bc, Cc, X, same)
    states, final_state = _carry_across_chunks(_chunk_states(A_cum, Bc, X, same), A_cum, initial_states, same)
    Y_off = _from_carried(A_cum, Cc, states, same)
    y = (Y_diag + Y_off).reshape(b, X.size(1) * X.size(2), h, p)[:, :l]
    if D is not None:
        y = y + x.to(cdt) * D.to(cdt)[None, None, :, None]
    y = y.to(x.dtype)
    if return_final_states:
        return y, final_state
    return y


class _DocMasks:
    """Where documents of a packed row start, and which interactions of the chunked scan stay inside one
    document (1) or would cross a boundary (0), from ``seq_idx (b, L)`` with ``L = c * Q``. "Boundary" ``z`` of the
    chunk recurrence is the state entering chunk ``z`` (``z = 0``: the initial state, taken to belong to
    the row's first document); it belongs to the document of the last position before it."""

    def __init__(self, seq_idx: torch.Tensor, c: int, Q: int, dtype: torch.dtype):
        b = seq_idx.size(0)
        s = seq_idx.reshape(b, c, Q)
        end = s[:, :, -1]  # (b, c): the document at each chunk's end
        bound = torch.cat([s[:, :1, 0], end], dim=1)  # (b, c+1)
        flat = seq_idx.reshape(b, -1)
        before = torch.cat([flat[:, :1], flat[:, :-1]], dim=1)  # the row's first position starts nothing
        self.starts = (flat != before).reshape(b, c, Q)[:, None]  # (b, 1, c, Q): a document starts here
        self.to_chunk_end = (s == end[..., None])[:, None].to(dtype)  # (b, 1, c, Q)
        self.across = (bound[:, :, None] == bound[:, None, :])[:, None].to(dtype)  # (b, 1, c+1, c+1)
        self.from_chunk_start = (s == bound[:, :-1, None])[:, None].to(dtype)  # (b, 1, c, Q)


def ssd_scan_ref(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    return_final_states: bool = False,
    seq_idx: torch.Tensor | None = None,
):
    """Step-by-step recurrence: the plain reference that the chunked scan is tested against (the state
    is zeroed where ``seq_idx`` changes)."""
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
        if seq_idx is not None and t > 0:
            state = state * (seq_idx[:, t] == seq_idx[:, t - 1]).to(cdt)[:, None, None, None]
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
