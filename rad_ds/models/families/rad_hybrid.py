"""rad_hybrid itself: an existing hybrid (a student) loads as it is; its own family (the one it was imported
from) is ``config.source_model_type``."""

from __future__ import annotations

from ..configuration_rad_hybrid import RadHybridConfig
from .base import FamilyAdapter


class RadHybrid(FamilyAdapter):
    model_type = "rad_hybrid"

    def config(self, src) -> RadHybridConfig:
        return RadHybridConfig.from_dict(src.to_dict())


FAMILY = RadHybrid()
