"""Export a distillation checkpoint as an HF directory (safetensors, config with layer_types, tokenizer,
model code), loadable with RadHybridForCausalLM and with plain transformers (trust_remote_code=True); or,
with --format native, as GraniteMoeHybrid, an architecture transformers implements itself (no remote
code; vLLM serves it).

    python launchers/export.py --checkpoint runs/rad --out runs/rad-export               # latest checkpoint
    python launchers/export.py --checkpoint runs/rad/checkpoints/step_00000200 --out runs/rad-200
    python launchers/export.py --checkpoint runs/rad --format native --out runs/rad-native
    python launchers/export.py --model runs/student --format native --out runs/student-native

One process, no process group: trained weights from the checkpoint's shards, frozen ones streamed from the
base model, one tensor at a time.

Installed as the console command `rad-export` (the same flags).
"""

import sys
from functools import partial

from rad_ds.distill import cli

main = partial(cli.export_main, doc=__doc__)

if __name__ == "__main__":
    sys.exit(main())
