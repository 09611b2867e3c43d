"""A distillation checkpoint -> an HF directory (safetensors, config with ``layer_types``, tokenizer, model
code), loadable by ``RadHybridForCausalLM.from_pretrained`` and by plain transformers
(``trust_remote_code=True``).

Streamed, one tensor in memory at a time: the trained parameters come from the checkpoint's fp32 ZeRO
partitions (``zero_to_fp32`` of the trainable ones only: the new mixers, small), every frozen one from
the run's base model, whose weights a run never changes (the file's embedding hash is checked against the
run's fingerprint; each tensor is cast to the run's dtype first, so the values are the student's own).
A base that is not a safetensors directory (GGUF) takes the old route: every parameter consolidated from
the shards into one in-memory model. One process, no process group; the directory is written atomically.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import tempfile
from pathlib import Path

import torch

from rad_ds.core.dtypes import to_dtype
from rad_ds.core.io import atomic_dir
from rad_ds.core.logs import LIBRARY
from rad_ds.core.outputs import check
from rad_ds.engine.faults import fault_point
from rad_ds.engine.identity import source_weights_hash
from rad_ds.models import RadHybridConfig, RadHybridForCausalLM
from rad_ds.models.conversion import load_tokenizer, model_location, write_model_files, write_model_metadata
from rad_ds.models.native import check_native, export_native
from rad_ds.models.weights import SafetensorsWriter, WeightSource

from .checkpoint import HF_DIR, CheckpointError, read_state, resolve_checkpoint
from .one_copy import student_state

logger = logging.getLogger(__name__)


def consolidated_state_dict(tag_dir: Path, trainable_only: bool = False) -> dict:
    """fp32 parameters of a checkpoint under the student's names (a one-copy run's teacher attention dropped)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    chatter = io.StringIO()  # zero_to_fp32 prints each file and shape: into OUT/rad_ds.log, not the terminal
    with contextlib.redirect_stdout(chatter):
        sd = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name,
                                                      exclude_frozen_parameters=trainable_only)
    logging.getLogger(LIBRARY + ".zero_to_fp32").info("%s:\n%s", tag_dir, chatter.getvalue().rstrip())
    return student_state(sd)


def load_checkpoint_model(checkpoint: str | Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer, tag_dir) of a checkpoint, the weights consolidated in float32 then cast."""
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


def tensor_layout(config) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor a saved student holds, in state-dict order (a tied LM head once)."""
    with torch.device("meta"):
        model = RadHybridForCausalLM(config)
    sd = model.state_dict()
    if config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    return [(k, tuple(v.shape)) for k, v in sd.items()]


def _base_source(tag_dir: Path, state: dict, config, run_dtype):
    """The run's base model as a safetensors source whose weights are the ones the run started from, or None."""
    model = state.get("model")
    if not model:
        return None
    try:
        directory, gguf = model_location(model, (state.get("config") or {}).get("model", {}).get("gguf_file"))
        source = None if gguf else WeightSource.find(directory)
    except (OSError, ValueError):
        return None
    if source is None:
        return None
    want = (state.get("fingerprint") or {}).get("student_weights")
    if want and source_weights_hash(source, config, run_dtype) != want:
        raise CheckpointError(f"checkpoint {tag_dir}: the base model {model} has changed since the run (its weights "
                              "hash differs); export with the base it was trained from")
    return source


