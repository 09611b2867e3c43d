"""``python -m rad_ds.eval`` (and ``deepspeed --module rad_ds.eval``): the evaluation stage."""

import sys

from .cli import main

sys.exit(main())
