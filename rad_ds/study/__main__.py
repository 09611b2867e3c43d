"""``python -m rad_ds.study``: the placement study."""

import sys

from .cli import main

sys.exit(main())
