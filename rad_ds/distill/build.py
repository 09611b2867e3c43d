"""Build the student and the teacher of a run (plain modules, before DeepSpeed wraps them).

The student is the base model with attention replaced by Mamba2 at the chosen layers (``--layers``, or a
diagnosis report and ``k``), or a student checkpoint as it is. The teacher is the base model itself
(self-distillation, RAD's headline setting) or a model given with ``--teacher`` that shares the
student's tokenizer. A fingerprint of both (architecture, layer selection, a hash of the embedding
weights) is stored in every checkpoint so that a resume with another model or selection is refused.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from rad_ds.core.dtypes import to_dtype
from rad_ds.data.teacher_store import TeacherCacheStore
from rad_ds.distill.config import ConfigError
from rad_ds.engine.identity import config_hash, source_weights_hash, streamable_source, teacher_identity, weights_hash
from rad_ds.models.conversion import load_config, load_model, load_tokenizer, model_location
from rad_ds.models.partitioned import build_partitioned, zero3_enabled
from rad_ds.models.vocab_parallel import VocabShard, shard_vocab
from rad_ds.selection import choose_for_run
from rad_ds.surgery import check_layers, layers_from_report, mark_replaced, new_mixer, replace_attention

from .one_copy import SelfDistillModel
from .optim import set_trainable
from .teacher_location import TeacherLocation, resolve_location
from .vocab_parallel import resolve_vocab_parallel

logger = logging.getLogger(__name__)



@dataclass
class Models:
    student: torch.nn.Module  # RadHybridForCausalLM, or SelfDistillModel (location shared: the teacher inside)
    teacher: torch.nn.Module | None  # None with location shared
    tokenizer: object
    replaced_layers: list[int]
    teacher_path: str
    vocab_limit: int | None  # compare logits [:vocab_limit] (loss.vocab=truncate), None = all
    fingerprint: dict = field(default_factory=dict)
    selection: dict = field(default_factory=dict)
    location: TeacherLocation | None = None
    partitioned: bool = False  # the student was created partitioned (ZeRO-3 construction)
    frozen_from_base: bool = False  # the base is safetensors: checkpoints leave the frozen weights to it
    vocab_shard: VocabShard | None = None  # student.vocab_parallel: this rank's rows of the embedding and head


@dataclass
class Sources:
    """What a run is made of, read from configs and tokenizers only (no weights)."""

    base_config: object
    teacher_config: object
    teacher_path: str
    self_distill: bool
    was_hybrid: bool
    layers: list[int]
    selection: dict
    tokenizer: object
    teacher_tokenizer: object


def _vocab_check(s_config, t_config, tok, teacher_tok, mode: str, teacher_path: str) -> int | None:
    if teacher_tok is not None and tok is not None:
        a, b = tok.get_vocab(), teacher_tok.get_vocab()
        if a != b:
            diff = len(set(a.items()) ^ set(b.items()))
            raise ConfigError(
                f"the tokenizer of teacher {teacher_path} does not match the student's ({diff} vocabulary entries "
                f"differ; {len(b)} vs {len(a)} tokens): logit distillation needs one vocabulary; use a teacher "
                "of the same model family"
            )
    vs, vt = s_config.vocab_size, t_config.vocab_size
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


def _teacher_of(cfg, base_config) -> tuple[str, bool]:
    """(teacher path, whether it is the base itself)."""
    if cfg.teacher.path is not None:
        return cfg.teacher.path, False
    if base_config.mamba_layers:
        source = (base_config.replaced_layers or {}).get("source")
        if not source or not (source.startswith("embedded:") or Path(source).exists()):
            raise ConfigError(
                f"model.path {cfg.model.path} is already a hybrid student: give its teacher with --teacher "
                f"(its recorded source {source!r} is not available)"
            )
        return source, False
    return cfg.model.path, True


def read_sources(cfg) -> Sources:
    """Configs, layer selection and tokenizers of a run, checked against each other before any weights load."""
    base = load_config(cfg.model.path, cfg.model.gguf_file)
    tok = load_tokenizer(*model_location(cfg.model.path, cfg.model.gguf_file))
    if tok is None:
        raise ConfigError(f"model.path {cfg.model.path}: no tokenizer found; distillation needs one to read --data")
    teacher_path, self_distill = _teacher_of(cfg, base)
    teacher = base if self_distill else load_config(teacher_path, cfg.teacher.gguf_file)
    if teacher.mamba_layers:
        logger.warning("the teacher %s has Mamba2 layers %s", teacher_path, teacher.mamba_layers)
    selection: dict = {}
    layers = cfg.student.layers
    if getattr(cfg.student, "placement", None) is not None:  # a named strategy (rad_ds.selection), on rank 0
        layers, selection = choose_for_run(cfg, base, tok)
    elif cfg.student.report is not None:
        layers, selection = layers_from_report(cfg.student.report, int(cfg.student.k), base)
    if layers:
        layers = check_layers(base, list(layers), allow_all=cfg.student.allow_all)
    elif not base.mamba_layers:
        raise ConfigError("no layers to replace: give --layers (e.g. 22,25) or --report FILE --k K")
    teacher_tok = None
    if not self_distill:
        teacher_tok = load_tokenizer(*model_location(teacher_path, cfg.teacher.gguf_file))
    if cfg.loss.hidden_weight > 0 and cfg.loss.hidden != "none":
        for what, a, b in (("layers", teacher.num_hidden_layers, base.num_hidden_layers),
                           ("hidden size", teacher.hidden_size, base.hidden_size)):
            if a != b:
                raise ConfigError(
                    f"loss.hidden_weight > 0 compares layer outputs, but the teacher {teacher_path} has {what} {a} "
                    f"and the student {b}; set loss.hidden_weight=0 for this teacher"
                )
    return Sources(base, teacher, str(teacher_path), self_distill, bool(base.mamba_layers), list(layers or []),
                   selection, tok, teacher_tok)


def build_models(cfg, s_ds: dict | None = None, t_ds: dict | None = None, world: int = 1, local_world: int = 1,
                 location: str | None = None, sources: Sources | None = None) -> Models:
    """Student and teacher of a run. ``s_ds``/``t_ds``: the filled DeepSpeed configs; under ZeRO-3 the models
    are created partitioned and loaded tensor by tensor (safetensors sources); ``location`` overrides
    ``teacher.location`` (the plain reference loop asks for ``replicated``). Collective under ZeRO-3."""
    src = sources or read_sources(cfg)
    if cfg.teacher.cache is not None and not cfg.loss.stage1_steps:
        place = TeacherLocation("cache", 0, 0)  # the teacher signal is read from disk: no teacher model at all
    elif location is not None:
        place = TeacherLocation(location, 0, 0)
    else:
        place = resolve_location(cfg, src.self_distill, src.teacher_config,
                                  t_ds or {"zero_optimization": {"stage": 3}}, world, local_world)
    if cfg.teacher.cache is not None and place.kind != "cache" and place.kind != "shared":
        raise ConfigError("loss.stage1_steps > 0 with teacher.cache needs self-distillation (the teacher's layer "
                          "inputs come from the one-copy teacher stream); drop teacher.cache or loss.stage1_steps")
    vocab_limit = _vocab_check(src.base_config, src.teacher_config, src.tokenizer, src.teacher_tokenizer,
                               cfg.loss.vocab, src.teacher_path)
    dtype = to_dtype(cfg.model.dtype)
    base_source = streamable_source(cfg.model.path, cfg.model.gguf_file)
    t_source = base_source if src.self_distill else streamable_source(src.teacher_path, cfg.teacher.gguf_file)
    s_partitioned = zero3_enabled(s_ds) and base_source is not None
    t_partitioned = place.kind == "zero3" and zero3_enabled(t_ds) and t_source is not None
    student, attention, copy_for_teacher, s_hash = _build_student(
        cfg, src, s_ds, base_source if s_partitioned else None, dtype, keep_attention=place.kind == "shared",
        copy_teacher=src.self_distill and place.kind not in ("shared", "cache")
        and not (t_partitioned or s_partitioned))
    teacher, t_hash = None, s_hash
    if place.kind == "cache":
        t_hash = teacher_identity(src.teacher_path, teacher_gguf(cfg, src), src.teacher_config)["teacher_weights"]
    elif place.kind != "shared":
        teacher, t_hash = _build_teacher(cfg, src, t_ds, t_source, dtype, t_partitioned, copy_for_teacher)
    replaced = sorted((student.config.replaced_layers or {}).get("layers") or student.config.mamba_layers)
    fingerprint = {
        "student_layer_types": list(student.config.layer_types),
        "replaced_layers": replaced,
        "student_config": config_hash(student.config),
        "student_weights": s_hash,
        "teacher_config": config_hash(src.teacher_config),
        "teacher_weights": t_hash,
        "trainable": cfg.student.trainable,
        "one_copy": place.kind == "shared",
        "teacher_cache": TeacherCacheStore.open(cfg.teacher.cache).id if cfg.teacher.cache else None,
    }
    set_trainable(student, cfg.student.trainable, replaced)
    shard = _vocab_parallel(cfg, student, place, s_partitioned, world, vocab_limit, base_source, dtype)
    if place.kind == "shared":
        student = SelfDistillModel(student, attention)
    return Models(student, teacher, src.tokenizer, replaced, src.teacher_path, vocab_limit, fingerprint,
                  src.selection, place, partitioned=s_partitioned, frozen_from_base=base_source is not None,
                  vocab_shard=shard)


def _vocab_parallel(cfg, student, place, partitioned, world, vocab_limit, source, dtype) -> VocabShard | None:
    """``student.vocab_parallel`` resolved (rad_ds/distill/vocab_parallel.py) and, when on, the student's embedding
    and LM head swapped for this rank's vocabulary rows, read from the base's files."""
    ends = (student.get_input_embeddings(), student.get_output_embeddings())
    frozen = not any(p.requires_grad for m in ends for p in m.parameters())
    on, why = resolve_vocab_parallel(cfg.student.vocab_parallel, world=world, partitioned=partitioned,
                                     shared=place.kind == "shared", frozen=frozen, fused=cfg.loss.fused,
                                     cache=cfg.teacher.cache is not None, vocab_limit=vocab_limit)
    rank = torch.distributed.get_rank() if world > 1 else 0
    if not on:
        if world > 1 and rank == 0 and cfg.student.vocab_parallel == "auto":
            logger.info("student.vocab_parallel=auto: off (%s)", why)
        return None
    shard = shard_vocab(student, source, rank, world, dtype)
    if rank == 0:
        logger.info("vocab-parallel embedding and LM head: %d vocabulary rows per rank of %d, never gathered whole",
                    shard.per, shard.vocab)
    return shard


def teacher_gguf(cfg, src: Sources) -> str | None:
    """The GGUF file name that goes with ``src.teacher_path``."""
    if cfg.teacher.path is not None:
        return cfg.teacher.gguf_file
    return cfg.model.gguf_file if src.self_distill else None


def _build_student(cfg, src: Sources, s_ds, source, dtype, keep_attention: bool, copy_teacher: bool):
    """(student, original attention of the replaced layers, a whole copy of the base or None, weights hash)."""
    st = cfg.student
    if source is not None:
        config = copy.deepcopy(src.base_config)
        if src.layers:
            record = mark_replaced(config, src.layers, st.init, st.seed, src.selection)
            record.source = cfg.model.path
            config.replaced_layers = record.to_dict()
        built = build_partitioned(config, source, s_ds, dtype, new_mixer=partial(new_mixer, init=st.init),
                                  new_layers=src.layers, keep_attention=keep_attention, seed=st.seed)
        logger.info("student created partitioned (ZeRO-3) and loaded tensor by tensor from %s", source.dir)
        return built.model, built.attention, None, source_weights_hash(source, config, dtype)
    if zero3_enabled(s_ds) and source is None:
        logger.warning("model.path %s is not a safetensors directory: every rank loads it whole before ZeRO-3 "
                       "partitions it; save it as safetensors (rad-replace, rad-export) to load shard by shard",
                       cfg.model.path)
    base, _ = load_model(cfg.model.path, gguf_file=cfg.model.gguf_file, dtype=dtype)
    teacher_copy = copy.deepcopy(base) if copy_teacher else None
    attention = {i: base.model.layers[i].self_attn for i in src.layers} if keep_attention else {}
    if src.layers:
        record = replace_attention(base, src.layers, init=st.init, allow_all=st.allow_all, seed=st.seed,
                                   selection=src.selection)
        record.source = cfg.model.path
        base.config.replaced_layers = record.to_dict()
    return base, attention, teacher_copy, weights_hash(base)


def _build_teacher(cfg, src: Sources, t_ds, source, dtype, partitioned: bool, teacher_copy):
    """(teacher, weights hash): partitioned from its safetensors, the base's copy, or loaded whole."""
    if partitioned:
        built = build_partitioned(src.teacher_config, source, t_ds, dtype)
        return built.model, source_weights_hash(source, src.teacher_config, dtype)
    teacher = teacher_copy
    if teacher is None:
        teacher, _ = load_model(src.teacher_path, gguf_file=cfg.teacher.gguf_file, dtype=dtype)
    return teacher, weights_hash(teacher)


def check_fingerprint(saved: dict, current: dict, tag_dir) -> None:
    """Refuse a checkpoint made for another model, teacher, layer selection or trainable set."""
    names = {
        "replaced_layers": "replaced layers", "student_layer_types": "student layer types",
        "student_config": "student architecture", "student_weights": "base model weights",
        "teacher_config": "teacher architecture", "teacher_weights": "teacher weights",
        "trainable": "student.trainable", "one_copy": "one-copy self-distillation (teacher.location=shared)",
        "teacher_cache": "teacher.cache",
    }
    diffs = [k for k in names if k in saved and saved[k] != current.get(k)]
    if diffs:
        k = diffs[0]
        raise ConfigError(
            f"checkpoint {tag_dir} was made with {names[k]} {saved[k]}, this run has {current.get(k)}"
            f"{' (and ' + ', '.join(names[d] for d in diffs[1:]) + ' differ)' if diffs[1:] else ''}; resume with the "
            "same --model/--teacher/--layers, or start a new --out"
        )


__all__ = ["Models", "Sources", "build_models", "check_fingerprint", "read_sources", "teacher_gguf"]
