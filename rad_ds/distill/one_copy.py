"""Self-distillation with one copy of the frozen weights: the teacher lives inside the student.

When the teacher is the base model itself, a second model would repeat every frozen weight. Here the
student keeps the base's weights once plus, frozen and never exported, the original attention of each
replaced layer. One forward computes both streams:

* layers below the first replaced layer are the same in teacher and student: computed once, shared;
* the teacher stream (``no_grad``) runs the remaining layers with the original attention at the replaced
  layers (``RadDecoderLayer(attention=...)``), then the final norm and LM head;
* the student stream runs the same layers with the new Mamba2 mixers (in layer-wise mode a replaced layer
  is fed the teacher's input to that layer, detached, as the two-engine path's feed hooks do).

The result equals a separate teacher engine's forward plus the student's (tested to 1e-6 in fp32, losses
and gradients). Under ZeRO-3 the wrapper is one engine: DeepSpeed fetches a layer's partitions for each
stream that runs it. Its state dict names the student ``student.*`` and the teacher's attention
``teacher_attention.<layer>.*``; ``student_state`` maps a checkpoint back to the student's own names.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.utils import ModelOutput

PREFIX = "student."
TEACHER_PREFIX = "teacher_attention."


@dataclass
class SelfDistillOutput(ModelOutput):
    """A ModelOutput (a dict), so DeepSpeed's ZeRO-3 hooks see the tensors inside."""

    logits: torch.Tensor | None = None  # the student's
    teacher_logits: torch.Tensor | None = None
    student_outputs: dict | None = None  # replaced layer -> its output
    teacher_outputs: dict | None = None
    teacher_inputs: dict | None = None
    hidden: torch.Tensor | None = None  # with ``hidden=True``: the student's final hidden states (after the norm)
    teacher_hidden: torch.Tensor | None = None  # ... and the teacher's, instead of the two logits


class SelfDistillModel(nn.Module):
    """A student (RadHybridForCausalLM) and the original attention of its replaced layers."""

    def __init__(self, student: nn.Module, attention: dict[int, nn.Module]):
        super().__init__()
        if not attention:
            raise ValueError("one-copy self-distillation needs the original attention of at least one layer")
        self.student = student
        self.teacher_attention = nn.ModuleDict({str(i): attention[i] for i in sorted(attention)})
        for p in self.teacher_attention.parameters():
            p.requires_grad_(False)
        self.replaced = sorted(attention)
        self.config = student.config

    def _shared_prefix(self, input_ids, position_ids) -> tuple[torch.Tensor, dict]:
        """The residual stream entering the first replaced layer, and the layers' keyword arguments."""
        core = self.student.model
        prefix = [core.embed_tokens, *core.layers[: self.replaced[0]]]
        grad = torch.is_grad_enabled() and any(p.requires_grad for m in prefix for p in m.parameters())
        with torch.set_grad_enabled(grad):
            h = core.embed_tokens(input_ids)
            kw = core.layer_inputs(h, position_ids)
            for layer in core.layers[: self.replaced[0]]:
                h = layer(h, **kw)
        return h, kw

    def _head(self, h):
        return self.student.lm_head(self.student.model.norm(h))

    def head_weight(self) -> torch.nn.Parameter:
        """The LM head both streams share (the fused loss takes it with the final hidden states)."""
        return self.student.lm_head.weight

    def forward(self, input_ids, position_ids=None, layerwise: bool = False, teacher: bool = True,
                hidden: bool = False, **_) -> SelfDistillOutput:
        """``teacher=False``: the student stream alone (its teacher signal comes from elsewhere, a cache);
        ``hidden=True``: the final hidden states of both streams instead of their logits (for the fused loss,
        which applies the head itself and never materialises ``tokens x vocab`` logits)."""
        final = self.student.model.norm if hidden else self._head
        h, kw = self._shared_prefix(input_ids, position_ids)
        layers, first = self.student.model.layers, self.replaced[0]
        out = SelfDistillOutput(student_outputs={}, teacher_outputs={}, teacher_inputs={})
        if teacher:
            with torch.no_grad():
                t = h.detach()
                for i in range(first, len(layers)):
                    attn = self.teacher_attention[str(i)] if str(i) in self.teacher_attention else None
                    if attn is not None:
                        out.teacher_inputs[i] = t
                    t = layers[i](t, attention=attn, **kw)
                    if attn is not None:
                        out.teacher_outputs[i] = t
                if hidden:
                    out.teacher_hidden = final(t)
                else:
                    out.teacher_logits = final(t)
        s = h
        for i in range(first, len(layers)):
            if layerwise and i in out.teacher_inputs:
                s = out.teacher_inputs[i].to(dtype=s.dtype)
            s = layers[i](s, **kw)
            if i in out.teacher_outputs:
                out.student_outputs[i] = s
        if hidden:
            out.hidden = final(s)
        else:
            out.logits = final(s)
        return out


def student_state(state: dict) -> dict:
    """A one-copy state dict (or a student's own) with the student's parameter names, the teacher's
    attention dropped."""
    if not any(k.startswith(PREFIX) for k in state):
        return state
    return {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}


__all__ = ["SelfDistillModel", "SelfDistillOutput", "student_state"]
