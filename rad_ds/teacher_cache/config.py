"""``TeacherCacheConfig``: the teacher-cache stage's settings (a teacher, the data exactly as the distillation
runs will pack it, k, the temperature, the value precision)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from rad_ds.core.config import Config, ConfigError, at_least, choice, resolve_shipped, section, setting
from rad_ds.core.dtypes import NAMES_32_16
from rad_ds.core.sections import ModelRef
from rad_ds.data.config import DataConfig
from rad_ds.data.teacher_store import VALUE_DTYPES

LOCATIONS = ("replicated", "zero3")


@dataclass
class CacheTeacherConfig(ModelRef):
    """The teacher (``ModelRef``: path, gguf_file, dtype) and where it runs."""

    location: str = setting("replicated", "replicated: a whole teacher per rank (no communication); zero3: "
                                           "partitioned over the ranks (a ZeRO-3 inference engine, teacher.deepspeed)")
    deepspeed: str = setting("ds_configs/zero3_teacher.json", "DeepSpeed config of the zero3 teacher engine")
    offload: bool = setting(False, "zero3: keep the teacher's partitions in CPU memory")


@dataclass
class TeacherCacheConfig(Config):
    RENAMED: ClassVar[dict[str, str]] = {"teacher.placement": "teacher.location"}

    out: str | None = setting(None, "cache directory (manifest.json + shards/); a killed build resumes into it")
    teacher: CacheTeacherConfig = section(CacheTeacherConfig, path="embedded:smollm2", dtype="float32", help={
        "path": "teacher model: HF dir, .gguf or embedded:smollm2 (for self-distillation: the base model)",
        "dtype": f"teacher weights and compute dtype: {', '.join(NAMES_32_16)}"})
    data: DataConfig = field(default_factory=DataConfig)
    k: int = setting(64, "teacher tokens kept per position (the rest of the mass is one tail bucket)")
    temperature: float = setting(1.0, "softmax temperature of the stored distribution; runs reading the cache "
                                      "must use the same loss.temperature")
    values_dtype: str = setting("float16", f"precision of the stored log-probabilities: {', '.join(VALUE_DTYPES)}")
    micro_batch: int = setting(4, "packed rows per teacher forward")
    rows_per_shard: int = setting(256, "packed rows per shard file (the unit of resumption)")
    dist_timeout_s: int = setting(600, "timeout of every collective")
    progress: bool = setting(True, "tqdm progress bar on rank 0")

    def validate(self) -> TeacherCacheConfig:
        if not self.out:
            raise ConfigError("out is not set: give --out DIR (the cache directory)")
        self.data.check()  # the data the distillation runs will read, with the same settings
        if not self.teacher.path:
            raise ConfigError("teacher.path is not set: give --teacher DIR (or embedded:smollm2)")
        choice("teacher.dtype", self.teacher.dtype, NAMES_32_16)
        choice("teacher.location", self.teacher.location, LOCATIONS)
        choice("values_dtype", self.values_dtype, VALUE_DTYPES)
        at_least(self, ("k", "micro_batch", "rows_per_shard", "dist_timeout_s", "data.seq_len"), 1)
        if not self.temperature > 0:
            raise ConfigError(f"temperature = {self.temperature} must be > 0")
        if self.teacher.offload and self.teacher.location != "zero3":
            raise ConfigError("teacher.offload needs teacher.location=zero3")
        if self.teacher.location == "zero3":
            p = resolve_shipped(self.teacher.deepspeed)
            if not p.is_file():
                raise ConfigError(f"teacher.deepspeed: {self.teacher.deepspeed} not found; give a DeepSpeed JSON "
                                  "config (see ds_configs/zero3_teacher.json)")
            self.teacher.deepspeed = str(p)
        out = Path(self.out)
        if out.is_file():
            raise ConfigError(f"out {out} is a file; give a directory")
        return self


__all__ = ["CacheTeacherConfig", "TeacherCacheConfig"]
