"""The whole RAD pipeline from one YAML: diagnose -> replace -> distill -> export -> evaluate.

``PipelineConfig`` is made of the stage configs themselves (``diagnose: DiagnoseConfig``, ``replace:
ReplaceConfig``, ``distill: DistillConfig``, ``evaluate: EvalConfig``) plus what joins them (``out``, ``model``,
``k``, ``nproc``, ``hostfile``); it is loaded and validated whole, so a typo in any section fails in
seconds, before any stage runs. The paths that connect the stages (the report, the student, the
checkpoints) are filled in by the pipeline. A section may name a base file with ``config:`` (a run config
for ``distill``); its other keys apply over it.

Each stage runs through its typed entry: in this process when it runs alone, or as ``deepspeed --module
rad_ds.<stage>`` with ``nproc`` ranks (or a hostfile) given the stage's config as a JSON file. A stage whose
output exists is skipped, so a re-run after a failure resumes where it stopped (distillation itself resumes
from its latest checkpoint). Results are read through the artifact types (``DiagnosisReport``,
``RunSummary``, ``EvalResults``); the comparison table is printed and written to ``OUT/comparison.md``.

Layout under ``out``: ``diagnosis/`` (report.json, redundancy.png), ``student/`` (the initialised student),
``distill/`` (checkpoints/, final/, metrics.jsonl, summary.json), ``eval/`` (results.json, results.md),
``configs/`` (each stage's resolved config), ``pipeline.json``, ``comparison.md``. In self-distillation the
distill stage starts from the base and the report's layers (the student ``replace`` writes, same init and
seed), so its teacher is the student's own frozen stack (``teacher.location=shared``); a separate teacher
distils the student in ``student/``.
"""

from __future__ import annotations

import argparse
import gc
import logging
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from rad_ds.core.cli import run_cli
from rad_ds.core.config import (
    Config,
    ConfigError,
    flatten,
    load_file,
    resolve_shipped,
    section,
    setting,
)
from rad_ds.core.io import write_text_atomic
from rad_ds.core.outputs import claim
from rad_ds.core.report import DiagnosisReport
from rad_ds.core.sections import ModelRef
from rad_ds.diagnosis.config import DiagnoseConfig
from rad_ds.distill.config import PLACEMENTS_WITH_REPORT, DistillConfig
from rad_ds.distill.export import export_checkpoint
from rad_ds.distill.summary import RunSummary
from rad_ds.distill.run import distill
from rad_ds.eval.config import EvalConfig
from rad_ds.eval.results import EvalResults, with_interval
from rad_ds.eval.run import evaluate
from rad_ds.surgery.config import ReplaceConfig
from rad_ds.surgery.run import replace

logger = logging.getLogger(__name__)
STAGES = ("diagnose", "replace", "distill", "export", "evaluate")
SECTIONS = {"diagnose": DiagnoseConfig, "replace": ReplaceConfig, "distill": DistillConfig, "evaluate": EvalConfig}
MODULES = {"diagnose": "rad_ds.diagnosis", "distill": "rad_ds.distill", "evaluate": "rad_ds.eval"}


class StageFailed(ValueError):
    """A stage exited non-zero or left no output (a ValueError, so launchers report it in one line)."""


