"""The placement study: does RAD's choice of attention layers beat fixed placements at an equal budget?

For one base model and k, every placement method (rad, single_skip, even, cosine, random x seeds, kl_probe)
picks k layers; each student is distilled with the same data, steps, tokens, schedule, seed and recipe (the
`distill` section, a run config), scored on held-out data every `eval_every` steps (KL to the teacher,
perplexity, top-1 and greedy agreement), and reported as results.json / results.md / curves.png with each
method's cost of choosing and its steps to `even`'s final held-out KL. The teacher's logit signal is computed
once into a shared teacher cache (`cache_k`); every step is resumable (run the same command again).

The committed CPU study (SmolLM2-135M-Instruct, k=4; a corpus from launchers/corpus.py):
    python launchers/placement.py --config configs/placement_smollm2.yaml --out runs/placement-k4

Any base and data:
    python launchers/placement.py --model /models/llama-3.2-1b --k 8 --data train.jsonl --heldout heldout.jsonl \\
        --steps 2000 --seq-len 2048 --out runs/placement --distill.deepspeed ds_configs/zero3.json

Every setting: --help (study settings, then --diagnose.* and --distill.* sections). Installed as `rad-placement`.
"""

import sys
from functools import partial

from rad_ds.study import cli

main = partial(cli.main, doc=__doc__)

if __name__ == "__main__":
    sys.exit(main())
