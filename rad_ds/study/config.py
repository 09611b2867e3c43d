"""``StudyConfig``: a placement study's settings: one base model, the k values, the placement methods to compare,
the training seeds, the test data, and the one distillation recipe every student gets (a ``DistillConfig``: same data,
steps, tokens and learning-rate schedule for all; training seed s gives every method the same data order)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from rad_ds.core.config import Config, ConfigError, at_least, choice, resolve_shipped, section, setting
from rad_ds.core.sections import ModelRef
from rad_ds.diagnosis.config import DiagnoseConfig
from rad_ds.distill import DistillConfig
from rad_ds.eval.passkey import PasskeyTask
from rad_ds.selection.choice import SelectionError
from rad_ds.selection.registry import METHODS, get_strategy

DIAGNOSE_ON = ("train", "train_prompts", "builtin")


@dataclass
class StudyConfig(Config):
    RENAMED: ClassVar[dict[str, str]] = {"heldout": "test"}

    out: str | None = setting(None, "study directory: diagnosis/, teacher_cache/, placements.json, arms/, "
                                    "results.json, "
                                    "results.md, curves.png")
    model: ModelRef = section(ModelRef, path="embedded:smollm2", help={
        "path": "base model (the teacher of every student): HF dir, .gguf, embedded:smollm2",
        "dtype": "dtype of the base in the study's diagnosis, teacher cache and distillations (unset: "
                 "diagnose.model.dtype and distill.model.dtype)"})
    k: list[int] = setting([4, 8], "numbers of attention layers a student replaces (one set of students per k)")
    seeds: list[int] = setting([0, 1, 2], "training seeds: each method's student is distilled once per seed; seed s "
                                          "gives every method the same data order (paired comparisons)")
    methods: list[str] = setting(["rad", "single_skip", "even", "cosine", "random"],
                                 f"placement methods to compare, of {', '.join(METHODS)}")
    random_seeds: list[int] = setting([0, 1, 2], "draws of the random placement (each distilled with every seed)")
    report: str | None = setting(None, "a diagnosis report.json for rad/single_skip (unset: the study runs "
                                       "the diagnosis with the diagnose section's settings, timed)")
    test: str | None = setting(None, "test data (jsonl/parquet/txt or a directory; the corpus' test split): reported, "
                                     "never trained on, never used to choose layers or settings")
    split: str = setting("test", "name of the scored split in the results: test (reported, never used to choose), or "
                                 "validation when the study is used to choose a setting (benchmarks/recipe.py)")
    heldout_rows: int = setting(16, "packed test rows scored (data.seq_len tokens each)")
    heldout_prompts: int = setting(8, "test prompts for greedy-generation agreement")
    prompts: str | None = setting(None, "file of test prompts (default: the test chats up to their first "
                                        "assistant turn)")
    greedy_tokens: int = setting(32, "tokens of the teacher's greedy continuation per test prompt")
    arithmetic_samples: int = setting(100, "arithmetic problems each final student and the teacher answer (exact "
                                           "match, rad_ds.eval.arithmetic's default difficulty; 0: none)")
    passkey_contexts: list[int] = setting([512, 1024], "passkey retrieval of each final student and the teacher: "
                                                       "prompt lengths in tokens")
    passkey_depths: list[float] = setting([0.0, 0.5, 1.0], "passkey: needle depths (fractions of the filler)")
    passkey_samples: int = setting(2, "passkey: keys per context and depth (0: no passkey)")
    task_seed: int = setting(0, "seed of the arithmetic problems and pass keys (seed 1 chose arithmetic's "
                                "difficulty: keep it off the test split)")
    eval_every: int = setting(8, "score each student on the test data every N steps (its checkpoints)")
    calibration_docs: int = setting(8, "training documents cosine / kl_probe score the layers on")
    cache_k: int = setting(64, "teacher tokens per position in the shared teacher cache of the logit-KD steps "
                               "(0: every student runs the teacher online)")
    cache_dir: str | None = setting(None, "an existing teacher cache to read (default: build OUT/teacher_cache); "
                                          "studies over the same teacher and data can share one")
    diagnose_on: str = setting("train", "what the study's diagnosis scores masks on when diagnose.data and "
                                        "diagnose.prompts are unset: train (the training documents, teacher-forced), "
                                        "train_prompts (the model's continuations of the training chats' prompts) or "
                                        "builtin (continuations of the diagnosis' math + code mix)")
    diagnose: DiagnoseConfig = field(default_factory=DiagnoseConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def validate(self) -> StudyConfig:
        if not self.out:
            raise ConfigError("out is not set: give --out DIR (the study directory)")
        if not self.model.path:
            raise ConfigError("model.path is not set: give --model DIR (or embedded:smollm2)")
        if not self.methods:
            raise ConfigError("methods is empty: give e.g. --methods rad,even,random")
        try:
            drawn = [m for m in self.methods if get_strategy(m, "methods").seed == "draw"]
        except SelectionError as e:
            raise ConfigError(str(e)) from None
        choice("diagnose_on", self.diagnose_on, DIAGNOSE_ON)
        choice("split", self.split, ("test", "validation"))
        if drawn and not self.random_seeds:
            raise ConfigError(f"random_seeds is empty and methods {drawn} draw their layers: give e.g. "
                              "--random-seeds 0,1,2")
        if not self.k or any(k < 1 for k in self.k):
            raise ConfigError(f"k = {self.k}: give one or more numbers of layers >= 1, e.g. --k 4,8")
        if not self.seeds:
            raise ConfigError("seeds is empty: give e.g. --seeds 0,1,2 (>= 3 for intervals)")
        self.k, self.seeds = sorted(set(self.k)), list(dict.fromkeys(self.seeds))
        at_least(self, ("heldout_rows", "eval_every", "calibration_docs", "greedy_tokens"), 1)
        at_least(self, ("heldout_prompts", "cache_k", "arithmetic_samples", "passkey_samples"), 0)
        if self.passkey_samples:
            try:
                PasskeyTask(self.passkey_contexts, self.passkey_depths, self.passkey_samples)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        if not self.test:
            raise ConfigError("test is not set: give --test FILE (data no student trains on and nothing is chosen on, "
                              "e.g. launchers/corpus.py's test/chat.jsonl)")
        if not self.distill.data.path:
            raise ConfigError("distill.data.path is not set: give --data FILE (the training data of every student)")
        test, train = resolve_shipped(self.test), resolve_shipped(self.distill.data.path)
        if not test.exists():
            raise ConfigError(f"test: {self.test} not found")
        if test.resolve() == train.resolve():
            raise ConfigError("test is the training data: give test data that no student trains on")
        self.test = str(test)
        if self.distill.student.layers is not None or self.distill.student.report is not None:
            raise ConfigError("distill.student.layers/report are chosen per method by the study: leave them unset")
        # every student's run config must be valid as it will run (out and layers filled in per arm)
        probe = DistillConfig.from_dict(self.distill.to_dict())
        probe.out, probe.student.layers = str(Path(self.out) / "arms" / "probe"), [0]
        probe.teacher.cache = None
        probe.validate()
        return self


__all__ = ["DIAGNOSE_ON", "METHODS", "StudyConfig"]
