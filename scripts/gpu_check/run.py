"""The GPU check: one command that fits a lent GPU machine's lease, rehearsed on the CPU before one is lent.

``bash scripts/gpu_check.sh`` (device) or ``bash scripts/gpu_check.sh --rehearse`` (CPU, toy sizes, the same steps,
commands and writers, the torch path standing in for the kernels). Steps, in order of value, each a list of commands
run under its own budget (killed and recorded as ``timeout`` past it; the next step still runs while the total
allows):

    install   the carried wheels (.whl/) the image lacks, into a --target folder on PYTHONPATH (--no-deps, --no-index)
    env       versions, the kernels, copy bandwidth and bf16 matmul rate (scripts/gpu_check/env_probe.py)
    tests     pytest -m gpu: kernels vs torch path, ZeRO-3 + one-copy teacher in bf16, CUDA-graph decode = eager
    distill   a bf16 distillation step of a ~1B-shaped student: tokens/s and MFU (benchmarks/distill_step.py)
    decode    hybrid vs all-attention base decode at 4k/16k/32k, batch 1 and 8, vs bandwidth (gpu_check/decode.py)
    scan      the SSD scan in bf16 and fp32: Triton vs torch vs mamba-ssm's references (benchmarks/ssm_scan.py)
    one_copy  one-copy teacher vs two engines, bf16 (benchmarks/one_copy.py)

What comes back (``$OUT``, at most 6 files; the device returns 8): ``summary.json`` (rewritten atomically before and
after every step: status, seconds, budget, key figures, versions, kernels), ``gpu_check.log`` (everything printed),
``gpu_tests.xml`` (junit), ``decode.png``, ``results.tar.gz`` (every step's JSON/.md, repacked after every step,
< 16 MiB) and on the device ``triton_cache.tar.gz`` (the compiled kernels: carried back in, a rerun skips compiling).

The steps and their budgets are a registry (``steps.py``); the writers are ``outputs.py``; the carried wheels
``wheels.py``. Standard library only: it runs before anything is installed. ``--check-wheels`` checks .whl/ here,
before a call.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
# this folder's modules (sys.path[0] when run as a script)
import wheels  # noqa: E402
from outputs import MAX_OUT_FILES, Log, now, pack, rounded, write_atomic  # noqa: E402
from steps import BY_NAME, REHEARSAL_KERNELS, STEPS, Ctx, Step  # noqa: E402


# -- running a step ------------------------------------------------------------------------------------------------


def _child_setup() -> None:
    """In the child: its own process group (so a timeout kills its children too, without a new session, which the
    device would leave running), and death with the driver (a driver killed at the call's limit takes it along)."""
    os.setpgid(0, 0)
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Runner:
    def __init__(self):
        self.child: subprocess.Popen | None = None

    def kill(self) -> None:
        p = self.child
        if p is None or p.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                return
            try:
                p.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def run(self, cmd: list[str], env: dict, timeout: float, log: Log) -> tuple[int | None, bool]:
        """(exit code, timed out) of ``cmd`` with its output streamed to ``log``."""
        self.child = p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, preexec_fn=_child_setup)
        pump = threading.Thread(target=lambda: [log(line.decode(errors="replace").rstrip("\n")) for line in p.stdout],
                                daemon=True)
        pump.start()
        try:
            rc = p.wait(timeout=max(timeout, 0.1))
            timed_out = False
        except subprocess.TimeoutExpired:
            self.kill()
            rc, timed_out = p.poll(), True
        pump.join(5)
        self.child = None
        return rc, timed_out


# -- the driver ----------------------------------------------------------------------------------------------------


def budget_of(step: Step, rehearse: bool, overrides: dict) -> float:
    return overrides.get(step.name, step.rehearse_budget if rehearse else step.budget)


def budget_table(steps, rehearse: bool, overrides: dict) -> str:
    rows = [f"  {s.name:9s} {budget_of(s, rehearse, overrides):6.0f} s  {s.what}" for s in steps]
    total = sum(budget_of(s, rehearse, overrides) for s in steps)
    return "\n".join(rows + [f"  {'total':9s} {total:6.0f} s"])


