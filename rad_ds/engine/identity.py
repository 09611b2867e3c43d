"""What identifies a model's weights without loading them: the hashes a run's fingerprint and a teacher cache
record, and the streamable (safetensors) source of a model path."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from rad_ds.models.conversion import model_location
from rad_ds.models.weights import WeightSource


def _hash_values(values: torch.Tensor) -> str:
    return hashlib.sha1(values.reshape(-1)[: 1 << 20].float().numpy().tobytes()).hexdigest()[:16]


def weights_hash(model) -> str:
    """sha1 of the first million embedding values: tells two checkpoints of one architecture apart."""
    return _hash_values(model.get_input_embeddings().weight.detach())


def source_weights_hash(source, config, dtype) -> str:
    """``weights_hash`` of the model ``source`` loads as, read from the file (nothing gathered)."""
    rows = -(-(1 << 20) // config.hidden_size)
    return _hash_values(source.rows("model.embed_tokens.weight", 0, rows).to(dtype))


def teacher_identity(path, gguf_file, config) -> dict:
    """What tells one teacher from another without loading it (a teacher cache records it, a run with that cache
    checks it): its architecture hash and, for a safetensors model, the hash of its first embedding values in
    float32 (for a GGUF/.bin model, its location)."""
    source = streamable_source(path, gguf_file)
    if source is not None:
        weights = source_weights_hash(source, config, torch.float32)
    else:
        directory, gguf = model_location(path, gguf_file)
        weights = "file:" + str(Path(directory).resolve() / (gguf or ""))
    return {"teacher_config": config_hash(config), "teacher_weights": weights}


def config_hash(config) -> str:
    d = config.to_dict()
    keep = {k: d.get(k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                  "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings")}
    return hashlib.sha1(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def streamable_source(path, gguf_file):
    """The safetensors source of a model path, or ``None`` (GGUF, .bin: loaded whole, then partitioned)."""
    directory, gguf = model_location(path, gguf_file)
    return None if gguf else WeightSource.find(directory)


__all__ = ["config_hash", "source_weights_hash", "streamable_source", "teacher_identity", "weights_hash"]
