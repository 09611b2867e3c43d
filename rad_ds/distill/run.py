"""The distillation loop: a frozen teacher engine and a training student engine fed the same batch.

One step = ``grad_accum`` micro-batches per rank; for each, a teacher forward (``no_grad``) and a student
forward/backward. Loss terms are sums over tokens divided by the token counts of the whole global batch,
so a step computes the same loss and gradient on any number of ranks and micro-batches (up to
floating-point summation order). Before the optimizer applies a step, the step's loss terms are summed
over ranks and checked: a NaN/inf loss stops the run with the last good checkpoint as ``latest``.

``DistillRun`` is one run on one rank: ``setup`` (resume point, models, data, engines, taps), ``resume``
(engine state, sampler, RNG, metrics), ``fit`` (the step loop), ``finish`` (export, summary). The NaN/inf
guard, fault injection, metrics tracking and checkpoint cadence are callbacks on the loop (``callbacks``).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from rad_ds.core.dist import broadcast_object, init_distributed, local_world_size, release_env
from rad_ds.core.host_memory import return_freed_memory
from rad_ds.core.io import ProvisionalDir
from rad_ds.core.outputs import Output, claim, read_marker
from rad_ds.data import DistillLoader, data_fingerprint, load_packed, tokenizer_fingerprint
from rad_ds.data.teacher_store import SparseTargets, TeacherCacheStore
from rad_ds.engine.engines import fill_ds_config, load_ds_config, plan_batch, replicated_teacher, teacher_engine
from rad_ds.engine.heads import FinalHidden, fused_ok, gathered, head_param
from rad_ds.engine.identity import teacher_identity
from rad_ds.models.vocab_parallel import VocabShard

from . import checkpoint as ckpt
from .build import build_models, check_fingerprint, read_sources, teacher_gguf
from .callbacks import Callback, Checkpointing, FaultInjection, NonFiniteGuard, Tracking
from .checkpoint import to_universal
from .config import ConfigError, DistillConfig
from .export import export_checkpoint
from .fused import fused_loss_sums
from .losses import ce_loss_sum, hidden_loss_sum, kd_loss_sum, sparse_kd_loss_sum
from .on_policy import OnPolicy, generation_model
from .optim import student_engine
from .summary import RunSummary
from .taps import LayerTaps, tap_outputs
from .tracking import Tracker, peak_memory_mb, read_metrics, truncate_metrics
from .vocab_parallel import vocab_parallel_loss_sums

logger = logging.getLogger(__name__)


@dataclass
class DistillResult:
    out: Path
    start_step: int
    steps: int
    losses: list[dict] = field(default_factory=list)  # one row per step run in this call (rank 0: all ranks agree)
    checkpoint: Path | None = None
    export: Path | None = None
    summary: dict = field(default_factory=dict)
    engine: object = field(default=None, repr=False)  # the student engine (for inspection after the run)


@dataclass
class FusedHeads:
    """What the fused loss takes instead of the two models' logits: final hidden states ``(b, l, H)`` and
    full (gathered) head weights ``(V, H)``; the teacher's may be None when KD is off."""

    s_hidden: torch.Tensor
    s_weight: torch.Tensor
    t_hidden: torch.Tensor | None
    t_weight: torch.Tensor | None
    shard: VocabShard | None = None  # the weights are these rows of the vocabulary (student.vocab_parallel)


