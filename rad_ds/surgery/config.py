"""``ReplaceConfig``: the replace stage's settings (a base model, the layers or a report, the init)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from rad_ds.core.config import Config, ConfigError, choice, section, setting
from rad_ds.core.dtypes import NAMES_32_16
from rad_ds.core.outputs import check
from rad_ds.core.sections import ModelRef

from .init import INIT_MODES


@dataclass
class ReplaceConfig(Config):
    RENAMED: ClassVar[dict[str, str]] = {"gguf_file": "model.gguf_file"}  # the model section; goes next release

    model: ModelRef = section(ModelRef, dtype="float32", help={
        "path": "base model: HF dir (Llama/Qwen2/Mistral/SmolLM or rad_hybrid), .gguf, or embedded:smollm2",
        "dtype": f"dtype the base is loaded in and the student written in: {', '.join(NAMES_32_16)}"})
    layers: list[int] | None = setting(None, "attention layers to replace, e.g. 3,7,11 or 4-6")
    report: str | None = setting(None, "a diagnosis report.json to take the layers from; use with k")
    k: int | None = setting(None, "with report: how many layers (a k the report holds)")
    out: str | None = setting(None, "output directory for the student checkpoint")
    init: str = setting("attention_skip", "attention_skip: MambaInLlama's mapping (V->x, K->B, Q->C, O->out_proj) "
                                          "with out_proj zeroed, the mixer starting as a skipped sublayer (measured "
                                          "best); attention: the mapping as published; random: ablation")
    allow_all: bool = setting(False, "allow replacing every attention layer")
    seed: int = setting(0, "seed of the Mamba2 init (z, dt, conv, A)")
    overwrite: bool = setting(False, "replace an existing non-empty out")

    def validate(self, inputs_exist: bool = True) -> "ReplaceConfig":
        """``inputs_exist=False``: the report is written by an earlier stage (the pipeline checks it later)."""
        if not self.model.path:
            raise ConfigError("model.path is not set: give --model DIR (or embedded:smollm2)")
        choice("model.dtype", self.model.dtype, NAMES_32_16)
        if not self.out:
            raise ConfigError("out is not set: give --out DIR (the student checkpoint)")
        if (self.layers is None) == (self.report is None):
            raise ConfigError("give either layers (--layers 3,7) or report with k (--report report.json --k 2)")
        if self.report is not None and self.k is None:
            raise ConfigError("report needs k (--k K, the number of layers to replace)")
        if self.layers is not None and not self.layers:
            raise ConfigError("layers is empty; give e.g. --layers 3,7")
        choice("init", self.init, INIT_MODES)
        check(self.out, "student", overwrite=self.overwrite)  # the directory appears whole in one rename
        if inputs_exist and self.report is not None and not Path(self.report).exists():
            raise FileNotFoundError(f"report {self.report}: file not found (a diagnosis report.json)")
        return self


__all__ = ["ReplaceConfig"]
