"""``python -m rad_ds.distill`` (and ``deepspeed --module rad_ds.distill``): the distillation stage."""

import sys

from .cli import main

sys.exit(main())