def _git(*args) -> str | None:
    try:
        r = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return r.stdout.strip() if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def kernels_line(ctx: Ctx) -> str | None:
    if ctx.rehearse:
        return REHEARSAL_KERNELS
    if not ctx.info:
        return None
    k = ctx.info.get("kernels")
    if not k:
        return f"NOT importable: {'; '.join(ctx.info.get('kernels_why_not') or ['?'])}"
    conv = "causal-conv1d kernels" if "conv" in k else "conv as F.conv1d (no causal-conv1d)"
    return f"mamba-ssm {ctx.info['versions'].get('mamba-ssm')} Triton kernels ({', '.join(k)}); {conv}"


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rehearse", action="store_true", help="on the CPU, toy sizes, torch path for the kernels")
    ap.add_argument("--check-wheels", nargs="?", const=str(ROOT / ".whl"), default=None, metavar="DIR",
                    help="only check the wheels to carry (default .whl/) for the device's Python and the size limit")
    ap.add_argument("--out", default=None, help="what comes back (default $OUT; else benchmarks/results/gpu, or a "
                                                 "temporary folder for --rehearse)")
    ap.add_argument("--work", default=None, help="scratch folder (default: a new temporary one, removed at the end)")
    ap.add_argument("--steps", default=None, help=f"comma-separated subset of {','.join(BY_NAME)}")
    ap.add_argument("--budget", action="append", default=[], metavar="STEP=SECONDS", help="override a step's budget")
    ap.add_argument("--deadline", type=float, default=None,
                    help="total seconds; a step gets min(its budget, what is left) (default: the budgets' sum + 20)")
    ap.add_argument("--list", action="store_true", help="print the steps and budgets and exit")
    return ap


def _overrides(ap: argparse.ArgumentParser, items: list[str]) -> dict:
    """``--budget STEP=SECONDS`` (repeated) as {step: seconds}."""
    overrides = {}
    for item in items:
        name, _, sec = item.partition("=")
        if name not in BY_NAME or not sec:
            ap.error(f"--budget {item}: want STEP=SECONDS with STEP one of {', '.join(BY_NAME)}")
        overrides[name] = float(sec)
    return overrides


def _selected(ap: argparse.ArgumentParser, names: str | None) -> list[Step]:
    """The steps ``--steps`` names, in the registry's order (all of them without it)."""
    if not names:
        return list(STEPS)
    unknown = [n for n in names.split(",") if n not in BY_NAME]
    if unknown:
        ap.error(f"--steps: unknown {unknown}; the steps are {', '.join(BY_NAME)}")
    return [s for s in STEPS if s.name in names.split(",")]


def _out_and_work(a) -> tuple[Path, Path]:
    """The folder that comes back, cleared of a previous run's files (nothing else in it is touched), and the scratch
    folder with its ``results/`` and ``scratch/``."""
    out = Path(a.out or os.environ.get("OUT") or (Path(tempfile.gettempdir()) / "rad_ds_gpu_check_rehearsal"
                                                   if a.rehearse else ROOT / "benchmarks" / "results" / "gpu"))
    out.mkdir(parents=True, exist_ok=True)
    for name in ("summary.json", "gpu_check.log", "gpu_tests.xml", "decode.png", "results.tar.gz",
                 "triton_cache.tar.gz"):
        (out / name).unlink(missing_ok=True)
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="rad_ds_gpu_check_"))
    (work / "results").mkdir(parents=True, exist_ok=True)
    (work / "scratch").mkdir(parents=True, exist_ok=True)
    return out, work


