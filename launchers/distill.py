"""Distil a Transformer into a Transformer/Mamba2 hybrid (RAD): a frozen ZeRO-3 teacher engine and a
ZeRO-3 student engine fed the same batches; sharded checkpoints, resume, export to an HF directory.

Single process (CPU or one GPU):
    python launchers/distill.py --model embedded:smollm2 --layers 22,25 --data chat.jsonl --out runs/rad \\
        --steps 200 --seq-len 512 --micro-batch 4

2 ranks on one node (2 GPUs, or 2 CPU processes over gloo), the same with torchrun:
    deepspeed --num_gpus 2 launchers/distill.py --config configs/smollm2_rad.yaml --data chat.jsonl --out runs/rad
    torchrun --standalone --nproc_per_node 2 launchers/distill.py --config configs/smollm2_rad.yaml \\
        --data chat.jsonl --out runs/rad

Multi-node (a hostfile of `host slots=N` lines; passwordless ssh + pdsh; a filesystem shared by the nodes):
    deepspeed --hostfile hostfile launchers/distill.py --config configs/smollm2_rad.yaml \\
        --deepspeed ds_configs/zero3.json --data chat.jsonl --out /shared/runs/rad

Resume: add --resume auto (latest complete checkpoint, or fresh) or --resume PATH. Any setting of the
run config can be given as --section.field=value (listed below); --config reads YAML/JSON first.
Writes OUT/checkpoints/, OUT/final/ (HF directory), OUT/metrics.jsonl, OUT/summary.json.

Installed as the console command `rad-distill` (the same flags).
"""

import sys
from functools import partial

from rad_ds.distill import cli

main = partial(cli.main, doc=__doc__)
make_config = partial(cli.make_config, doc=__doc__)

if __name__ == "__main__":
    sys.exit(main())
