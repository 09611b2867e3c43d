"""Run a teacher once over the packed data and store its top-k next-token distribution per counted position
(plus the log of the remaining mass), so that distillation runs read the teacher signal from disk
(`--teacher.cache DIR`): no teacher engine, and one teacher pass serves any number of students.

Single process:
    python launchers/teacher_cache.py --teacher embedded:smollm2 --data chat.jsonl --seq-len 512 --k 64 \\
        --out runs/cache-smollm2

2 ranks (shards dealt to the ranks; a whole teacher per rank):
    torchrun --standalone --nproc_per_node 2 launchers/teacher_cache.py --teacher embedded:smollm2 \\
        --data chat.jsonl --seq-len 512 --out runs/cache-smollm2

A teacher no rank can hold (ZeRO-3 inference engine over all ranks; multi-node with a hostfile):
    deepspeed --hostfile hostfile launchers/teacher_cache.py --teacher /models/llama-70b --data chat.jsonl \\
        --teacher.location zero3 --deepspeed ds_configs/zero3_teacher.json --out /shared/cache-70b

Then distil from it (same data settings; loss.temperature = the cache's temperature):
    python launchers/distill.py --model embedded:smollm2 --layers 20,25 --data chat.jsonl --seq-len 512 \\
        --teacher.cache runs/cache-smollm2 --out runs/rad

The same command resumes a killed build (finished shards are kept). Writes OUT/manifest.json and
OUT/shards/*.safetensors. Installed as the console command `rad-teacher-cache` (the same flags).
"""

import sys
from functools import partial

from rad_ds.teacher_cache import cli

main = partial(cli.main, doc=__doc__)

if __name__ == "__main__":
    sys.exit(main())
