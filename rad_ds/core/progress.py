"""Progress of long work that shows in a terminal and in a log: a tqdm bar on a TTY, otherwise a line in the log
every ``every_s`` seconds (and at the end), so a Slurm or nohup log shows how far a run is.

Used by every stage's loop on rank 0 (``enabled=False`` elsewhere gives an object that does nothing).
"""

from __future__ import annotations

import logging
import sys
import time

from tqdm.auto import tqdm

logger = logging.getLogger("rad_ds.progress")


class LogProgress:
    """tqdm's ``update`` / ``set_postfix`` / ``close`` written as log lines: ``desc: n/total (p%), rate, eta``."""

    def __init__(self, total: int | None, desc: str, unit: str, initial: int = 0, every_s: float = 30.0):
        self.total, self.desc, self.unit, self.n, self.every_s = total, desc, unit, initial, every_s
        self.t0 = self.last = time.monotonic()
        self.start = initial
        self.postfix = ""

    def _line(self) -> str:
        dt = time.monotonic() - self.t0
        done = self.n - self.start
        rate = done / dt if dt > 0 else 0.0
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        eta = (f", eta {(self.total - self.n) / rate:.0f} s" if self.total and rate > 0 and self.n < self.total else "")
        return (f"{self.desc}: {self.n}/{self.total if self.total else '?'} {self.unit}{pct}, "
                f"{rate:.2f} {self.unit}/s{eta}{(' ' + self.postfix) if self.postfix else ''}")

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            logger.info(self._line())

    def set_postfix(self, refresh: bool = False, **kw) -> None:
        self.postfix = " ".join(f"{k}={v}" for k, v in kw.items())

    def close(self) -> None:
        if self.n > self.start:
            logger.info(self._line())


class _Off:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, refresh: bool = False, **kw) -> None:
        pass

    def close(self) -> None:
        pass


def progress(total: int | None, desc: str, unit: str = "it", enabled: bool = True, initial: int = 0,
             every_s: float = 30.0, leave: bool = True):
    """A progress reporter: tqdm when stderr is a terminal, log lines otherwise, nothing when not ``enabled``."""
    if not enabled:
        return _Off()
    if sys.stderr.isatty():
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr,
                    leave=leave)
    return LogProgress(total, desc, unit, initial, every_s)


__all__ = ["LogProgress", "progress"]
