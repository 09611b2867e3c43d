"""Decoding shared by diagnosis and evaluation: layer-skipping drafts, the self-speculative decoder,
prompt loading and encoding, text generation."""

from .eos import eos_set, model_eos_ids
from .skipping import PrefixRunner, candidate_layers, topk_mask
from .spec_decode import SelfSpeculativeDecoder, SpecConfig, SpecResult, plain_decode

__all__ = [
    "PrefixRunner", "SelfSpeculativeDecoder", "SpecConfig", "SpecResult", "candidate_layers", "eos_set",
    "model_eos_ids", "plain_decode", "topk_mask",
]
