"""Training data for distillation: datasets-based loading, chat templates, packing, a resumable sampler."""

from .loader import DistillLoader, MicroBatch, StepBatch, build_packed, data_fingerprint, load_packed
from .packing import Documents, Packed, pack_documents
from .sampler import ResumableSampler
from .sources import DataError, load_records
from .tokenization import tokenize_documents, tokenize_records, tokenizer_fingerprint

__all__ = [
    "DataError", "DistillLoader", "Documents", "MicroBatch", "Packed", "ResumableSampler", "StepBatch",
    "build_packed", "data_fingerprint", "load_packed", "load_records", "pack_documents", "tokenize_documents",
    "tokenize_records", "tokenizer_fingerprint",
]