def _steps_env(rehearse: bool, work: Path, triton_cache: Path) -> dict:
    """The environment of every step's commands: offline, caches under ``work``, the installed wheels' folder first on
    PYTHONPATH; the rehearsal hides any GPU and runs one thread unless told otherwise."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false", "MPLBACKEND": "Agg",
           "RAD_DS_CACHE": str(work / "cache"), "TRITON_CACHE_DIR": str(triton_cache),
           "PYTHONPATH": os.pathsep.join([str(work / "site"), str(ROOT)]
                                         + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))}
    env.pop("RAD_DS_REQUIRE_KERNELS", None)
    if rehearse:
        env.update(OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"), CUDA_VISIBLE_DEVICES="")
    return env


def _new_summary(a, argv, steps, overrides: dict, total_budget: float) -> dict:
    """``summary.json`` before any step has run: every step pending, the provenance this machine can tell."""
    commit = _git("rev-parse", "HEAD") or os.environ.get("RAD_DS_COMMIT")  # the device's copy has no .git
    return {
        "check": "rad-ds GPU check (scripts/gpu_check.sh)", "mode": "rehearsal" if a.rehearse else "device",
        "kernels": REHEARSAL_KERNELS if a.rehearse else None, "status": "running", "started": now(), "updated": None,
        "elapsed_s": 0.0, "budget_total_s": total_budget,
        "provenance": {"commit": commit, "dirty": bool(_git("status", "--porcelain", "--untracked-files=no"))
                       if commit else None,
                       "command": " ".join(["bash scripts/gpu_check.sh", *(sys.argv[1:] if argv is None else argv)]),
                       "date": now(), "versions": {"python": platform.python_version()},
                       "machine": {"platform": platform.platform(), "processor": platform.machine(),
                                   "cpus": os.cpu_count(), "device": None}},
        "versions": None, "device": None,
        "steps": [{"step": s.name, "what": s.what, "status": "pending", "seconds": None,
                   "budget_s": budget_of(s, a.rehearse, overrides), "rc": None, "figures": {}, "note": None,
                   "commands": None} for s in steps],
        "files": None, "left_out_of_tarball": [],
    }


class Check:
    """One run of the check: its steps run one after the other under the deadline, and ``summary.json`` and
    ``results.tar.gz`` kept current in ``out`` so that a run killed part-way leaves what finished."""

    def __init__(self, ctx: Ctx, steps: list[Step], summary: dict, log: Log, t_start: float, deadline: float,
                 triton_cache: Path):
        self.ctx, self.steps, self.summary, self.log = ctx, steps, summary, log
        self.t_start, self.deadline, self.triton_cache = t_start, deadline, triton_cache
        self.runner = Runner()

    def write_summary(self) -> None:
        s, out = self.summary, self.ctx.out
        s["updated"] = now()
        s["elapsed_s"] = round(time.monotonic() - self.t_start, 1)
        present = sorted(p.name for p in out.iterdir() if p.is_file() and not p.name.startswith("."))
        s["files"] = sorted(set(present) | {"summary.json"})
        write_atomic(out / "summary.json", (json.dumps(s, indent=2) + "\n").encode())

    def repack(self) -> None:
        self.summary["left_out_of_tarball"] = pack(self.ctx.work / "results", self.ctx.out / "results.tar.gz",
                                                   "results")

    def on_signal(self, signum, frame):
        """The call's limit (TERM), ^C: say so, keep what finished, stop."""
        self.runner.kill()
        for r in self.summary["steps"]:
            if r["status"] == "running":
                r["status"], r["note"] = "killed", f"the check got signal {signum} while this step ran"
        self.summary["status"] = f"killed (signal {signum})"
        try:
            self.repack()
        finally:
            self.write_summary()
        self.log(f"gpu_check: killed by signal {signum}; summary.json lists what finished")
        os._exit(128 + signum)

    def run_step(self, step: Step, rec: dict) -> None:
        """``step`` under min(its budget, what is left of the deadline), recorded in ``rec``."""
        left = self.deadline - time.monotonic()
        budget = min(rec["budget_s"], left)
        if left < min(5.0, rec["budget_s"]):
            rec["status"], rec["note"] = "not run", f"no time left ({left:.0f} s of the deadline)"
            self.log(f"== {step.name}: not run, {left:.0f} s left")
            self.write_summary()
            return
        cmds = self._commands(step, rec)
        if not cmds:
            self.write_summary()
            return
        rec["status"] = "running"
        self.write_summary()
        self.log(f"== [{self.steps.index(step) + 1}/{len(self.steps)}] {step.name} (budget {budget:.0f} s): "
                 f"{step.what}")
        t0 = time.monotonic()
        rc, timed_out = 0, False
        step_env = {**self.ctx.env, **step.env(self.ctx)}
        for cmd in cmds:
            self.log("$ " + rec["commands"][cmds.index(cmd)])
            rc, timed_out = self.runner.run(cmd, step_env, budget - (time.monotonic() - t0), self.log)
            if rc != 0 or timed_out:
                break
        rec["seconds"] = round(time.monotonic() - t0, 1)
        rec["rc"] = rc
        self._judge(step, rec, timed_out, budget)
        if self.ctx.info and self.summary["versions"] is None:  # the env step has run: what the check runs with
            self._record_env()
        self.log(f"== {step.name}: {rec['status']} in {rec['seconds']} s (budget {budget:.0f} s)"
                 + (f"; {rec['note']}" if rec["note"] else ""))
        self.repack()
        if step.pack_triton_cache and not self.ctx.rehearse:
            pack_triton(self.triton_cache, self.ctx.out, self.summary)
        self.write_summary()

    def _commands(self, step: Step, rec: dict) -> list:
        """The step's commands, also recorded (paths relative to the repository); a step that cannot even build them
        is recorded as failed and the next one runs."""
        try:
            cmds = step.commands(self.ctx)
        except Exception as e:  # noqa: BLE001
            cmds, rec["status"], rec["note"] = [], "failed", f"could not build its command: {type(e).__name__}: {e}"
        rec["commands"] = [" ".join(str(c).replace(str(ROOT) + "/", "") for c in cmd) for cmd in cmds]
        return cmds

    def _judge(self, step: Step, rec: dict, timed_out: bool, budget: float) -> None:
        """The step's figures and status (its own judge where it has one), then its ``after``."""
        try:
            rec["figures"] = rounded(step.figures(self.ctx))
        except Exception as e:  # noqa: BLE001
            rec["figures"], rec["note"] = {}, f"figures unreadable: {type(e).__name__}: {e}"
        if timed_out:
            rec["status"] = "timeout"
            rec["note"] = f"killed at its budget of {budget:.0f} s"
        elif step.judge:
            rec["status"], rec["note"] = step.judge(self.ctx, rec)
        else:
            rec["status"] = "ok" if rec["rc"] == 0 else "failed"
        try:
            step.after(self.ctx)
        except Exception as e:  # noqa: BLE001
            rec["note"] = (rec["note"] or "") + f" (after: {type(e).__name__}: {e})"

    def _record_env(self) -> None:
        """What the env step found (versions, GPU, bandwidth, kernels) into the summary and its provenance."""
        s, info = self.summary, self.ctx.info
        s["versions"] = {k: v for k, v in info["versions"].items() if not k.endswith("_from")}
        s["versions"]["torch_cuda"] = info.get("torch_cuda")
        s["provenance"]["versions"] = s["versions"]
        gpu = info.get("gpu")
        s["provenance"]["machine"]["device"] = f"cuda: {gpu['name']}" if gpu else "cpu"
        s["device"] = {"gpu": gpu, "copy_gbs": info.get("copy_gbs"),
                       "matmul_bf16_tflops": info.get("matmul_bf16_tflops"),
                       "datasheet_bf16_tflops": info.get("datasheet_bf16_tflops")}
        s["kernels"] = kernels_line(self.ctx)

    def finish(self, total_budget: float) -> int:
        """The overall status, the last summary and the table of steps; 0 when every step is ok."""
        s, out = self.summary, self.ctx.out
        if not self.ctx.rehearse:
            pack_triton(self.triton_cache, out, s)
        s["status"] = "ok" if all(r["status"] == "ok" for r in s["steps"]) else "failed"
        self.repack()
        self.write_summary()
        if len(s["files"]) > MAX_OUT_FILES:
            self.log(f"gpu_check: {len(s['files'])} files in {out} (> {MAX_OUT_FILES}): {s['files']}")
        self.log("")
        self.log(f"{'step':9s} {'status':8s} {'seconds':>8s} {'budget':>7s}  note")
        for r in s["steps"]:
            sec = "-" if r["seconds"] is None else f"{r['seconds']:.1f}"
            self.log(f"{r['step']:9s} {r['status']:8s} {sec:>8s} {r['budget_s']:7.0f}  {r['note'] or ''}")
        self.log(f"gpu_check: {s['status']} in {s['elapsed_s']:.0f} s (budgets {total_budget:.0f} s); kernels: "
                 f"{s['kernels']}; files in {out}: {', '.join(s['files'])}")
        return 0 if s["status"] == "ok" else 1


