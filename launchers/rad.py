"""Run the whole RAD pipeline from one YAML: diagnose -> replace -> distill -> export -> evaluate.

Each stage is skipped when its output exists, so running the same command again after a failure (or a
pre-emption) resumes where it stopped; distillation resumes from its latest checkpoint. Ends with a
base-vs-student comparison table (also OUT/comparison.md).

    python launchers/rad.py --config configs/rad_demo.yaml                 # stages with nproc ranks each
    python launchers/rad.py --config configs/rad_demo.yaml --out runs/rad2 --nproc 1
    python launchers/rad.py --config my.yaml --hostfile hostfile           # distributed stages multi-node

The YAML: out, model, k, nproc, hostfile, stages, and one section per stage (diagnose, replace, distill,
evaluate) holding that stage's own settings (the same names as its launcher's flags; a distill section
may start from a run config with `config: FILE`); see configs/rad_demo.yaml. The whole file is checked
before any stage runs. Installed as the console command `rad` (the same flags).
"""

import sys
from functools import partial

from rad_ds import pipeline

main = partial(pipeline.main, doc=__doc__)

if __name__ == "__main__":
    sys.exit(main())
