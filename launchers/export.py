"""Export a distillation checkpoint as an HF directory (safetensors, config with layer_types, tokenizer,
model code), loadable with RadHybridForCausalLM and with plain transformers (trust_remote_code=True).

    python launchers/export.py --checkpoint runs/rad --out runs/rad-export               # latest checkpoint
    python launchers/export.py --checkpoint runs/rad/checkpoints/step_00000200 --out runs/rad-200

One process, no process group: the shards of every rank are consolidated with DeepSpeed's zero_to_fp32.

Installed as the console command `rad-export` (the same flags).
"""

import sys
from functools import partial

from rad_ds.distill import cli

main = partial(cli.export_main, doc=__doc__)

if __name__ == "__main__":
    sys.exit(main())
