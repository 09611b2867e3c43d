"""The placement study: one student per placement method, the same distillation for each, held-out scores.

1. Choose: each method picks k layers (``rad_ds.selection.choose_layers``); ``rad`` and ``single_skip`` read a
   diagnosis report (given, or made here: its wall time is their cost of choosing); ``cosine`` / ``kl_probe``
   score the layers on training documents; ``random`` draws one student per seed.
2. Teacher signal: with ``cache_k > 0`` the teacher runs once over the training data into a shared teacher
   cache (``launchers/teacher_cache.py``'s stage) and every student's logit-KD steps read it.
3. Distil: every student gets the same run config (data, steps, tokens, schedule, seed, recipe), a checkpoint
   every ``eval_every`` steps, and its final student exported (``arms/<name>/final``).
4. Score: the initial student and every checkpoint on the held-out data (``heldout.HeldOut``), one line per
   point in ``arms/<name>/heldout.jsonl``.
5. Report: ``results.StudyResults`` (results.json, results.md, curves.png).

Every step is resumable: a chosen placement, the cache, a finished run and a scored checkpoint are kept, so
running the same command again continues where a kill stopped it.
"""

from __future__ import annotations

import copy
import gc
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rad_ds.core.io import write_json_atomic
from rad_ds.distill.config import RunConfig

from .config import StudyConfig
from .heldout import HeldOut
from .results import StudyResults

logger = logging.getLogger(__name__)


@dataclass
class Arm:
    name: str  # "rad", "random_s1", ...
    method: str
    seed: int
    choice: dict  # Choice.record() plus the diagnosis time where it applies


def _arms(cfg: StudyConfig) -> list[tuple[str, str, int]]:
    out = []
    for m in cfg.methods:
        if m == "random":
            out += [(f"random_s{s}", m, int(s)) for s in cfg.random_seeds]
        else:
            out.append((m, m, int(cfg.distill.train.seed)))
    return out


