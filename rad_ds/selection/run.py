"""The placement of a distillation run (``student.placement``): chosen once on rank 0 and sent to every rank, so
the ranks agree and only one of them loads the weights a placement reads (``cosine``, ``kl_probe``)."""

from __future__ import annotations

import logging

import torch

from rad_ds.core import dist
from rad_ds.core.dtypes import to_dtype
from rad_ds.models.conversion import load_model

from .calibration import MAX_TOKENS, N_SEQUENCES, calibration_tokens
from .choice import SelectionError
from .registry import get_strategy
from .strategies import choose_layers

logger = logging.getLogger(__name__)


def _choose(cfg, base_config, tokenizer) -> dict:
    st = cfg.student
    strategy = get_strategy(st.placement)
    model, calibration = base_config, None
    if strategy.needs_weights:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        model, _ = load_model(cfg.model.path, gguf_file=cfg.model.gguf_file, dtype=to_dtype(cfg.model.dtype, device))
        model.to(device)
    if strategy.needs_calibration:
        d = cfg.data
        calibration = calibration_tokens(d.path, tokenizer, N_SEQUENCES, min(d.seq_len, MAX_TOKENS), d.format, d.split,
                                         d.text_field, d.messages_field)
    choice = choose_layers(st.placement, int(st.k), model, report=st.report, calibration=calibration,
                           seed=st.placement_seed)
    logger.info("student.placement=%s chose layers %s in %.1f s (%d forward passes)", choice.method,
                list(choice.layers), choice.seconds, choice.forward_passes)
    return choice.record()


def choose_for_run(cfg, base_config, tokenizer) -> tuple[list[int], dict]:
    """(layers, selection record) of ``cfg.student.placement``; collective when a process group is up."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    record, error, raised = None, None, None
    if rank == 0:
        try:
            record = _choose(cfg, base_config, tokenizer)
        except Exception as e:  # every rank must leave the broadcast below, with the layers or the error
            error, raised = (str(e).splitlines() or [type(e).__name__])[0], e
    record, error = dist.broadcast_object((record, error) if rank == 0 else None)
    if raised is not None:
        raise raised
    if error is not None:
        raise SelectionError(f"student.placement={cfg.student.placement} failed on rank 0: {error}")
    return list(record["layers"]), record


__all__ = ["choose_for_run"]