class LossComputer:
    """The step objective from teacher/student outputs, as per-term sums (normalised by the caller)."""

    def __init__(self, loss_cfg, replaced: list[int], vocab_limit: int | None):
        self.cfg, self.layers, self.vocab_limit = loss_cfg, replaced, vocab_limit
        self.kd_on = loss_cfg.kd != "none" and loss_cfg.kd_weight > 0
        self.divergence = loss_cfg.divergence() if self.kd_on else None  # loss.kd with its parameters
        self.hidden_on = loss_cfg.hidden != "none" and loss_cfg.hidden_weight > 0
        self.ce_on = loss_cfg.ce_weight > 0

    @property
    def needs_head(self) -> bool:
        """Whether the step reads the LM head (a logit loss is on)."""
        return self.kd_on or self.ce_on

    def sums(self, s_logits, t_logits, mb, s_outputs: dict | None, t_outputs: dict | None,
             sparse: SparseTargets | None = None, heads: FusedHeads | None = None) -> dict:
        """``*_outputs``: replaced layer -> that layer's output (for the hidden-state loss); ``sparse``: the
        teacher as top-k + tail targets (a teacher cache) instead of ``t_logits``; ``heads``: hidden states
        and head weights instead of both logits (the fused loss, fused.py)."""
        c = self.cfg
        out = {}
        if heads is not None:
            if self.needs_head:
                lim = self.vocab_limit
                s_w, t_w = heads.s_weight, heads.t_weight
                if lim is not None:
                    s_w, t_w = s_w[:lim], (t_w[:lim] if t_w is not None else None)
                loss_sums = (fused_loss_sums if heads.shard is None
                             else partial(vocab_parallel_loss_sums, shard=heads.shard))
                out.update(loss_sums(
                    heads.s_hidden, s_w, heads.t_hidden, t_w, mb.target,
                    mb.input_ids if self.ce_on else None, self.divergence, c.temperature, None, c.chunk_tokens))
            if self.hidden_on:
                out["hidden"] = sum(hidden_loss_sum(s_outputs[i], t_outputs[i], mb.token, c.hidden)
                                    for i in self.layers)
            return {k: out[k] for k in ("kd", "hidden", "ce") if k in out}
        if self.vocab_limit is not None:
            s_logits = s_logits[..., :self.vocab_limit]
            t_logits = t_logits[..., :self.vocab_limit] if t_logits is not None else None
        if self.kd_on:
            if sparse is not None:
                out["kd"] = sparse_kd_loss_sum(s_logits, sparse.indices, sparse.logp, sparse.tail, mb.target,
                                               self.divergence, c.temperature, None, c.chunk_tokens)
            else:
                out["kd"] = kd_loss_sum(s_logits, t_logits, mb.target, self.divergence, c.temperature, None,
                                       c.chunk_tokens)
        if self.hidden_on:
            out["hidden"] = sum(hidden_loss_sum(s_outputs[i], t_outputs[i], mb.token, c.hidden)
                                for i in self.layers)
        if self.ce_on:
            out["ce"] = ce_loss_sum(s_logits, mb.input_ids, mb.target, c.chunk_tokens)
        return out

    def weighted(self, sums: dict, n_target: int, n_token: int):
        """Per-token normalised terms and their weighted total (tensors or floats alike)."""
        c = self.cfg
        terms = {}
        if "kd" in sums:
            terms["kd"] = sums["kd"] / max(n_target, 1)
        if "hidden" in sums:
            terms["hidden"] = sums["hidden"] / (max(n_token, 1) * len(self.layers))
        if "ce" in sums:
            terms["ce"] = sums["ce"] / max(n_target, 1)
        w = {"kd": c.kd_weight, "hidden": c.hidden_weight, "ce": c.ce_weight}
        total = sum(w[k] * v for k, v in terms.items())
        return total, terms


