"""``StudyConfig``: a placement study's settings: one base model, one k, the placement methods to compare, the
held-out data, and the one distillation recipe every student gets (a ``RunConfig``: same data, steps, tokens,
learning-rate schedule and seed for all)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rad_ds.core.config import Config, ConfigError, at_least, choice, resolve_shipped, setting
from rad_ds.diagnosis.config import DiagnoseConfig
from rad_ds.distill.config import RunConfig

METHODS = ("rad", "single_skip", "even", "random", "cosine", "kl_probe")


@dataclass
class StudyConfig(Config):
    out: str | None = setting(None, "study directory: diagnosis/, teacher_cache/, arms/<method>/, results.json, "
                                    "results.md, curves.png")
    model: str = setting("embedded:smollm2", "base model (the teacher of every student): HF dir, .gguf, "
                                             "embedded:smollm2")
    k: int = setting(4, "attention layers each student replaces")
    methods: list[str] = setting(["rad", "single_skip", "even", "cosine", "random"],
                                 f"placement methods to compare, of {', '.join(METHODS)}")
    random_seeds: list[int] = setting([0, 1, 2], "seeds of the random placement (one student each)")
    report: str | None = setting(None, "a diagnosis report.json for rad/single_skip (unset: the study runs "
                                       "the diagnosis with the diagnose section's settings, timed)")
    heldout: str | None = setting(None, "held-out data (jsonl/parquet/txt or a directory): never trained on, "
                                        "never used to choose layers")
    heldout_rows: int = setting(24, "packed held-out rows scored (data.seq_len tokens each)")
    heldout_prompts: int = setting(16, "held-out prompts for greedy-generation agreement")
    prompts: str | None = setting(None, "file of held-out prompts (default: the held-out chats up to their first "
                                        "assistant turn)")
    greedy_tokens: int = setting(32, "tokens of the teacher's greedy continuation per held-out prompt")
    eval_every: int = setting(8, "score each student on the held-out data every N steps (its checkpoints)")
    calibration_docs: int = setting(8, "training documents cosine / kl_probe score the layers on")
    cache_k: int = setting(64, "teacher tokens per position in the shared teacher cache of the logit-KD steps "
                               "(0: every student runs the teacher online)")
    cache_dir: str | None = setting(None, "an existing teacher cache to read (default: build OUT/teacher_cache); "
                                          "studies over the same teacher and data can share one")
    diagnose_on: str = setting("train", "what the study's diagnosis scores masks on when diagnose.prompts is unset: "
                                        "train (prompts from the training data: chats up to their first answer, "
                                        "shuffled with diagnose.seed) or builtin (the diagnosis' math + code mix)")
    diagnose: DiagnoseConfig = field(default_factory=DiagnoseConfig)
    distill: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> StudyConfig:
        if not self.out:
            raise ConfigError("out is not set: give --out DIR (the study directory)")
        if not self.methods:
            raise ConfigError("methods is empty: give e.g. --methods rad,even,random")
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ConfigError(f"methods: {bad[0]!r} is not a placement method; use {', '.join(METHODS)}")
        choice("diagnose_on", self.diagnose_on, ("train", "builtin"))
        if "random" in self.methods and not self.random_seeds:
            raise ConfigError("random_seeds is empty: give e.g. --random-seeds 0,1,2")
        at_least(self, ("k", "heldout_rows", "eval_every", "calibration_docs", "greedy_tokens"), 1)
        at_least(self, ("heldout_prompts", "cache_k"), 0)
        if not self.heldout:
            raise ConfigError("heldout is not set: give --heldout FILE (data no student trains on, e.g. "
                              "launchers/corpus.py's heldout split)")
        if not self.distill.data.path:
            raise ConfigError("distill.data.path is not set: give --data FILE (the training data of every student)")
        heldout, train = resolve_shipped(self.heldout), resolve_shipped(self.distill.data.path)
        if not heldout.exists():
            raise ConfigError(f"heldout: {self.heldout} not found")
        if heldout.resolve() == train.resolve():
            raise ConfigError("heldout is the training data: give held-out data that no student trains on")
        self.heldout = str(heldout)
        if self.distill.student.layers is not None or self.distill.student.report is not None:
            raise ConfigError("distill.student.layers/report are chosen per method by the study: leave them unset")
        # every student's run config must be valid as it will run (out and layers filled in per arm)
        probe = RunConfig.from_dict(self.distill.to_dict())
        probe.out, probe.student.layers = str(Path(self.out) / "arms" / "probe"), [0]
        probe.teacher.cache = None
        probe.validate()
        return self


__all__ = ["METHODS", "StudyConfig"]
