"""Evaluate base, student and teacher side by side: GSM8K-style math, short arithmetic, HumanEval and
CRUXEval-style code (generated code runs in a sandbox), passkey retrieval by context length and depth,
perplexity, and decoding speed (plain, and self-speculative with a diagnosis mask). Writes OUT/results.json,
OUT/results.md, OUT/samples/<model>/<task>.jsonl and, for passkey, OUT/passkey_<model>.png (the heat map).

    # one process (CPU or one GPU)
    python launchers/evaluate.py --model embedded:smollm2 --model runs/student \\
        --tasks gsm8k,humaneval,cruxeval,ppl,speed --limit 20 --out runs/eval
    # local data: --data FILE (when one task reads data) or --data TASK=FILE, repeatable
    python launchers/evaluate.py --model runs/student --tasks gsm8k,ppl \\
        --data gsm8k=gsm8k_test.jsonl --data ppl=wiki.txt --few-shot 8 --out runs/eval
    # the tasks with signal at 135M: arithmetic (200 problems) and passkey (contexts 512-4096 x 5 depths)
    python launchers/evaluate.py --model embedded:smollm2 --model runs/student --tasks arithmetic,passkey \
        --passkey-contexts 512,1024,2048,4096 --passkey-samples 4 --out runs/eval
    # speed with the diagnosis mask (self-speculative decoding of the base model)
    python launchers/evaluate.py --model embedded:smollm2 --tasks speed --report runs/diag/report.json --k 4 \\
        --out runs/eval
    # 2 ranks on one node (batches sharded, records gathered: same scores as one process)
    deepspeed --num_gpus 2 launchers/evaluate.py --model DIR --tasks gsm8k,humaneval --out runs/eval
    torchrun --standalone --nproc_per_node 2 launchers/evaluate.py --model DIR --tasks gsm8k --out runs/eval
    # several nodes
    deepspeed --hostfile hostfile launchers/evaluate.py --model DIR --tasks gsm8k,humaneval,ppl --out runs/eval

Tasks (rad_ds/eval/registry.py): gsm8k (exact match), humaneval (pass@1), cruxeval (output prediction,
pass@1), arithmetic (exact match), passkey (exact match, one row per context), ppl (perplexity), speed
(tokens/s). Greedy decoding everywhere; chat template applied when the tokenizer has one.

Installed as the console command `rad-evaluate` (the same flags).
"""

import sys
from functools import partial

from rad_ds.eval import cli

main = partial(cli.main, doc=__doc__)

if __name__ == "__main__":
    sys.exit(main())
