"""Fault injection for the crash-safety tests (off unless ``RAD_DS_FAULT`` is set).

``RAD_DS_FAULT="kill@save_after_shards:step=6:rank=1"`` sends SIGKILL to this process when it reaches
the named point at that step on that rank (``rank`` omitted: any rank); ``nan@loss:step=4`` makes the
loss of step 4 NaN. Points: ``step_end``, ``save_after_shards``, ``save_before_latest``, ``export_written``
(the final export's files written, not yet renamed into place) (kill), ``loss`` (nan). The tests use it to prove
that a kill at the worst moment leaves a resumable run and that a NaN loss stops the run without saving.
"""

from __future__ import annotations

import os
import signal


def _parse(spec: str):
    action_point, *params = spec.split(":")
    action, _, point = action_point.partition("@")
    kv = dict(p.split("=", 1) for p in params if "=" in p)
    return action, point, kv


def _matches(point: str, step: int, rank: int):
    spec = os.environ.get("RAD_DS_FAULT")
    if not spec:
        return None
    action, where, kv = _parse(spec)
    if where != point or int(kv.get("step", -1)) != step:
        return None
    if "rank" in kv and int(kv["rank"]) != rank:
        return None
    return action


def fault_point(point: str, step: int, rank: int = 0) -> None:
    if _matches(point, step, rank) == "kill":
        os.kill(os.getpid(), signal.SIGKILL)


def inject_nan(step: int, rank: int = 0) -> bool:
    return _matches("loss", step, rank) == "nan"


__all__ = ["fault_point", "inject_nan"]
