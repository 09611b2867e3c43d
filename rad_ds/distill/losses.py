"""Distillation losses: logit KD (any divergence of :mod:`rad_ds.distill.divergences`: forward KL, reverse KL,
generalised JSD, DistiLLM's skew KL and skew reverse KL, total variation, or one registered there),
replaced-layer output losses (MSE, cosine) and cross-entropy on the data.

Every function returns the **sum** of a per-token loss over the positions that ``mask`` selects; the
trainer divides by the number of selected tokens of the whole global batch (all micro-batches of all
ranks), so a step's loss and gradient do not depend on how the batch was split over ranks and
micro-batches. ``mean_*`` helpers give the per-token mean of one tensor. A mask that selects nothing
gives 0 with a gradient of 0, never NaN.

Logit losses (:func:`kd_loss_sum`, :func:`ce_loss_sum`) are custom autograd functions that walk the
selected positions in chunks of ``chunk_tokens``: the forward keeps only its inputs (plus a few floats
per token), and the backward recomputes each chunk's float32 log-softmax and writes its closed-form
gradient into the gradient of the logits. Memory beyond the logits and their gradient is two or three
float32 ``chunk_tokens x vocab`` buffers, not the ``tokens x vocab`` float32 log-softmaxes that
autograd would otherwise keep alive from forward to backward (5 GB for 4 x 2048 tokens at vocab
128256; see ``benchmarks/results/kd_memory_cpu.md``). ``kd_loss_sum_ref`` / ``ce_loss_sum_ref`` are the
plain autograd versions that tests and ``benchmarks/kd_memory.py`` compare against.

These functions still need both models' logits and produce the student's logits gradient (``tokens x vocab``
each). :mod:`rad_ds.distill.fused` goes one step further and never makes them: it takes the final hidden
states and the LM head weights and runs the per-chunk helpers below on each chunk's projected logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from rad_ds.core.dtypes import compute_dtype
from rad_ds.engine.topk import tail_logmass

from .divergences import REGISTRY, Divergence, resolve

KD_KINDS = tuple(REGISTRY)  # the built-in divergences; REGISTRY itself also holds any registered later


def token_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                     kind: str | Divergence = "forward_kl", temperature: float = 1.0,
                     beta: float | None = None) -> torch.Tensor:
    """Per-position divergence between the two next-token distributions, ``(..., V) -> (...)``, in float32.

    ``kind``: a :class:`~rad_ds.distill.divergences.Divergence` or a registered name (``forward_kl``:
    KL(teacher || student), RAD's default; ``reverse_kl``; ``jsd``; ``skew_kl`` / ``skew_rkl`` (DistiLLM);
    ``tv``; see :mod:`rad_ds.distill.divergences`); ``beta``: with a name, the divergence's mixture weight
    (JSD's beta, skew's alpha; ignored by the others). Distributions are softmax(logits / T); the result is
    scaled by T^2 so gradient magnitudes do not shrink with the temperature (Hinton et al. 2015, sec. 2)."""
    div = resolve(kind, beta)
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return div.reference(s, t) * (temperature**2)


# -- chunked logit losses ---------------------------------------------------------------------------------
#
# Notation per selected row: z = logits / T, s = log_softmax(z_student), t = log_softmax(z_teacher),
# p = exp(s), q = exp(t). With L the unscaled divergence, the loss is T^2 * L and its gradient w.r.t. the
# student logits is T^2 * dL/dz / T = T * dL/dz. Each divergence (rad_ds/distill/divergences/, one file each,
# with its closed form) computes L and a row constant c from (s, t) in ``rows`` and dL/dz from (s, t, c) in
# ``grad_rows``. The row constants and both logsumexps come from the forward, a few floats per row. The
# per-chunk helpers own their (chunk, V) buffers and the divergences work in place on them: forward_kl and
# reverse_kl hold two float32 (chunk, V) buffers at a time, jsd three; all die when the helper returns.


def _log_softmax_rows(flat, rows, temperature, dtype, lse=None):
    """Log-softmax of ``flat[rows] / T`` as a fresh ``(chunk, V)`` tensor of ``dtype``, and the rows'
    logsumexp; pass ``lse`` back to skip the reduction (backward reuses the forward's, so both passes see
    bit-identical log-probabilities)."""
    x = flat.index_select(0, rows).to(dtype)  # index_select copies, so ``x`` never aliases ``flat``
    if temperature != 1.0:
        x.div_(temperature)
    if lse is None:
        lse = torch.logsumexp(x, dim=-1, keepdim=True)
    return x.sub_(lse), lse


def _divergence_rows(student, teacher, rows, div, temperature, dtype):
    """Unscaled divergence of each selected row, the rows' two logsumexps and the gradient's row constant
    (``(chunk, 1)`` each)."""
    s, ls = _log_softmax_rows(student, rows, temperature, dtype)
    t, lt = _log_softmax_rows(teacher, rows, temperature, dtype)
    d, c = div.rows(s, t)
    return d, ls, lt, c


def _divergence_grad_rows(student, teacher, rows, ls, lt, c, div, temperature, dtype):
    """dL/dz of each selected row, a fresh ``(chunk, V)`` tensor of ``dtype``."""
    s, _ = _log_softmax_rows(student, rows, temperature, dtype, ls)
    t, _ = _log_softmax_rows(teacher, rows, temperature, dtype, lt)
    return div.grad_rows(s, t, c)


class _ChunkedDivergence(torch.autograd.Function):
    """Sum of :func:`token_divergence` over ``rows`` of ``(N, V)`` logits, recomputed chunk by chunk in
    backward. Saved for backward: the two logits tensors (alive in the caller anyway), the row indices and
    three floats per selected row; no ``(rows, V)`` activation survives the forward. ``div``: a
    :class:`~rad_ds.distill.divergences.Divergence` (its parameters travel inside it)."""

    @staticmethod
    def forward(ctx, student, teacher, rows, div, temperature, chunk):
        dtype = compute_dtype(student)
        total = torch.zeros((), dtype=dtype, device=student.device)
        saved = []  # (lse_student, lse_teacher, row constant) per chunk
        with torch.autocast(student.device.type, enabled=False):
            for r in rows.split(chunk):
                d, *rest = _divergence_rows(student, teacher, r, div, temperature, dtype)
                total += d.sum()
                saved.append(rest)
        per_row = [torch.cat(xs) for xs in zip(*saved)] if saved else [rows.new_zeros(0, 1, dtype=dtype)] * 3
        ctx.save_for_backward(student, teacher, rows, *per_row)
        ctx.cfg = (div, temperature, chunk)
        return total * (temperature**2)

    @staticmethod
    @once_differentiable  # the backward is closed-form, not itself differentiable
    def backward(ctx, grad_out):
        student, teacher, rows, *per_row = ctx.saved_tensors
        div, temperature, chunk = ctx.cfg
        if not ctx.needs_input_grad[0]:
            return (None,) * 6
        dtype = compute_dtype(student)
        grad = torch.zeros(student.shape, dtype=student.dtype, device=student.device)
        scale = grad_out.to(dtype) * temperature
        with torch.autocast(student.device.type, enabled=False):
            for r, ls, lt, c in zip(rows.split(chunk), *(x.split(chunk) for x in per_row)):
                g = _divergence_grad_rows(student, teacher, r, ls, lt, c, div, temperature, dtype)
                grad.index_copy_(0, r, g.mul_(scale).to(student.dtype))
                del g  # before the next chunk allocates its buffers
        return grad, None, None, None, None, None


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Sum of ``cross_entropy(logits[rows], targets)`` over ``(N, V)`` logits, recomputed chunk by chunk in
    backward (gradient softmax - one_hot). Saved: the logits, rows, targets and one logsumexp per row."""

    @staticmethod
    def forward(ctx, logits, rows, targets, chunk):
        dtype = compute_dtype(logits)
        total = torch.zeros((), dtype=dtype, device=logits.device)
        lses = []
        with torch.autocast(logits.device.type, enabled=False):
            for r, y in zip(rows.split(chunk), targets.split(chunk)):
                s, lse = _log_softmax_rows(logits, r, 1.0, dtype)
                total += F.nll_loss(s, y, reduction="sum")  # = cross_entropy, incl. its ignore_index=-100
                lses.append(lse)
                del s
        lse = torch.cat(lses) if lses else rows.new_zeros(0, 1, dtype=dtype)
        ctx.save_for_backward(logits, rows, targets, lse)
        ctx.chunk = chunk
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        logits, rows, targets, lse = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        dtype = compute_dtype(logits)
        grad = torch.zeros(logits.shape, dtype=logits.dtype, device=logits.device)
        with torch.autocast(logits.device.type, enabled=False):
            for r, y, ls in zip(rows.split(ctx.chunk), targets.split(ctx.chunk), lse.split(ctx.chunk)):
                g = _log_softmax_rows(logits, r, 1.0, dtype, ls)[0].exp_()  # softmax
                keep = (y != -100).to(dtype).unsqueeze(-1)  # ignored targets: no gradient for the row
                g.scatter_add_(-1, y.clamp(min=0).unsqueeze(-1), -keep)  # - one_hot(y)
                g.mul_(keep * grad_out.to(dtype))
                grad.index_copy_(0, r, g.to(logits.dtype))
                del g
        return grad, None, None, None


