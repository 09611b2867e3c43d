"""RAD diagnosis: self-speculative decoding with attention sublayers skipped finds redundant layers."""

from .acceptance import AcceptanceEstimator, AcceptanceStats
from .skipping import PrefixRunner, candidate_layers, topk_mask
from .spec_decode import SelfSpeculativeDecoder, SpecConfig, SpecResult, plain_decode

__all__ = [
    "AcceptanceEstimator", "AcceptanceStats", "PrefixRunner", "SelfSpeculativeDecoder", "SpecConfig", "SpecResult",
    "candidate_layers", "plain_decode", "topk_mask",
]
