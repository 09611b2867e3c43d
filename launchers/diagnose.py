"""Diagnose redundant attention layers with self-speculative decoding (RAD stage 1).

Drafts skip a set of attention sublayers of the model itself; the full model verifies. A Bayesian
optimisation over z in [0,1]^L with a top-k step (optuna TPE) finds, for each k, the skip set with the
highest estimated throughput; per-layer single-skip scores and (optionally) a greedy build-up are the
baselines; the chosen sets are re-checked with the real decoder. Writes OUT/report.json,
OUT/redundancy.png and OUT/cost_model.json.

    # one process (CPU or one GPU)
    python launchers/diagnose.py --model embedded:smollm2 --k 2,4,8 --out runs/diag
    # 2 ranks on one node (prompts sharded, statistics reduced: same report as one process)
    deepspeed --num_gpus 2 launchers/diagnose.py --model DIR --k 2,4,8 --out runs/diag
    torchrun --standalone --nproc_per_node 2 launchers/diagnose.py --model DIR --k 4 --out runs/diag
    # several nodes
    deepspeed --hostfile hostfile launchers/diagnose.py --model DIR --k 4,8,12 --out runs/diag --trials 100

Then: python launchers/replace.py --model DIR --report runs/diag/report.json --k 4 --out runs/student
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rad_ds.cli import run_cli  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model dir, .gguf file, or embedded:smollm2")
    ap.add_argument("--gguf-file", default=None)
    ap.add_argument("--k", required=True, help="numbers of attention layers to skip, e.g. 2,4,8")
    ap.add_argument("--out", required=True, help="output directory (report.json, redundancy.png)")
    ap.add_argument("--prompts", default=None,
                    help="jsonl/parquet/json/csv/txt with a 'messages' or text field (default: math + code mix)")
    ap.add_argument("--num-prompts", type=int, default=8, help="prompts to use (<= 0: all of --prompts)")
    ap.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    ap.add_argument("--trials", type=int, default=60, help="Bayesian-optimisation trials per k")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--draft-len", type=int, default=4, help="tokens drafted per round")
    ap.add_argument("--objective", default="estimated", choices=["estimated", "measured"],
                    help="estimated: exact acceptance x cost model (fast); measured: real decoder wall-clock")
    ap.add_argument("--cost-model", default="measured",
                    help="measured (timed here), weights (memory-bound analytic), or a cost_model.json")
    ap.add_argument("--greedy-baseline", action="store_true", help="also run the greedy build-up baseline")
    ap.add_argument("--recheck-prompts", type=int, default=4,
                    help="prompts per rank for the real-decoder re-check of the chosen sets (0: skip)")
    ap.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16", "fp64"])
    ap.add_argument("--wandb", action="store_true", help="log to wandb (offline unless WANDB_MODE says otherwise)")
    ap.add_argument("--wandb-project", default="rad-ds")
    ap.add_argument("--wandb-run", default=None)
    ap.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)  # deepspeed
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from rad_ds.diagnosis.runner import DiagnoseConfig, diagnose

    try:
        ks = [int(x) for x in args.k.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--k {args.k!r}: give integers, e.g. --k 2,4,8") from None
    if not ks:
        raise ValueError("--k is empty; give e.g. --k 2,4,8")
    if args.trials < 1:
        raise ValueError("--trials must be >= 1")
    cfg = DiagnoseConfig(
        model=args.model, out=args.out, k=ks, gguf_file=args.gguf_file, prompts=args.prompts,
        num_prompts=args.num_prompts, chat=not args.no_chat, max_new_tokens=args.max_new_tokens,
        draft_len=args.draft_len, trials=args.trials, seed=args.seed, objective=args.objective,
        cost_model=args.cost_model, greedy_baseline=args.greedy_baseline, recheck_prompts=args.recheck_prompts,
        wandb=args.wandb, wandb_project=args.wandb_project, wandb_run=args.wandb_run, dtype=args.dtype,
    )
    diagnose(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
