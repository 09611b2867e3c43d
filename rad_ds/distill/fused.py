"""Fused LM head + loss: KD (any divergence of :mod:`rad_ds.distill.divergences`) and cross-entropy straight
from the final hidden states and the head weights, never materialising ``tokens x vocab`` logits or their
gradient.

:func:`fused_loss_sums` takes the student's and the teacher's final hidden states (after the final norm),
both head weights (tied or not; the teacher's is frozen) and the selection mask. It walks the selected
positions in chunks of ``chunk_tokens``: each chunk is projected (``h @ W^T``, in the hidden states' dtype
as ``lm_head`` would, then upcast to float32), scored, and its closed-form logits gradient (the tables of
:mod:`rad_ds.distill.losses`) is multiplied straight back into the gradients of the student's hidden
states and head weight. Gradients are computed in the forward, as Liger Kernel's fused linear losses do:
the backward only scales them by the incoming gradient, so a step costs the same four ``tokens x hidden x
vocab`` matmuls as the logits path (two projections, two gradient products), not six. Kept from forward
to backward: the ``tokens x hidden`` gradient of the student hidden states and, when the head trains, its
``vocab x hidden`` gradient (one of each per loss term); transient: a few float32 ``chunk x vocab``
buffers. ``fused_loss_sums_ref`` is the plain version (project everything, then the chunked losses) that
tests compare against.

On CUDA with ``liger-kernel`` importable, cross-entropy alone goes to Liger's fused linear cross-entropy;
everything else (and every CPU run) takes the torch path here, which is the reference for both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from rad_ds.core.dtypes import compute_dtype

from .divergences import Divergence, resolve
from .losses import (
    _divergence_grad_rows,
    _divergence_rows,
    ce_loss_sum,
    ce_targets,
    kd_loss_sum,
)

try:  # optional CUDA kernels; the torch path below is the reference and the CPU path
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss as _LigerFLCE
except Exception:  # noqa: BLE001 - any import failure just means "not available"
    _LigerFLCE = None


def _rows(student, teacher, div, temperature, dtype, grad: bool):
    """Unscaled divergence of every row of two ``(c, V)`` logits chunks and (``grad``) its ``dL/dz``."""
    rows = torch.arange(student.size(0), device=student.device)
    d, ls, lt, c = _divergence_rows(student, teacher, rows, div, temperature, dtype)
    if not grad:
        return d, None
    return d, _divergence_grad_rows(student, teacher, rows, ls, lt, c, div, temperature, dtype)


class _FusedHeadLoss(torch.autograd.Function):
    """(KD sum, CE sum) over ``rows`` of flattened hidden states; see the module docstring.

    ``targets``: per selected row the CE target (-100: no CE term for that row), or None (CE off);
    ``div``: a :class:`~rad_ds.distill.divergences.Divergence`, or None (KD off)."""

    @staticmethod
    def forward(ctx, s_hidden, s_weight, t_hidden, t_weight, rows, targets, div, temperature, chunk):
        dtype = compute_dtype(s_hidden)
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        kd_on, ce_on = div is not None, targets is not None
        zero = torch.zeros((), dtype=dtype, device=s_hidden.device)
        kd_sum, ce_sum = zero.clone(), zero.clone()
        terms = [t for t, on in (("kd", kd_on), ("ce", ce_on)) if on]
        gh = {t: torch.zeros_like(s_hidden) if want_h else None for t in terms}
        gw = {t: torch.zeros_like(s_weight) if want_w else None for t in terms}
        targets_split = targets.split(chunk) if ce_on else [None] * len(rows.split(chunk))

        def add_grad(term, r, hs, g):  # dL/dz of a chunk -> the hidden states' and the head's gradients
            g = g.to(s_hidden.dtype)
            if want_h:
                gh[term].index_copy_(0, r, g @ s_weight)
            if want_w:
                gw[term].addmm_(g.t(), hs)

        with torch.autocast(s_hidden.device.type, enabled=False), torch.no_grad():
            for r, y in zip(rows.split(chunk), targets_split):
                hs = s_hidden.index_select(0, r)
                zs = F.linear(hs, s_weight).to(dtype)  # as lm_head computes it, then float32
                if ce_on:
                    lse = torch.logsumexp(zs, dim=-1, keepdim=True)
                    keep = (y != -100).unsqueeze(-1)
                    picked = zs.gather(-1, y.clamp(min=0).unsqueeze(-1))
                    ce_sum += torch.where(keep, lse - picked, torch.zeros_like(lse)).sum()
                    if want_h or want_w:
                        g = zs.sub(lse).exp_()  # softmax - one_hot, zero for ignored rows
                        g.scatter_add_(-1, y.clamp(min=0).unsqueeze(-1), -torch.ones_like(picked))
                        add_grad("ce", r, hs, g.mul_(keep.to(dtype)))
                        del g  # before the KD buffers
                if kd_on:
                    zt = F.linear(t_hidden.index_select(0, r), t_weight).to(dtype)
                    d, g = _rows(zs, zt, div, temperature, dtype, want_h or want_w)
                    del zt
                    kd_sum += d.sum()
                    if g is not None:
                        add_grad("kd", r, hs, g.mul_(temperature))  # T^2 * dL/dz / T
                    del g
                del zs
        ctx.terms = terms
        ctx.save_for_backward(*(gh[t] for t in terms if want_h), *(gw[t] for t in terms if want_w))
        ctx.want = (want_h, want_w)
        return kd_sum * (temperature**2), ce_sum

    @staticmethod
    @once_differentiable  # the saved gradients are constants: no double backward
    def backward(ctx, g_kd, g_ce):
        want_h, want_w = ctx.want
        saved = list(ctx.saved_tensors)
        n = len(ctx.terms)
        gh, gw = (saved[:n] if want_h else None), (saved[n if want_h else 0:] if want_w else None)
        scale = {"kd": g_kd, "ce": g_ce}

        def combine(parts):
            out = None
            for t, g in zip(ctx.terms, parts):
                s = scale[t]
                if s is None:
                    continue
                term = g * s.to(g.dtype)
                out = term if out is None else out.add_(term)
            return out

        return (combine(gh) if want_h else None, combine(gw) if want_w else None,
                None, None, None, None, None, None, None)


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.size(-1))


def _check(s_hidden, s_weight, t_hidden, t_weight, mask):
    if s_hidden.shape[:-1] != mask.shape:
        raise ValueError(f"fused loss: mask {tuple(mask.shape)} does not match hidden states "
                         f"{tuple(s_hidden.shape)}; the mask must have their shape without the hidden dimension")
    if s_weight.size(1) != s_hidden.size(-1):
        raise ValueError(f"fused loss: student head {tuple(s_weight.shape)} does not take hidden size "
                         f"{s_hidden.size(-1)}")
    if t_hidden is not None:
        if t_hidden.shape[:-1] != s_hidden.shape[:-1] or t_weight.size(1) != t_hidden.size(-1):
            raise ValueError(f"fused loss: teacher hidden {tuple(t_hidden.shape)} / head {tuple(t_weight.shape)} "
                             f"do not match the student's {tuple(s_hidden.shape)}")
        if t_weight.size(0) != s_weight.size(0):
            raise ValueError(f"fused loss: student head has {s_weight.size(0)} vocabulary rows, teacher head "
                             f"{t_weight.size(0)}; vocab sizes must match (or use loss.vocab=truncate)")


def liger_available(device: torch.device) -> bool:
    return _LigerFLCE is not None and device.type == "cuda"


def fused_loss_sums(s_hidden: torch.Tensor, s_weight: torch.Tensor, t_hidden: torch.Tensor | None,
                    t_weight: torch.Tensor | None, mask: torch.Tensor, input_ids: torch.Tensor | None = None,
                    kind: str | Divergence | None = "forward_kl", temperature: float = 1.0,
                    beta: float | None = None, chunk_tokens: int = 1024) -> dict:
    """``{"kd": ..., "ce": ...}`` sums equal to :func:`~rad_ds.distill.losses.kd_loss_sum` of the two
    models' logits (``kind`` set) and :func:`~rad_ds.distill.losses.ce_loss_sum` of the student's
    (``input_ids`` given), from hidden states ``(b, l, H)`` and head weights ``(V, H)``; ``kind`` and
    ``beta`` as there (None: no KD). The teacher side is detached; gradients reach ``s_hidden`` and
    ``s_weight`` (if it requires grad)."""
    div = resolve(kind, beta) if kind is not None else None
    if div is not None:
        if t_hidden is None or t_weight is None:
            raise ValueError("fused loss: KD needs the teacher's hidden states and head weight")
    if div is None and input_ids is None:
        return {}
    _check(s_hidden, s_weight, t_hidden, t_weight, mask)
    chunk = max(int(chunk_tokens), 1)
    if div is None and liger_available(s_hidden.device):
        return {"ce": _liger_ce(s_hidden, s_weight, input_ids, mask)}
    rows = mask.reshape(-1).nonzero().squeeze(-1).to(s_hidden.device)
    targets = None
    if input_ids is not None:
        targets = ce_targets(input_ids, mask).to(s_hidden.device).index_select(0, rows)
    t_h = _flat(t_hidden).detach() if div is not None else None
    t_w = t_weight.detach() if div is not None else None
    kd, ce = _FusedHeadLoss.apply(_flat(s_hidden), s_weight, t_h, t_w, rows, targets, div, float(temperature),
                                  chunk)
    out = {}
    if div is not None:
        out["kd"] = kd
    if input_ids is not None:
        out["ce"] = ce
    return out


def _liger_ce(s_hidden, s_weight, input_ids, mask):  # pragma: no cover - CUDA with liger-kernel only
    tgt = ce_targets(input_ids, mask).to(s_hidden.device)
    return _LigerFLCE(reduction="sum", ignore_index=-100)(s_weight, _flat(s_hidden), tgt).float()


def fused_loss_sums_ref(s_hidden, s_weight, t_hidden, t_weight, mask, input_ids=None, kind="forward_kl",
                        temperature=1.0, beta=None, chunk_tokens=1024) -> dict:
    """:func:`fused_loss_sums` the plain way: project to full logits, then the chunked logit losses."""
    s_logits = F.linear(s_hidden, s_weight)
    out = {}
    if kind is not None:
        t_logits = F.linear(t_hidden.detach(), t_weight.detach())
        out["kd"] = kd_loss_sum(s_logits, t_logits, mask, kind, temperature, beta, chunk_tokens)
    if input_ids is not None:
        out["ce"] = ce_loss_sum(s_logits, input_ids, mask, chunk_tokens)
    return out


__all__ = ["fused_loss_sums", "fused_loss_sums_ref", "liger_available"]