def _stream_weights(path: Path, config, trained: dict, source, run_dtype, dtype) -> None:
    layout = tensor_layout(config)
    with SafetensorsWriter(path, [(n, s, dtype) for n, s in layout], metadata={"format": "pt"}) as w:
        for name, _ in layout:
            t = trained.get(name)
            if t is None:
                if name not in source:
                    raise CheckpointError(f"parameter {name} is neither trained in the checkpoint nor in the base "
                                          f"{source.dir}")
                t = source.read(name).to(run_dtype)
            w.write(name, t.to(dtype))


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, overwrite: bool = False,
                      dtype: torch.dtype = torch.float32) -> Path:
    """Write the student of ``checkpoint`` (a run dir, its ``checkpoints/`` or a ``step_*`` dir) to ``out_dir``."""
    out = _check_out(out_dir, overwrite)
    tag_dir = resolve_checkpoint(checkpoint)
    if not (tag_dir / HF_DIR / "config.json").is_file():
        raise CheckpointError(f"checkpoint {tag_dir}: no {HF_DIR}/config.json; was it written by rad-ds distill?")
    state = read_state(tag_dir)
    provenance = {
        "checkpoint": str(tag_dir), "step": state.get("step"), "tokens": state.get("tokens"),
        "replaced_layers": state.get("replaced_layers"), "selection": state.get("selection"),
        "teacher": state.get("teacher"), "model": state.get("model"),
    }
    extra = {"distill.json": json.dumps(provenance, indent=2) + "\n"}
    config = RadHybridConfig.from_pretrained(str(tag_dir / HF_DIR))
    run_dtype = to_dtype((state.get("config") or {}).get("model", {}).get("dtype", "float32"))
    source = _base_source(tag_dir, state, config, run_dtype)
    if source is None and not state.get("frozen_in_checkpoint", True):
        raise CheckpointError(f"checkpoint {tag_dir} holds only the trained parameters; the frozen ones are read from "
                              f"its base model {state.get('model')}, which is not there: restore it at that path")
    step = int(state.get("step") or 0)
    if source is None:
        model, tok, _ = load_checkpoint_model(tag_dir, dtype)
        with atomic_dir(out) as tmp:  # the directory appears whole in one rename, or not at all
            write_model_files(model, tok, tmp, extra)
            fault_point("export_written", step=step)
    else:
        trained = consolidated_state_dict(tag_dir, trainable_only=True)
        with atomic_dir(out) as tmp:
            _stream_weights(tmp / "model.safetensors", config, trained, source, run_dtype, dtype)
            write_model_metadata(config, load_tokenizer(tag_dir / HF_DIR), tmp, extra)
            fault_point("export_written", step=step)
    logger.info("exported %s (step %s) -> %s%s", tag_dir, state.get("step"), out,
                " (frozen weights streamed from the base)" if source is not None else "")
    return out


def _check_out(out_dir, overwrite: bool) -> Path:
    """An exported model appears whole in one rename, so checking ``--out`` is the whole discipline."""
    check(out_dir, "export", overwrite=overwrite)
    return Path(out_dir)


def export_any(source: str | Path, out_dir: str | Path, native: bool = False, from_checkpoint: bool = True,
               overwrite: bool = False, dtype: torch.dtype = torch.float32) -> Path:
    """A checkpoint (``from_checkpoint``) or a student directory written to ``out_dir`` as rad_hybrid, or with
    ``native`` as GraniteMoeHybrid (``rad_ds.models.native``: checked before anything is written)."""
    if not native:
        return export_checkpoint(source, out_dir, overwrite=overwrite, dtype=dtype)
    out = _check_out(out_dir, overwrite)
    if not from_checkpoint:
        check_native(RadHybridConfig.from_pretrained(str(source)))
        return export_native(source, out, dtype=dtype)
    tag_dir = resolve_checkpoint(source)
    check_native(RadHybridConfig.from_pretrained(str(tag_dir / HF_DIR)))
    tmp = Path(tempfile.mkdtemp(prefix=".rad_hybrid-", dir=out.parent if out.parent.exists() else None))
    try:
        export_checkpoint(tag_dir, tmp / "student", dtype=dtype)
        return export_native(tmp / "student", out, dtype=dtype,
                             extra_files={"checkpoint": str(tag_dir), "step": read_state(tag_dir).get("step")})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["consolidated_state_dict", "export_any", "export_checkpoint", "load_checkpoint_model", "tensor_layout"]
