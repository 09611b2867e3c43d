"""Skip-set search: Bayesian optimisation over z in [0,1]^L with a top-k step (RAD), the cheap baselines
(per-layer single-skip scores and a greedy build-up), and a swap-move local search that refines the best of
them (``search_k`` runs the whole per-k procedure, the same in the stage and in the benchmarks).

Every rank evaluates the same masks in the same order (the sampler is seeded and objective values are
computed from integer totals reduced over ranks), so 1 and 2 ranks reach the same result.
"""

from __future__ import annotations

import logging
import random
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


def _key(s: MaskScore) -> tuple[float, float]:
    """What "better" means everywhere in the search: the objective, then the acceptance rate."""
    return (s.objective, s.stats.acceptance_rate)


def swap_order(mask: frozenset, candidates: list[int], prior: dict[int, float]) -> list[tuple[int, int]]:
    """Every swap move (one layer out of ``mask``, one candidate in), most promising first by ``prior``
    (e.g. single-skip acceptance): the largest ``prior[in] - prior[out]`` first, ties by layer index."""
    moves = [(o, i) for o in sorted(mask) for i in candidates if i not in mask]
    return sorted(moves, key=lambda m: (prior[m[0]] - prior[m[1]], m[0], m[1]))


def swap_search(evaluate: MaskEvaluator, candidates: list[int], start: MaskScore, budget: int,
                prior: dict[int, float], progress=None) -> tuple[MaskScore, dict]:
    """First-improvement local search around ``start`` over swap moves (one layer out, one in), tried in
    ``swap_order``: the first strictly better neighbour becomes the incumbent and its neighbourhood is tried
    next. Stops at a local optimum (no better neighbour) or after ``budget`` new mask evaluations (memoised
    masks are free). Deterministic; never returns worse than ``start``. Returns the best and a record."""
    best, used, moves, out_of_budget = start, 0, [], False
    while not out_of_budget:
        improved = False
        for out, inn in swap_order(best.mask, candidates, prior):
            mask = (best.mask - {out}) | {inn}
            new = mask not in evaluate.cache
            if new and used >= budget:
                out_of_budget = True
                break
            s = evaluate(mask)
            if new:
                used += 1
                if progress is not None:
                    progress.update(1)
            if _key(s) > _key(best):
                moves.append({"out": out, "in": inn, "objective": s.objective,
                              "acceptance_rate": s.stats.acceptance_rate})
                best, improved = s, True
                break
        if not improved:
            break
    local_opt = not out_of_budget  # the whole neighbourhood of ``best`` was scored and none was better
    record = {"start": start.layers, "start_method": start.method, "evaluations": used, "budget": budget,
              "moves": moves, "local_optimum": local_opt}
    if best is not start:
        best = replace(best, method="swap")
    return best, record


def bo_search(evaluate: MaskEvaluator, candidates: list[int], k: int, n_trials: int, seed: int,
              warm_start: dict[int, float] | None = None, progress=None, on_trial=None) -> tuple[MaskScore, list]:
    """Optuna TPE over z in [0,1]^L; the trial's mask is the top-k of z. Returns the best and all trials."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=min(10, n_trials))
    study = optuna.create_study(direction="maximize", sampler=sampler)
    if warm_start:
        # start from the prior (e.g. single-skip scores) and a few jittered copies of it
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


@dataclass
class KResult:
    """The per-k outcome: the chosen mask, the scores it competed with, the TPE trials, the swap record."""

    k: int
    best: MaskScore
    candidates: dict[str, MaskScore]  # bo (if trials), single_skip_topk, greedy (if run): the swap's start pool
    trials: list
    swap: dict

    def gains(self) -> dict[str, dict[str, float]]:
        """The chosen mask's objective and acceptance minus each baseline's (>= 0 in the objective)."""
        return {m: {"objective": self.best.objective - s.objective,
                    "acceptance_rate": self.best.stats.acceptance_rate - s.stats.acceptance_rate,
                    "mean_accepted_length": self.best.stats.mean_accepted_length - s.stats.mean_accepted_length}
                for m, s in self.candidates.items()}


def search_k(evaluate: MaskEvaluator, candidates: list[int], k: int, prior: dict[int, float], trials: int,
             seed: int, swap_evals: int, greedy: MaskScore | None = None, progress=None, on_trial=None) -> KResult:
    """One k: TPE (warm-started from ``prior``), the single-skip top-k and the greedy build-up (if given)
    compete; the swap search refines the best of them within ``swap_evals`` new evaluations."""
    pool: dict[str, MaskScore] = {}
    tpe_trials: list = []
    if trials > 0:
        pool["bo"], tpe_trials = bo_search(evaluate, candidates, k, trials, seed, warm_start=prior,
                                           progress=progress, on_trial=on_trial)
    pool["single_skip_topk"] = replace(evaluate(topk_mask(prior, candidates, k)), method="single_skip_topk")
    if greedy is not None:
        pool["greedy"] = replace(greedy, method="greedy")
    incumbent = max(pool.values(), key=_key)  # ties: the first in pool order
    best, record = swap_search(evaluate, candidates, incumbent, swap_evals, prior, progress=progress)
    return KResult(k, best, pool, tpe_trials, record)


def select(evaluate: MaskEvaluator, candidates: list[int], ks: list[int], trials: int, swap_evals: int, seed: int,
           greedy_baseline: bool = True, progress=None,
           on_trial=None) -> tuple[dict[int, MaskScore], dict[int, KResult]]:
    """The whole search: single-skip scores (the prior), the greedy build-up up to max(ks), then ``search_k``
    per k (TPE seeded ``seed + 1000 k``). Returns the single-skip scores and the per-k results."""
    single = single_skip_scores(evaluate, candidates, progress=progress)
    prior = {i: single[i].stats.acceptance_rate for i in candidates}
    greedy = greedy_buildup(evaluate, candidates, max(ks), progress=progress) if greedy_baseline else {}
    results = {k: search_k(evaluate, candidates, k, prior, trials, seed + 1000 * k, swap_evals, greedy=greedy.get(k),
                           progress=progress, on_trial=on_trial) for k in ks}
    return single, results
