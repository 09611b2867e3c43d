"""What the fused loss (:mod:`rad_ds.distill.fused`) needs from a model instead of its logits: the final
hidden states (after the final norm) and the LM head weight, also under ZeRO-3.

The hidden states come from a forward hook on ``model.model.norm`` while the model runs with
``logits_to_keep=1`` (one position's logits instead of all), so the model's own forward, and DeepSpeed's
hooks around it, run unchanged. A ZeRO-3-partitioned head weight is gathered for the length of the loss
call (a collective: every rank calls it, in the same order); the fused loss computes its gradients in its
forward, so nothing of the gathered weight is needed in backward. A *trainable* partitioned head is the
one case it does not serve (its gradient must reach DeepSpeed's partitioned gradient): :func:`fused_ok`
says no and the trainer keeps the logits path.
"""

from __future__ import annotations

import contextlib

import torch


def _module(model):
    return getattr(model, "module", model)  # a DeepSpeed engine wraps its model


def final_norm(model) -> torch.nn.Module:
    """The final norm of a causal LM (RadHybrid, Llama-family transformers models), also inside an engine."""
    inner = _module(model)
    core = getattr(inner, "model", None)
    norm = getattr(core, "norm", None)
    if norm is None:
        raise ValueError(f"{type(inner).__name__} has no model.norm: the fused loss needs the final hidden "
                         "states; set loss.fused=false")
    return norm


def head_param(model) -> torch.nn.Parameter:
    return _module(model).get_output_embeddings().weight


def partitioned(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")  # a ZeRO-3 parameter (its .data is a placeholder outside its module's forward)


def fused_ok(model) -> bool:
    """Whether the fused loss can serve this model's head (see the module docstring)."""
    p = head_param(model)
    return not (partitioned(p) and p.requires_grad)


class FinalHidden:
    """Capture the output of a model's final norm on each forward (``.value``; ``clear()`` after use)."""

    def __init__(self, model):
        self.value = None
        self._handle = final_norm(model).register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.value = output[0] if isinstance(output, tuple) else output

    def take(self) -> torch.Tensor:
        v, self.value = self.value, None
        if v is None:
            raise RuntimeError("the model's forward did not run its final norm")
        return v

    def remove(self) -> None:
        self._handle.remove()


@contextlib.contextmanager
def gathered(*params):
    """The full tensors of ``params`` for the length of the block (ZeRO-3 partitions gathered, others as they
    are); duplicates (a tied or shared head) are gathered once."""
    unique = list({id(p): p for p in params if p is not None}.values())
    parts = [p for p in unique if partitioned(p)]
    if not parts:
        yield
        return
    import deepspeed

    with contextlib.ExitStack() as stack:  # one gather per parameter: they may belong to different engines
        for p in parts:
            stack.enter_context(deepspeed.zero.GatheredParameters([p], modifier_rank=None))
        yield


__all__ = ["FinalHidden", "final_norm", "fused_ok", "gathered", "head_param", "partitioned"]