def _flat(logits: torch.Tensor) -> torch.Tensor:
    return logits.reshape(-1, logits.size(-1))  # a view for contiguous logits and for vocab slices of them


def _mask_rows(mask: torch.Tensor, logits: torch.Tensor, what: str) -> torch.Tensor:
    if mask.numel() * logits.size(-1) != logits.numel():
        raise ValueError(f"{what}: mask {tuple(mask.shape)} does not match logits {tuple(logits.shape)}; "
                         "the mask must have the logits' shape without the vocab dimension")
    return mask.reshape(-1).nonzero().squeeze(-1).to(logits.device)


def _check_shapes(student_logits, teacher_logits):
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ; "
            "vocab sizes must match (or use loss.vocab=truncate)"
        )


def kd_loss_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                kind: str | Divergence = "forward_kl", temperature: float = 1.0, beta: float | None = None,
                chunk_tokens: int = 1024) -> torch.Tensor:
    """Sum over selected positions of :func:`token_divergence`. ``logits (b, l, V)``, ``mask (b, l)``;
    ``kind`` and ``beta`` as there (a Divergence object carries its own parameters).
    Memory beyond the inputs and their gradient: ``chunk_tokens x V`` floats (see the module docstring);
    the teacher logits never receive a gradient."""
    _check_shapes(student_logits, teacher_logits)
    div = resolve(kind, beta)
    rows = _mask_rows(mask, student_logits, "kd_loss_sum")
    return _ChunkedDivergence.apply(_flat(student_logits), _flat(teacher_logits.detach()), rows, div,
                                    float(temperature), max(int(chunk_tokens), 1))


