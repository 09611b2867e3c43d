"""Generate text from a base model or a hybrid student (greedy by default).

    python launchers/generate.py --model runs/student --prompt "What is 12*7?"
    python launchers/generate.py --model embedded:smollm2 --prompt "Write a haiku" --sample --temperature 0.7

Single process, CPU or GPU.

Installed as the console command `rad-generate` (the same flags).
"""

import sys
from functools import partial

from rad_ds.decoding import cli

main = partial(cli.main, doc=__doc__)

if __name__ == "__main__":
    sys.exit(main())
