"""The placement study: per k, one student per placement method and training seed, the same distillation for
each, scored on the test split.

1. Choose: per k, each method picks k layers (``rad_ds.selection.choose_layers``); what a method reads is its
   registry entry's (``rad_ds.selection.registry``): those that read a report (``rad``, ``single_skip``) share
   one diagnosis report for every k (given, or made here on the training data: its wall time is their cost of
   choosing); those that read weights and calibration tokens (``cosine``, ``kl_probe``) score the layers on
   training documents; one whose seed is a draw (``random``) makes one placement per draw in ``random_seeds``. A
   placement does not depend on the training seed.
2. Teacher signal: with ``cache_k > 0`` the teacher runs once over the training data into a shared teacher cache
   (``launchers/teacher_cache.py``'s stage) that every student of every k and seed reads.
3. Distil: every (placement, seed) gets the same run config but its layers and ``train.seed`` (seed s: the same
   data order for every method), a checkpoint every ``eval_every`` steps and its final student exported. A run is
   keyed by its layers and seed (``arms/L<layers>/s<seed>``), so two methods that pick the same layers share it.
4. Score: the initial student (once per placement: it does not depend on the seed) and every checkpoint on the
   test data (``heldout.HeldOut``), one line per point in the run's ``test.jsonl``.
5. Report: ``results.StudyResults`` (results.json, results.md, curves.png): per k and method the per-seed test
   scores, their mean and 95% interval, and RAD's paired difference to each baseline.

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

from rad_ds.core.config import resolve_shipped
from rad_ds.core.io import write_json_atomic
from rad_ds.core.outputs import claim
from rad_ds.core.records import read_records
from rad_ds.core.report import DiagnosisReport
from rad_ds.data.teacher_store import TeacherCacheStore
from rad_ds.decoding.prompts import encode, load_prompts, prompt_turns
from rad_ds.diagnosis.run import diagnose
from rad_ds.distill import DistillConfig, RunSummary, consolidated_state_dict, distill
from rad_ds.models.conversion import load_model
from rad_ds.selection import calibration_tokens, choose_layers, get_strategy
from rad_ds.surgery import replace_attention
from rad_ds.teacher_cache import TeacherCacheConfig, build_teacher_cache

from .config import StudyConfig
from .heldout import HeldOut, TaskScores, scored_rows
from .results import StudyResults

logger = logging.getLogger(__name__)


@dataclass
class Arm:
    """One student: a placement (method, k, its layers) distilled with one training seed."""

    key: str  # the placement: "k4/rad", "k4/random_d1", ...
    method: str
    k: int
    draw: int | None  # random's draw seed
    seed: int  # training seed
    choice: dict  # Choice.record() plus the diagnosis time where it applies

    @property
    def layers(self) -> list[int]:
        return [int(i) for i in self.choice["layers"]]

    @property
    def run_name(self) -> str:
        """The run's directory under arms/: its layers and seed (methods that agree share the run)."""
        return f"L{'-'.join(map(str, self.layers))}/s{self.seed}"


