"""Diagnose redundant attention layers with self-speculative decoding (RAD stage 1).

Drafts skip a set of attention sublayers of the model itself; the full model verifies. Each mask is scored on
the user's data (``--data``: the distillation data, its documents teacher-forced) by the expected acceptance of
speculative sampling (``--signal expected``: alpha = sum min(p, q) per position), or on continuations of prompts.
A Bayesian optimisation over z in [0,1]^L with a top-k step (optuna TPE) and a swap search find, for each k, the
skip set with the highest estimated throughput; per-layer single-skip scores and (optionally) a greedy build-up are
the baselines; the chosen sets are re-checked with the real decoder. Writes OUT/report.json, OUT/redundancy.png and
OUT/cost_model.json.

    # one process (CPU or one GPU), on the data you will distil on
    python launchers/diagnose.py --model embedded:smollm2 --k 2,4,8 --data train.jsonl --out runs/diag
    # 2 ranks on one node (documents sharded, statistics reduced: same report as one process)
    deepspeed --num_gpus 2 launchers/diagnose.py --model DIR --k 2,4,8 --data train.jsonl --out runs/diag
    torchrun --standalone --nproc_per_node 2 launchers/diagnose.py --model DIR --k 4 --data train.jsonl --out runs/diag
    # several nodes, a bigger budget
    deepspeed --hostfile hostfile launchers/diagnose.py --model DIR --k 4,8,12 --data train.jsonl --out runs/diag \\
        --tokens 16384 --trials 100 --swap-evals 64
    # no data: continuations of prompts with the former greedy signal
    python launchers/diagnose.py --model DIR --k 4 --prompts prompts.jsonl --signal greedy --out runs/diag

Then: python launchers/replace.py --model DIR --report runs/diag/report.json --k 4 --out runs/student

Installed as the console command `rad-diagnose` (the same flags).
"""

import sys
from functools import partial

from rad_ds.diagnosis import cli

main = partial(cli.main, doc=__doc__)

if __name__ == "__main__":
    sys.exit(main())
