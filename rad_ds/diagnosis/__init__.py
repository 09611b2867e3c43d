"""RAD diagnosis: self-speculative decoding with attention sublayers skipped finds redundant layers."""

from rad_ds.core.report import DiagnosisReport, Selection
from rad_ds.decoding.skipping import PrefixRunner, candidate_layers, topk_mask
from rad_ds.decoding.spec_decode import (
    SelfSpeculativeDecoder,
    SpecConfig,
    SpecResult,
    plain_decode,
)

from .acceptance import AcceptanceEstimator, AcceptanceStats

__all__ = [
    "AcceptanceEstimator", "AcceptanceStats", "DiagnosisReport", "PrefixRunner", "SelfSpeculativeDecoder",
    "SpecConfig", "SpecResult", "Selection", "candidate_layers", "plain_decode", "topk_mask",
]