@dataclass
class PipelineConfig(Config):
    RENAMED: ClassVar[dict[str, str]] = {"gguf_file": "model.gguf_file"}  # the model section; goes next release

    out: str | None = setting(None, "the run directory (diagnosis/, student/, distill/, eval/, comparison.md)")
    model: ModelRef = section(ModelRef, path="embedded:smollm2", help={
        "path": "base model: HF dir, .gguf file or embedded:smollm2",
        "dtype": "dtype of the base in every stage (diagnose, replace, distill, evaluate); unset: each section's "
                 "own"})
    k: int = setting(2, "attention layers to replace (one of diagnose.k)")
    nproc: int = setting(1, "ranks for the distributed stages (diagnose, distill, evaluate) on this node")
    hostfile: str | None = setting(None, "multi-node: a deepspeed hostfile (overrides nproc)")
    stages: list[str] = setting(list(STAGES), f"stages to run, of {', '.join(STAGES)}")
    diagnose: DiagnoseConfig = field(default_factory=DiagnoseConfig)
    replace: ReplaceConfig = field(default_factory=ReplaceConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)

    @classmethod
    def load(cls, path: str | Path, overrides: dict | None = None) -> "PipelineConfig":
        """The YAML/JSON at ``path`` (each section over its ``config:`` base file), then ``overrides``,
        joined and validated: any error names the file, the key and the fix."""
        where = str(path)
        data = load_file(resolve_shipped(path), what="--config")
        cfg = cls()
        for name, section_cls in SECTIONS.items():
            sec = data.pop(name, None) or {}
            if not isinstance(sec, dict):
                raise ConfigError(f"{where}: {name} must be a mapping of {name} settings, got {sec!r}")
            base = sec.pop("config", None)
            if base is not None:
                setattr(cfg, name, section_cls.load(base, what=f"{where}: {name}.config"))
            for key, value in flatten(section_cls, sec).items():
                cfg.set(f"{name}.{key}", value, source=where)
        given = {k: v for k, v in (overrides or {}).items() if v is not None}
        for key, value in {**flatten(cls, data), **given}.items():
            cfg.set(key, value, source=where)
        return cfg.resolve(where)

    def resolve(self, where: str = "config") -> "PipelineConfig":
        """Fill in what joins the stages, then validate every stage's config before any of them runs."""
        if not self.out:
            raise ConfigError(f"{where}: 'out' (the run directory) is required")
        bad = [s for s in self.stages if s not in STAGES]
        if bad:
            raise ConfigError(f"{where}: unknown stage(s) {bad}; stages are {list(STAGES)}")
        if self.nproc < 1:
            raise ConfigError(f"{where}: nproc must be >= 1")
        if self.k not in self.diagnose.k:
            raise ConfigError(f"{where}: k={self.k} must be one of diagnose.k {self.diagnose.k} (the report gives "
                              "the layers)")
        d = self.dirs
        self.model.apply_to(self.diagnose.model)
        self.diagnose.out = str(d["diagnose"])
        # a stage runs only when done() says its output is missing, so it may replace what is there (moved aside
        # until it finishes, restored if it fails); distillation resumes instead
        self.diagnose.overwrite = True
        r = self.replace
        self.model.apply_to(r.model)
        r.layers, r.report, r.k = None, str(self.report_path), self.k
        r.out, r.overwrite = str(d["replace"]), True
        t = self.distill
        t.out, t.checkpoint.resume = str(d["distill"]), "auto"
        place = t.student.placement  # how distill chooses its layers (rad_ds.selection); None: the report's
        if t.teacher.path is None:
            # self-distillation: distil from the base with the report's layers, the same student replace writes
            # (same init and seed), so the teacher is the student's own frozen stack, held once
            self.model.apply_to(t.model)
            t.student.layers, t.student.report, t.student.k = None, str(self.report_path), self.k
            if place is not None and place not in PLACEMENTS_WITH_REPORT:
                t.student.report = None  # this placement chooses without the report
            t.student.init, t.student.seed, t.student.allow_all = r.init, r.seed, r.allow_all
        else:  # a separate teacher: the student is the one replace wrote
            if place not in (None, "rad"):
                raise ConfigError(f"{where}: distill.student.placement={place} needs self-distillation in the "
                                  "pipeline (with distill.teacher.path the student is the one replace builds from "
                                  "the report); drop one of the two")
            ModelRef(str(d["replace"]), None, self.model.dtype).apply_to(t.model)
            t.student.layers = t.student.report = t.student.k = t.student.placement = None
        dg = self.diagnose
        if dg.data is None and dg.prompts is None and dg.source in ("auto", "documents", "both") and t.data.path:
            dg.data = t.data.path  # the diagnosis scores masks on the data this run distils on
        e = self.evaluate
        joined = [self.model.source, str(d["distill"] / "final")]
        e.dtype = self.model.dtype or e.dtype
        e.models = joined + [m for m in e.models if m not in joined]  # the section may add models (a teacher)
        e.out, e.overwrite = str(d["evaluate"]), True
        if "speed" in e.tasks and e.report is None and not e.skip_layers:
            e.report, e.k = str(self.report_path), self.k
        for name, stage in (("diagnose", self.diagnose), ("replace", self.replace), ("distill", self.distill),
                            ("evaluate", self.evaluate)):
            try:
                stage.validate(inputs_exist=False) if name in ("replace", "evaluate") else stage.validate()
            except (ValueError, FileNotFoundError) as err:
                raise ConfigError(f"{where}: section {name}: {str(err).splitlines()[0]}") from None
        return self

    @property
    def dirs(self) -> dict[str, Path]:
        out = Path(self.out)
        return {"diagnose": out / "diagnosis", "replace": out / "student", "distill": out / "distill",
                "evaluate": out / "eval"}

    @property
    def report_path(self) -> Path:
        return self.dirs["diagnose"] / DiagnosisReport.FILE


