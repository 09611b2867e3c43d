"""``python -m rad_ds.teacher_cache`` (and ``deepspeed --module rad_ds.teacher_cache``): the teacher-cache stage."""

import sys

from .cli import main

sys.exit(main())
