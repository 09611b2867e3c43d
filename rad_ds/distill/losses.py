"""Distillation losses: logit KD (forward KL, reverse KL, generalised JSD, DistiLLM's skew KL and skew reverse
KL, total variation), replaced-layer output losses (MSE, cosine) and cross-entropy on the data.

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

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

KD_KINDS = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_rkl", "tv")
MIXED = ("jsd", "skew_kl", "skew_rkl")  # the kinds that take a mixture weight (``beta``)


def _check_kind(kind: str, beta: float) -> None:
    if kind not in KD_KINDS:
        raise ValueError(f"unknown KD loss {kind!r}; use one of {list(KD_KINDS)}")
    if kind in MIXED and not 0.0 < beta < 1.0:
        raise ValueError(f"{kind} mixture weight beta={beta} must be in (0, 1)")


def token_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str = "forward_kl",
                     temperature: float = 1.0, beta: float = 0.5) -> torch.Tensor:
    """Per-position divergence between the two next-token distributions, ``(..., V) -> (...)``, in float32.

    ``forward_kl``: KL(teacher || student) (Hinton et al.; RAD's default); ``reverse_kl``: KL(student ||
    teacher); ``jsd``: beta*KL(T||M) + (1-beta)*KL(S||M) with M = beta*T + (1-beta)*S (TRL's generalised
    JSD; beta=0.5 is the symmetric JSD); ``skew_kl``: KL(T || beta*T + (1-beta)*S) and ``skew_rkl``: KL(S ||
    beta*S + (1-beta)*T) (DistiLLM, Ko et al. 2024: the skew alpha is ``beta``, 0.1 there), bounded where
    plain KL explodes on tokens one side gives no mass; ``tv``: total variation 0.5 * sum |S - T|.
    Distributions are softmax(logits / T); the result is scaled by T^2 so gradient magnitudes do not shrink
    with the temperature (Hinton et al. 2015, sec. 2)."""
    _check_kind(kind, beta)
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if kind == "forward_kl":
        d = F.kl_div(s, t, reduction="none", log_target=True).sum(-1)
    elif kind == "reverse_kl":
        d = F.kl_div(t, s, reduction="none", log_target=True).sum(-1)
    elif kind == "skew_kl":
        m = torch.logsumexp(torch.stack([t + math.log(beta), s + math.log(1.0 - beta)]), dim=0)
        d = F.kl_div(m, t, reduction="none", log_target=True).sum(-1)
    elif kind == "skew_rkl":
        m = torch.logsumexp(torch.stack([s + math.log(beta), t + math.log(1.0 - beta)]), dim=0)
        d = F.kl_div(m, s, reduction="none", log_target=True).sum(-1)
    elif kind == "tv":
        d = 0.5 * (s.exp() - t.exp()).abs().sum(-1)
    else:
        m = torch.logsumexp(torch.stack([t + math.log(beta), s + math.log(1.0 - beta)]), dim=0)
        d = beta * F.kl_div(m, t, reduction="none", log_target=True).sum(-1) + (1.0 - beta) * F.kl_div(
            m, s, reduction="none", log_target=True
        ).sum(-1)
    return d * (temperature**2)


# -- chunked logit losses ---------------------------------------------------------------------------------
#
# Notation per selected row: z = logits / T, s = log_softmax(z_student), t = log_softmax(z_teacher),
# p = exp(s), q = exp(t). With L the unscaled divergence, the loss is T^2 * L and its gradient w.r.t. the
# student logits is T^2 * dL/dz / T = T * dL/dz, where (softmax Jacobian dp/dz = diag(p) - p p^T):
#   forward_kl  L = sum q (t - s)                      dL/dz = p - q
#   reverse_kl  L = sum p (s - t)                      dL/dz = p * ((s - t) - L)
#   jsd         L = b sum q (t - lm) + (1-b) sum p h,  lm = log(b q + (1-b) p),  h = s - lm
#                                                      dL/dz = (1-b) p * (h - sum p h)
#   skew_kl     L = sum q (t - lm),  lm = log(a q + (1-a) p),  r = p q / m
#                                                      dL/dz = (1-a) (p sum r - r)
#   skew_rkl    L = sum p (s - lm),  lm = log(a p + (1-a) q),  u = (s - lm) - a p / m
#                                                      dL/dz = p * (u - sum p u)
#   tv          L = 1/2 sum |p - q|,  g = sign(p - q) / 2    dL/dz = p * (g - sum p g)
# (for jsd, dL/dp = b q (-(1-b)/m) + (1-b)(h + 1) - (1-b) p (1-b)/m = (1-b) h as b q + (1-b) p = m, then
# through the Jacobian; skew_rkl: dL/dp = h + 1 - a p/m; for all: dL/dz = p (dL/dp - sum p dL/dp)).
# The row constants (L, sum p h, ...) and both logsumexps come from the forward, a few
# floats per row. The per-chunk helpers own their (chunk, V) buffers and work in place: forward_kl and
# reverse_kl hold two float32 (chunk, V) buffers at a time, jsd three; all die when the helper returns.


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)  # float32, or float64 for float64 logits (gradcheck)


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


def _divergence_rows(student, teacher, rows, kind, temperature, beta, dtype):
    """Unscaled divergence of each selected row, the rows' two logsumexps and the gradient's row constant
    (``(chunk, 1)`` each)."""
    s, ls = _log_softmax_rows(student, rows, temperature, dtype)
    t, lt = _log_softmax_rows(teacher, rows, temperature, dtype)
    if kind == "forward_kl":
        t_minus_s = s.neg_().add_(t)
        d = t_minus_s.mul_(t.exp_()).sum(-1, keepdim=True)  # sum q (t - s)
        return d, ls, lt, d
    if kind == "reverse_kl":
        s_minus_t = t.neg_().add_(s)
        d = s_minus_t.mul_(s.exp_()).sum(-1, keepdim=True)  # sum p (s - t): also the gradient's constant
        return d, ls, lt, d
    if kind in ("skew_kl", "skew_rkl", "tv"):
        d, c = _other_rows(s, t, kind, beta)
        return d, ls, lt, c
    lm = t + math.log(beta)
    torch.logaddexp(lm, s + math.log(1.0 - beta), out=lm)  # log(b q + (1-b) p)
    kl_t = t.exp().mul_(t.sub_(lm)).sum(-1, keepdim=True)  # sum q (t - lm)
    del t
    p = s.exp()
    c = s.sub_(lm).mul_(p).sum(-1, keepdim=True)  # sum p h
    return beta * kl_t + (1.0 - beta) * c, ls, lt, c


def _other_rows(s, t, kind, a):
    """(divergence, gradient row constant) of skew_kl, skew_rkl and tv rows (``s``, ``t`` consumed)."""
    if kind == "skew_kl":
        lm = torch.logaddexp(t + math.log(a), s + math.log(1.0 - a))
        c = (s + t - lm).exp_().sum(-1, keepdim=True)  # sum p q / m
        return t.exp().mul_(t.sub_(lm)).sum(-1, keepdim=True), c
    if kind == "skew_rkl":
        lm = torch.logaddexp(s + math.log(a), t + math.log(1.0 - a))
        p = s.exp()
        h = s.sub_(lm)  # s - lm
        d = (p * h).sum(-1, keepdim=True)
        u = h.sub_(p.mul(a).div_(lm.exp_()))  # h - a p / m
        return d, u.mul_(p).sum(-1, keepdim=True)
    p, q = s.exp_(), t.exp_()
    g = torch.sign(p - q).mul_(0.5)
    return p.sub(q).abs_().sum(-1, keepdim=True).mul_(0.5), g.mul_(p).sum(-1, keepdim=True)


def _other_grad_rows(s, t, c, kind, a):
    """dL/dz of skew_kl, skew_rkl and tv rows (see the table above)."""
    if kind == "skew_kl":
        lm = torch.logaddexp(t + math.log(a), s + math.log(1.0 - a))
        r = t.add_(s).sub_(lm).exp_()  # p q / m
        return s.exp_().mul_(c).sub_(r).mul_(1.0 - a)  # (1-a) (p sum r - r)
    if kind == "skew_rkl":
        lm = torch.logaddexp(s + math.log(a), t + math.log(1.0 - a))
        p = s.exp()
        u = s.sub_(lm).sub_(p.mul(a).div_(lm.exp_()))
        return u.sub_(c).mul_(p)  # p (u - sum p u)
    p, q = s.exp_(), t.exp_()
    return torch.sign(p - q).mul_(0.5).sub_(c).mul_(p)  # p (g - sum p g)


def _divergence_grad_rows(student, teacher, rows, ls, lt, c, kind, temperature, beta, dtype):
    """dL/dz of each selected row, a fresh ``(chunk, V)`` tensor of ``dtype``."""
    s, _ = _log_softmax_rows(student, rows, temperature, dtype, ls)
    t, _ = _log_softmax_rows(teacher, rows, temperature, dtype, lt)
    if kind == "forward_kl":
        return s.exp_().sub_(t.exp_())  # p - q
    if kind == "reverse_kl":
        s_minus_t_minus_l = t.neg_().add_(s).sub_(c)
        return s_minus_t_minus_l.mul_(s.exp_())  # p ((s - t) - L)
    if kind in ("skew_kl", "skew_rkl", "tv"):
        return _other_grad_rows(s, t, c, kind, beta)
    lm = t.add_(math.log(beta))
    torch.logaddexp(lm, s + math.log(1.0 - beta), out=lm)
    p = s.exp()
    h = s.sub_(lm)
    del lm, t
    return h.sub_(c).mul_(p).mul_(1.0 - beta)  # (1-b) p (h - sum p h)


class _ChunkedDivergence(torch.autograd.Function):
    """Sum of :func:`token_divergence` over ``rows`` of ``(N, V)`` logits, recomputed chunk by chunk in
    backward. Saved for backward: the two logits tensors (alive in the caller anyway), the row indices and
    three floats per selected row; no ``(rows, V)`` activation survives the forward."""

    @staticmethod
    def forward(ctx, student, teacher, rows, kind, temperature, beta, chunk):
        dtype = _compute_dtype(student)
        total = torch.zeros((), dtype=dtype, device=student.device)
        saved = []  # (lse_student, lse_teacher, row constant) per chunk
        with torch.autocast(student.device.type, enabled=False):
            for r in rows.split(chunk):
                d, *rest = _divergence_rows(student, teacher, r, kind, temperature, beta, dtype)
                total += d.sum()
                saved.append(rest)
        per_row = [torch.cat(xs) for xs in zip(*saved)] if saved else [rows.new_zeros(0, 1, dtype=dtype)] * 3
        ctx.save_for_backward(student, teacher, rows, *per_row)
        ctx.cfg = (kind, temperature, beta, chunk)
        return total * (temperature**2)

    @staticmethod
    @once_differentiable  # the backward is closed-form, not itself differentiable
    def backward(ctx, grad_out):
        student, teacher, rows, *per_row = ctx.saved_tensors
        kind, temperature, beta, chunk = ctx.cfg
        if not ctx.needs_input_grad[0]:
            return (None,) * 7
        dtype = _compute_dtype(student)
        grad = torch.zeros(student.shape, dtype=student.dtype, device=student.device)
        scale = grad_out.to(dtype) * temperature
        with torch.autocast(student.device.type, enabled=False):
            for r, ls, lt, c in zip(rows.split(chunk), *(x.split(chunk) for x in per_row)):
                g = _divergence_grad_rows(student, teacher, r, ls, lt, c, kind, temperature, beta, dtype)
                grad.index_copy_(0, r, g.mul_(scale).to(student.dtype))
                del g  # before the next chunk allocates its buffers
        return grad, None, None, None, None, None, None


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Sum of ``cross_entropy(logits[rows], targets)`` over ``(N, V)`` logits, recomputed chunk by chunk in
    backward (gradient softmax - one_hot). Saved: the logits, rows, targets and one logsumexp per row."""

    @staticmethod
    def forward(ctx, logits, rows, targets, chunk):
        dtype = _compute_dtype(logits)
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
        dtype = _compute_dtype(logits)
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
                kind: str = "forward_kl", temperature: float = 1.0, beta: float = 0.5,
                chunk_tokens: int = 1024) -> torch.Tensor:
    """Sum over selected positions of :func:`token_divergence`. ``logits (b, l, V)``, ``mask (b, l)``;
    ``beta``: the mixture weight of jsd, skew_kl and skew_rkl.
    Memory beyond the inputs and their gradient: ``chunk_tokens x V`` floats (see the module docstring);
    the teacher logits never receive a gradient."""
    _check_shapes(student_logits, teacher_logits)
    _check_kind(kind, beta)
    rows = _mask_rows(mask, student_logits, "kd_loss_sum")
    return _ChunkedDivergence.apply(_flat(student_logits), _flat(teacher_logits.detach()), rows, kind,
                                    float(temperature), float(beta), max(int(chunk_tokens), 1))


