"""How much a diagnosis depends on its prompts: bootstrap intervals over prompts of acceptance-rate scores,
how often each layer is in the single-skip top-k under resampling, the Jaccard overlap of two selections,
and the split of a prompt list into a selection set and a disjoint held-out set.

The resampling unit is the prompt (tokens of one continuation are correlated): a resample draws prompts
with replacement and recomputes each score as the ratio of its summed totals (accepted / drafted), which
is how the search computes it. One set of draws is shared by all layers, so ranks are compared on the
same resampled prompt sets.
"""

from __future__ import annotations

import numpy as np
import torch

from rad_ds.core.intervals import bootstrap_draws, bootstrap_ratio_interval, percentile_interval, resampled_ratios


def bootstrap_interval(num, den, resamples: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval over prompts of ``sum(num) / sum(den)`` (e.g. an acceptance rate)."""
    return bootstrap_ratio_interval(num, den, resamples, seed, level)


def topk_frequency(ratios: np.ndarray, candidates: list[int], k: int) -> dict[int, float]:
    """``ratios``: (resamples, len(candidates)) resampled scores; per candidate, the share of resamples in
    which it is among the k highest (ties to the lower index, as ``topk_mask``)."""
    order = np.lexsort((np.broadcast_to(np.asarray(candidates), ratios.shape), -ratios), axis=-1)[:, :k]
    counts = np.bincount(order.ravel(), minlength=len(candidates))
    return {c: float(counts[j]) / ratios.shape[0] for j, c in enumerate(candidates)}


def single_skip_stability(per_prompt: dict[int, torch.Tensor], candidates: list[int], ks: list[int],
                          resamples: int = 1000, seed: int = 0, level: float = 0.95):
    """From each candidate's per-prompt totals ((n_prompts, 4) accepted, drafted, rounds, tokens): its
    acceptance-rate interval and, per k, how often it is in the single-skip top-k. Returns
    ``({layer: (lo, hi)}, {k: {layer: share}})``."""
    acc = np.stack([per_prompt[i][:, 0].numpy() for i in candidates])
    drafted = np.stack([per_prompt[i][:, 1].numpy() for i in candidates])
    ratios = resampled_ratios(acc, drafted, bootstrap_draws(acc.shape[1], resamples, seed))  # (B, L)
    lo, hi = percentile_interval(ratios, level)
    intervals = {c: (float(lo[j]), float(hi[j])) for j, c in enumerate(candidates)}
    return intervals, {k: topk_frequency(ratios, candidates, k) for k in ks}


def jaccard(a, b) -> float:
    """|a & b| / |a | b| (1.0 for two empty sets)."""
    a, b = set(a), set(b)
    return len(a & b) / len(a | b) if a | b else 1.0


def split_held_out(prompts: list[torch.Tensor], n: int, held_out: int) -> tuple[list, list]:
    """The first ``n`` prompts (all when ``n`` <= 0) for the search and up to ``held_out`` of the following
    ones for held-out scoring; a following prompt identical to a search prompt is skipped, so the two sets
    share no prompt."""
    sel = list(prompts) if n <= 0 else list(prompts[:n])
    seen = {tuple(p.tolist()) for p in sel}
    held = []
    for p in prompts[len(sel):]:
        if len(held) >= held_out:
            break
        key = tuple(p.tolist())
        if key not in seen:
            seen.add(key)
            held.append(p)
    return sel, held


__all__ = [
    "bootstrap_draws", "bootstrap_interval", "jaccard", "percentile_interval", "resampled_ratios",
    "single_skip_stability", "split_held_out", "topk_frequency",
]