def _shifted_targets(input_ids: torch.Tensor, mask: torch.Tensor):
    m = mask.clone()
    m[:, -1] = 0
    targets = torch.zeros_like(input_ids)
    targets[:, :-1] = input_ids[:, 1:]
    return m, targets.reshape(-1)


def ce_targets(input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The flattened next-token target of every position, -100 (no CE term) where ``mask`` does not count it and
    at each row's last position (no next token): what the fused and vocab-parallel losses take."""
    m, tgt = _shifted_targets(input_ids, mask)
    return torch.where(m.reshape(-1).bool(), tgt, torch.full_like(tgt, -100))


def ce_loss_sum(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor,
                chunk_tokens: int = 1024) -> torch.Tensor:
    """Cross-entropy of predicting ``input_ids[:, t+1]`` at position ``t``, summed over the positions
    that ``mask`` selects (``mask[:, -1]`` is ignored: the last position has no target). Memory as for
    :func:`kd_loss_sum`."""
    m, targets = _shifted_targets(input_ids, mask)
    rows = _mask_rows(m, logits, "ce_loss_sum")
    return _ChunkedCrossEntropy.apply(_flat(logits), rows, targets.to(logits.device).index_select(0, rows),
                                      max(int(chunk_tokens), 1))


# -- sparse teacher targets: top-k log-probabilities and a tail bucket -------------------------------------
#
# A teacher stored as its k most likely tokens per position (log-probabilities at temperature T) plus the log
# of the mass outside them is a distribution over k + 1 buckets. The student's distribution is collapsed onto
# the same buckets (its own log-probabilities of those k tokens, and the log of its remaining mass), and any
# registered divergence is taken between the two (k + 1)-bucket distributions. With k = vocab this is the
# full-vocabulary divergence. Top-k reverse KL without a tail is unbounded wherever the student puts mass the
# top-k teacher lacks (the instability verl reports): the tail bucket keeps it finite, with no renormalisation.


def bucket_divergence(s: torch.Tensor, t: torch.Tensor, kind: str | Divergence,
                      beta: float | None = None) -> torch.Tensor:
    """Divergence ``kind`` (as in :func:`token_divergence`) between two distributions given as
    log-probabilities over the same buckets (entries may be -inf), unscaled."""
    return resolve(kind, beta).bucket(s, t)


def _sparse_chunk(student, rows, idx, top, tail, div, temperature):
    dtype = compute_dtype(student)
    s = F.log_softmax(student.index_select(0, rows).to(dtype) / temperature, dim=-1)
    s_b = torch.cat([s.gather(-1, idx), tail_logmass(s, idx)[..., None]], dim=-1)
    t_b = torch.cat([top.to(dtype), tail.to(dtype)[..., None]], dim=-1)
    return div.bucket(s_b, t_b).sum()


def sparse_kd_loss_sum(student_logits: torch.Tensor, topk_idx: torch.Tensor, topk_logp: torch.Tensor,
                       tail_logp: torch.Tensor, mask: torch.Tensor, kind: str | Divergence = "forward_kl",
                       temperature: float = 1.0, beta: float | None = None, chunk_tokens: int = 1024) -> torch.Tensor:
    """:func:`kd_loss_sum` against a sparse teacher (:func:`teacher_topk` of its logits at the same
    temperature): ``topk_* (b, l, k)``, ``tail_logp (b, l)``. Each chunk is recomputed in backward
    (activation checkpointing), so memory stays ``chunk_tokens x V``; scaled by T^2 like the dense loss."""
    div = resolve(kind, beta)
    flat = _flat(student_logits)
    k = topk_idx.size(-1)
    rows_all = _mask_rows(mask, student_logits, "sparse_kd_loss_sum")
    idx_f, top_f, tail_f = topk_idx.reshape(-1, k), topk_logp.reshape(-1, k), tail_logp.reshape(-1)
    total = _zero_like_graph(student_logits)
    for rows in rows_all.split(max(int(chunk_tokens), 1)):
        r = rows.to(idx_f.device)
        args = (flat, rows, idx_f.index_select(0, r).to(flat.device), top_f.index_select(0, r).to(flat.device),
                tail_f.index_select(0, r).to(flat.device), div, float(temperature))
        total = total + checkpoint(_sparse_chunk, *args, use_reentrant=False)
    return total * (temperature**2)


# -- plain autograd references (what tests and benchmarks/kd_memory.py compare the chunked functions with) --

def _zero_like_graph(t: torch.Tensor) -> torch.Tensor:
    """A scalar 0 still connected to ``t``'s graph (backward works and gives zero gradients)."""
    return t.reshape(-1)[:1].float().sum() * 0.0


def kd_loss_sum_ref(student_logits, teacher_logits, mask, kind="forward_kl", temperature=1.0, beta=None,
                    chunk_tokens=1024):
    """:func:`kd_loss_sum` through plain autograd, chunk by chunk: autograd keeps every chunk's float32
    log-softmax (student and teacher) until backward, about 8 bytes x tokens x vocab."""
    _check_shapes(student_logits, teacher_logits)
    div = resolve(kind, beta)
    s_flat, t_flat = _flat(student_logits), _flat(teacher_logits)
    total = _zero_like_graph(student_logits)
    for rows in _mask_rows(mask, student_logits, "kd_loss_sum_ref").split(max(int(chunk_tokens), 1)):
        d = token_divergence(s_flat.index_select(0, rows), t_flat.index_select(0, rows).detach(), div,
                             temperature)
        total = total + d.sum()
    return total


def ce_loss_sum_ref(logits, input_ids, mask, chunk_tokens=1024):
    """:func:`ce_loss_sum` through plain autograd, chunk by chunk."""
    m, tgt = _shifted_targets(input_ids, mask)
    flat = _flat(logits)
    total = _zero_like_graph(logits)
    for rows in _mask_rows(m, logits, "ce_loss_sum_ref").split(max(int(chunk_tokens), 1)):
        total = total + F.cross_entropy(flat.index_select(0, rows).float(), tgt.index_select(0, rows), reduction="sum")
    return total


def hidden_loss_sum(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, mask: torch.Tensor,
                    kind: str = "mse") -> torch.Tensor:
    """Per-token distance between a student layer's output and the teacher's, summed over selected
    tokens. ``mse``: mean over the hidden dimension of the squared difference; ``cosine``: 1 - cos."""
    s, t = student_hidden.float(), teacher_hidden.detach().float()
    if kind == "mse":
        d = (s - t).pow(2).mean(-1)
    elif kind == "cosine":
        d = 1.0 - F.cosine_similarity(s, t, dim=-1, eps=1e-8)
    else:
        raise ValueError(f"unknown hidden-state loss {kind!r}; use mse or cosine")
    return torch.where(mask.bool(), d, torch.zeros_like(d)).sum()  # where, not *: 0 * NaN is NaN


def mean_kd_loss(student_logits, teacher_logits, mask=None, **kw) -> torch.Tensor:
    """Per-token mean of :func:`kd_loss_sum` over one batch (0 when nothing is selected)."""
    mask = torch.ones(student_logits.shape[:-1], dtype=torch.bool) if mask is None else mask
    return kd_loss_sum(student_logits, teacher_logits, mask, **kw) / mask.sum().clamp(min=1)


__all__ = [
    "KD_KINDS", "bucket_divergence", "ce_loss_sum", "ce_loss_sum_ref", "hidden_loss_sum", "kd_loss_sum",
    "kd_loss_sum_ref", "mean_kd_loss", "sparse_kd_loss_sum", "token_divergence",
]
