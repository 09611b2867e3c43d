"""Build the student and the teacher of a run (plain modules, before DeepSpeed wraps them).

The student is the base model with attention replaced by Mamba2 at the chosen layers (``--layers``, or a
diagnosis report and ``k``), or a student checkpoint as it is. The teacher is the base model itself
(self-distillation, RAD's headline setting) or a model given with ``--teacher`` that shares the
student's tokenizer. A fingerprint of both (architecture, layer selection, a hash of the embedding
weights) is stored in every checkpoint so that a resume with another model or selection is refused.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rad_ds.core.dtypes import to_dtype
from rad_ds.distill.config import ConfigError

logger = logging.getLogger(__name__)



@dataclass
class Models:
    student: torch.nn.Module
    teacher: torch.nn.Module
    tokenizer: object
    replaced_layers: list[int]
    teacher_path: str
    vocab_limit: int | None  # compare logits [:vocab_limit] (loss.vocab=truncate), None = all
    fingerprint: dict = field(default_factory=dict)
    selection: dict = field(default_factory=dict)


def _weights_hash(model) -> str:
    """sha1 of the first million embedding values: tells two checkpoints of one architecture apart."""
    w = model.get_input_embeddings().weight.detach()
    return hashlib.sha1(w.reshape(-1)[: 1 << 20].float().numpy().tobytes()).hexdigest()[:16]


def _config_hash(config) -> str:
    d = config.to_dict()
    keep = {k: d.get(k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                  "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings")}
    return hashlib.sha1(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def _vocab_check(student, teacher, tok, teacher_tok, mode: str, teacher_path: str) -> int | None:
    if teacher_tok is not None and tok is not None:
        a, b = tok.get_vocab(), teacher_tok.get_vocab()
        if a != b:
            diff = len(set(a.items()) ^ set(b.items()))
            raise ConfigError(
                f"the tokenizer of teacher {teacher_path} does not match the student's ({diff} vocabulary entries "
                f"differ; {len(b)} vs {len(a)} tokens): logit distillation needs one vocabulary; use a teacher "
                "of the same model family"
            )
    vs, vt = student.config.vocab_size, teacher.config.vocab_size
    if vs == vt:
        return None
    if mode != "truncate":
        raise ConfigError(
            f"teacher vocab size {vt} != student vocab size {vs}; if one is a padded version of the other, set "
            "loss.vocab=truncate (the logits of the tokenizer's tokens are compared)"
        )
    n = len(tok)
    if n > min(vs, vt):
        raise ConfigError(f"loss.vocab=truncate: the tokenizer has {n} tokens, more than min({vs}, {vt}) logits")
    return n


def build_models(cfg) -> Models:
    from rad_ds.models.conversion import load_model, load_tokenizer
    from rad_ds.surgery import layers_from_report, replace_attention

    dtype = to_dtype(cfg.model.dtype)
    base, tok = load_model(cfg.model.path, gguf_file=cfg.model.gguf_file, dtype=dtype)
    if tok is None:
        raise ConfigError(f"model.path {cfg.model.path}: no tokenizer found; distillation needs one to read --data")
    was_hybrid = bool(base.config.mamba_layers)
    teacher_path = cfg.teacher.path
    teacher = None
    if teacher_path is None:
        if was_hybrid:
            source = (base.config.replaced_layers or {}).get("source")
            if not source or not (source.startswith("embedded:") or Path(source).exists()):
                raise ConfigError(
                    f"model.path {cfg.model.path} is already a hybrid student: give its teacher with --teacher "
                    f"(its recorded source {source!r} is not available)"
                )
            teacher_path = source
        else:
            teacher_path = cfg.model.path
            teacher = copy.deepcopy(base)  # self-distillation: the base model itself, before surgery
    if teacher is None:
        teacher, teacher_tok = load_model(teacher_path, gguf_file=cfg.teacher.gguf_file, dtype=dtype)
    else:
        teacher_tok = None
    if teacher.config.mamba_layers:
        logger.warning("the teacher %s has Mamba2 layers %s", teacher_path, teacher.config.mamba_layers)

    selection: dict = {}
    layers = cfg.student.layers
    if cfg.student.report is not None:
        layers, selection = layers_from_report(cfg.student.report, int(cfg.student.k), base.config)
    if layers:
        record = replace_attention(base, layers, init=cfg.student.init, allow_all=cfg.student.allow_all,
                                   seed=cfg.student.seed, selection=selection)
        record.source = cfg.model.path
        base.config.replaced_layers = record.to_dict()
    elif not was_hybrid:
        raise ConfigError("no layers to replace: give --layers (e.g. 22,25) or --report FILE --k K")
    replaced = sorted((base.config.replaced_layers or {}).get("layers") or base.config.mamba_layers)
    if teacher_tok is None and teacher_path != cfg.model.path:
        teacher_tok = load_tokenizer(teacher_path) if Path(teacher_path).is_dir() else None
    vocab_limit = _vocab_check(base, teacher, tok, teacher_tok, cfg.loss.vocab, teacher_path)
    if teacher.config.num_hidden_layers != base.config.num_hidden_layers and cfg.loss.hidden_weight > 0:
        raise ConfigError(
            f"loss.hidden_weight > 0 compares layer outputs, but the teacher has {teacher.config.num_hidden_layers} "
            f"layers and the student {base.config.num_hidden_layers}; set loss.hidden_weight=0 for this teacher"
        )
    fingerprint = {
        "student_layer_types": list(base.config.layer_types),
        "replaced_layers": replaced,
        "student_config": _config_hash(base.config),
        "student_weights": _weights_hash(base),
        "teacher_config": _config_hash(teacher.config),
        "teacher_weights": _weights_hash(teacher),
        "trainable": cfg.student.trainable,
    }
    return Models(base, teacher, tok, replaced, str(teacher_path), vocab_limit, fingerprint, selection)


def check_fingerprint(saved: dict, current: dict, tag_dir) -> None:
    """Refuse a checkpoint made for another model, teacher, layer selection or trainable set."""
    names = {
        "replaced_layers": "replaced layers", "student_layer_types": "student layer types",
        "student_config": "student architecture", "student_weights": "base model weights",
        "teacher_config": "teacher architecture", "teacher_weights": "teacher weights",
        "trainable": "student.trainable",
    }
    diffs = [k for k in names if k in saved and saved[k] != current.get(k)]
    if diffs:
        k = diffs[0]
        raise ConfigError(
            f"checkpoint {tag_dir} was made with {names[k]} {saved[k]}, this run has {current.get(k)}"
            f"{' (and ' + ', '.join(names[d] for d in diffs[1:]) + ' differ)' if diffs[1:] else ''}; resume with the "
            "same --model/--teacher/--layers, or start a new --out"
        )


__all__ = ["Models", "build_models", "check_fingerprint"]
