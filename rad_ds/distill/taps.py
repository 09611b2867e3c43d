"""Forward hooks on decoder layers: capture a layer's input and output, or feed a layer a given input.

Hooks sit on ``model.model.layers[i]`` (a ``RadDecoderLayer``, whose first positional argument is the
residual stream). They work unchanged under ZeRO-3, where DeepSpeed's own hooks fetch the layer's
parameters around the same call. The teacher's taps record what the student's losses compare against;
in layer-wise mode the student's replaced layers are fed the teacher's input to the same layer, so each
new mixer learns in isolation (MOHAWK's hidden-state alignment; ModelOpt's layer-wise distillation).
"""

from __future__ import annotations

import torch


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder layers of a RadHybridForCausalLM, also when wrapped by a DeepSpeed engine."""
    module = getattr(model, "module", model)
    return module.model.layers


class LayerTaps:
    """Record inputs/outputs of chosen layers on each forward; optionally replace their inputs.

    ``feed`` maps a layer index to a callable returning the tensor to use as that layer's input."""

    def __init__(self, model, layers, capture_inputs: bool = False, capture_outputs: bool = True, feed=None):
        self.layers = list(layers)
        self.inputs: dict[int, torch.Tensor] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self._handles = []
        mods = decoder_layers(model)
        for i in self.layers:
            mod = mods[i]
            if feed is not None and i in feed:
                self._handles.append(mod.register_forward_pre_hook(self._feeder(i, feed[i]), with_kwargs=True))
            if capture_inputs:
                self._handles.append(mod.register_forward_pre_hook(self._in_hook(i), with_kwargs=True))
            if capture_outputs:
                self._handles.append(mod.register_forward_hook(self._out_hook(i)))

    def _feeder(self, i, source):
        def hook(module, args, kwargs):
            new = source()  # None: leave the layer's own input (a feed that is switched off)
            if new is None:
                return None
            return (new.to(dtype=args[0].dtype), *args[1:]), kwargs

        return hook

    def _in_hook(self, i):
        def hook(module, args, kwargs):
            self.inputs[i] = args[0]

        return hook

    def _out_hook(self, i):
        def hook(module, args, output):
            self.outputs[i] = output[0] if isinstance(output, tuple) else output

        return hook

    def clear(self) -> None:
        self.inputs.clear()
        self.outputs.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.clear()


def tap_outputs(taps: LayerTaps | None) -> dict | None:
    """The captured layer outputs of ``taps`` (``None`` without taps: no hidden-state loss)."""
    return taps.outputs if taps is not None else None


__all__ = ["LayerTaps", "decoder_layers", "tap_outputs"]
