"""``DiagnoseConfig``: the diagnosis stage's settings (model, k values, prompts, search budget)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from rad_ds.core.config import Config, ConfigError, at_least, choice, resolve_shipped, section, setting
from rad_ds.core.dtypes import NAMES as DTYPE_NAMES
from rad_ds.core.sections import ModelRef, WandbConfig
from rad_ds.data.sources import DataError, resolve_files

from .signals import SIGNALS

OBJECTIVES = ("estimated", "measured")
SOURCES = ("auto", "documents", "continuations", "both")


@dataclass
class DiagnoseConfig(Config):
    # the model and wandb sections; the old names go next release
    RENAMED: ClassVar[dict[str, str]] = {"gguf_file": "model.gguf_file", "dtype": "model.dtype",
                                         "wandb_project": "wandb.project", "wandb_run": "wandb.run"}

    model: ModelRef = section(ModelRef, help={"dtype": f"{', '.join(DTYPE_NAMES)} (unset: bf16 on CUDA, fp32 on CPU)"})
    out: str | None = setting(None, "output directory (report.json, redundancy.png, cost_model.json)")
    overwrite: bool = setting(False, "replace a finished diagnosis in out")
    k: list[int] = setting([2, 4, 8], "numbers of attention layers to skip, e.g. 2,4,8")
    data: str | None = setting(None, "the user's data (the distillation data: jsonl/parquet/json/txt with a 'messages' "
                                     "or text field): masks are scored on its documents' counted positions, "
                                     "teacher-forced (unset: on continuations of the prompts)")
    source: str = setting("auto", "what masks are scored on: documents (data, teacher-forced), continuations (the "
                                  "model's greedy continuations of prompts), both; auto: documents when data is "
                                  "set, else continuations")
    signal: str = setting("expected", "the acceptance signal: "
                          + "; ".join(f"{n}: {c.help}" for n, c in SIGNALS.items()))
    temperature: float = setting(1.0, "sampling temperature of the expected signal (and of the sampling re-check)")
    tokens: int = setting(2048, "counted positions of data the search scores masks on (documents source; "
                                "benchmarks/results/diagnosis_stability_cpu.md: the choice per budget)")
    held_out_tokens: int = setting(1024, "further positions, from other documents of data, on which the chosen masks "
                                         "and the baselines are scored after the search (0: none)")
    seq_len: int = setting(256, "tokens per document window of data")
    prompts: str | None = setting(None, "jsonl/parquet/json/csv/txt with a 'messages' or text field for the "
                                        "continuations and the re-check (unset: prompts from data when it is set, "
                                        "else the built-in math + code mix)")
    num_prompts: int = setting(8, "prompts the search scores masks on (continuations source; <= 0: all of a prompts "
                                  "file)")
    held_out: int = setting(8, "further prompts, disjoint from the search's, on which the chosen masks and the "
                               "baselines are scored after the search (continuations source; 0: none)")
    chat: bool = setting(True, "apply the chat template (--no-chat: plain prompts)")
    max_new_tokens: int = setting(64, "tokens generated per prompt")
    draft_len: int = setting(4, "tokens drafted per round")
    trials: int = setting(12, "Bayesian-optimisation (optuna TPE) trials per k (0: none; the default fits k = 2, 4, 8 "
                              "in "
                                  "under 10 min on 2 CPU cores at the default tokens: raise it on a GPU)")
    swap_evals: int = setting(16, "new masks the swap search (one layer out, one in, around the best mask) may "
                                  "score per k (0: no swap search)")
    seed: int = setting(0, "seed of the prompts and the search")
    objective: str = setting("estimated", "estimated: exact acceptance x cost model (fast); measured: real "
                                          "decoder wall-clock (depends on the machine)")
    cost_model: str = setting("weights", "weights (analytic, memory-bound: the same on every machine), measured "
                                         "(timed here: the choice can differ between machines), or a "
                                         "cost_model.json")
    greedy_baseline: bool = setting(False, "run the greedy build-up baseline (the search starts from the best of "
                                          "it, TPE and the single-skip top-k)")
    bootstrap: int = setting(1000, "bootstrap resamples over prompts for the score intervals (0: none)")
    recheck_prompts: int = setting(4, "prompts per rank for the real-decoder re-check of the chosen sets (0: skip)")
    wandb: WandbConfig = section(WandbConfig)
    progress: bool = setting(True, "tqdm progress bar on rank 0")

    def validate(self) -> "DiagnoseConfig":
        if not self.model.path:
            raise ConfigError("model.path is not set: give --model DIR (or embedded:smollm2)")
        if not self.out:
            raise ConfigError("out is not set: give --out DIR (report.json, redundancy.png)")
        if not self.k:
            raise ConfigError("k is empty; give e.g. --k 2,4,8")
        at_least(self, ("max_new_tokens", "draft_len", "tokens", "seq_len"), 1)
        at_least(self, ("trials", "swap_evals", "held_out", "held_out_tokens", "bootstrap", "recheck_prompts"), 0)
        if not self.prompts and not self.data and self.num_prompts < 1:
            raise ConfigError(f"num_prompts = {self.num_prompts}: the built-in prompts need a count >= 1 "
                              "(<= 0 means all rows of a --prompts file)")
        choice("objective", self.objective, OBJECTIVES)
        choice("signal", self.signal, tuple(SIGNALS))
        choice("source", self.source, SOURCES)
        if self.source in ("documents", "both") and not self.data:
            raise ConfigError(f"source = {self.source}: set data (--data FILE, the distillation data) to score "
                              "masks on its documents")
        if self.data:
            found = resolve_shipped(self.data)
            try:
                if resolve_files(str(found))[0] != "hub":
                    self.data = str(found)
            except DataError:
                raise ConfigError(f"data: {self.data} not found; give the distillation data (jsonl/parquet/json/txt "
                                  "file or directory, or a hub dataset name)") from None
        if not self.temperature > 0:
            raise ConfigError(f"temperature = {self.temperature}: give a value > 0 (1.0: the model's own distribution)")
        if self.model.dtype is not None:
            choice("model.dtype", self.model.dtype, DTYPE_NAMES)
        self.k = sorted(set(self.k))
        return self

    @property
    def scored_on(self) -> str:
        """documents, continuations or both (``source`` with ``auto`` resolved)."""
        if self.source != "auto":
            return self.source
        return "documents" if self.data else "continuations"


__all__ = ["DiagnoseConfig", "OBJECTIVES"]