class Pipeline:
    def __init__(self, cfg: PipelineConfig, python: str = sys.executable):
        self.cfg, self.out, self.python, self.dirs = cfg, Path(cfg.out), python, cfg.dirs
        self.timings: dict[str, float | str] = {}

    # -- what "done" means for each stage
    def done(self, stage: str) -> bool:
        d = self.dirs
        if stage == "distill":
            summary = RunSummary.load(d["distill"])
            return summary is not None and summary.finished
        return {
            "diagnose": self.cfg.report_path,
            "replace": d["replace"] / "config.json",
            "export": d["distill"] / "final" / "config.json",
            "evaluate": d["evaluate"] / EvalResults.FILE,
        }[stage].is_file()

    @property
    def distributed(self) -> bool:
        return bool(self.cfg.hostfile) or self.cfg.nproc > 1

    def command(self, stage: str) -> list[str]:
        """The ``deepspeed --module`` command of a distributed stage, given its config as a JSON file."""
        conf = self.out / "configs" / f"{stage}.json"
        getattr(self.cfg, stage).save(conf)
        port = str(random.Random(f"{self.out}{stage}").randint(29500, 29999))
        cmd = [str(Path(self.python).parent / "deepspeed"), "--master_port", port]
        cmd += ["--hostfile", self.cfg.hostfile] if self.cfg.hostfile else ["--num_gpus", str(self.cfg.nproc)]
        return cmd + ["--module", MODULES[stage], "--config", str(conf)]

    def run_stage(self, stage: str) -> None:
        if stage in MODULES and self.distributed:
            cmd = self.command(stage)
            print(f"== {stage}: {' '.join(cmd)}", flush=True)
            rc = subprocess.run(cmd).returncode
            if rc != 0:
                raise StageFailed(f"stage {stage} failed (exit {rc}); fix the cause and run the same command "
                                  "again: finished stages are skipped")
        else:
            print(f"== {stage}: in this process", flush=True)
            self.run_here(stage)
            gc.collect()

    def run_here(self, stage: str) -> None:
        c = self.cfg
        if stage == "diagnose":
            from rad_ds.diagnosis.run import diagnose  # deferred: rad --help without optuna (diagnosis.search)

            diagnose(c.diagnose)
        elif stage == "replace":
            record = replace(c.replace)
            print(f"replaced layers {record.layers} (init={record.init}) -> {c.replace.out}")
        elif stage == "distill":
            distill(c.distill)
        elif stage == "export":
            export_checkpoint(self.dirs["distill"] / "checkpoints", self.dirs["distill"] / "final", overwrite=True)
        else:
            evaluate(c.evaluate)

    def run(self) -> str:
        # the run directory is locked for the pipeline's lifetime; a re-run continues it (finished stages skipped)
        with claim(self.out, "pipeline", resume=True) as output:
            table = self._run()
            output.finish()
        return table

    def _run(self) -> str:
        self.cfg.save(self.out / "pipeline.json")
        for stage in (s for s in STAGES if s in self.cfg.stages):
            if self.done(stage):
                print(f"== {stage}: done already, skipped", flush=True)
                self.timings[stage] = "skipped"
                continue
            t0 = time.perf_counter()
            try:
                self.run_stage(stage)
            finally:
                self.timings[stage] = time.perf_counter() - t0
                _end_process_group()
            if not self.done(stage):
                raise StageFailed(f"stage {stage} finished but left no output in {self.dirs.get(stage, self.out)}")
            print(f"== {stage}: {self.timings[stage]:.0f} s", flush=True)
        table = self.comparison()
        write_text_atomic(self.out / "comparison.md", table + "\n")
        print("\n" + table, flush=True)
        return table

    def comparison(self) -> str:
        """Base vs student: the evaluation scores and speed, the replaced layers and the diagnosis."""
        lines = [f"# RAD: {self.cfg.model.source} -> hybrid student", ""]
        if self.cfg.report_path.is_file():
            rep = DiagnosisReport.load(self.cfg.report_path)
            sel = rep.selection(self.cfg.k)
            meas = f", measured {sel.measured_speedup:.2f}x" if sel.measured_speedup else ""
            lines += [f"Diagnosis: k={sel.k} attention layers {list(sel.layers)} ({sel.method}): draft acceptance "
                      f"{sel.acceptance_rate:.3f}, mean accepted length {sel.mean_accepted_length:.2f}, estimated "
                      f"speed-up {sel.estimated_speedup:.2f}x{meas}. {rep.scored_on()}", ""]
        s = RunSummary.load(self.dirs["distill"])
        if s is not None and s.get("final_loss") is not None:
            lines += [f"Distillation: {s['last_step']} steps on {s['world']} rank(s), {s['tokens']} tokens, loss "
                      f"{s['first_loss']:.4f} -> {s['final_loss']:.4f}, {s['elapsed_s']:.0f} s "
                      f"({s['tokens_per_s']:.0f} tokens/s).", ""]
            if self.cfg.distill.student.placement not in (None, "rad"):
                lines[-1:] = [f"Student layers {s.get('replaced_layers')}, chosen by distill.student.placement="
                              f"{self.cfg.distill.student.placement}.", ""]
        if (self.dirs["evaluate"] / EvalResults.FILE).is_file():
            lines += _results_table(EvalResults.load(self.dirs["evaluate"]))
        t = ", ".join(f"{k} {v:.0f} s" if isinstance(v, float) else f"{k} {v}" for k, v in self.timings.items())
        if t:
            lines += ["", f"Stages: {t}."]
        return "\n".join(lines)