def _placements(cfg: StudyConfig) -> list[tuple[str, str, int, int | None]]:
    """(key, method, k, draw) of every placement the study makes."""
    out = []
    for k in cfg.k:
        for m in cfg.methods:
            if get_strategy(m, "methods").seed == "draw":
                out += [(f"k{k}/{m}_d{d}", m, k, int(d)) for d in cfg.random_seeds]
            else:
                out.append((f"k{k}/{m}", m, k, None))
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
        if not any(get_strategy(m, "methods").needs_report for m in cfg.methods):
            return None, 0.0
        if cfg.report:
            return cfg.report, 0.0
        d = self.out / "diagnosis"
        timing = d / "study_timing.json"
        if (d / DiagnosisReport.FILE).is_file() and timing.is_file():
            return str(d / DiagnosisReport.FILE), json.loads(timing.read_text())["seconds"]
        dc = copy.deepcopy(cfg.diagnose)
        cfg.model.apply_to(dc.model)
        dc.out, dc.k = str(d), sorted({*dc.k, *cfg.k}) if dc.k else list(cfg.k)
        dc.overwrite = True  # not done by the study's measure (no timing): a report there is replaced
        if not dc.prompts and not dc.data:
            train = str(resolve_shipped(cfg.distill.data.path))
            if cfg.diagnose_on == "train":  # the training documents, teacher-forced
                dc.data, dc.source = train, "documents"
            elif cfg.diagnose_on == "train_prompts":  # the model's continuations of the training chats' prompts
                dc.data, dc.source = train, "continuations"
            else:
                dc.source = "continuations"
        t0 = time.perf_counter()
        diagnose(dc)
        seconds = time.perf_counter() - t0
        write_json_atomic(timing, {"seconds": seconds})
        return str(d / DiagnosisReport.FILE), seconds

    def choose(self) -> list[Arm]:
        """Every placement (kept in placements.json), then one arm per placement and training seed."""
        cfg = self.cfg
        path = self.out / "placements.json"
        done = json.loads(path.read_text()) if path.is_file() else {}
        report, diag_s = self.report()
        model = tok = calib = None
        for key, method, k, draw in _placements(cfg):
            if key in done:
                continue
            strategy = get_strategy(method, "methods")
            if (strategy.needs_weights or strategy.needs_calibration) and model is None:
                model, tok = load_model(cfg.model.path, gguf_file=cfg.model.gguf_file)  # its tokenizer: calibration
                calib = calibration_tokens(cfg.distill.data.path, tok, n=cfg.calibration_docs,
                                           max_tokens=cfg.distill.data.seq_len)
            seed = draw if draw is not None else int(cfg.distill.student.placement_seed)
            choice = choose_layers(method, k, model if model is not None else cfg.model.path, report=report,
                                   calibration=calib, seed=seed).record()
            if strategy.needs_report:  # their cost is the report's own (its search / single-skip
                choice["diagnosis_seconds"] = diag_s  # part); the diagnosis' wall time, all of it, beside it
            choice["selection_seconds"] = choice["seconds"]
            done[key] = {"method": method, "k": k, "draw": draw, "choice": choice}
            write_json_atomic(path, done)
            logger.info("placement %s: layers %s (%.1f s)", key, choice["layers"], choice["selection_seconds"])
        del model
        gc.collect()
        return [Arm(key, method, k, draw, int(s), done[key]["choice"])
                for key, method, k, draw in _placements(cfg) for s in cfg.seeds]

    # -- 2. teacher signal -----------------------------------------------------------------------------------

    def teacher_cache(self) -> tuple[str | None, float]:
        cfg = self.cfg
        if not cfg.cache_k:
            return None, 0.0
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
        tc.teacher.path, tc.teacher.gguf_file = cfg.model.path, cfg.model.gguf_file
        tc.teacher.dtype = cfg.model.dtype or cfg.distill.model.dtype
        tc.data = copy.deepcopy(cfg.distill.data)
        tc.progress = cfg.distill.log.progress
        t0 = time.perf_counter()
        build_teacher_cache(tc)
        seconds = time.perf_counter() - t0
        write_json_atomic(timing, {"seconds": seconds})
        return str(d), seconds

    # -- 3. distil -------------------------------------------------------------------------------------------

    def run_config(self, arm: Arm, cache: str | None) -> DistillConfig:
        cfg = self.cfg
        rc = DistillConfig.from_dict(cfg.distill.to_dict())
        rc.out = str(self.out / "arms" / arm.run_name)
        cfg.model.apply_to(rc.model)
        rc.train.seed = arm.seed
        rc.student.layers = arm.layers
        rc.teacher.cache = cache
        rc.checkpoint.every = cfg.eval_every
        rc.checkpoint.keep = rc.train.steps // cfg.eval_every + 2  # every scored point stays until scored
        rc.checkpoint.resume = "auto"
        rc.checkpoint.export_final = True
        return rc

    def distill(self, arm: Arm, cache: str | None) -> dict:
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
        """The teacher's side of the test data (once): its log-probabilities and greedy continuations."""
        cfg = self.cfg
        teacher, tok = load_model(cfg.model.path, gguf_file=cfg.model.gguf_file)
        packed = scored_rows(cfg.distill.data, cfg.test, tok, cfg.heldout_rows)
        prompts = []
        if cfg.heldout_prompts and cfg.prompts:
            prompts = load_prompts(tok, cfg.prompts, n=cfg.heldout_prompts, what="prompts")
        elif cfg.heldout_prompts:
            prompts = _user_turns(cfg.test, tok, cfg.heldout_prompts)
        self.teacher = teacher
        self.tasks = TaskScores(tok, cfg.arithmetic_samples, cfg.passkey_contexts, cfg.passkey_depths,
                                cfg.passkey_samples, cfg.task_seed)
        self.teacher_tasks = self._teacher_tasks()
        return HeldOut(teacher, tok, packed, prompts, cfg.greedy_tokens)

    def _teacher_tasks(self) -> dict:
        """The teacher's arithmetic and passkey scores (the students' reference), computed once and kept."""
        path = self.out / "teacher_tasks.json"
        if not self.tasks:
            return {}
        settings = self._task_settings()
        if path.is_file() and (kept := json.loads(path.read_text())).get("settings") == settings:
            return kept
        scores = {**self.tasks.evaluate(self.teacher, "teacher"), "settings": settings}
        write_json_atomic(path, scores)
        return scores

    def _task_settings(self) -> dict:
        c = self.cfg
        return {"arithmetic_samples": c.arithmetic_samples, "passkey_contexts": list(c.passkey_contexts),
                "passkey_depths": list(c.passkey_depths), "passkey_samples": c.passkey_samples, "seed": c.task_seed}

    def _student(self, rc: DistillConfig):
        student = copy.deepcopy(self.teacher)
        replace_attention(student, rc.student.layers, init=rc.student.init, seed=rc.student.seed)
        return student.eval()

    def initial(self, arm: Arm, ref: HeldOut) -> dict:
        """Test scores of the placement's initial student (before any step: the same for every seed), cached."""
        rc = self.run_config(arm, None)
        path = Path(rc.out).parent / "initial.json"
        if path.is_file():
            return json.loads(path.read_text())
        row = {"step": 0, "tokens": 0, **ref.evaluate(self._student(rc))}
        write_json_atomic(path, row)
        return row

    def score(self, arm: Arm, ref: HeldOut) -> list[dict]:
        """Test metrics of the initial student and of every checkpoint (cached line by line)."""
        rc = self.run_config(arm, None)
        path = Path(rc.out) / "test.jsonl"
        rows = [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []
        seen = {r["step"] for r in rows}
        steps = [s for s in range(self.cfg.eval_every, rc.train.steps + 1, self.cfg.eval_every)]
        if rc.train.steps not in steps:
            steps.append(rc.train.steps)
        todo = [s for s in steps if s not in seen]
        if todo:
            student = self._student(rc)
            tokens = _tokens_by_step(Path(rc.out))
            for step in todo:
                tag = Path(rc.out) / "checkpoints" / f"step_{step:08d}"
                sd = consolidated_state_dict(tag, trainable_only=True)
                missing, unexpected = student.load_state_dict(sd, strict=False)
                if unexpected:
                    raise RuntimeError(f"{tag}: parameters {unexpected[:3]} are not in the student")
                row = {"step": step, "tokens": tokens.get(step, 0), **ref.evaluate(student)}
                if step == rc.train.steps and self.tasks:  # generation tasks: the final student only (cost)
                    row.update(self.tasks.evaluate(student, arm.run_name))
                rows.append(row)
                with open(path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                logger.info("%s step %d: test KL %.4f, ppl %.2f, top-1 %.3f", arm.run_name, step, row["heldout_kl"],
                            row["ppl"], row["top1_agreement"])
        return [self.initial(arm, ref)] + sorted(rows, key=lambda r: r["step"])

    # -- all -------------------------------------------------------------------------------------------------

    def run(self) -> StudyResults:
        clock = WallClock(self.out / WallClock.FILE)
        arms = self.choose()
        clock.tick()
        cache, cache_s = self.teacher_cache()
        ref = self.heldout()
        clock.tick()
        runs: dict[str, dict] = {}  # run_name -> timing and curve (shared by arms that picked the same layers)
        for arm in arms:
            if arm.run_name not in runs:
                timing = self.distill(arm, cache)
                clock.tick()
                runs[arm.run_name] = {"timing": timing, "curve": self.score(arm, ref)}
                clock.tick()
        out_arms = [{"key": a.key, "method": a.method, "k": a.k, "draw": a.draw, "seed": a.seed, "choice": a.choice,
                     "run": a.run_name, "curve": runs[a.run_name]["curve"],
                     "train_seconds": runs[a.run_name]["timing"].get("seconds"),
                     "export": str(self.out / "arms" / a.run_name / "final")} for a in arms]
        budget = self._budget(cache_s, ref)
        results = StudyResults.build(self.cfg, out_arms, budget, clock.tick(), distinct_runs=len(runs))
        results.write(self.out)
        return results

    def _budget(self, cache_s: float, ref: HeldOut) -> dict:
        d = self.cfg.distill
        return {"steps": d.train.steps, "seq_len": d.data.seq_len, "micro_batch": d.train.micro_batch,
                "grad_accum": d.train.grad_accum, "lr": d.optim.lr, "schedule": d.optim.schedule,
                "seeds": list(self.cfg.seeds), "init": d.student.init, "stage1_steps": d.loss.stage1_steps,
                "kd": d.loss.kd, "data": d.data.path, "test": self.cfg.test,
                "heldout_positions": ref.positions, "heldout_prompts": len(ref.prompts),
                "teacher_cache_k": self.cfg.cache_k, "teacher_cache_seconds": cache_s,
                "tasks": self._tasks_budget()}

    def _tasks_budget(self) -> dict | None:
        """The arithmetic / passkey settings and the teacher's scores (None: the study ran without them)."""
        if not self.tasks:
            return None
        return {**self._task_settings(), "teacher": {k: v for k, v in self.teacher_tasks.items() if k != "settings"}}


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


def _user_turns(path: str, tok, n: int) -> list[torch.Tensor]:
    """The first ``n`` held-out conversations up to their first assistant turn, as generation prompts."""
    return [encode(tok, "chat", m) for m in prompt_turns(read_records(path, what="test"))[:n]]


def _tokens_by_step(out: Path) -> dict[int, int]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return {}
    return {r["step"]: r["tokens"] for r in map(json.loads, path.read_text().splitlines())}


def run_study(cfg: StudyConfig) -> StudyResults:
    """Run (or continue: finished runs are kept) the study; its directory is locked while it runs."""
    cfg.validate()
    with claim(cfg.out, "study", resume=True) as output:
        results = Study(cfg).run()
        output.finish()
    return results


__all__ = ["Study", "run_study"]