class Study:
    def __init__(self, cfg: StudyConfig):
        self.cfg = cfg.validate()
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        cfg.save(self.out / "study_config.json")

    # -- 1. choose -----------------------------------------------------------------------------------------

    def report(self) -> tuple[str | None, float]:
        """(report path, seconds the diagnosis took) for the report-based methods."""
        cfg = self.cfg
        if not {"rad", "single_skip"} & set(cfg.methods):
            return None, 0.0
        if cfg.report:
            return cfg.report, 0.0
        from rad_ds.core.report import DiagnosisReport
        from rad_ds.diagnosis.runner import diagnose

        d = self.out / "diagnosis"
        timing = d / "study_timing.json"
        if (d / DiagnosisReport.FILE).is_file() and timing.is_file():
            return str(d / DiagnosisReport.FILE), json.loads(timing.read_text())["seconds"]
        dc = copy.deepcopy(cfg.diagnose)
        dc.model, dc.out, dc.k = cfg.model, str(d), sorted({*dc.k, cfg.k}) if dc.k else [cfg.k]
        if not dc.prompts and cfg.diagnose_on == "train":
            dc.prompts = _training_prompts(cfg.distill.data.path, d / "train_prompts.jsonl", dc.seed)
        t0 = time.perf_counter()
        diagnose(dc)
        seconds = time.perf_counter() - t0
        write_json_atomic(timing, {"seconds": seconds})
        return str(d / DiagnosisReport.FILE), seconds

    def choose(self) -> list[Arm]:
        from rad_ds.models.conversion import load_model
        from rad_ds.selection import calibration_tokens, choose_layers

        cfg = self.cfg
        path = self.out / "placements.json"
        done = json.loads(path.read_text()) if path.is_file() else {}
        report, diag_s = self.report()
        model = tok = calib = None
        arms = []
        for name, method, seed in _arms(cfg):
            if name not in done:
                if method in ("cosine", "kl_probe") and model is None:
                    model, tok = load_model(cfg.model)
                    calib = calibration_tokens(cfg.distill.data.path, tok, n=cfg.calibration_docs,
                                               max_tokens=cfg.distill.data.seq_len)
                choice = choose_layers(method, cfg.k, model if model is not None else cfg.model, report=report,
                                       calibration=calib, seed=seed).record()
                if method in ("rad", "single_skip"):  # their cost is the report's own (its search / single-skip
                    choice["diagnosis_seconds"] = diag_s  # part); the diagnosis' wall time, all of it, beside it
                choice["selection_seconds"] = choice["seconds"]
                done[name] = {"method": method, "seed": seed, "choice": choice}
                write_json_atomic(path, done)
                logger.info("placement %s: layers %s (%.1f s)", name, choice["layers"], choice["selection_seconds"])
            arms.append(Arm(name, method, seed, done[name]["choice"]))
        del model
        gc.collect()
        return arms

    # -- 2. teacher signal -----------------------------------------------------------------------------------

    def teacher_cache(self) -> tuple[str | None, float]:
        cfg = self.cfg
        if not cfg.cache_k:
            return None, 0.0
        from rad_ds.data.teacher_store import TeacherCacheStore
        from rad_ds.teacher_cache import TeacherCacheConfig, build_teacher_cache

        if cfg.cache_dir:
            TeacherCacheStore.open(cfg.cache_dir)  # complete, or a one-line error; each run checks the fingerprint
            return cfg.cache_dir, 0.0
        d = self.out / "teacher_cache"
        timing = d / "study_timing.json"
        store = TeacherCacheStore.read_manifest(d)
        if store is not None and store.get("status") == "complete" and timing.is_file():
            return str(d), json.loads(timing.read_text())["seconds"]
        tc = TeacherCacheConfig()
        tc.out, tc.k, tc.temperature = str(d), cfg.cache_k, cfg.distill.loss.temperature
        tc.teacher.path, tc.teacher.dtype = cfg.model, cfg.distill.model.dtype
        tc.data = copy.deepcopy(cfg.distill.data)
        tc.progress = cfg.distill.log.progress
        t0 = time.perf_counter()
        build_teacher_cache(tc)
        seconds = time.perf_counter() - t0
        write_json_atomic(timing, {"seconds": seconds})
        return str(d), seconds

    # -- 3. distil -------------------------------------------------------------------------------------------

    def run_config(self, arm: Arm, cache: str | None) -> RunConfig:
        cfg = self.cfg
        rc = RunConfig.from_dict(cfg.distill.to_dict())
        rc.out = str(self.out / "arms" / arm.name)
        rc.model.path = cfg.model
        rc.student.layers = list(arm.choice["layers"])
        rc.teacher.cache = cache
        rc.checkpoint.every = cfg.eval_every
        rc.checkpoint.keep = rc.train.steps // cfg.eval_every + 2  # every scored point stays until scored
        rc.checkpoint.resume = "auto"
        rc.checkpoint.export_final = True
        return rc

    def distill(self, arm: Arm, cache: str | None) -> dict:
        from rad_ds.distill import distill
        from rad_ds.distill.summary import RunSummary

        rc = self.run_config(arm, cache)
        out = Path(rc.out)
        summary = RunSummary.load(out)
        if summary is None or not summary.finished or not (out / "final").is_dir():
            t0 = time.perf_counter()
            distill(rc)
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
            write_json_atomic(out / "study_timing.json", {"seconds": time.perf_counter() - t0})
        return json.loads((out / "study_timing.json").read_text()) if (out / "study_timing.json").is_file() else {}

    # -- 4. score --------------------------------------------------------------------------------------------

    def heldout(self) -> HeldOut:
        from rad_ds.data import build_packed
        from rad_ds.decoding.prompts import load_prompts
        from rad_ds.models.conversion import load_model

        cfg = self.cfg
        teacher, tok = load_model(cfg.model)
        data = copy.deepcopy(cfg.distill.data)
        data.path, data.max_documents, data.shuffle = cfg.heldout, None, False
        packed = build_packed(data, tok)
        packed = type(packed)(packed.input_ids[:cfg.heldout_rows], packed.target[:cfg.heldout_rows],
                              packed.token[:cfg.heldout_rows], packed.position_ids[:cfg.heldout_rows],
                              packed.n_documents, packed.n_split)
        prompts = []
        if cfg.heldout_prompts and cfg.prompts:
            prompts = load_prompts(tok, cfg.prompts, n=cfg.heldout_prompts, what="prompts")
        elif cfg.heldout_prompts:
            prompts = _user_turns(cfg.heldout, tok, cfg.heldout_prompts)
        self.teacher = teacher
        return HeldOut(teacher, tok, packed, prompts, cfg.greedy_tokens)

    def score(self, arm: Arm, ref: HeldOut) -> list[dict]:
        """Held-out metrics of the initial student and of every checkpoint (cached line by line)."""
        from rad_ds.distill.export import consolidated_state_dict
        from rad_ds.surgery import replace_attention

        rc = self.run_config(arm, None)
        path = Path(rc.out) / "heldout.jsonl"
        rows = [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []
        seen = {r["step"] for r in rows}
        student = copy.deepcopy(self.teacher)
        replace_attention(student, rc.student.layers, init=rc.student.init, seed=rc.student.seed)
        student.eval()
        tokens = _tokens_by_step(Path(rc.out))
        steps = [0] + [s for s in range(self.cfg.eval_every, rc.train.steps + 1, self.cfg.eval_every)]
        if rc.train.steps not in steps:
            steps.append(rc.train.steps)
        for step in steps:
            if step in seen:
                continue
            if step > 0:
                tag = Path(rc.out) / "checkpoints" / f"step_{step:08d}"
                sd = consolidated_state_dict(tag, trainable_only=True)
                missing, unexpected = student.load_state_dict(sd, strict=False)
                if unexpected:
                    raise RuntimeError(f"{tag}: parameters {unexpected[:3]} are not in the student")
            row = {"step": step, "tokens": tokens.get(step, 0), **ref.evaluate(student)}
            rows.append(row)
            with open(path, "a") as f:
                f.write(json.dumps(row) + "\n")
            logger.info("%s step %d: held-out KL %.4f, ppl %.2f, top-1 %.3f", arm.name, step, row["heldout_kl"],
                        row["ppl"], row["top1_agreement"])
        return sorted(rows, key=lambda r: r["step"])

    # -- all -------------------------------------------------------------------------------------------------

    def run(self) -> StudyResults:
        clock = WallClock(self.out / WallClock.FILE)
        arms = self.choose()
        clock.tick()
        cache, cache_s = self.teacher_cache()
        ref = self.heldout()
        clock.tick()
        out_arms = {}
        for arm in arms:
            timing = self.distill(arm, cache)
            clock.tick()
            curve = self.score(arm, ref)
            clock.tick()
            out_arms[arm.name] = {"method": arm.method, "seed": arm.seed, "choice": arm.choice, "curve": curve,
                                  "train_seconds": timing.get("seconds"),
                                  "export": str(self.out / "arms" / arm.name / "final")}
        budget = self._budget(cache_s, ref)
        results = StudyResults.build(self.cfg, out_arms, budget, clock.tick())
        results.write(self.out)
        return results

    def _budget(self, cache_s: float, ref: HeldOut) -> dict:
        d = self.cfg.distill
        return {"steps": d.train.steps, "seq_len": d.data.seq_len, "micro_batch": d.train.micro_batch,
                "grad_accum": d.train.grad_accum, "lr": d.optim.lr, "schedule": d.optim.schedule,
                "seed": d.train.seed, "init": d.student.init, "stage1_steps": d.loss.stage1_steps,
                "kd": d.loss.kd, "data": d.data.path, "heldout": self.cfg.heldout,
                "heldout_positions": ref.positions, "heldout_prompts": len(ref.prompts),
                "teacher_cache_k": self.cfg.cache_k, "teacher_cache_seconds": cache_s}


class WallClock:
    """The study's wall time over all its invocations: a resumed study adds what the earlier ones spent up to their
    last finished stage (``tick`` after each stage), so a study killed and resumed reports its whole cost."""

    FILE = "study_wall.json"

    def __init__(self, path: Path):
        prev = json.loads(path.read_text()) if path.is_file() else {}
        self.path, self.t0 = path, time.perf_counter()
        self.before = prev.get("before_seconds", 0.0) + prev.get("this_seconds", 0.0)
        self.invocations = prev.get("invocations", 0) + 1

    def tick(self) -> dict:
        """Record the time so far; returns ``{"seconds", "this_invocation_seconds", "invocations"}``."""
        this = time.perf_counter() - self.t0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path, {"before_seconds": self.before, "this_seconds": this,
                                      "invocations": self.invocations})
        return {"seconds": self.before + this, "this_invocation_seconds": this, "invocations": self.invocations}


