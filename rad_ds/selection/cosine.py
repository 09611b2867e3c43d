"""Training-free attention redundancy (He et al. 2024, "What Matters in Transformers? Not All Attention is
Needed", LLM-Drop): an attention sublayer whose output barely turns the residual stream is redundant.

For attention layer i with input ``h`` (the residual stream entering the layer) and output ``a =
self_attn(input_layernorm(h))``, the score is ``1 - mean_t cos(h_t, h_t + a_t)`` over every calibration token
t (token-weighted over the sequences; a calibration sequence holds only real tokens). A score near 0 means the
sublayer hardly changes its input: the k lowest are chosen. One forward per calibration sequence, read through
forward hooks, so the model computes exactly what it computes in use."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from .choice import Choice, Inputs, SelectionError, lowest
from .spacing import attention_layers, check_k

SCORE = "1 - mean cos(h, h + attn(h)) over calibration tokens (lowest chosen)"


def check_calibration(calibration) -> list[torch.Tensor]:
    seqs = [torch.as_tensor(s).view(-1) for s in (calibration or [])]
    if not seqs or any(s.numel() < 1 for s in seqs):
        raise SelectionError("calibration tokens are empty: give token-id sequences (rad_ds.selection."
                             "calibration_tokens(data.path, tokenizer)) for this placement")
    return seqs


@torch.no_grad()
def attention_redundancy(model, calibration) -> dict[int, float]:
    """Per attention layer of ``model`` (a ``RadHybridForCausalLM``): ``1 - mean cos(h, h + attn(h))``."""
    seqs = check_calibration(calibration)
    layers = model.model.layers
    cands = attention_layers(model.config)
    sums = {i: torch.zeros((), dtype=torch.float64) for i in cands}
    count = 0
    inputs: dict[int, torch.Tensor] = {}
    hooks = []

    def keep_input(i, _module, args, kwargs):
        inputs[i] = args[0] if args else kwargs["hidden_states"]

    def score(i, _module, _args, out):
        h = inputs.pop(i).float()
        cos = F.cosine_similarity(h, h + out.float(), dim=-1)  # (batch, tokens)
        sums[i] += cos.double().sum().cpu()

    try:
        for i in cands:
            hooks.append(layers[i].register_forward_pre_hook(
                lambda m, a, kw, i=i: keep_input(i, m, a, kw), with_kwargs=True))
            hooks.append(layers[i].self_attn.register_forward_hook(lambda m, a, o, i=i: score(i, m, a, o)))
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        for ids in seqs:
            model.model(input_ids=ids.view(1, -1).to(device))
            count += ids.numel()
        model.train(was_training)
    finally:
        for h in hooks:
            h.remove()
    return {i: float(1.0 - sums[i] / count) for i in cands}


def cosine_choice(model, k: int, calibration) -> Choice:
    """The k attention layers of lowest ``1 - cos(h, h + attn(h))``; cost = one forward per calibration sequence."""
    k = check_k(k, attention_layers(model.config))
    seqs = check_calibration(calibration)
    t0 = time.perf_counter()
    scores = attention_redundancy(model, seqs)
    return Choice(lowest(scores, k), "cosine", k, time.perf_counter() - t0, len(seqs), scores, SCORE,
                  {"calibration_sequences": len(seqs), "calibration_tokens": int(sum(s.numel() for s in seqs))})


def cosine_strategy(k: int, inputs: Inputs) -> Choice:
    """``cosine`` (registry entry)."""
    return cosine_choice(inputs.model, k, inputs.calibration)


__all__ = ["attention_redundancy", "check_calibration", "cosine_choice", "cosine_strategy"]
