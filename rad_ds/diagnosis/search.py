"""Skip-set search: Bayesian optimisation over z in [0,1]^L with a top-k step (RAD), plus the cheap
baselines: per-layer single-skip scores and a greedy build-up.

Every rank evaluates the same masks in the same order (the sampler is seeded and objective values are
computed from integer totals reduced over ranks), so 1 and 2 ranks reach the same result.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import optuna

from rad_ds.decoding.skipping import topk_mask

from .acceptance import AcceptanceStats

logger = logging.getLogger(__name__)


@dataclass
class MaskScore:
    mask: frozenset
    stats: AcceptanceStats
    objective: float  # estimated (or measured) speed-up over plain decoding
    method: str = ""

    @property
    def layers(self) -> list[int]:
        return sorted(self.mask)


@dataclass
class MaskEvaluator:
    """Scores a mask (memoised): acceptance totals over all ranks' prompts, then the objective."""

    stats_fn: Callable[[frozenset], AcceptanceStats]
    objective_fn: Callable[[frozenset, AcceptanceStats], float]
    cache: dict = field(default_factory=dict)
    evaluations: int = 0

    def __call__(self, mask) -> MaskScore:
        mask = frozenset(mask)
        if mask not in self.cache:
            st = self.stats_fn(mask)
            self.cache[mask] = MaskScore(mask, st, self.objective_fn(mask, st))
            self.evaluations += 1
        return self.cache[mask]


def single_skip_scores(evaluate: MaskEvaluator, candidates: list[int], progress=None) -> dict[int, MaskScore]:
    out = {}
    for i in candidates:
        out[i] = evaluate({i})
        if progress is not None:
            progress.update(1)
    return out


def greedy_buildup(evaluate: MaskEvaluator, candidates: list[int], k_max: int, progress=None) -> dict[int, MaskScore]:
    """Add, one at a time, the layer whose addition keeps acceptance highest."""
    chosen: set[int] = set()
    out = {}
    for k in range(1, k_max + 1):
        best = None
        for i in candidates:
            if i in chosen:
                continue
            s = evaluate(chosen | {i})
            if progress is not None:
                progress.update(1)
            key = (s.stats.acceptance_rate, s.objective, -i)
            if best is None or key > best[0]:
                best = (key, i, s)
        chosen.add(best[1])
        out[k] = replace(best[2], method="greedy")
    return out


def bo_search(evaluate: MaskEvaluator, candidates: list[int], k: int, n_trials: int, seed: int,
              warm_start: dict[int, float] | None = None, progress=None, on_trial=None) -> tuple[MaskScore, list]:
    """Optuna TPE over z in [0,1]^L; the trial's mask is the top-k of z. Returns the best and all trials."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=min(10, n_trials))
    study = optuna.create_study(direction="maximize", sampler=sampler)
    if warm_start:
        # start from the prior (e.g. single-skip scores) and a few jittered copies of it
        import random

        rng = random.Random(seed)
        lo, hi = min(warm_start.values()), max(warm_start.values())
        scale = (hi - lo) or 1.0
        for j in range(min(5, n_trials)):
            z = {f"z{i}": min(max((warm_start[i] - lo) / scale + (rng.gauss(0, 0.15) if j else 0.0), 0.0), 1.0)
                 for i in candidates}
            study.enqueue_trial(z)
    trials = []

    def objective(trial):
        z = {i: trial.suggest_float(f"z{i}", 0.0, 1.0) for i in candidates}
        s = evaluate(topk_mask(z, candidates, k))
        trials.append({"trial": trial.number, "k": k, "layers": s.layers, "objective": s.objective,
                       "acceptance_rate": s.stats.acceptance_rate})
        if progress is not None:
            progress.update(1)
            progress.set_postfix(k=k, best=f"{max(t['objective'] for t in trials):.3f}")
        if on_trial is not None:
            on_trial(trials[-1])
        return s.objective

    study.optimize(objective, n_trials=n_trials)
    best_layers = max(trials, key=lambda t: (t["objective"], t["acceptance_rate"]))["layers"]
    return replace(evaluate(best_layers), method="bo"), trials
