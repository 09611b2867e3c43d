"""Replace attention layers of a model with Mamba2 mixers initialised from the attention weights.

Writes a student checkpoint (safetensors + config with ``layer_types`` / ``replaced_layers`` +
tokenizer + model code, so it also loads with plain transformers and ``trust_remote_code=True``)
and ``replacement.json``, the record of what was replaced.

    python launchers/replace.py --model embedded:smollm2 --layers 3,7 --out runs/student
    python launchers/replace.py --model /models/Llama-3.2-1B --layers 4-6,11 --out runs/student
    python launchers/replace.py --model DIR --gguf-file model.Q8_0.gguf --layers 3 --out runs/student
    python launchers/replace.py --model DIR --report runs/diag/report.json --k 4 --out runs/student

Single process, CPU or GPU; no launcher needed.

Installed as the console command `rad-replace` (the same flags).
"""

import sys
from functools import partial

from rad_ds.surgery import cli

main = partial(cli.main, doc=__doc__)

if __name__ == "__main__":
    sys.exit(main())
