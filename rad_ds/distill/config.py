"""``DistillConfig``: the distillation stage's settings, a typed tree on ``rad_ds.core.config`` (YAML/JSON,
dotted overrides such as ``--train.steps=200``, ``--help`` from field docs, ``validate()``), stored in every
checkpoint. DeepSpeed's own settings stay in DeepSpeed's JSON format (``deepspeed`` names the file);
the values rad-ds derives (batch sizes, clipping, precision) are filled into its ``"auto"`` entries.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from rad_ds.core.config import (  # noqa: F401 - ConfigError, load_file, parse_overrides: part of this API
    Config,
    ConfigError,
    at_least,
    choice,
    load_file,
    parse_overrides,
    resolve_shipped,
    section,
    setting,
)
from rad_ds.core.dtypes import NAMES_32_16, to_dtype
from rad_ds.core.sections import ModelRef, WandbConfig
from rad_ds.data.config import DATA_FORMATS, LONG_DOCUMENTS, PACKING, DataConfig
from rad_ds.distill.divergences import REGISTRY as DIVERGENCES
from rad_ds.distill.divergences import Divergence
from rad_ds.distill.divergences import get as get_divergence
from rad_ds.selection.strategies import METHODS as LAYER_PLACEMENTS
from rad_ds.selection.strategies import NEEDS_REPORT as PLACEMENTS_WITH_REPORT
from rad_ds.surgery.init import INIT_MODES

KD_KINDS = (*DIVERGENCES, "none")  # the built-ins; validate() reads DIVERGENCES, so later registrations count
HIDDEN_KINDS = ("mse", "cosine", "none")
VOCAB_MODES = ("strict", "truncate")
FUSED_MODES = ("auto", "true", "false")
TRAINABLE = ("mamba", "mamba_mlp", "replaced", "all")
VOCAB_PARALLEL_MODES = ("auto", "true", "false")
LOCATIONS = ("auto", "shared", "replicated", "zero3")
SCHEDULES = ("cosine", "linear", "constant")
DTYPES = NAMES_32_16
_f = setting


@dataclass
class TeacherConfig(ModelRef):
    """The teacher (``ModelRef``: path, gguf_file, dtype; unset path: the base itself) and where it runs."""

    offload: bool = _f(False, "offload the teacher's ZeRO-3 parameters to CPU memory (teacher.location zero3)")
    deepspeed: str = _f("ds_configs/zero3_teacher.json", "DeepSpeed config of the teacher engine (location zero3)")
    location: str = _f(
        "auto",
        "shared: self-distillation with one copy of the frozen weights, inside the student engine; replicated: "
        "a whole frozen teacher per rank (no communication); zero3: a ZeRO-3 inference engine partitioned over "
        "the ranks (with teacher.offload: in CPU memory); auto: shared for self-distillation, else replicated "
        "when the teacher takes at most teacher.replicate_fraction of a device, else zero3",
    )
    replicate_fraction: float = _f(0.25, "location auto: replicate a teacher up to this fraction of device memory")
    device_memory_gb: float | None = _f(
        None, "memory per rank the location check assumes (default: the GPU's, or host RAM / local ranks)")
    cache: str | None = _f(
        None, "a teacher cache directory (launchers/teacher_cache.py): the teacher signal (top-k + tail per "
              "position) is read from it, no teacher runs; needs the cache's data, data.seq_len and temperature")


@dataclass
class StudentConfig:
    layers: list[int] | None = _f(None, "attention layers to replace with Mamba2, e.g. 22,25 or 4-6")
    report: str | None = _f(None, "diagnosis report.json to take the layers from (with student.k)")
    k: int | None = _f(None, "with student.report or student.placement: how many layers to replace")
    placement: str | None = _f(
        None, f"how to choose student.layers (with student.k): {' | '.join(LAYER_PLACEMENTS)}; rad/single_skip read "
              "student.report (docs/selection.md)")
    placement_seed: int = _f(0, "student.placement=random: the seed of the draw (kl_probe: of the probe's init)")
    init: str = _f("attention_skip", "Mamba2 init: attention_skip (MambaInLlama's mapping with out_proj zeroed: the "
                   "mixer starts as a skipped sublayer; measured best, benchmarks/results/recipe_cpu.md), attention "
                   "(the mapping as published) or random")
    seed: int = _f(0, "seed of the Mamba2 init")
    allow_all: bool = _f(False, "allow replacing every attention layer")
    trainable: str = _f(
        "mamba",
        "what trains: mamba (new mixers only, RAD), mamba_mlp (+ MLPs of replaced layers), "
        "replaced (whole replaced layers), all",
    )
    gradient_checkpointing: bool = _f(False, "recompute student activations in backward")
    vocab_parallel: str = _f(
        "auto", "split the frozen embedding and LM head by vocabulary rows over the ranks, none gathered whole "
                "(docs/cluster.md): auto (on with > 1 rank, ZeRO-3 from a safetensors base, the one-copy teacher, "
                "a frozen embedding and head and the fused loss), true (an error where it cannot be), false")


@dataclass
class LossConfig:
    kd: str = _f("forward_kl", f"logit distillation: {', '.join(KD_KINDS)}")
    kd_weight: float = _f(1.0, "weight of the logit loss")
    temperature: float = _f(1.0, "softmax temperature of the logit loss (the loss is scaled by T^2)")
    jsd_beta: float = _f(0.5, "JSD mixture weight: M = beta*teacher + (1-beta)*student")
    skew_alpha: float = _f(0.1, "skew_kl / skew_rkl (DistiLLM): KL(T || a T + (1-a) S) / KL(S || a S + (1-a) T)")
    kd_params: dict[str, str] = _f({}, "parameters of loss.kd's divergence, NAME=VALUE[,...] (e.g. beta=0.3 for "
                                       "jsd); a name given here wins over loss.jsd_beta / loss.skew_alpha")
    hidden: str = _f("mse", f"replaced-layer output loss: {', '.join(HIDDEN_KINDS)}")
    hidden_weight: float = _f(0.0, "weight of the replaced-layer loss (0 = off)")
    layerwise: bool = _f(
        False, "each replaced student layer gets the teacher's input to that layer (MOHAWK-style stage)"
    )
    ce_weight: float = _f(0.0, "weight of cross-entropy on the data (0 = off)")
    stage1_steps: int = _f(0, "two-stage recipe: the first N steps align each replaced layer alone (fed the "
                              "teacher's input to it, trained on its output with loss.hidden, weight 1, no logit "
                              "loss), then the configured losses end to end (0 = one stage)")
    chunk_tokens: int = _f(1024, "tokens per chunk when computing the logit losses (bounds memory)")
    fused: str = _f("auto", "fused LM head + loss from the final hidden states, no tokens x vocab logits "
                    "(rad_ds/distill/fused.py): auto (on wherever it applies: not with teacher.cache targets "
                    "nor a trainable ZeRO-3-partitioned head), true (on; an error where it cannot be), false")
    vocab: str = _f("strict", "strict: teacher and student vocab sizes must match; truncate: compare the "
                    "tokenizer's tokens when one vocab is a padded version of the other")

    def divergence(self) -> Divergence | None:
        """``loss.kd`` as a Divergence with its parameters (None when KD is off): ``loss.kd_params`` over the
        dedicated settings the divergence names in its ``config_keys`` (``loss.jsd_beta``, ``loss.skew_alpha``)."""
        if self.kd == "none":
            return None
        choice("loss.kd", self.kd, (*DIVERGENCES, "none"))
        params = {name: getattr(self, key) for name, key in DIVERGENCES[self.kd].config_keys.items()}
        params.update(self.kd_params)
        try:
            return get_divergence(self.kd, **params)
        except ValueError as e:
            raise ConfigError(f"loss.kd = {self.kd!r} with loss.kd_params = {self.kd_params}: {e}") from None


@dataclass
class OptimConfig:
    lr: float = _f(1e-4, "peak learning rate (AdamW)")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    betas: list[float] = _f([0.9, 0.95], "AdamW betas")
    eps: float = _f(1e-8, "AdamW epsilon")
    schedule: str = _f("cosine", f"learning-rate schedule after warmup: {', '.join(SCHEDULES)}")
    warmup_steps: int = _f(0, "linear warmup steps")
    min_lr_ratio: float = _f(0.1, "final learning rate as a fraction of optim.lr")
    grad_clip: float = _f(1.0, "clip the global gradient norm (0 = off)")


@dataclass
class TrainConfig:
    steps: int = _f(100, "optimizer steps")
    micro_batch: int = _f(1, "sequences per rank per forward")
    grad_accum: int | None = _f(None, "micro-batches per step and rank (default: from global_batch, else 1)")
    global_batch: int | None = _f(None, "sequences per optimizer step (= micro_batch x grad_accum x world)")
    seed: int = _f(0, "seed of data order, init and RNG")
    stop_after: int | None = _f(None, "stop (with a checkpoint) after this many steps in this invocation; "
                                      "for time-limited jobs, continue with --resume auto")
    dist_timeout_s: int = _f(600, "timeout of every collective (a dead rank ends the job, no hang)")


@dataclass
class CheckpointConfig:
    every: int = _f(0, "save every N steps (0: only at the end)")
    keep: int = _f(2, "keep the last K complete checkpoints")
    resume: str | None = _f(None, "auto (latest complete checkpoint in out/checkpoints, or fresh) or a path")
    export_final: bool = _f(True, "write out/final (HF directory) at the end")


@dataclass
class LogConfig:
    progress: bool = _f(True, "tqdm progress bar on rank 0")


@dataclass
class OnPolicyConfig:
    lmbda: float = _f(0.0, "fraction of steps whose completions the student generates (GKD's lambda; 0 = "
                           "off-policy only); see docs/on_policy.md")
    max_new_tokens: int = _f(64, "on-policy steps: longest completion the student generates per prompt")
    temperature: float = _f(1.0, "on-policy steps: sampling temperature of the student (0 = greedy)")
    min_prompt_tokens: int = _f(4, "on-policy steps: shortest prompt (plain-text documents have no prompt: their "
                                   "first tokens are the prompt)")
    max_prompts_per_row: int = _f(0, "on-policy steps: prompts from at most this many documents of each packed row "
                                     "(0 = every document)")


@dataclass
class DistillConfig(Config):
    # wandb settings moved from log to the wandb section every stage shares; the old names go next release
    RENAMED: ClassVar[dict[str, str]] = {"log.wandb": "wandb.enabled", "log.project": "wandb.project",
                                         "log.run_name": "wandb.run", "teacher.placement": "teacher.location"}

    out: str | None = _f(None, "run directory: checkpoints/, final/, metrics.jsonl")
    overwrite: bool = _f(False, "replace a finished run in out (its checkpoints, final/, metrics) with a new one")
    deepspeed: str = _f("ds_configs/zero3.json", "DeepSpeed config of the student engine")
    model: ModelRef = section(ModelRef, path="embedded:smollm2", dtype="float32", help={
        "path": "base model (HF dir, .gguf, embedded:smollm2) or a student checkpoint",
        "dtype": f"weights and compute dtype of the student (and of the teacher): {', '.join(DTYPES)}"})
    teacher: TeacherConfig = section(TeacherConfig, help={
        "path": "teacher model; default: the base model itself (self-distillation)",
        "dtype": "the teacher's dtype: unset or model.dtype (the teacher runs in the student's dtype)"})
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    wandb: WandbConfig = section(WandbConfig, enabled=True, help={"run": "wandb run name (default: the out "
                                                                         "directory's name)"})
    on_policy: OnPolicyConfig = field(default_factory=OnPolicyConfig)

    # -- checks ----------------------------------------------------------------------------------
    def validate(self) -> DistillConfig:
        """Fail early, naming the field and the fix, on anything that cannot run."""
        self._check_models()
        self._check_choices()
        if not self.out:
            raise ConfigError("out is not set: give --out DIR (the run directory)")
        self.data.check()
        self._check_student_layers()
        self._check_numbers()
        hid_on = self._check_losses()
        self._check_on_policy()
        self._check_cache(hid_on)
        self._check_files()
        return self

    def _check_choices(self) -> None:
        """Every setting that takes one of a list of names (YAML's true/false read as their names)."""
        for key in ("student.vocab_parallel", "loss.fused"):
            if isinstance(self.get(key), bool):
                self.set(key, str(self.get(key)).lower())
        for key, names in (("student.init", INIT_MODES), ("student.trainable", TRAINABLE),
                           ("student.vocab_parallel", VOCAB_PARALLEL_MODES), ("data.format", DATA_FORMATS),
                           ("data.packing", PACKING), ("data.long_documents", LONG_DOCUMENTS),
                           ("loss.kd", (*DIVERGENCES, "none")), ("loss.hidden", HIDDEN_KINDS),
                           ("loss.vocab", VOCAB_MODES), ("loss.fused", FUSED_MODES), ("optim.schedule", SCHEDULES)):
            choice(key, self.get(key), names)
        if self.loss.fused == "true" and self.teacher.cache:
            raise ConfigError("loss.fused=true: a teacher cache's top-k targets take the logits path; set "
                              "loss.fused=auto (or false) with teacher.cache")

    def _check_numbers(self) -> None:
        """Counts, rates and weights in their ranges."""
        at_least(self, ("data.seq_len", "train.steps", "train.micro_batch", "loss.chunk_tokens",
                        "train.dist_timeout_s"), 1)
        at_least(self, ("train.grad_accum", "train.global_batch", "train.stop_after", "data.num_proc"), 1,
                 optional=True)
        at_least(self, ("checkpoint.every", "optim.warmup_steps", "loss.stage1_steps", "optim.grad_clip",
                        "optim.weight_decay", "loss.kd_weight", "loss.hidden_weight", "loss.ce_weight"), 0)
        at_least(self, ("checkpoint.keep",), 1)
        if not self.optim.lr > 0:
            raise ConfigError(f"optim.lr = {self.optim.lr} must be > 0")
        if not 0 <= self.optim.min_lr_ratio <= 1:
            raise ConfigError(f"optim.min_lr_ratio = {self.optim.min_lr_ratio} must be in [0, 1]")
        if len(self.optim.betas) != 2 or not all(0 <= b < 1 for b in self.optim.betas):
            raise ConfigError(f"optim.betas = {self.optim.betas}: give two numbers in [0, 1), e.g. 0.9,0.95")
        if not self.loss.temperature > 0:
            raise ConfigError(f"loss.temperature = {self.loss.temperature} must be > 0")
        if not 0 < self.loss.jsd_beta < 1:
            raise ConfigError(f"loss.jsd_beta = {self.loss.jsd_beta} must be in (0, 1)")
        if not 0 < self.loss.skew_alpha < 1:
            raise ConfigError(f"loss.skew_alpha = {self.loss.skew_alpha} must be in (0, 1)")

    def _check_losses(self) -> bool:
        """At least one loss term on, and the terms' combinations that can run; returns whether the
        replaced-layer loss is on."""
        self.loss.divergence()  # the divergence checks its own parameters (loss.kd_params)
        kd_on = self.loss.kd != "none" and self.loss.kd_weight > 0
        hid_on = self.loss.hidden != "none" and self.loss.hidden_weight > 0
        if not (kd_on or hid_on or self.loss.ce_weight > 0):
            raise ConfigError(
                "every loss term is off: set loss.kd_weight > 0 (with loss.kd), loss.hidden_weight > 0 "
                "(with loss.hidden) or loss.ce_weight > 0"
            )
        if self.loss.stage1_steps:
            if self.loss.hidden == "none":
                raise ConfigError("loss.stage1_steps > 0 aligns layer outputs with loss.hidden: set loss.hidden to "
                                  "mse or cosine")
            if self.loss.stage1_steps >= self.train.steps:
                raise ConfigError(f"loss.stage1_steps = {self.loss.stage1_steps} leaves no end-to-end steps of "
                                  f"train.steps = {self.train.steps}: lower it or raise train.steps")
        if self.loss.layerwise and not hid_on:
            raise ConfigError(
                "loss.layerwise trains each replaced layer on its own output: set loss.hidden_weight > 0 "
                "(and loss.hidden mse or cosine)"
            )
        return hid_on

    def _check_files(self) -> None:
        """The checkpoint to resume from and the DeepSpeed configs exist (the shipped ones found from anywhere)."""
        if self.checkpoint.resume not in (None, "auto", "none") and not Path(self.checkpoint.resume).exists():
            raise ConfigError(
                f"checkpoint.resume: {self.checkpoint.resume} does not exist; give 'auto' or a checkpoint "
                "directory (OUT/checkpoints or a step_* directory inside it)"
            )
        for key in ("deepspeed", "teacher.deepspeed"):
            p = resolve_shipped(self.get(key))
            if not p.is_file():
                raise ConfigError(f"{key}: {self.get(key)} not found; give a DeepSpeed JSON config (see ds_configs/)")
            self.set(key, str(p))

    def _check_models(self) -> None:
        """The model and teacher sections: a base, known dtypes (the teacher runs in the student's), a location."""
        if not self.model.path:
            raise ConfigError("model.path is not set: give --model DIR (or embedded:smollm2)")
        choice("model.dtype", self.model.dtype, DTYPES)
        if self.teacher.dtype is not None:
            choice("teacher.dtype", self.teacher.dtype, DTYPES)
            if to_dtype(self.teacher.dtype) != to_dtype(self.model.dtype):
                raise ConfigError(f"teacher.dtype = {self.teacher.dtype}: the teacher runs in model.dtype "
                                  f"({self.model.dtype}); leave teacher.dtype unset")
        choice("teacher.location", self.teacher.location, LOCATIONS)
        if self.teacher.offload and self.teacher.location in ("shared", "replicated"):
            raise ConfigError(f"teacher.offload needs teacher.location=zero3 (or auto), not {self.teacher.location}")
        if not 0 < self.teacher.replicate_fraction <= 1:
            raise ConfigError(f"teacher.replicate_fraction = {self.teacher.replicate_fraction} must be in (0, 1]")
        if self.teacher.device_memory_gb is not None and not self.teacher.device_memory_gb > 0:
            raise ConfigError(f"teacher.device_memory_gb = {self.teacher.device_memory_gb} must be > 0")

    def _check_student_layers(self) -> None:
        """One source of layers: a list, a report with k, or a placement with k (student.placement needs k, excludes
        a list, and only rad / single_skip read a report: a report beside another placement would be ignored)."""
        st = self.student
        if st.layers is not None and st.report is not None:
            raise ConfigError("student.layers and student.report are both set: give one of --layers or --report/--k")
        if st.report is not None and st.k is None:
            raise ConfigError("student.report needs student.k (--k K, the number of layers to replace)")
        if st.layers is not None and not st.layers:
            raise ConfigError("student.layers is empty; give e.g. --layers 3,7")
        if st.placement is None:
            return
        choice("student.placement", st.placement, LAYER_PLACEMENTS)
        if st.layers is not None:
            raise ConfigError(f"student.layers and student.placement={st.placement} are both set: give the layers "
                              "(--layers) or a placement with --k, not both")
        if st.k is None or st.k < 1:
            raise ConfigError(f"student.placement={st.placement} needs student.k >= 1 (--k K, how many layers)")
        if st.placement in PLACEMENTS_WITH_REPORT and st.report is None:
            raise ConfigError(f"student.placement={st.placement} reads a diagnosis report: give --report "
                              "report.json (launchers/diagnose.py --k K writes one)")
        if st.placement not in PLACEMENTS_WITH_REPORT and st.report is not None:
            raise ConfigError(f"student.report is read only by student.placement rad or single_skip, not "
                              f"{st.placement}: drop --report")

    def _check_on_policy(self) -> None:
        """GKD's lambda: a fraction in [0, 1]; on-policy steps need a teacher that can score new tokens."""
        op = self.on_policy
        if not 0 <= op.lmbda <= 1:
            raise ConfigError(f"on_policy.lmbda = {op.lmbda} must be in [0, 1] (the fraction of on-policy steps)")
        at_least(self, ("on_policy.max_new_tokens", "on_policy.min_prompt_tokens"), 1)
        at_least(self, ("on_policy.max_prompts_per_row",), 0)
        if not op.temperature >= 0:
            raise ConfigError(f"on_policy.temperature = {op.temperature} must be >= 0 (0 = greedy)")
        if op.lmbda == 0:
            return
        if getattr(self.teacher, "cache", None):
            raise ConfigError("on_policy.lmbda > 0 needs a live teacher: a cached teacher (teacher.cache) cannot "
                              "score the student's new tokens; drop teacher.cache or set on_policy.lmbda=0")
        if self.loss.layerwise:
            raise ConfigError("on_policy.lmbda > 0 with loss.layerwise=true: layer-wise training compares hidden "
                              "states only, sampling adds nothing; set on_policy.lmbda=0 or loss.layerwise=false")
        if self.loss.ce_weight > 0:
            raise ConfigError("on_policy.lmbda > 0 with loss.ce_weight > 0: cross-entropy on the student's own "
                              "samples trains it to repeat itself; set loss.ce_weight=0 or on_policy.lmbda=0")

    def _check_cache(self, hidden_on: bool) -> None:
        """What a teacher read from a cache cannot do (it holds top-k logits, nothing else)."""
        cache = self.teacher.cache
        if cache is None:
            return
        if not (Path(cache) / "manifest.json").is_file():
            raise ConfigError(f"teacher.cache: {cache} is not a teacher cache (no manifest.json); build one with "
                              "launchers/teacher_cache.py")
        if self.out and Path(self.out).resolve() == Path(cache).resolve():
            raise ConfigError(f"out {self.out} is the teacher cache itself: give the run its own --out")
        if hidden_on or self.loss.layerwise:
            raise ConfigError("teacher.cache holds the teacher's logits only: set loss.hidden_weight=0 and "
                              "loss.layerwise=false, or drop teacher.cache to run the teacher online")
        if self.teacher.location != "auto" or self.teacher.offload:
            raise ConfigError(f"teacher.cache replaces the teacher engine: drop teacher.location="
                              f"{self.teacher.location} / teacher.offload")


def field_help() -> list[tuple[str, str, Any]]:
    """(dotted name, help, default) of every run setting, for ``--help``."""
    return DistillConfig.field_help()


def __getattr__(name: str):
    if name == "RunConfig":  # the stage config's former name, kept for one release
        warnings.warn("rad_ds.distill.config.RunConfig is deprecated and will be removed in the next release; "
                      "it is DistillConfig, import that", DeprecationWarning, stacklevel=2)
        return DistillConfig
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CheckpointConfig", "ConfigError", "DataConfig", "LogConfig", "LossConfig", "OnPolicyConfig",
    "OptimConfig", "DistillConfig", "StudentConfig", "TeacherConfig", "TrainConfig", "field_help", "load_file",
    "parse_overrides",
]
