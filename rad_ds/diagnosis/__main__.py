"""``python -m rad_ds.diagnosis`` (and ``deepspeed --module rad_ds.diagnosis``): the diagnosis stage."""

import sys

from .cli import main

sys.exit(main())
