"""Attention -> Mamba2 surgery (RAD stage 2): ``replace_attention`` on a model, ``replace`` as a stage."""

from .config import ReplaceConfig
from .init import INIT_MODES, SurgeryError, init_from_attention
from .replace import (
    ReplacementRecord,
    check_layers,
    layers_from_report,
    mark_replaced,
    new_mixer,
    parse_layers,
    replace_attention,
)
from .run import build_student, replace

__all__ = [
    "INIT_MODES", "ReplaceConfig", "ReplacementRecord", "SurgeryError", "build_student", "check_layers",
    "init_from_attention", "layers_from_report", "mark_replaced", "new_mixer", "parse_layers", "replace",
    "replace_attention",
]