def _prompt_turns(records: list[dict]) -> list[list[dict]]:
    """Each chat record up to its first assistant turn (records without one are left out)."""
    out = []
    for r in records:
        msgs = r.get("messages") or []
        first = next((i for i, m in enumerate(msgs) if m.get("role") == "assistant"), None)
        if first:
            out.append(msgs[:first])
    return out


def _user_turns(path: str, tok, n: int) -> list[torch.Tensor]:
    """The first ``n`` held-out conversations up to their first assistant turn, as generation prompts."""
    from rad_ds.core.records import read_records
    from rad_ds.decoding.prompts import encode

    return [encode(tok, "chat", m) for m in _prompt_turns(read_records(path, what="heldout"))[:n]]


def _training_prompts(data: str, out: Path, seed: int) -> str | None:
    """The diagnosis' prompts from the training data (the distribution the students are distilled and judged on):
    chats up to their first answer, else the text documents' first 1000 characters, shuffled with ``seed``, written
    to ``out``. ``None`` (the diagnosis' built-in prompts) when the data is not one local file."""
    import random

    from rad_ds.core.config import resolve_shipped
    from rad_ds.core.records import read_records

    path = resolve_shipped(data)
    if not path.is_file():
        logger.info("diagnosis prompts: %s is not one local file; the diagnosis uses its built-in prompts", data)
        return None
    records = read_records(path, what="distill.data.path")
    rows = [{"messages": m} for m in _prompt_turns(records)]
    if not rows:
        rows = [{"text": str(r["text"])[:1000]} for r in records if str(r.get("text") or "").strip()]
    random.Random(seed).shuffle(rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(out)


def _tokens_by_step(out: Path) -> dict[int, int]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return {}
    return {r["step"]: r["tokens"] for r in map(json.loads, path.read_text().splitlines())}


def run_study(cfg: StudyConfig) -> StudyResults:
    return Study(cfg).run()


__all__ = ["Study", "run_study"]
