"""Batched greedy generation with the hybrid cache, and how work is split over ranks.

Batches are formed once, over all samples, sorted by prompt length (less padding); rank r takes batches
r, r + W, r + 2W, ... The same batch, with the same left padding, is computed whatever the number of
ranks, so 1 and N ranks give the same outputs token for token; per-sample records are then gathered
and put back in sample order.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from transformers import StoppingCriteriaList

from rad_ds.core.batching import left_padded, pad_id
from rad_ds.decoding.eos import model_eos_ids


def my_batches(batches: list, rank: int, world: int) -> list:
    return batches[rank::world]


def gather(items: list) -> list:
    """All ranks' lists, concatenated (every rank gets the result)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return list(items)
    box = [None] * dist.get_world_size()
    dist.all_gather_object(box, list(items))
    return [x for part in box for x in part]


@dataclass
class Generated:
    text: str
    new_tokens: int  # up to and including the EOS token
    truncated_prompt: bool = False


class StopOnStrings:
    """Stop a row once its generated text contains a stop string (any tokenizer: the recent tokens are
    decoded, where transformers' ``stop_strings`` needs a tokenizer with a subword vocabulary)."""

    def __init__(self, tokenizer, stops: tuple[str, ...], prompt_width: int, lookback: int = 24):
        self.tokenizer, self.stops, self.start, self.lookback = tokenizer, stops, prompt_width, lookback

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        new = input_ids[:, self.start:]
        tail = new[:, -self.lookback:].tolist()
        done = [any(s in self.tokenizer.decode(row, skip_special_tokens=True) for s in self.stops) for row in tail]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def generate_batch(model, tokenizer, prompts: list[torch.Tensor], max_new_tokens: int,
                   stop_strings: tuple[str, ...] = ()) -> tuple[list[Generated], float]:
    """Greedy continuations of ``prompts`` (1-D id tensors), left-padded into one batch; (results, seconds)."""
    eos = model_eos_ids(tokenizer, model)
    pad = pad_id(tokenizer)
    ctx = getattr(model.config, "max_position_embeddings", None)
    budget = max(1, ctx - max_new_tokens) if ctx else None
    cut = [bool(budget and p.numel() > budget) for p in prompts]
    prompts = [p[-budget:] if c else p for p, c in zip(prompts, cut)]  # keep the end (the question)
    ids, mask = left_padded(prompts, pad)
    width = ids.size(1)
    dev = model.device
    kw = dict(max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
              pad_token_id=pad, eos_token_id=sorted(eos) or None)
    if stop_strings:
        kw["stopping_criteria"] = StoppingCriteriaList([StopOnStrings(tokenizer, tuple(stop_strings), width)])
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    out = model.generate(ids.to(dev), attention_mask=mask.to(dev), **kw)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t0
    results = []
    for i, row in enumerate(out[:, width:].tolist()):
        n = len(row)
        for j, t in enumerate(row):
            if t in eos:
                n = j + 1
                break
        else:  # stopped by a stop string (or the length limit): generate() padded the rest
            while n and pad not in eos and row[n - 1] == pad:
                n -= 1
        text = tokenizer.decode(row[:n], skip_special_tokens=True)
        results.append(Generated(text, n, cut[i]))
    return results, seconds


__all__ = ["Generated", "gather", "generate_batch", "my_batches"]
