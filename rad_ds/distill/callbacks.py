"""What the distillation loop does around its steps, one callback each: stop on NaN/inf, fault injection,
metrics tracking, checkpoint cadence.

The loop (``run.DistillRun``) calls every registered callback's hooks in registration order:

    on_step_start(step)                  before the step's first micro-batch
    on_loss(step, sums) -> sums          per micro-batch, the loss sums before backward (may replace them)
    pre_optim_step(step, loss, terms)    the step's loss, summed over ranks, before the optimizer step
    post_optim_step(step, grad_norm)     after the optimizer step (``grad_norm`` None where not computed)
    on_step_end(step, row)               the step's metrics row
    on_error(exc)                        the loop raised (then the exception propagates)
    on_finish(summary)                   the run's summary, before ``summary.json`` is written

Hooks of the step (all but ``on_error``/``on_finish``) run on every rank; a hook that runs a collective
must run it on every rank alike. ``run`` is the loop the callback is registered on.
"""

from __future__ import annotations

import math

from . import checkpoint as ckpt
from rad_ds.engine.faults import fault_point, inject_nan
from .tracking import Tracker


class Callback:
    """No-op hooks; subclasses override the ones they need."""

    run = None  # the DistillRun, set when the callback is registered

    def on_step_start(self, step: int) -> None:
        pass

    def on_loss(self, step: int, sums: dict) -> dict:
        return sums

    def pre_optim_step(self, step: int, loss: float, terms: dict) -> None:
        pass

    def post_optim_step(self, step: int, grad_norm: float | None) -> None:
        pass

    def on_step_end(self, step: int, row: dict) -> None:
        pass

    def on_error(self, exc: BaseException) -> None:
        pass

    def on_finish(self, summary: dict) -> None:
        pass


class NonFiniteGuard(Callback):
    """Stop on a NaN/inf loss before the optimizer applies it, or on a non-finite gradient norm after."""

    def _restart(self) -> str:
        """Where a restart continues from, for the message."""
        last = self.run.last_saved
        if last is None:
            return "no checkpoint was saved yet, so a restart begins at step 0"
        return f"--resume auto continues from {last} (step {int(last.name.split('_')[-1])})"

    def pre_optim_step(self, step, loss, terms):
        if not math.isfinite(loss):
            raise ckpt.NonFiniteError(
                f"step {step}: the loss is not finite ({', '.join(f'{k}={v}' for k, v in terms.items())}); "
                f"stopped before the optimizer step, nothing saved; {self._restart()}. Lower optim.lr or check "
                "the data"
            )

    def post_optim_step(self, step, grad_norm):
        if grad_norm is not None and not math.isfinite(grad_norm):
            raise ckpt.NonFiniteError(
                f"step {step}: the gradient norm is {grad_norm} (DeepSpeed skipped the update); stopped, nothing "
                f"saved; {self._restart()}. Lower optim.lr or check the data"
            )


class FaultInjection(Callback):
    """``RAD_DS_FAULT`` hooks of the loop (see ``faults``): a NaN loss, a kill at the end of a step."""

    def on_loss(self, step, sums):
        if inject_nan(step, self.run.rank):
            return {k: v * float("nan") for k, v in sums.items()}
        return sums

    def on_step_end(self, step, row):
        fault_point("step_end", step=step, rank=self.run.rank)


class Tracking(Callback):
    """One metrics row per step into the ``Tracker``; closes it on error and (with the summary) at the end."""

    def __init__(self, tracker: Tracker):
        self.tracker = tracker

    def on_step_end(self, step, row):
        self.tracker.log(row)

    def on_error(self, exc):
        self.tracker.close()

    def on_finish(self, summary):
        self.tracker.close(summary)


class Checkpointing(Callback):
    """Save (collective) every ``every`` steps, at the last step and where ``train.stop_after`` stops the run."""

    def __init__(self, every: int | None, total_steps: int):
        self.every, self.total_steps = every, total_steps

    def on_step_end(self, step, row):
        every = self.every
        if step == self.total_steps or (every and step % every == 0) or self.run.stop_reached(step):
            self.run.last_saved = self.run.save(step)


__all__ = ["Callback", "Checkpointing", "FaultInjection", "NonFiniteGuard", "Tracking"]
