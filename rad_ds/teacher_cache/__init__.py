"""The teacher-cache stage: run a teacher once over a packed dataset and keep its top-k next-token
distribution per counted position (``rad_ds.data.teacher_store``), so that distillation runs read their
teacher signal from disk (``teacher.cache=DIR``) instead of running a teacher engine."""

from __future__ import annotations

from .config import TeacherCacheConfig


def __getattr__(name):
    if name == "build_teacher_cache":
        from .run import build_teacher_cache  # deferred: rad-teacher-cache --help imports no transformers (~2 s)

        return build_teacher_cache
    raise AttributeError(name)


__all__ = ["TeacherCacheConfig", "build_teacher_cache"]