def _shifted_targets(input_ids: torch.Tensor, mask: torch.Tensor):
    m = mask.clone()
    m[:, -1] = 0
    targets = torch.zeros_like(input_ids)
    targets[:, :-1] = input_ids[:, 1:]
    return m, targets.reshape(-1)


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
# divergence of ``KD_KINDS`` is taken between the two (k + 1)-bucket distributions. With k = vocab this is the
# full-vocabulary divergence. Top-k reverse KL without a tail is unbounded wherever the student puts mass the
# top-k teacher lacks (the instability verl reports): the tail bucket keeps it finite, with no renormalisation.


def teacher_topk(teacher_logits: torch.Tensor, k: int, temperature: float = 1.0):
    """``(indices, log-probabilities, tail log-mass)`` of the ``k`` most likely tokens of softmax(logits / T):
    shapes ``(..., k)``, ``(..., k)``, ``(...)``; the tail is -inf when ``k`` covers the vocabulary."""
    logp = F.log_softmax(teacher_logits.to(_compute_dtype(teacher_logits)) / temperature, dim=-1)
    top, idx = logp.topk(min(k, logp.size(-1)), dim=-1)
    return idx, top, _tail(logp, idx)


def _tail(logp: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """log of the mass of ``logp`` outside ``idx`` (exact: a logsumexp over the other tokens)."""
    if idx.size(-1) >= logp.size(-1):
        return torch.full(logp.shape[:-1], float("-inf"), dtype=logp.dtype, device=logp.device)
    return logp.scatter(-1, idx, float("-inf")).logsumexp(-1)


def _w_diff(w, a, b):
    """sum w (a - b) with 0 wherever w is 0 (a or b may be -inf there), NaN-free in backward too."""
    on = w > 0
    zero = torch.zeros((), dtype=a.dtype, device=a.device)
    return (w * (torch.where(on, a, zero) - torch.where(on, b, zero))).sum(-1)


def bucket_divergence(s: torch.Tensor, t: torch.Tensor, kind: str, beta: float) -> torch.Tensor:
    """Divergence of :func:`token_divergence`'s ``kind`` between two distributions given as log-probabilities
    over the same buckets (entries may be -inf), unscaled."""
    p, q = s.exp(), t.exp()
    if kind == "forward_kl":
        return _w_diff(q, t, s)
    if kind == "reverse_kl":
        return _w_diff(p, s, t)
    if kind == "tv":
        return 0.5 * (p - q).abs().sum(-1)
    if kind == "skew_rkl":
        return _w_diff(p, s, torch.logaddexp(s + math.log(beta), t + math.log(1.0 - beta)))
    m = torch.logaddexp(t + math.log(beta), s + math.log(1.0 - beta))
    if kind == "skew_kl":
        return _w_diff(q, t, m)
    return beta * _w_diff(q, t, m) + (1.0 - beta) * _w_diff(p, s, m)  # jsd


def _sparse_chunk(student, rows, idx, top, tail, kind, temperature, beta):
    dtype = _compute_dtype(student)
    s = F.log_softmax(student.index_select(0, rows).to(dtype) / temperature, dim=-1)
    s_b = torch.cat([s.gather(-1, idx), _tail(s, idx)[..., None]], dim=-1)
    t_b = torch.cat([top.to(dtype), tail.to(dtype)[..., None]], dim=-1)
    return bucket_divergence(s_b, t_b, kind, beta).sum()


def sparse_kd_loss_sum(student_logits: torch.Tensor, topk_idx: torch.Tensor, topk_logp: torch.Tensor,
                       tail_logp: torch.Tensor, mask: torch.Tensor, kind: str = "forward_kl",
                       temperature: float = 1.0, beta: float = 0.5, chunk_tokens: int = 1024) -> torch.Tensor:
    """:func:`kd_loss_sum` against a sparse teacher (:func:`teacher_topk` of its logits at the same
    temperature): ``topk_* (b, l, k)``, ``tail_logp (b, l)``. Each chunk is recomputed in backward
    (activation checkpointing), so memory stays ``chunk_tokens x V``; scaled by T^2 like the dense loss."""
    from torch.utils.checkpoint import checkpoint

    _check_kind(kind, beta)
    flat = _flat(student_logits)
    k = topk_idx.size(-1)
    rows_all = _mask_rows(mask, student_logits, "sparse_kd_loss_sum")
    idx_f, top_f, tail_f = topk_idx.reshape(-1, k), topk_logp.reshape(-1, k), tail_logp.reshape(-1)
    total = _zero_like_graph(student_logits)
    for rows in rows_all.split(max(int(chunk_tokens), 1)):
        r = rows.to(idx_f.device)
        args = (flat, rows, idx_f.index_select(0, r).to(flat.device), top_f.index_select(0, r).to(flat.device),
                tail_f.index_select(0, r).to(flat.device), kind, float(temperature), float(beta))
        total = total + checkpoint(_sparse_chunk, *args, use_reentrant=False)
    return total * (temperature**2)


# -- plain autograd references (what tests and benchmarks/kd_memory.py compare the chunked functions with) --

def _zero_like_graph(t: torch.Tensor) -> torch.Tensor:
    """A scalar 0 still connected to ``t``'s graph (backward works and gives zero gradients)."""
    return t.reshape(-1)[:1].float().sum() * 0.0


def kd_loss_sum_ref(student_logits, teacher_logits, mask, kind="forward_kl", temperature=1.0, beta=0.5,
                    chunk_tokens=1024):
    """:func:`kd_loss_sum` through plain autograd, chunk by chunk: autograd keeps every chunk's float32
    log-softmax (student and teacher) until backward, about 8 bytes x tokens x vocab."""
    _check_shapes(student_logits, teacher_logits)
    s_flat, t_flat = _flat(student_logits), _flat(teacher_logits)
    total = _zero_like_graph(student_logits)
    for rows in _mask_rows(mask, student_logits, "kd_loss_sum_ref").split(max(int(chunk_tokens), 1)):
        d = token_divergence(s_flat.index_select(0, rows), t_flat.index_select(0, rows).detach(), kind,
                             temperature, beta)
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
    "kd_loss_sum_ref", "mean_kd_loss", "sparse_kd_loss_sum", "teacher_topk", "token_divergence",
]
