"""The distillation step as the plain PyTorch loop a user would write (one process, no DeepSpeed): the
baseline the trainer's speed is measured against (``benchmarks/distill_step.py``) and, in
``tests/test_distill.py``, the check of the trainer's DeepSpeed plumbing (ZeRO partitioning, engines,
micro-batching, teacher location).

It is not an independent oracle: it reuses the trainer's ``build_models``, ``LossComputer`` (the losses and
their normalisation), loader, ``build_optimizer`` / ``param_groups``, ``build_scheduler`` / ``lr_factor``
and ``LayerTaps``, so a bug in any of those is in both and goes unseen. The objective, the optimizer and the
schedule are checked against ``tests/trainer_oracle.py``, written from their definitions in float64 and
sharing no code with the trainer (``tests/test_trainer_oracle.py``).
"""

from __future__ import annotations

import time

import torch

from rad_ds.data import DistillLoader, build_packed

from .build import build_models
from rad_ds.engine.engines import plan_batch
from .optim import build_optimizer, build_scheduler
from .taps import LayerTaps, tap_outputs
from .run import LossComputer


class ReferenceDistiller:
    """``step()`` runs one optimizer step of the plain loop and returns its metrics row."""

    def __init__(self, cfg, world: int = 1, device: str = "cpu"):
        cfg.validate()
        torch.manual_seed(cfg.train.seed)
        self.cfg = cfg
        models = build_models(cfg, location="replicated")  # two plain models: the baseline of every placement
        self.models = models
        self.device = torch.device(device)
        self.student, self.teacher = models.student.to(self.device).train(), models.teacher.to(self.device).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.params = [p for p in self.student.parameters() if p.requires_grad]
        # the same global batch as a run on `world` ranks, all on this process
        plan = plan_batch(cfg.train, world)
        self.loader = DistillLoader(build_packed(cfg.data, models.tokenizer), plan.micro_batch,
                                    plan.grad_accum * world, 0, 1, cfg.train.seed, cfg.data.shuffle)
        self.opt = build_optimizer(self.student, cfg.optim)
        self.sched = build_scheduler(self.opt, cfg.optim, cfg.train.steps)
        self.losses = LossComputer(cfg.loss, models.replaced_layers, models.vocab_limit)
        self.t_taps = self.s_taps = None
        if self.losses.hidden_on:
            layers = models.replaced_layers
            self.t_taps = LayerTaps(self.teacher, layers, capture_inputs=cfg.loss.layerwise)
            feed = {i: (lambda i=i: self.t_taps.inputs[i].detach()) for i in layers} if cfg.loss.layerwise else None
            self.s_taps = LayerTaps(self.student, layers, feed=feed)
        self.step_no = 0

    def step(self) -> dict:
        t0 = time.perf_counter()
        batch = self.loader.next_step()
        lr = self.opt.param_groups[0]["lr"]
        acc = {}
        for mb in batch.micro:
            mb.input_ids, mb.target, mb.token, mb.position_ids = (
                x.to(self.device) for x in (mb.input_ids, mb.target, mb.token, mb.position_ids))
            with torch.no_grad():
                t_logits = self.teacher(mb.input_ids, position_ids=mb.position_ids, use_cache=False).logits
            s_logits = self.student(mb.input_ids, position_ids=mb.position_ids, use_cache=False).logits
            sums = self.losses.sums(s_logits, t_logits, mb, tap_outputs(self.s_taps), tap_outputs(self.t_taps))
            total, _ = self.losses.weighted(sums, batch.n_target, batch.n_token)
            total.backward()
            for k, v in sums.items():
                acc[k] = acc.get(k, 0.0) + float(v.detach())
            for taps in (self.t_taps, self.s_taps):
                if taps is not None:
                    taps.clear()
        clip = self.cfg.optim.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(self.params, clip if clip else float("inf"))
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.step_no += 1
        loss, terms = self.losses.weighted(acc, batch.n_target, batch.n_token)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        return {"step": self.step_no, "loss": loss, **terms, "lr": lr, "grad_norm": float(norm),
                "tokens_per_s": batch.n_token / dt, "step_s": dt}

    def run(self, steps: int | None = None) -> list[dict]:
        return [self.step() for _ in range(steps or self.cfg.train.steps)]


__all__ = ["ReferenceDistiller"]
