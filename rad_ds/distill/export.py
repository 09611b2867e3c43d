"""A distillation checkpoint -> an HF directory (safetensors, config with ``layer_types``, tokenizer, model
code), loadable by ``RadHybridForCausalLM.from_pretrained`` and by plain transformers
(``trust_remote_code=True``).

The weights are consolidated with DeepSpeed's ``zero_to_fp32`` from the shards of every rank (frozen
parameters included), on one process, without a process group. The directory is written atomically.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from .checkpoint import HF_DIR, CheckpointError, read_state, resolve_checkpoint

logger = logging.getLogger(__name__)


def consolidated_state_dict(tag_dir: Path) -> dict:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)


def load_checkpoint_model(checkpoint: str | Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer, tag_dir) of a checkpoint, the weights consolidated in float32 then cast."""
    from rad_ds.models import RadHybridConfig, RadHybridForCausalLM
    from rad_ds.models.conversion import load_tokenizer

    tag_dir = resolve_checkpoint(checkpoint)
    if not (tag_dir / HF_DIR / "config.json").is_file():
        raise CheckpointError(f"checkpoint {tag_dir}: no {HF_DIR}/config.json; was it written by rad-ds distill?")
    config = RadHybridConfig.from_pretrained(str(tag_dir / HF_DIR))
    sd = consolidated_state_dict(tag_dir)
    model = RadHybridForCausalLM(config)
    if config.tie_word_embeddings:  # one tensor under two names; zero_to_fp32 may list it once
        sd.setdefault("lm_head.weight", sd.get("model.embed_tokens.weight"))
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise CheckpointError(f"checkpoint {tag_dir}: weights do not match its config ({first})") from None
    model = model.to(dtype).eval()
    return model, load_tokenizer(tag_dir / HF_DIR), tag_dir


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, overwrite: bool = False,
                      dtype: torch.dtype = torch.float32) -> Path:
    """Write the student of ``checkpoint`` (a run dir, its ``checkpoints/`` or a ``step_*`` dir) to ``out_dir``."""
    from rad_ds.models.conversion import save_model

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"--out {out} exists and is not empty; choose a new directory or pass --overwrite")
    model, tok, tag_dir = load_checkpoint_model(checkpoint, dtype)
    state = read_state(tag_dir)
    provenance = {
        "checkpoint": str(tag_dir), "step": state.get("step"), "tokens": state.get("tokens"),
        "replaced_layers": state.get("replaced_layers"), "selection": state.get("selection"),
        "teacher": state.get("teacher"), "model": state.get("model"),
    }
    save_model(model, tok, out, extra_files={"distill.json": json.dumps(provenance, indent=2) + "\n"})
    logger.info("exported %s (step %s) -> %s", tag_dir, state.get("step"), out)
    return out


__all__ = ["consolidated_state_dict", "export_checkpoint", "load_checkpoint_model"]