def _quiet():
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+` is deprecated.*")
    warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed.*")
    for name in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _resume_point(cfg: DistillConfig, root: Path, rank: int) -> Path | None:
    """The checkpoint to resume from: none, the newest under ``root`` that verifies (``auto``), or the one
    ``checkpoint.resume`` names, verified. Rank 0 checks the files; every rank gets its answer (collective)."""
    resume = cfg.checkpoint.resume
    if resume in (None, "none"):
        existing = ckpt.latest_checkpoint(root) or (ckpt.complete_tags(root) or [None])[-1]
        if existing is not None:
            raise ConfigError(
                f"--out {cfg.out} already holds checkpoint {existing.name}; pass --resume auto to continue that run, "
                "--overwrite to start it again, or choose a new --out"
            )
        return None
    found, err = None, None
    if rank == 0:
        try:
            if resume == "auto":
                found, rejected = ckpt.newest_verified(root)
                for line in rejected:
                    logger.warning("%s; trying an earlier one", line)
                if found is None and rejected:
                    raise ckpt.CheckpointError(f"no checkpoint in {root} verifies ({rejected[0]}); pass --overwrite "
                                               "to start the run again")
                if found is None:
                    logger.info("no complete checkpoint in %s: starting fresh", root)
                elif rejected:
                    logger.warning("resuming from %s, the newest checkpoint that verifies", found)
            else:
                found = ckpt.resolve_checkpoint(resume)
                problem = ckpt.verify_checkpoint(found)
                if problem is not None:
                    raise ckpt.CheckpointError(f"checkpoint {found} does not verify: {problem}; give an earlier "
                                               "step_* directory, or --resume auto")
        except ckpt.CheckpointError as e:
            err = str(e)
    found, err = broadcast_object((found, err))
    if err is not None:
        raise ckpt.CheckpointError(err)
    return found


def distill(cfg: DistillConfig) -> DistillResult:
    """Run (or resume) a distillation as described by ``cfg``; collective: call it on every rank."""
    cfg.validate()
    _quiet()
    if not torch.cuda.is_available():
        return_freed_memory()  # on a CPU the host is the device: gathered layers give their memory back
    info = init_distributed(cfg.train.dist_timeout_s, deepspeed=True)
    try:
        # a run that fails before its first step (bad --data, --layers, --model) leaves no --out behind
        with ProvisionalDir(cfg.out, owner=info.rank == 0) as out_dir, \
                claim(cfg.out, "distill", overwrite=cfg.overwrite, rank=info.rank,
                      resume=cfg.checkpoint.resume not in (None, "none")) as output:
            return DistillRun(cfg, info, out_dir, output).run()
    finally:
        release_env()


class DistillRun:
    """One run on one rank; ``run()`` is setup, resume, fit, finish. Callbacks see it as ``callback.run``."""

    def __init__(self, cfg: DistillConfig, info, out_dir: ProvisionalDir, output: Output):
        self.cfg, self.out_dir, self.output = cfg, out_dir, output
        self.rank, self.world = info.rank, info.world
        self.local_world = local_world_size(info.world)
        self.out = Path(cfg.out)
        self.root = self.out / "checkpoints"
        self.callbacks: list[Callback] = []
        self.rows: list[dict] = []
        self.start_step = self.tokens_seen = self.tokens_run = 0
        self.elapsed = 0.0

    def run(self) -> DistillResult:
        done = self.setup()
        if done is not None:
            return done
        self.resume()
        # the tracker appends to metrics.jsonl, so it opens only after resume() has truncated it; at a step's
        # end the row is logged, then the kill point, then the checkpoint is saved
        tracker = Tracker(self.out, self.cfg, enabled=self.rank == 0, total_steps=self.cfg.train.steps,
                          start_step=self.start_step)
        for cb in (NonFiniteGuard(), FaultInjection(), Tracking(tracker),
                   Checkpointing(self.cfg.checkpoint.every, self.cfg.train.steps)):
            self.add_callback(cb)
        self.fit()
        return self.finish()

    def add_callback(self, cb: Callback) -> None:
        cb.run = self
        self.callbacks.append(cb)

    def _hook(self, name: str, *args) -> None:
        for cb in self.callbacks:
            getattr(cb, name)(*args)

    # -- setup ---------------------------------------------------------------------------------------------

    def setup(self) -> DistillResult | None:
        """Build everything a step needs; a result (and nothing built) when the checkpoint is already done."""
        cfg = self.cfg
        self.plan = plan_batch(cfg.train, self.world)
        if self.output.state == "complete":  # finished (final/ and summary.json written), claimed with --resume
            done = int((read_marker(self.out) or {}).get("steps") or 0) if self.rank == 0 else 0
            if self.world > 1:
                done = broadcast_object(done)
            if done >= cfg.train.steps or not done:
                if self.rank == 0:
                    logger.info("%s holds a finished run of %d steps: nothing to do", self.out, done)
                final = self.out / "final"
                return DistillResult(self.out, cfg.train.steps, cfg.train.steps,
                                     checkpoint=ckpt.latest_checkpoint(self.root),
                                     export=final if final.is_dir() else None)
            self.output.reopen()  # asked for more steps than the finished run made: it goes on
        self.tag_dir = _resume_point(cfg, self.root, self.rank)  # rank 0 verifies, every rank gets its choice
        if self.tag_dir is None and self.output.state == "unfinished" and (self.out / "summary.json").is_file():
            raise ConfigError(f"--out {self.out} holds a run that has no checkpoint left to continue from; pass "
                              "--overwrite to start it again, or choose a new --out")
        self.state = ckpt.read_state(self.tag_dir) if self.tag_dir is not None else None
        if self.state is not None and self.state["step"] >= cfg.train.steps:
            # the last step was saved but the run stopped before final/ and summary.json: finish them
            if self.rank == 0:
                logger.info("checkpoint %s is at step %d >= train.steps=%d: finishing the run (export, summary)",
                            self.tag_dir, self.state["step"], cfg.train.steps)
            return self.finish_only()
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
        torch.distributed.barrier()
        self._ds_configs()
        self._build_models()
        self._build_data()
        self._build_engines()
        self.losses = LossComputer(cfg.loss, self.models.replaced_layers, self.models.vocab_limit)
        # the two-stage recipe's first stage: each replaced layer alone, fed the teacher's input, on its output
        self.stage1_steps = cfg.loss.stage1_steps
        stage1 = dataclasses.replace(cfg.loss, kd="none", kd_weight=0.0, ce_weight=0.0, hidden_weight=1.0,
                                     layerwise=True)
        self.stage1_losses = LossComputer(stage1, self.models.replaced_layers, self.models.vocab_limit)
        self.layerwise_now = cfg.loss.layerwise
        # GKD's lambda: on some steps the student writes the completions it is trained on (on_policy.py)
        self.on_policy = OnPolicy(cfg.on_policy, cfg.train.seed, generation_model(self.student), self.tok,
                                  self.device, self.rank, self.world, self.models.vocab_limit,
                                  after=self.stage1_steps)
        self.t_taps = self.s_taps = None
        self.one_copy = self.models.location.kind == "shared"  # the teacher stream runs inside the student engine
        if (self.losses.hidden_on or self.stage1_steps) and not self.one_copy:
            layers = self.models.replaced_layers
            layerwise = cfg.loss.layerwise or bool(self.stage1_steps)
            self.t_taps = LayerTaps(self.teacher, layers, capture_inputs=layerwise)
            feed = {i: partial(self._teacher_input, i) for i in layers} if layerwise else None
            self.s_taps = LayerTaps(self.student, layers, feed=feed)
        self.fused = self._use_fused()
        self.s_final = self.t_final = None
        if self.fused and not self.one_copy:  # final hidden states from hooks on the final norms
            self.s_final = FinalHidden(self.student)
            self.t_final = FinalHidden(self.teacher) if self.teacher is not None else None
        return None

    def _student_head(self) -> torch.nn.Parameter:
        module = self.student.module
        return module.head_weight() if self.one_copy else head_param(module)

    def _use_fused(self) -> bool:
        """loss.fused resolved for this run: the fused head + loss wherever it can serve (config.py)."""
        mode = self.cfg.loss.fused
        if mode == "false":
            return False
        why = None
        if self.cache is not None:
            why = "the teacher cache's top-k targets take the logits path"
        elif not fused_ok(self.student.module if not self.one_copy else self.student.module.student):
            why = "the LM head trains and is ZeRO-3-partitioned (its gradient must go through DeepSpeed's hooks)"
        if why is not None:
            if mode == "true":
                raise ConfigError(f"loss.fused=true: {why}; set loss.fused=auto or false")
            if self.rank == 0:
                logger.info("loss.fused=auto: logits path (%s)", why)
            return False
        if self.rank == 0:
            logger.info("fused LM head + loss: no tokens x vocab logits (loss.chunk_tokens=%d)",
                        self.cfg.loss.chunk_tokens)
        return True

    def _teacher_input(self, i: int) -> torch.Tensor | None:
        return self.t_taps.inputs[i].detach() if self.layerwise_now else None

    def losses_at(self, step: int) -> LossComputer:
        """The objective of ``step``: the recipe's layer-wise first stage, then the configured losses."""
        return self.stage1_losses if step <= self.stage1_steps else self.losses

    def _ds_configs(self) -> None:
        """The filled DeepSpeed configs of both engines (the models are created under them)."""
        cfg, plan = self.cfg, self.plan
        self.sources = src = read_sources(cfg)  # configs and tokenizers only: every check before any weights
        self.s_ds = fill_ds_config(load_ds_config(cfg.deepspeed), plan, cfg.model.dtype, cfg.deepspeed,
                                   grad_clip=cfg.optim.grad_clip or None, model_config=src.base_config)
        self.t_ds = fill_ds_config(load_ds_config(cfg.teacher.deepspeed), plan, cfg.model.dtype,
                                   cfg.teacher.deepspeed, offload_params=cfg.teacher.offload, optimizer=False,
                                   model_config=src.teacher_config)

    def _build_models(self) -> None:
        cfg, state = self.cfg, self.state
        torch.manual_seed(cfg.train.seed)
        self.models = models = build_models(cfg, self.s_ds, self.t_ds, self.world, self.local_world,
                                            sources=self.sources)
        if state is not None:
            check_fingerprint(state.get("fingerprint", {}), models.fingerprint, self.tag_dir)
        if self.rank == 0:
            logger.info("teacher location: %s (%s)", models.location.kind, models.teacher_path)
        if cfg.student.gradient_checkpointing:
            student = getattr(models.student, "student", models.student)
            if hasattr(student, "activation_checkpointing_enable"):  # transformers >= 5.x name
                student.activation_checkpointing_enable({"use_reentrant": False})
            else:  # pragma: no cover
                student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.tok = models.tokenizer

    def _build_data(self) -> None:
        cfg, state, plan = self.cfg, self.state, self.plan
        self.packed = load_packed(cfg.data, self.tok, self.out / "data")
        self.data_fp = data_fingerprint(self.packed)
        if state is not None and state.get("data_fingerprint") not in (None, self.data_fp):
            raise ConfigError(
                f"checkpoint {self.tag_dir} was trained on other data ({state.get('data_rows')} packed rows); now "
                f"{len(self.packed)} rows: resume with the same --data, data.seq_len and data.packing, or start a "
                "new --out"
            )
        self.loader = DistillLoader(self.packed, plan.micro_batch, plan.grad_accum, self.rank, self.world,
                                    cfg.train.seed, cfg.data.shuffle)
        self.cache = self._open_cache() if cfg.teacher.cache else None

    def _open_cache(self) -> TeacherCacheStore:
        """The teacher cache, checked against this run: teacher, tokenizer, packed rows, temperature, vocab."""
        cfg, src = self.cfg, self.sources
        store = TeacherCacheStore.open(cfg.teacher.cache)
        store.check({
            **teacher_identity(src.teacher_path, teacher_gguf(cfg, src), src.teacher_config),
            "tokenizer": tokenizer_fingerprint(self.tok), "seq_len": cfg.data.seq_len, "rows": len(self.packed),
            "data": self.data_fp, "temperature": float(cfg.loss.temperature),
            "vocab_size": int(src.base_config.vocab_size),
        })
        if self.rank == 0:
            logger.info("teacher signal from the cache %s (k=%d, %s values)", store.root, store.k,
                        store.fingerprint["values_dtype"])
        return store

    def _build_engines(self) -> None:
        cfg, state, tag_dir, s_ds = self.cfg, self.state, self.tag_dir, self.s_ds
        self.load_dir, self.universal = tag_dir, None
        if state is not None and state.get("world") != self.world:
            # ZeRO shards are per rank: DeepSpeed's universal format re-partitions them for this world size
            if self.rank == 0:
                logger.warning("checkpoint %s was saved by %s ranks, resuming on %d: converting it (universal "
                               "format); the data order continues exactly", tag_dir, state.get("world"), self.world)
            self.universal = to_universal(tag_dir, self.root / "universal", self.rank)
            self.load_dir = self.universal
            s_ds.setdefault("checkpoint", {})["load_universal"] = True
        self.student = student_engine(self.models.student, s_ds, cfg.optim, cfg.train.steps)
        self.device = self.student.device
        kind, teacher = self.models.location.kind, self.models.teacher
        self.teacher = None if kind in ("shared", "cache") else (
            teacher_engine(teacher, self.t_ds) if kind == "zero3" else replicated_teacher(teacher, self.device))

    # -- resume --------------------------------------------------------------------------------------------

    def resume(self) -> None:
        """Continue from the checkpoint, if any (collective), and record the run config."""
        state, tag_dir = self.state, self.tag_dir
        self.last_saved = tag_dir if state is not None else None
        if state is not None:
            ckpt.load_engine_state(self.student, self.load_dir, universal=self.universal is not None,
                                   strict=state.get("frozen_in_checkpoint", True))
            if self.universal is not None:
                torch.distributed.barrier()
                if self.rank == 0:
                    shutil.rmtree(self.universal.parent, ignore_errors=True)
            self.loader.load_state_dict(state["sampler"])
            ckpt.restore_rng(tag_dir, self.rank, self.world)
            self.start_step, self.tokens_seen = int(state["step"]), int(state["tokens"])
            if self.rank == 0:
                logger.info("resumed from %s at step %d", tag_dir, self.start_step)
        if self.rank == 0:
            # rows past the checkpoint (or every row, starting afresh) belong to a run that was cut short
            truncate_metrics(self.out / "metrics.jsonl", self.start_step)
            self.cfg.save(self.out / "run_config.json")

    # -- the loop ------------------------------------------------------------------------------------------

    def fit(self) -> None:
        t_run = time.perf_counter()
        self.out_dir.keep()
        self.output.commit()  # set up: a run that --overwrite replaces is dropped now
        try:
            for step in range(self.start_step + 1, self.cfg.train.steps + 1):
                row = self.train_step(step)
                self.rows.append(row)
                self._hook("on_step_end", step, row)
                if self.stop_reached(step):
                    break
        except BaseException as e:
            self._hook("on_error", e)
            raise
        self.elapsed = time.perf_counter() - t_run

    def stop_reached(self, step: int) -> bool:
        stop_after = self.cfg.train.stop_after
        return stop_after is not None and step - self.start_step >= stop_after

    def train_step(self, step: int) -> dict:
        """One optimizer step over the step's micro-batches; its metrics row."""
        t0 = time.perf_counter()
        self._hook("on_step_start", step)
        self.layerwise_now = self.losses_at(step).cfg.layerwise  # before generation: the feed hooks read it
        batch = self.on_policy.maybe_replace(step, self.loader.next_step())
        lr = self.student.get_lr()[0]
        acc = {}
        for a, mb in enumerate(batch.micro):
            for k, v in self.micro_step(step, mb, batch).items():
                acc[k] = acc.get(k, 0.0) + v.detach().float()
            if a < len(batch.micro) - 1:
                self.student.step()
        loss, terms = self.global_loss(acc, batch, self.losses_at(step))
        self._hook("pre_optim_step", step, loss, terms)
        self.student.step()
        grad_norm = self.student.get_global_grad_norm()  # None where DeepSpeed did not compute it
        grad_norm = float(grad_norm) if grad_norm is not None else None
        self._hook("post_optim_step", step, grad_norm)
        dt = time.perf_counter() - t0
        self.tokens_seen += batch.n_token
        self.tokens_run += batch.n_token
        return {"step": step, "loss": loss, **terms, "lr": lr, "grad_norm": grad_norm, "tokens": self.tokens_seen,
                "tokens_per_s": batch.n_token / dt, "step_s": dt, "mem_mb": peak_memory_mb(),
                **self.on_policy.metrics(), **self.stage_metrics(step)}

    def stage_metrics(self, step: int) -> dict:
        return {"stage": 1 if step <= self.stage1_steps else 2} if self.stage1_steps else {}

    def micro_step(self, step: int, mb, batch) -> dict:
        """Teacher forward, student forward/backward of one micro-batch; its loss sums."""
        mb.input_ids, mb.target, mb.token, mb.position_ids = (
            x.to(self.device) for x in (mb.input_ids, mb.target, mb.token, mb.position_ids))
        losses = self.losses_at(step)  # train_step set self.layerwise_now from it
        # the cache gives the logit targets (in a two-stage run: of the second stage)
        cached = self.cache is not None and step > self.stage1_steps
        sparse = self.cache.targets(mb.rows, mb.target) if cached else None
        if self.fused:
            sums = self._fused_sums(losses, mb)
        elif self.one_copy:
            out = self.student(mb.input_ids, position_ids=mb.position_ids, layerwise=self.layerwise_now,
                               teacher=sparse is None)
            sums = losses.sums(out.logits, out.teacher_logits, mb, out.student_outputs, out.teacher_outputs,
                               sparse=sparse)
        elif sparse is not None:
            s_logits = self.student(mb.input_ids, position_ids=mb.position_ids, use_cache=False).logits
            sums = losses.sums(s_logits, None, mb, None, None, sparse=sparse)
        else:
            with torch.no_grad():
                t_logits = self.teacher(mb.input_ids, position_ids=mb.position_ids, use_cache=False).logits
            s_logits = self.student(mb.input_ids, position_ids=mb.position_ids, use_cache=False).logits
            sums = losses.sums(s_logits, t_logits, mb, tap_outputs(self.s_taps), tap_outputs(self.t_taps))
        for cb in self.callbacks:
            sums = cb.on_loss(step, sums)
        total, _ = losses.weighted(sums, batch.n_target, batch.n_token)
        # DeepSpeed divides by grad_accum and averages gradients over ranks: undo both so the
        # gradient is that of the global per-token mean
        self.student.backward(total * (self.plan.grad_accum * self.world))
        for taps in (self.t_taps, self.s_taps):
            if taps is not None:
                taps.clear()
        return sums

    def _fused_sums(self, losses: LossComputer, mb) -> dict:
        """The micro-batch's loss sums through the fused head + loss: the models return final hidden states
        (one-copy: ``hidden=True``; engines: a hook on the final norm, ``logits_to_keep=1``)."""
        ids, pos = mb.input_ids, mb.position_ids
        s_w = self._student_head()
        if self.one_copy:
            out = self.student(ids, position_ids=pos, layerwise=self.layerwise_now, hidden=True)
            s_h, t_h, t_w = out.hidden, out.teacher_hidden, s_w  # one head serves both streams
            s_out, t_out = out.student_outputs, out.teacher_outputs
        else:
            with torch.no_grad():
                self.teacher(ids, position_ids=pos, use_cache=False, logits_to_keep=1)
            t_h, t_w = self.t_final.take(), head_param(self.teacher)
            self.student(ids, position_ids=pos, use_cache=False, logits_to_keep=1)
            s_h = self.s_final.take()
            s_out, t_out = tap_outputs(self.s_taps), tap_outputs(self.t_taps)
        heads = FusedHeads(s_h, s_w, t_h, t_w, self.models.vocab_shard)
        if not losses.needs_head:
            return losses.sums(None, None, mb, s_out, t_out, heads=heads)
        with gathered(s_w, t_w):  # ZeRO-3: the whole heads, for the length of the loss (no backward use; a
            return losses.sums(None, None, mb, s_out, t_out, heads=heads)  # vocab-parallel head: its rows as they are

    def global_loss(self, acc: dict, batch, losses: LossComputer | None = None):
        """The step's loss terms summed over ranks (collective), normalised by the global token counts."""
        keys = sorted(acc)
        vec = torch.stack([acc[k].reshape(()) for k in keys]).to(self.device) if keys else torch.zeros(0)
        if self.world > 1 and keys:
            torch.distributed.all_reduce(vec)
        glob = {k: float(v) for k, v in zip(keys, vec.cpu().tolist())}
        return (losses or self.losses).weighted(glob, batch.n_target, batch.n_token)

    # -- checkpoints ---------------------------------------------------------------------------------------

    def save(self, step: int) -> Path:
        """Save a checkpoint of this step (collective); its directory."""
        saved = ckpt.save_checkpoint(self.student, self.root, step, self.client_state(step), hf_files=self._hf_files,
                                     keep=self.cfg.checkpoint.keep, rank=self.rank, world=self.world,
                                     exclude_frozen=self.models.frozen_from_base)
        if self.rank == 0:
            logger.info("saved %s", saved.path)
        return saved.path

    def client_state(self, step: int) -> dict:
        cfg, models, world = self.cfg, self.models, self.world
        return {
            "step": step, "tokens": self.tokens_seen, "world": world, "sampler": self.loader.state_dict(),
            "data_fingerprint": self.data_fp, "data_rows": len(self.packed), "fingerprint": models.fingerprint,
            "replaced_layers": models.replaced_layers, "selection": models.selection,
            "teacher": models.teacher_path, "model": cfg.model.path, "config": cfg.to_dict(),
            "frozen_in_checkpoint": not models.frozen_from_base,
            "batch": {"micro_batch": self.plan.micro_batch, "grad_accum": self.plan.grad_accum, "world": world},
        }

    def _hf_files(self, d: Path) -> None:
        d.mkdir(parents=True, exist_ok=True)
        self.student.module.config.save_pretrained(str(d))
        self.tok.save_pretrained(str(d))

    # -- finish --------------------------------------------------------------------------------------------

    def finish(self) -> DistillResult:
        """Export (when the last step ran and ``checkpoint.export_final``), write the summary, remove the taps."""
        cfg, rows = self.cfg, self.rows
        export_dir = None
        finished = bool(rows) and rows[-1]["step"] == cfg.train.steps
        if cfg.checkpoint.export_final and finished:
            if self.rank == 0:
                export_dir = export_checkpoint(self.last_saved, self.out / "final", overwrite=True)
            torch.distributed.barrier()
        summary = self.summary(export_dir)
        self._hook("on_finish", summary)
        if self.rank == 0:
            RunSummary(summary).write(self.out)
        if finished:  # only now, with final/ and summary.json on disk, is the run marked finished
            self.output.finish(steps=cfg.train.steps)
        for taps in (self.t_taps, self.s_taps, getattr(self, "s_final", None), getattr(self, "t_final", None)):
            if taps is not None:
                taps.remove()
        return DistillResult(self.out, self.start_step, cfg.train.steps, rows, self.last_saved, export_dir, summary,
                             engine=self.student)

    def finish_only(self) -> DistillResult:
        """The end of a run whose last checkpoint was saved but whose export or summary was cut short (collective):
        export that checkpoint, write the summary from ``metrics.jsonl``, mark the run finished."""
        cfg = self.cfg
        self.last_saved, self.start_step = self.tag_dir, int(self.state["step"])
        self.tokens_seen, self.tokens_run = int(self.state["tokens"]), 0
        export_dir = None
        if cfg.checkpoint.export_final and self.rank == 0:
            export_dir = export_checkpoint(self.tag_dir, self.out / "final", overwrite=True)
        if self.world > 1:
            torch.distributed.barrier()
        rows = read_metrics(self.out / "metrics.jsonl", self.start_step) if self.rank == 0 else []
        summary = {
            "steps": cfg.train.steps, "start_step": rows[0]["step"] - 1 if rows else self.start_step,
            "last_step": self.start_step, "first_loss": rows[0]["loss"] if rows else None,
            "final_loss": rows[-1]["loss"] if rows else None, "tokens": self.tokens_seen,
            "elapsed_s": sum(r.get("step_s", 0.0) for r in rows),
            "tokens_per_s": (sum(r["tokens_per_s"] * r["step_s"] for r in rows) / max(sum(r["step_s"] for r in rows),
                                                                                     1e-9)) if rows else 0.0,
            "peak_mem_mb": max((r.get("mem_mb", 0.0) for r in rows), default=0.0), "world": self.world,
            "replaced_layers": self.state.get("replaced_layers"), "teacher_location": None, "teacher_placement": None,
            "checkpoint": str(self.tag_dir), "export": str(export_dir) if export_dir else None,
            "finished_after_interruption": True,
        }
        if self.rank == 0:
            RunSummary(summary).write(self.out)
        self.output.finish(steps=cfg.train.steps)
        return DistillResult(self.out, self.start_step, cfg.train.steps, [], self.tag_dir, export_dir, summary)

    def summary(self, export_dir: Path | None) -> dict:
        rows, elapsed = self.rows, self.elapsed
        return {
            "steps": self.cfg.train.steps, "start_step": self.start_step,
            "last_step": rows[-1]["step"] if rows else self.start_step,
            "first_loss": rows[0]["loss"] if rows else None, "final_loss": rows[-1]["loss"] if rows else None,
            "tokens": self.tokens_seen, "elapsed_s": elapsed,
            "tokens_per_s": self.tokens_run / elapsed if elapsed > 0 else None, "peak_mem_mb": peak_memory_mb(),
            "world": self.world, "replaced_layers": self.models.replaced_layers,
            "teacher_location": self.models.location.kind, "checkpoint": str(self.last_saved),
            "teacher_placement": self.models.location.kind,  # the former name of teacher_location, for one release
            "export": str(export_dir) if export_dir else None,
        }


__all__ = ["DistillResult", "LossComputer", "distill"]