def main(argv=None) -> int:
    ap = _parser()
    a = ap.parse_args(argv)
    if a.check_wheels is not None:
        report = wheels.check_wheels(Path(a.check_wheels), tree=wheels.tree_bytes(ROOT))
        print(wheels.format_report(report))
        return 0 if report["ok"] else 1
    overrides = _overrides(ap, a.budget)
    steps = _selected(ap, a.steps)
    total_budget = sum(budget_of(s, a.rehearse, overrides) for s in steps)
    if a.list:
        print(budget_table(steps, a.rehearse, overrides))
        return 0

    t_start = time.monotonic()
    deadline = t_start + (a.deadline if a.deadline is not None else total_budget + 20)
    out, work = _out_and_work(a)
    log = Log(out / "gpu_check.log")
    triton_cache = ROOT / ".triton_cache" if (ROOT / ".triton_cache").is_dir() else work / "triton_cache"
    ctx = Ctx(rehearse=a.rehearse, py=sys.executable, out=out, work=work,
              env=_steps_env(a.rehearse, work, triton_cache))
    check = Check(ctx, steps, _new_summary(a, argv, steps, overrides, total_budget), log, t_start, deadline,
                  triton_cache)
    signal.signal(signal.SIGTERM, check.on_signal)
    signal.signal(signal.SIGINT, check.on_signal)

    log(f"# rad-ds GPU check, {check.summary['mode']}, {now()}; out {out}; work {work}")
    log(f"steps and budgets (a step past its budget is killed and recorded as timeout):\n"
        f"{budget_table(steps, a.rehearse, overrides)}")
    check.write_summary()
    for step, rec in zip(steps, check.summary["steps"]):
        check.run_step(step, rec)
    rc = check.finish(total_budget)
    if not a.work:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return rc


def pack_triton(cache: Path, out: Path, summary: dict) -> None:
    """The compiled Triton kernels as ``triton_cache.tar.gz`` (if under the file limit): unpacked into
    ``.triton_cache/`` and carried, a rerun finds them (scripts/gpu_check.sh uses that folder when it exists)."""
    if not cache.is_dir() or not any(cache.iterdir()):
        return
    left = pack(cache, out / "triton_cache.tar.gz", ".", level=1)
    summary["triton_cache_left_out"] = len(left)


if __name__ == "__main__":
    sys.exit(main())
