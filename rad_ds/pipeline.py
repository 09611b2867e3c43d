"""The whole RAD pipeline from one YAML: diagnose -> replace -> distill -> export -> evaluate.

Each stage is the same launcher a user runs by hand, started as a subprocess (under ``deepspeed`` with
``nproc`` ranks, or a hostfile, where the stage is distributed), and is skipped when its output already
exists, so a re-run after a failure resumes where it stopped (distillation itself resumes from its
latest checkpoint). At the end a comparison table (base vs student: scores, speed, what was replaced)
is printed and written to ``OUT/comparison.md``.

Layout under ``out``: ``diagnosis/`` (report.json, redundancy.png), ``student/`` (the initialised
student), ``distill/`` (checkpoints/, final/, metrics.jsonl), ``eval/`` (results.json, results.md).
"""

from __future__ import annotations

import json
import logging
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
logger = logging.getLogger(__name__)
STAGES = ("diagnose", "replace", "distill", "export", "evaluate")


class StageFailed(ValueError):
    """A stage exited non-zero or left no output (a ValueError, so launchers report it in one line)."""


@dataclass
class PipelineConfig:
    out: str
    model: str = "embedded:smollm2"
    gguf_file: str | None = None
    k: int = 2  # attention layers to replace (must be one of diagnose.k)
    nproc: int = 1  # ranks for the distributed stages (diagnose, distill, evaluate) on this node
    hostfile: str | None = None  # multi-node: a deepspeed hostfile (overrides nproc)
    diagnose: dict = field(default_factory=dict)  # extra launchers/diagnose.py flags, e.g. {trials: 20}
    replace: dict = field(default_factory=dict)  # extra launchers/replace.py flags, e.g. {init: attention}
    distill: dict = field(default_factory=dict)  # {config: YAML, ...dotted or plain launchers/distill.py flags}
    evaluate: dict = field(default_factory=dict)  # extra launchers/evaluate.py flags, e.g. {tasks: gsm8k, limit: 8}
    stages: list = field(default_factory=lambda: list(STAGES))

    @classmethod
    def load(cls, path: str | Path, overrides: dict | None = None) -> "PipelineConfig":
        p = Path(path)
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except FileNotFoundError:
            raise FileNotFoundError(f"--config {p}: file not found") from None
        except yaml.YAMLError as e:
            raise ValueError(f"--config {p}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ValueError(f"--config {p}: expected a mapping of settings at the top level")
        data.update({k: v for k, v in (overrides or {}).items() if v is not None})
        known = set(cls.__dataclass_fields__)
        bad = sorted(set(data) - known)
        if bad:
            raise ValueError(f"--config {p}: unknown setting(s) {bad}; known: {sorted(known)}")
        if "out" not in data:
            raise ValueError(f"--config {p}: 'out' (the run directory) is required")
        cfg = cls(**data)
        cfg.validate(str(p))
        return cfg

    def validate(self, where: str = "config"):
        bad = [s for s in self.stages if s not in STAGES]
        if bad:
            raise ValueError(f"{where}: unknown stage(s) {bad}; stages are {list(STAGES)}")
        ks = self.diagnose.get("k", [self.k])
        ks = [int(x) for x in (ks.split(",") if isinstance(ks, str) else ks)] if not isinstance(ks, int) else [ks]
        if self.k not in ks:
            raise ValueError(f"{where}: k={self.k} must be one of diagnose.k {ks} (the report gives the layers)")
        self.diagnose["k"] = ks
        if self.nproc < 1:
            raise ValueError(f"{where}: nproc must be >= 1")


def _flags(d: dict) -> list[str]:
    """{trials: 20, no_chat: true, k: [2, 4]} -> ['--trials', '20', '--no-chat', '--k', '2,4']."""
    out = []
    for key, val in d.items():
        flag = "--" + key.replace("_", "-") if "." not in key else "--" + key
        if val is True:
            out.append(flag)
        elif val is False or val is None:
            continue
        elif isinstance(val, (list, tuple)):
            if key in ("model", "data"):  # repeatable flags
                for v in val:
                    out += [flag, str(v)]
            else:
                out += [flag, ",".join(map(str, val))]
        else:
            out += [flag, str(val)]
    return out


class Pipeline:
    def __init__(self, cfg: PipelineConfig, python: str = sys.executable):
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.python = python
        self.dirs = {"diagnose": self.out / "diagnosis", "replace": self.out / "student",
                     "distill": self.out / "distill", "evaluate": self.out / "eval"}
        self.timings: dict[str, float | str] = {}

    # -- what "done" means for each stage
    def done(self, stage: str) -> bool:
        d = self.dirs
        return {
            "diagnose": (d["diagnose"] / "report.json").is_file(),
            "replace": (d["replace"] / "config.json").is_file(),
            "distill": self._distill_finished(),
            "export": (d["distill"] / "final" / "config.json").is_file(),
            "evaluate": (d["evaluate"] / "results.json").is_file(),
        }[stage]

    def _distill_finished(self) -> bool:
        s = self.dirs["distill"] / "summary.json"
        if not s.is_file():
            return False
        summ = json.loads(s.read_text())
        return summ.get("last_step") is not None and summ.get("last_step") == summ.get("steps")

    def _launch(self, script: str, args: list[str], distributed: bool) -> list[str]:
        cmd = [self.python]
        if distributed and (self.cfg.hostfile or self.cfg.nproc > 1):
            ds = str(Path(self.python).parent / "deepspeed")
            port = str(random.Random(f"{self.out}{script}").randint(29500, 29999))
            cmd = [ds, "--master_port", port]
            cmd += ["--hostfile", self.cfg.hostfile] if self.cfg.hostfile else ["--num_gpus", str(self.cfg.nproc)]
        return cmd + [str(ROOT / "launchers" / script)] + args

    def command(self, stage: str) -> list[str]:
        c, d = self.cfg, self.dirs
        model = ["--model", c.model] + (["--gguf-file", c.gguf_file] if c.gguf_file else [])
        if stage == "diagnose":
            return self._launch("diagnose.py", model + ["--out", str(d["diagnose"])] + _flags(c.diagnose), True)
        if stage == "replace":
            args = model + ["--report", str(d["diagnose"] / "report.json"), "--k", str(c.k),
                            "--out", str(d["replace"]), "--overwrite"] + _flags(c.replace)
            return self._launch("replace.py", args, False)
        if stage == "distill":
            extra = dict(c.distill)
            conf = extra.pop("config", None)
            # the student is the one the replace stage wrote: no further layer selection here
            args = (["--config", str(conf)] if conf else []) + [
                "--model", str(d["replace"]), "--out", str(d["distill"]), "--resume", "auto",
                "--student.layers=null", "--student.report=null", "--student.k=null"]
            # the teacher is the base model (the student records it as its source)
            args += [f"--teacher.path={c.model}"] + ([f"--teacher.gguf_file={c.gguf_file}"] if c.gguf_file else [])
            for key, val in extra.items():
                args.append(f"--{key}={','.join(map(str, val)) if isinstance(val, list) else val}")
            return self._launch("distill.py", args, True)
        if stage == "export":
            return self._launch("export.py", ["--checkpoint", str(d["distill"] / "checkpoints"),
                                              "--out", str(d["distill"] / "final")], False)
        if stage == "evaluate":
            ev = dict(c.evaluate)
            args = ["--model", c.model, "--model", str(d["distill"] / "final"), "--out", str(d["evaluate"])]
            if "speed" in str(ev.get("tasks", "")) and "report" not in ev:
                args += ["--report", str(d["diagnose"] / "report.json"), "--k", str(c.k)]
            return self._launch("evaluate.py", args + _flags(ev), True)
        raise ValueError(stage)

    def run(self) -> str:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "pipeline.json").write_text(json.dumps(self.cfg.__dict__, indent=2, default=str) + "\n")
        for stage in STAGES:
            if stage not in self.cfg.stages:
                continue
            if self.done(stage):
                print(f"== {stage}: done already, skipped", flush=True)
                self.timings[stage] = "skipped"
                continue
            cmd = self.command(stage)
            print(f"== {stage}: {' '.join(cmd)}", flush=True)
            t0 = time.perf_counter()
            rc = subprocess.run(cmd, cwd=ROOT).returncode
            self.timings[stage] = time.perf_counter() - t0
            if rc != 0:
                raise StageFailed(
                    f"stage {stage} failed (exit {rc}); fix the cause and run the same command again: "
                    "finished stages are skipped"
                )
            if not self.done(stage):
                raise StageFailed(f"stage {stage} exited 0 but left no output in {self.dirs.get(stage, self.out)}")
            print(f"== {stage}: {self.timings[stage]:.0f} s", flush=True)
        table = self.comparison()
        (self.out / "comparison.md").write_text(table + "\n")
        print("\n" + table, flush=True)
        return table

    def comparison(self) -> str:
        """Base vs student: the evaluation scores and speed, the replaced layers and the diagnosis."""
        lines = [f"# RAD: {self.cfg.model} -> hybrid student", ""]
        rep_p = self.dirs["diagnose"] / "report.json"
        if rep_p.is_file():
            rep = json.loads(rep_p.read_text())
            sel = next((s for s in rep["selections"] if s["k"] == self.cfg.k), None)
            if sel:
                meas = sel.get("measured_speedup")
                lines += [f"Diagnosis: k={sel['k']} attention layers {sel['layers']} ({sel.get('method')}): "
                          f"draft acceptance {sel['acceptance_rate']:.3f}, mean accepted length "
                          f"{sel['mean_accepted_length']:.2f}, estimated speed-up {sel['estimated_speedup']:.2f}x"
                          + (f", measured {meas:.2f}x" if meas else "") + ".", ""]
        summ = self.dirs["distill"] / "summary.json"
        if summ.is_file():
            s = json.loads(summ.read_text())
            if s.get("final_loss") is not None:
                lines += [f"Distillation: {s['last_step']} steps on {s['world']} rank(s), {s['tokens']} tokens, loss "
                          f"{s['first_loss']:.4f} -> {s['final_loss']:.4f}, {s['elapsed_s']:.0f} s "
                          f"({s['tokens_per_s']:.0f} tokens/s).", ""]
        res_p = self.dirs["evaluate"] / "results.json"
        if res_p.is_file():
            res = json.loads(res_p.read_text())
            rows = res["results"]
            models = list(dict.fromkeys(r["model"] for r in rows))
            tasks = list(dict.fromkeys((r["task"], r["metric"]) for r in rows))
            lines += ["| task | metric | " + " | ".join(models) + " |", "|---|---|" + "---|" * len(models)]
            for task, metric in tasks:
                cells = []
                for m in models:
                    r = next((x for x in rows if x["model"] == m and x["task"] == task and x["metric"] == metric), None)
                    cells.append("-" if r is None or r["score"] is None else
                                 (f"{r['score']:.4g}" + (f" (n={r['n']})" if task != "speed" else "")))
                lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
            if res.get("models"):
                lines += ["", "| model | layers (A = attention, M = Mamba2) |", "|---|---|"]
                lines += [f"| {m} | `{v['layers']}` |" for m, v in res["models"].items()]
        t = ", ".join(f"{k} {v:.0f} s" if isinstance(v, float) else f"{k} {v}" for k, v in self.timings.items())
        if t:
            lines += ["", f"Stages: {t}."]
        return "\n".join(lines)
