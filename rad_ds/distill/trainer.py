"""The distillation loop: a frozen teacher engine and a training student engine fed the same batch.

One step = ``grad_accum`` micro-batches per rank; for each, a teacher forward (``no_grad``) and a student
forward/backward. Loss terms are sums over tokens divided by the token counts of the whole global batch,
so a step computes the same loss and gradient on any number of ranks and micro-batches (up to
floating-point summation order). Before the optimizer applies a step, the step's loss terms are summed
over ranks and checked: a NaN/inf loss stops the run with the last good checkpoint as ``latest``.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rad_ds.config import ConfigError, RunConfig
from rad_ds.core.io import ProvisionalDir
from rad_ds.data import DistillLoader, data_fingerprint, load_packed

from . import checkpoint as ckpt
from .build import build_models, check_fingerprint
from .checkpoint import to_universal
from .engines import (
    fill_ds_config, init_distributed, load_ds_config, plan_batch, release_env, student_engine, teacher_engine,
)
from .faults import fault_point, inject_nan
from .losses import ce_loss_sum, hidden_loss_sum, kd_loss_sum
from .optim import set_trainable
from .taps import LayerTaps
from .tracking import Tracker, peak_memory_mb, truncate_metrics

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


class LossComputer:
    """The step objective from teacher/student outputs, as per-term sums (normalised by the caller)."""

    def __init__(self, loss_cfg, replaced: list[int], vocab_limit: int | None):
        self.cfg, self.layers, self.vocab_limit = loss_cfg, replaced, vocab_limit
        self.kd_on = loss_cfg.kd != "none" and loss_cfg.kd_weight > 0
        self.hidden_on = loss_cfg.hidden != "none" and loss_cfg.hidden_weight > 0
        self.ce_on = loss_cfg.ce_weight > 0

    def sums(self, s_logits, t_logits, mb, s_taps, t_taps) -> dict:
        c = self.cfg
        out = {}
        if self.vocab_limit is not None:
            s_logits, t_logits = s_logits[..., :self.vocab_limit], t_logits[..., :self.vocab_limit]
        if self.kd_on:
            out["kd"] = kd_loss_sum(s_logits, t_logits, mb.target, c.kd, c.temperature, c.jsd_beta, c.chunk_tokens)
        if self.hidden_on:
            out["hidden"] = sum(hidden_loss_sum(s_taps.outputs[i], t_taps.outputs[i], mb.token, c.hidden)
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


def _resume_point(cfg: RunConfig, root: Path) -> Path | None:
    resume = cfg.checkpoint.resume
    if resume in (None, "none"):
        existing = ckpt.latest_checkpoint(root)
        if existing is not None:
            raise ConfigError(
                f"--out {cfg.out} already holds checkpoint {existing.name}; pass --resume auto to continue that run, "
                "or choose a new --out"
            )
        return None
    if resume == "auto":
        found = ckpt.latest_checkpoint(root)
        if found is None:
            logger.info("no complete checkpoint in %s: starting fresh", root)
        return found
    return ckpt.resolve_checkpoint(resume)


def distill(cfg: RunConfig) -> DistillResult:
    """Run (or resume) a distillation as described by ``cfg``; collective: call it on every rank."""
    cfg.validate()
    _quiet()
    info = init_distributed(cfg.train.dist_timeout_s)
    try:
        # a run that fails before its first step (bad --data, --layers, --model) leaves no --out behind
        with ProvisionalDir(cfg.out, owner=info.rank == 0) as out_dir:
            return _distill(cfg, info, out_dir)
    finally:
        release_env()


def _distill(cfg: RunConfig, info, out_dir: ProvisionalDir) -> DistillResult:
    rank, world = info.rank, info.world
    dist = torch.distributed
    out = Path(cfg.out)
    root = out / "checkpoints"
    plan = plan_batch(cfg.train, world)
    # -- where to start (every rank reads the same files) -------------------------------------------------
    tag_dir = _resume_point(cfg, root)
    state = ckpt.read_state(tag_dir) if tag_dir is not None else None
    if state is not None and state["step"] >= cfg.train.steps:
        if rank == 0:
            logger.info("checkpoint %s is at step %d >= train.steps=%d: nothing to do", tag_dir, state["step"],
                        cfg.train.steps)
        return DistillResult(out, state["step"], cfg.train.steps, checkpoint=tag_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    dist.barrier()

    torch.manual_seed(cfg.train.seed)
    models = build_models(cfg)
    if state is not None:
        check_fingerprint(state.get("fingerprint", {}), models.fingerprint, tag_dir)
    set_trainable(models.student, cfg.student.trainable, models.replaced_layers)
    if cfg.student.gradient_checkpointing:
        if hasattr(models.student, "activation_checkpointing_enable"):  # transformers >= 5.x name
            models.student.activation_checkpointing_enable({"use_reentrant": False})
        else:  # pragma: no cover
            models.student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    tok = models.tokenizer

    packed = load_packed(cfg.data, tok, out / "data", rank=rank, barrier=dist.barrier)
    data_fp = data_fingerprint(packed)
    if state is not None and state.get("data_fingerprint") not in (None, data_fp):
        raise ConfigError(
            f"checkpoint {tag_dir} was trained on other data ({state.get('data_rows')} packed rows); now "
            f"{len(packed)} rows: resume with the same --data, data.seq_len and data.packing, or start a new --out"
        )
    loader = DistillLoader(packed, plan.micro_batch, plan.grad_accum, rank, world, cfg.train.seed, cfg.data.shuffle)

    s_ds = fill_ds_config(load_ds_config(cfg.deepspeed), plan, cfg.model.dtype, cfg.deepspeed,
                          grad_clip=cfg.optim.grad_clip or None)
    t_ds = fill_ds_config(load_ds_config(cfg.teacher.deepspeed), plan, cfg.model.dtype, cfg.teacher.deepspeed,
                          offload_params=cfg.teacher.offload, optimizer=False)
    if t_ds.get("zero_optimization", {}).get("stage") != 3:
        logger.warning("teacher.deepspeed %s is not ZeRO-3: the teacher is replicated on every rank",
                       cfg.teacher.deepspeed)
    load_dir, universal = tag_dir, None
    if state is not None and state.get("world") != world:
        # ZeRO shards are per rank: DeepSpeed's universal format re-partitions them for this world size
        if rank == 0:
            logger.warning("checkpoint %s was saved by %s ranks, resuming on %d: converting it (universal format); "
                           "the data order continues exactly", tag_dir, state.get("world"), world)
        universal = to_universal(tag_dir, root / "universal", rank)
        load_dir = universal
        s_ds.setdefault("checkpoint", {})["load_universal"] = True
    teacher = teacher_engine(models.teacher, t_ds)
    student = student_engine(models.student, s_ds, cfg.optim, cfg.train.steps)
    student_module = student.module

    start_step, tokens_seen = 0, 0
    if state is not None:
        ckpt.load_engine_state(student, load_dir, universal=universal is not None)
        if universal is not None:
            dist.barrier()
            if rank == 0:
                shutil.rmtree(universal.parent, ignore_errors=True)
        loader.load_state_dict(state["sampler"])
        ckpt.restore_rng(tag_dir, rank, world)
        start_step, tokens_seen = int(state["step"]), int(state["tokens"])
        if rank == 0:
            truncate_metrics(out / "metrics.jsonl", start_step)
            logger.info("resumed from %s at step %d", tag_dir, start_step)
    if rank == 0:
        cfg.save(out / "run_config.json")

    losses = LossComputer(cfg.loss, models.replaced_layers, models.vocab_limit)
    t_taps = s_taps = None
    if losses.hidden_on:
        t_taps = LayerTaps(teacher, models.replaced_layers, capture_inputs=cfg.loss.layerwise)
        feed = ({i: (lambda i=i: t_taps.inputs[i].detach()) for i in models.replaced_layers}
                if cfg.loss.layerwise else None)
        s_taps = LayerTaps(student, models.replaced_layers, feed=feed)

    def client_state(step: int) -> dict:
        return {
            "step": step, "tokens": tokens_seen, "world": world, "sampler": loader.state_dict(),
            "data_fingerprint": data_fp, "data_rows": len(packed), "fingerprint": models.fingerprint,
            "replaced_layers": models.replaced_layers, "selection": models.selection,
            "teacher": models.teacher_path, "model": cfg.model.path, "config": cfg.to_dict(),
            "batch": {"micro_batch": plan.micro_batch, "grad_accum": plan.grad_accum, "world": world},
        }

    def hf_files(d: Path) -> None:
        d.mkdir(parents=True, exist_ok=True)
        student_module.config.save_pretrained(str(d))
        tok.save_pretrained(str(d))

    def save(step: int) -> Path:
        saved = ckpt.save_checkpoint(student, root, step, client_state(step), hf_files=hf_files,
                                     keep=cfg.checkpoint.keep, rank=rank, world=world)
        if rank == 0:
            logger.info("saved %s", saved.path)
        return saved.path

    tracker = Tracker(out, cfg, enabled=rank == 0, total_steps=cfg.train.steps, start_step=start_step)
    rows: list[dict] = []
    last_saved = tag_dir if state is not None else None
    device = student.device
    t_run = time.perf_counter()
    tokens_run = 0
    out_dir.keep()
    try:
        for step in range(start_step + 1, cfg.train.steps + 1):
            t0 = time.perf_counter()
            batch = loader.next_step()
            acc = {}
            lr = student.get_lr()[0]
            for a, mb in enumerate(batch.micro):
                mb.input_ids, mb.target, mb.token = (x.to(device) for x in (mb.input_ids, mb.target, mb.token))
                with torch.no_grad():
                    t_logits = teacher(mb.input_ids, use_cache=False).logits
                s_logits = student(mb.input_ids, use_cache=False).logits
                sums = losses.sums(s_logits, t_logits, mb, s_taps, t_taps)
                if inject_nan(step, rank):
                    sums = {k: v * float("nan") for k, v in sums.items()}
                total, _ = losses.weighted(sums, batch.n_target, batch.n_token)
                # DeepSpeed divides by grad_accum and averages gradients over ranks: undo both so the
                # gradient is that of the global per-token mean
                student.backward(total * (plan.grad_accum * world))
                for k, v in sums.items():
                    acc[k] = acc.get(k, 0.0) + v.detach().float()
                for taps in (t_taps, s_taps):
                    if taps is not None:
                        taps.clear()
                del t_logits, s_logits, total
                if a < len(batch.micro) - 1:
                    student.step()
            keys = sorted(acc)
            vec = torch.stack([acc[k].reshape(()) for k in keys]).to(device) if keys else torch.zeros(0)
            if world > 1 and keys:
                dist.all_reduce(vec)
            glob = {k: float(v) for k, v in zip(keys, vec.cpu().tolist())}
            loss, terms = losses.weighted(glob, batch.n_target, batch.n_token)
            if not math.isfinite(loss):
                where = f"; the last good checkpoint is {last_saved}" if last_saved else ""
                raise ckpt.NonFiniteError(
                    f"step {step}: the loss is not finite ({', '.join(f'{k}={v}' for k, v in terms.items())}); "
                    f"stopped before the optimizer step, nothing saved{where}. Lower optim.lr or check the data"
                )
            student.step()
            grad_norm = student.get_global_grad_norm()  # None where DeepSpeed did not compute it
            grad_norm = float(grad_norm) if grad_norm is not None else None
            if grad_norm is not None and not math.isfinite(grad_norm):
                raise ckpt.NonFiniteError(
                    f"step {step}: the gradient norm is {grad_norm} (DeepSpeed skipped the update); stopped, nothing "
                    f"saved. Lower optim.lr or check the data"
                )
            dt = time.perf_counter() - t0
            tokens_seen += batch.n_token
            tokens_run += batch.n_token
            row = {"step": step, "loss": loss, **terms, "lr": lr, "grad_norm": grad_norm, "tokens": tokens_seen,
                   "tokens_per_s": batch.n_token / dt, "step_s": dt, "mem_mb": peak_memory_mb()}
            rows.append(row)
            tracker.log(row)
            fault_point("step_end", step=step, rank=rank)
            every = cfg.checkpoint.every
            stop = cfg.train.stop_after is not None and step - start_step >= cfg.train.stop_after
            if step == cfg.train.steps or (every and step % every == 0) or stop:
                last_saved = save(step)
            if stop:
                break
    except BaseException:
        tracker.close()
        raise
    elapsed = time.perf_counter() - t_run
    export_dir = None
    finished = bool(rows) and rows[-1]["step"] == cfg.train.steps
    if cfg.checkpoint.export_final and finished:
        if rank == 0:
            from .export import export_checkpoint

            export_dir = export_checkpoint(last_saved, out / "final", overwrite=True)
        dist.barrier()
    summary = {
        "steps": cfg.train.steps, "start_step": start_step, "last_step": rows[-1]["step"] if rows else start_step,
        "first_loss": rows[0]["loss"] if rows else None, "final_loss": rows[-1]["loss"] if rows else None,
        "tokens": tokens_seen, "elapsed_s": elapsed,
        "tokens_per_s": tokens_run / elapsed if elapsed > 0 else None, "peak_mem_mb": peak_memory_mb(),
        "world": world, "replaced_layers": models.replaced_layers, "checkpoint": str(last_saved),
        "export": str(export_dir) if export_dir else None,
    }
    tracker.close(summary)
    if rank == 0:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    for taps in (t_taps, s_taps):
        if taps is not None:
            taps.remove()
    return DistillResult(out, start_step, cfg.train.steps, rows, last_saved, export_dir, summary, engine=student)


__all__ = ["DistillResult", "LossComputer", "distill"]
