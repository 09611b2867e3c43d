"""A shared-nothing oracle of the distillation trainer's optimizer steps, written from the definitions.

It imports nothing from ``rad_ds.distill`` or ``rad_ds.data``: no loss function, normalisation, optimizer,
parameter grouping, schedule, tap or loader of the trainer. It takes plain float64 models (the model
classes run the forwards: the model is not the trainer), the names of the parameters that train, and the
token ids / ``position_ids`` the trainer's forward received, and for each step computes, in float64:

* the counted positions from the data definitions (``text_masks``): a real token is not padding; a
  plain-text position counts in the logit losses when its next token is in the same document;
* the objective (``objective``): T^2 KL(p_T || p_S) with p = softmax(z / T) summed over the counted
  positions and divided by their number in the whole global batch; the replaced-layer MSE (mean over the
  hidden dimension of the squared difference of the layer outputs) summed over real tokens and divided by
  (real tokens x replaced layers), i.e. a per-token mean averaged over the replaced layers; CE on the next
  token over the counted positions; weighted by ``kd_weight``, ``hidden_weight``, ``ce_weight``;
* gradients by autograd of that loss, the global-norm clip g <- g min(1, c / (||g|| + 1e-6));
* AdamW written out: m, v, bias corrections, decoupled decay p <- p (1 - lr wd) on tensors of two or more
  dimensions only, p <- p - lr m_hat / (sqrt(v_hat) + eps);
* the learning rate of step s (1-based) in closed form: s / W during W warm-up steps, then cosine (or
  linear) from 1 at step W + 1 to ``min_lr_ratio`` at the last step, constant beyond; or constant.

The model classes keep ``dt``, ``A`` and the RoPE tables in float32 by design (``Mamba2Mixer._dt``, the
rotary embedding), so the oracle's forward is float64 everywhere else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

F64 = torch.float64


@dataclass(frozen=True)
class OracleSettings:
    """The run settings the oracle needs, as plain numbers (not the trainer's config classes)."""

    lr: float
    total_steps: int
    warmup_steps: int = 0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 0.0  # 0: off
    temperature: float = 1.0
    kd_weight: float = 1.0
    hidden_weight: float = 0.0
    ce_weight: float = 0.0


# -- data ------------------------------------------------------------------------------------------------

def text_masks(input_ids: torch.Tensor, position_ids: torch.Tensor, pad_id: int):
    """``(target, token)`` of packed plain-text rows: ``token`` is a real token (not ``pad_id``); ``target``:
    the prediction at this position counts, i.e. the position and the next one are real tokens of the same
    document (a document starts where ``position_ids`` is 0), so a document's last position, padding and
    the row's last position do not count."""
    token = input_ids != pad_id
    target = torch.zeros_like(token)
    target[:, :-1] = token[:, :-1] & token[:, 1:] & (position_ids[:, 1:] != 0)
    return target, token


# -- schedule --------------------------------------------------------------------------------------------

def lr_multiplier(step: int, total_steps: int, warmup_steps: int = 0, schedule: str = "cosine",
                  min_lr_ratio: float = 0.1) -> float:
    """Fraction of the peak learning rate at optimizer step ``step`` (1-based), in closed form."""
    if step <= warmup_steps:
        return step / warmup_steps
    if schedule == "constant":
        return 1.0
    first, last = warmup_steps + 1, total_steps  # the decay runs from 1 at `first` to min_lr_ratio at `last`
    progress = 0.0 if last <= first else min(1.0, (step - first) / (last - first))
    if schedule == "linear":
        return min_lr_ratio + (1.0 - min_lr_ratio) * (1.0 - progress)
    if schedule == "cosine":
        return min_lr_ratio + (1.0 - min_lr_ratio) * (1.0 + math.cos(math.pi * progress)) / 2.0
    raise ValueError(schedule)


# -- objective -------------------------------------------------------------------------------------------

def objective(s_logits, t_logits, s_hidden: list, t_hidden: list, input_ids, target, token, cfg: OracleSettings):
    """The step's loss and its terms over a whole global batch, from the definitions (see the module doc)."""
    target, token = target.bool(), token.bool()
    n_target, n_token = int(target.sum()), int(token.sum())
    terms = {}
    if cfg.kd_weight > 0:
        T = cfg.temperature
        log_p = torch.log_softmax(s_logits.to(F64) / T, dim=-1)[target]
        log_q = torch.log_softmax(t_logits.to(F64).detach() / T, dim=-1)[target]
        kl = (log_q.exp() * (log_q - log_p)).sum(-1)  # KL(teacher || student) per counted position
        terms["kd"] = T * T * kl.sum() / n_target
    if cfg.hidden_weight > 0:
        per_layer = [((s.to(F64) - t.to(F64).detach()) ** 2).mean(-1)[token].sum() for s, t in zip(s_hidden, t_hidden)]
        terms["hidden"] = sum(per_layer) / (n_token * len(per_layer))
    if cfg.ce_weight > 0:
        log_p = torch.log_softmax(s_logits.to(F64), dim=-1)[:, :-1]
        nll = -log_p.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
        terms["ce"] = nll[target[:, :-1]].sum() / n_target
    weights = {"kd": cfg.kd_weight, "hidden": cfg.hidden_weight, "ce": cfg.ce_weight}
    return sum(weights[k] * v for k, v in terms.items()), terms


# -- the optimizer step ----------------------------------------------------------------------------------

def decays(param: torch.Tensor) -> bool:
    """AdamW's decoupled weight decay applies to matrices (and higher-rank weights), never to vectors."""
    return param.ndim >= 2


class TrainerOracle:
    """``step(input_ids, position_ids, target, token)``: one optimizer step of the whole global batch."""

    def __init__(self, student, teacher, trainable: list[str], replaced: list[int], cfg: OracleSettings,
                 decay_rule=decays, clip_eps: float = 1e-6):
        self.student, self.teacher, self.cfg, self.replaced = student.to(F64), teacher.to(F64).eval(), cfg, replaced
        self.decay_rule, self.clip_eps = decay_rule, clip_eps
        named = dict(self.student.named_parameters())
        for p in self.student.parameters():
            p.requires_grad_(False)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.params = {n: named[n] for n in trainable}
        for p in self.params.values():
            p.requires_grad_(True)
        self.m = {n: torch.zeros_like(p) for n, p in self.params.items()}
        self.v = {n: torch.zeros_like(p) for n, p in self.params.items()}
        self.t = 0

    def _forward(self, model, input_ids, position_ids):
        """Logits and the outputs of the replaced layers (own hooks on the decoder layers)."""
        outs, handles = {}, []
        for i in self.replaced:
            def hook(module, args, output, i=i):
                outs[i] = output[0] if isinstance(output, tuple) else output
            handles.append(model.model.layers[i].register_forward_hook(hook))
        try:
            logits = model(input_ids, position_ids=position_ids, use_cache=False).logits
        finally:
            for h in handles:
                h.remove()
        return logits, [outs[i] for i in self.replaced]

    def step(self, input_ids, position_ids, target, token) -> dict:
        cfg = self.cfg
        self.t += 1
        lr = cfg.lr * lr_multiplier(self.t, cfg.total_steps, cfg.warmup_steps, cfg.schedule, cfg.min_lr_ratio)
        with torch.no_grad():
            t_logits, t_hidden = self._forward(self.teacher, input_ids, position_ids)
        s_logits, s_hidden = self._forward(self.student, input_ids, position_ids)
        loss, terms = objective(s_logits, t_logits, s_hidden, t_hidden, input_ids, target, token, cfg)
        names = list(self.params)
        grads = dict(zip(names, torch.autograd.grad(loss, [self.params[n] for n in names])))
        norm = math.sqrt(sum(float((g * g).sum()) for g in grads.values()))
        scale = min(1.0, cfg.grad_clip / (norm + self.clip_eps)) if cfg.grad_clip > 0 else 1.0
        b1, b2 = cfg.betas
        with torch.no_grad():
            for n in names:
                p, g = self.params[n], grads[n] * scale
                if self.decay_rule(p):
                    p.mul_(1.0 - lr * cfg.weight_decay)
                self.m[n] = b1 * self.m[n] + (1.0 - b1) * g
                self.v[n] = b2 * self.v[n] + (1.0 - b2) * g * g
                m_hat = self.m[n] / (1.0 - b1 ** self.t)
                v_hat = self.v[n] / (1.0 - b2 ** self.t)
                p.sub_(lr * m_hat / (v_hat.sqrt() + cfg.eps))
        return {"step": self.t, "loss": float(loss.detach()), **{k: float(v.detach()) for k, v in terms.items()},
                "lr": lr, "grad_norm": norm, "n_target": int(target.sum()), "n_token": int(token.sum())}

    def state(self) -> dict[str, torch.Tensor]:
        """The trainable parameters now (float64 copies)."""
        return {n: p.detach().clone() for n, p in self.params.items()}


__all__ = ["OracleSettings", "TrainerOracle", "decays", "lr_multiplier", "objective", "text_masks"]
