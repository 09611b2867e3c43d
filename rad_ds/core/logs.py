"""Where log lines go: the console gets rank 0's own lines, the output directory's ``rad_ds.log`` gets everything
(rad-ds' lines, DeepSpeed's, and the library chatter that would bury the summary, e.g. zero_to_fp32's list of
files), so nothing is lost and the terminal stays readable.

Library chatter is logged under :data:`LIBRARY` (``logging.getLogger(LIBRARY + ".zero_to_fp32")``): the file
keeps it, the console drops it."""

from __future__ import annotations

import logging
from pathlib import Path

LIBRARY = "rad_ds.library"
LOG_FILE = "rad_ds.log"
_FORMAT = "%(asctime)s [%(levelname)s] %(name)s: %(message)s"


class _NotLibrary(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.name.startswith(LIBRARY)


def quiet_console() -> None:
    """Keep library chatter off the console handlers that ``logging.basicConfig`` installed."""
    for h in logging.getLogger().handlers:
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
            if not any(isinstance(f, _NotLibrary) for f in h.filters):
                h.addFilter(_NotLibrary())


def attach_log_file(out: str | Path) -> logging.Handler:
    """Append every INFO+ line of this process (DeepSpeed's included) to ``out/rad_ds.log``; returns the handler
    for :func:`detach_log_file`."""
    quiet_console()
    handler = logging.FileHandler(Path(out) / LOG_FILE, mode="a", encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter(_FORMAT))
    root = logging.getLogger()
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    root.addHandler(handler)
    ds = logging.getLogger("DeepSpeed")  # its own handler, not propagated to the root
    if not ds.propagate:
        ds.addHandler(handler)
    return handler


def detach_log_file(handler: logging.Handler | None) -> None:
    if handler is None:
        return
    for name in (None, "DeepSpeed"):
        logger = logging.getLogger(name)
        if handler in logger.handlers:
            logger.removeHandler(handler)
    handler.close()


__all__ = ["LIBRARY", "LOG_FILE", "attach_log_file", "detach_log_file", "quiet_console"]