def main(argv: list[str] | None = None, doc: str | None = None) -> int:
    """``rad`` / ``launchers/rad.py``: ``--config YAML`` and a few top-level overrides."""
    def run(a):
        ap = argparse.ArgumentParser(description=doc or __doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        ap.add_argument("--config", required=True, help="pipeline YAML (see configs/rad_demo.yaml)")
        ap.add_argument("--out", default=None, help="override the run directory")
        ap.add_argument("--model", default=None, help="override the base model")
        ap.add_argument("--nproc", type=int, default=None, help="override ranks per distributed stage")
        ap.add_argument("--hostfile", default=None, help="deepspeed hostfile for the distributed stages")
        args = ap.parse_args(a)
        over = {"out": args.out, "model": args.model, "nproc": args.nproc, "hostfile": args.hostfile}
        Pipeline(PipelineConfig.load(args.config, over)).run()
        return 0

    return run_cli(run, argv)


def _results_table(res: EvalResults) -> list[str]:
    """Scores as ``x [lo, hi] (n=N)`` (95% intervals, see results.md), and the paired speed ratio to the first
    model (per repeat, the models timed round-robin) with its interval."""
    models = list(dict.fromkeys(r["model"] for r in res.rows))
    tasks = list(dict.fromkeys((r["task"], r["metric"]) for r in res.rows))
    lines = ["| task | metric | " + " | ".join(models) + " |", "|---|---|" + "---|" * len(models)]
    for task, metric in tasks:
        cells = []
        for m in models:
            r = res.score(m, task, metric)
            cells.append("-" if r is None or r["score"] is None else
                         (with_interval(r["score"], r.get("ci95"), 1 if task == "speed" else 4)
                          + (f" (n={r['n']})" if task != "speed" else "")))
        lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
        if task == "speed":
            paired = [(res.score(m, task, metric) or {}).get("details", {}).get("paired") for m in models]
            ref = next((p["against"] for p in paired if p), None)
            if ref is not None:
                reps = (res.score(ref, task, metric) or {}).get("details", {}).get("repeats")
                cells = [with_interval(p["median"], p["ci95"], 3) if p else ("1" if m == ref else "-")
                         for m, p in zip(models, paired)]
                lines.append(f"| speed | decode tok/s / {ref}'s, paired (median of {reps} repeats) | "
                             + " | ".join(cells) + " |")
    lines += ["", "[lo, hi]: 95% intervals: Wilson's for accuracies, a bootstrap over documents for perplexity, order "
              "statistics of the timed repeats for speed (eval/results.md says more)."]
    if res.models:
        lines += ["", "| model | layers (A = attention, M = Mamba2) |", "|---|---|"]
        lines += [f"| {m} | `{v['layers']}` |" for m, v in res.models.items()]
    return lines


def _end_process_group() -> None:
    """A stage run in this process leaves no process group behind for the next one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


__all__ = ["Pipeline", "PipelineConfig", "StageFailed", "main"]
