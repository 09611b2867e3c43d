"""Shared command-line plumbing for the launchers: one-line errors and non-zero exits."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

# errors that come from the user's input: print one line, no traceback
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, FileExistsError, KeyError, TimeoutError)


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s] %(message)s")
    try:
        rc = main(argv)
    except USER_ERRORS as e:
        msg = str(e).strip().strip('"') or type(e).__name__
        print(f"error: {msg.splitlines()[0]}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)
