"""KL probe: how much the model's next-token distribution moves when one attention layer alone is replaced by
Mamba2 at its initialisation (the MambaInLlama mapping, ``rad_ds.surgery.replace_attention`` on a copy).

Score of layer i = ``mean_t KL(p_teacher(.|t) || p_student_i(.|t))`` over every calibration token, the teacher
being the unmodified model; the k lowest are chosen (the layers whose replacement, before any training, costs
least). Cost: one forward of the model per calibration sequence (its final hidden states are kept, the logits are
recomputed per sequence so no vocab-sized tensor is stored) plus one forward per candidate layer and sequence."""

from __future__ import annotations

import copy
import time

import torch

from rad_ds.core.token_kl import log_probs, token_kl
from rad_ds.surgery import replace_attention

from .choice import Choice, Inputs, lowest
from .cosine import check_calibration
from .spacing import attention_layers, check_k

SCORE = "mean KL(teacher || model with only this layer replaced at init) per token (lowest chosen)"


def _log_probs(model, hidden: torch.Tensor) -> torch.Tensor:
    return log_probs(model.lm_head(hidden))


@torch.no_grad()
def replacement_kl(model, calibration, init: str = "attention", seed: int = 0) -> dict[int, float]:
    """Per attention layer: the per-token KL(teacher || teacher with that layer replaced by a fresh Mamba2)."""
    seqs = check_calibration(calibration)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids = [s.view(1, -1).to(device) for s in seqs]
    final = [model.model(input_ids=x).last_hidden_state for x in ids]  # the teacher's, once
    tokens = sum(x.numel() for x in ids)
    scores = {}
    for i in attention_layers(model.config):
        student = copy.deepcopy(model)
        replace_attention(student, [i], init=init, allow_all=True, seed=seed)
        total = torch.zeros((), dtype=torch.float64)
        for x, h in zip(ids, final):
            t = _log_probs(model, h)
            s = _log_probs(student, student.model(input_ids=x).last_hidden_state)
            total += token_kl(t, s).double().cpu()
        scores[i] = float(total / tokens)
        del student
    model.train(was_training)
    return scores


def kl_probe_choice(model, k: int, calibration, seed: int = 0) -> Choice:
    """The k attention layers whose lone replacement moves the logits least (KL, teacher || student)."""
    cands = attention_layers(model.config)
    k = check_k(k, cands)
    seqs = check_calibration(calibration)
    t0 = time.perf_counter()
    scores = replacement_kl(model, seqs, seed=seed)
    return Choice(lowest(scores, k), "kl_probe", k, time.perf_counter() - t0, len(seqs) * (1 + len(cands)), scores,
                  SCORE, {"calibration_sequences": len(seqs), "calibration_tokens": int(sum(s.numel() for s in seqs)),
                          "init": "attention", "seed": int(seed)})


def kl_probe_strategy(k: int, inputs: Inputs) -> Choice:
    """``kl_probe`` (registry entry): ``inputs.seed`` seeds the probe's Mamba2 init."""
    return kl_probe_choice(inputs.model, k, inputs.calibration, seed=inputs.seed)


__all__ = ["kl_probe_choice", "kl_probe_strategy", "replacement_kl"]
