"""The GPU check's steps: one registry (``STEPS``) where each step names its device and rehearsal budgets, the
commands it runs (device sizes, or toy sizes on the CPU for ``--rehearse``) and how its key figures are read from the
JSON it writes. The driver (``run.py``) knows no step by name. Standard library only."""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from outputs import FILE_LIMIT, copy_atomic

ROOT = Path(__file__).resolve().parents[2]
FALLBACK_PEAK_TFLOPS = 989.4  # H100/H200 SXM dense bf16, where the card's name is not in env_probe's table
REHEARSAL_KERNELS = "torch reference (rehearsal)"
GPU_TEST_MARK = "pytest.mark.gpu"
# the rehearsal's stand-in for the gpu tests, which skip without CUDA: the same operations on the torch path against
# mamba-ssm's own pure-PyTorch references (the kernels' references: scan, step, gated norm), a mixer's decode against
# its forward, and StaticDecoder's eager step against the uncached argmax loop (the CUDA-graph test's other side)
STANDIN_TESTS = ("tests/test_ssd_scan.py::test_matches_ssd_chunk_scan_combined_ref",
                 "tests/test_ssd_scan.py::test_scan_step_matches_selective_state_update_ref",
                 "tests/test_ssd_scan.py::test_gated_rmsnorm_matches_rms_norm_ref",
                 "tests/test_ssd_scan.py::test_mixer_decode_matches_forward",
                 "tests/test_static_decode.py::test_greedy_equals_uncached_argmax_loop")


# -- the run's state ---------------------------------------------------------------------------------------------


@dataclass
class Ctx:
    """What the steps see: mode, interpreter, folders, environment, and what earlier steps found."""

    rehearse: bool
    py: str
    out: Path  # what comes back
    work: Path  # scratch; results/ inside it is packed into results.tar.gz
    env: dict
    info: dict = field(default_factory=dict)  # env.json, once the env step has run

    @property
    def results(self) -> Path:
        return self.work / "results"

    @property
    def scratch(self) -> Path:
        return self.work / "scratch"

    def result(self, name: str) -> dict | None:
        p = self.results / name
        try:
            return json.loads(p.read_text())
        except (OSError, ValueError):
            return None


@dataclass(frozen=True)
class Step:
    """One step: its budget on the device and in the rehearsal, its commands, and how to read its results."""

    name: str
    what: str
    budget: float
    rehearse_budget: float
    commands: Callable[[Ctx], list[list[str]]]
    figures: Callable[[Ctx], dict] = lambda ctx: {}
    judge: Callable[[Ctx, dict], tuple[str, str | None]] | None = None  # (status, note) from rc and figures
    env: Callable[[Ctx], dict] = lambda ctx: {}
    after: Callable[[Ctx], None] = lambda ctx: None
    pack_triton_cache: bool = False  # on the device, pack the compiled kernels after it (for a rerun to carry)


def _py(ctx: Ctx, script: str, *args) -> list[str]:
    return [ctx.py, str(ROOT / script), *map(str, args)]


# -- step: install -------------------------------------------------------------------------------------------------


def install_cmds(ctx: Ctx) -> list[list[str]]:
    return [_py(ctx, "scripts/gpu_check/wheels.py", "--install", ROOT / ".whl", "--target", ctx.work / "site",
                "--report", ctx.results / "install.json")]


def install_figures(ctx: Ctx) -> dict:
    r = ctx.result("install.json") or {}
    return {k: r.get(k) for k in ("installed", "upgraded", "kept", "missing", "conflicts")} if r else {}


# -- step: env -----------------------------------------------------------------------------------------------------


def env_cmds(ctx: Ctx) -> list[list[str]]:
    extra = ["--device", "cpu", "--copy-mib", "64", "--matmul-n", "256"] if ctx.rehearse else ["--device", "cuda"]
    return [_py(ctx, "scripts/gpu_check/env_probe.py", *extra, "--out", ctx.results / "env.json")]


def env_figures(ctx: Ctx) -> dict:
    info = ctx.result("env.json")
    if not info:
        return {}
    v = info["versions"]
    return {"gpu": (info.get("gpu") or {}).get("name"), "copy_gbs": info.get("copy_gbs"),
            "matmul_bf16_tflops": info.get("matmul_bf16_tflops"),
            "datasheet_bf16_tflops": info.get("datasheet_bf16_tflops"),
            "kernels": info.get("kernels"), "imports": info.get("imports"), "torch": v.get("torch"),
            "triton": v.get("triton"), "transformers": v.get("transformers"), "deepspeed": v.get("deepspeed"),
            "mamba-ssm": v.get("mamba-ssm")}


def env_after(ctx: Ctx) -> None:
    """What the later steps read from the env step: the versions (xdist?), the peak and measured matmul rate."""
    ctx.info = ctx.result("env.json") or {}


# -- step: tests ---------------------------------------------------------------------------------------------------


def gpu_test_files() -> list[str]:
    """The test files holding a gpu-marked test (a text search: nothing is imported)."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                  if GPU_TEST_MARK in p.read_text(errors="replace"))


def tests_cmds(ctx: Ctx) -> list[list[str]]:
    """The device's command; in the rehearsal the same command (every gpu test skips: no CUDA), then the stand-in."""
    cmd = [ctx.py, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider"]
    workers = ["-n", "4"] if (ctx.info.get("versions") or {}).get("pytest-xdist") and not ctx.rehearse else []
    gpu = cmd + [f"--junitxml={ctx.out / 'gpu_tests.xml'}", "-m", "gpu", *workers, *gpu_test_files()]
    if ctx.rehearse:
        return [gpu, cmd + [f"--junitxml={ctx.results / 'standin_tests.xml'}", *STANDIN_TESTS]]
    return [gpu]


def junit_counts(path: Path) -> dict:
    """tests / passed / failed / errors / skipped / seconds and the failed test ids of a pytest junit XML."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {"tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0, "seconds": 0.0}
    failed, skipped_gpu = [], 0
    for s in suites:
        counts["seconds"] += float(s.get("time", 0))
        for case in s.iter("testcase"):
            counts["tests"] += 1
            kinds = {c.tag for c in case}
            name = f"{case.get('classname')}::{case.get('name')}"
            if "failure" in kinds:
                counts["failed"] += 1
                failed.append(name)
            elif "error" in kinds:
                counts["errors"] += 1
                failed.append(name)
            elif "skipped" in kinds:
                counts["skipped"] += 1
                skipped_gpu += any("CUDA" in (c.get("message") or "") for c in case if c.tag == "skipped")
            else:
                counts["passed"] += 1
    counts["seconds"] = round(counts["seconds"], 1)
    counts["not_passed"] = failed[:20]
    counts["skipped_no_cuda"] = skipped_gpu
    return counts


def tests_figures(ctx: Ctx) -> dict:
    try:
        f = junit_counts(ctx.out / "gpu_tests.xml")
    except (OSError, ET.ParseError):
        return {}
    if ctx.rehearse:
        try:
            f["standin"] = junit_counts(ctx.results / "standin_tests.xml")
        except (OSError, ET.ParseError):
            f["standin"] = None
    return f


def tests_judge(ctx: Ctx, r: dict) -> tuple[str, str | None]:
    f = r["figures"]
    if not f:
        return "failed", "no junit XML: pytest did not finish"
    if ctx.rehearse:
        s = f.get("standin") or {}
        bad = f["failed"] + f["errors"] + s.get("failed", 0) + s.get("errors", 0)
        note = (f"pytest -m gpu: {f['skipped']} of {f['tests']} skipped (no CUDA, rehearsal); CPU stand-in (torch path "
                f"vs mamba-ssm references, StaticDecoder eager = argmax loop): {s.get('passed', 0)} passed, "
                f"{s.get('failed', 0) + s.get('errors', 0)} failed")
        ok = r["rc"] == 0 and not bad and f["skipped"] == f["tests"] > 0 and s.get("passed", 0) > 0
        return ("ok" if ok else "failed"), note
    bad = f["failed"] + f["errors"]
    note = f"{f['passed']} passed, {bad} failed or errors, {f['skipped']} skipped of {f['tests']}"
    if f["not_passed"]:
        note += ": " + ", ".join(f["not_passed"][:5])
    return ("ok" if r["rc"] == 0 and not bad and not f["skipped"] and f["passed"] else "failed"), note


# -- step: distill -------------------------------------------------------------------------------------------------


def peak_tflops(ctx: Ctx) -> float:
    """The card's dense bf16 peak for MFU; in the rehearsal the CPU's measured matmul rate (so MFU is computed)."""
    if ctx.rehearse:
        return max(ctx.info.get("matmul_bf16_tflops") or 0.1, 0.01)
    return float(os.environ.get("PEAK_TFLOPS") or ctx.info.get("datasheet_bf16_tflops") or FALLBACK_PEAK_TFLOPS)


def distill_cmds(ctx: Ctx) -> list[list[str]]:
    out = ctx.results / ("distill_cpu_rehearsal.json" if ctx.rehearse else "distill_cuda_bf16.json")
    common = ["--dtype", "bfloat16", "--ranks", "1", "--repeats", "1", "--peak-tflops", f"{peak_tflops(ctx):.4g}",
              "--out", out]
    if ctx.rehearse:
        size = ["--device", "cpu", "--threads", "1", "--hidden", "64", "--num-layers", "4", "--layers", "1,3",
                "--vocab", "512", "--seq-len", "64", "--micro-batch", "2", "--steps", "2", "--warmup", "1"]
    else:  # hidden 2048, 32/16 heads, MLP 5632: a 1B model's layer; 16 of them and vocab 32k: 0.82B parameters
        size = ["--device", "cuda", "--threads", "4", "--hidden", "2048", "--num-layers", "16", "--layers", "5,11",
                "--vocab", "32768", "--seq-len", "1024", "--micro-batch", "4", "--steps", "6", "--warmup", "2"]
    return [_py(ctx, "benchmarks/distill_step.py", *size, *common)]


def distill_figures(ctx: Ctx) -> dict:
    d = ctx.result("distill_cpu_rehearsal.json" if ctx.rehearse else "distill_cuda_bf16.json")
    if not d:
        return {}
    s, e = d["summary"], d["summary"].get("engine1") or {}
    f = {"model": d.get("model"), "params": (d.get("params") or {}).get("total"),
         "tokens_per_step": d.get("tokens_per_step"), "trainer_tokens_per_s": e.get("tokens_per_s"),
         "trainer_median_step_s": e.get("median_step_s"),
         "plain_tokens_per_s": (s.get("plain") or {}).get("tokens_per_s"),
         "overhead_1rank": s.get("overhead_1rank"), "mfu": e.get("mfu"), "peak_tflops": peak_tflops(ctx),
         "peak_mem_mb": e.get("peak_mem_mb_per_rank"), "teacher_placement": e.get("teacher_placement")}
    measured = ctx.info.get("matmul_bf16_tflops")
    if f["mfu"] is not None and measured:
        f["mfu_vs_measured_matmul"] = f["mfu"] * f["peak_tflops"] / measured
    return f


# -- step: decode --------------------------------------------------------------------------------------------------


def decode_cmds(ctx: Ctx) -> list[list[str]]:
    out = ctx.results / ("decode_cpu_rehearsal.json" if ctx.rehearse else "decode_cuda_bf16.json")
    if ctx.rehearse:
        size = ["--device", "cpu", "--shape", "toy", "--contexts", "64,256", "--batches", "1,2", "--steps", "6",
                "--copy-mib", "64"]
    else:
        size = ["--device", "cuda", "--shape", "smollm2", "--contexts", "4096,16384,32768", "--batches", "1,8",
                "--steps", "48"]
    return [_py(ctx, "scripts/gpu_check/decode.py", *size, "--dtype", "bfloat16", "--out", out,
                "--plot", ctx.results / "decode.png")]


def decode_figures(ctx: Ctx) -> dict:
    d = ctx.result("decode_cpu_rehearsal.json" if ctx.rehearse else "decode_cuda_bf16.json")
    return d.get("figures", {}) if d else {}


def decode_after(ctx: Ctx) -> None:
    png = ctx.results / "decode.png"
    if png.is_file() and png.stat().st_size < FILE_LIMIT:
        copy_atomic(png, ctx.out / "decode.png")


# -- step: scan ----------------------------------------------------------------------------------------------------


def scan_name(ctx: Ctx, dtype: str) -> str:
    return f"ssm_scan_{'cpu_rehearsal' if ctx.rehearse else 'cuda'}_{dtype}.json"


def scan_cmds(ctx: Ctx) -> list[list[str]]:
    if ctx.rehearse:
        size = ["--device", "cpu", "--lengths", "128", "--heads", "2", "--headdim", "16", "--d-state", "16",
                "--groups", "1", "--chunk-size", "32", "--extra-chunk-sizes", "--reps", "1", "--step-reps", "1",
                "--threads", "1"]
    else:
        size = ["--device", "cuda", "--lengths", "512", "2048", "--extra-chunk-sizes", "--reps", "5",
                "--step-reps", "1"]
    return [_py(ctx, "benchmarks/ssm_scan.py", *size, "--dtype", dt, "--out", ctx.results / scan_name(ctx, dt))
            for dt in ("bf16", "fp32")]


def scan_figures(ctx: Ctx) -> dict:
    """Per dtype: the benchmark's own headline if it has one, and each (length, mode)'s seconds per implementation
    at the main chunk size."""
    out = {}
    for dt in ("bf16", "fp32"):
        d = ctx.result(scan_name(ctx, dt))
        if not d:
            continue
        rows = d.get("rows") or []
        main_chunk = rows[0].get("chunk_size") if rows else None
        secs = {f"{r['length']}_{r['mode']}": {k[:-2]: v for k, v in r.items() if k.endswith("_s") and v is not None}
                for r in rows if r.get("chunk_size") == main_chunk and "length" in r and "mode" in r}
        out[dt] = {k: d[k] for k in ("headline", "targets", "summary") if k in d}
        out[dt]["seconds"] = secs
    return out


# -- step: one_copy ------------------------------------------------------------------------------------------------


def one_copy_cmds(ctx: Ctx) -> list[list[str]]:
    out = ctx.results / ("one_copy_cpu_rehearsal.json" if ctx.rehearse else "one_copy_cuda_bf16.json")
    size = (["--seq-len", "32", "--micro-batch", "1", "--steps", "2", "--vocabs", "512"] if ctx.rehearse
            else ["--seq-len", "1024", "--micro-batch", "4", "--steps", "4", "--vocabs", "49152"])
    return [_py(ctx, "benchmarks/one_copy.py", *size, "--dtype", "bfloat16", "--work", ctx.scratch / "one_copy",
                "--out", out)]


def one_copy_figures(ctx: Ctx) -> dict:
    d = ctx.result("one_copy_cpu_rehearsal.json" if ctx.rehearse else "one_copy_cuda_bf16.json")
    if not d:
        return {}
    return {str(r["vocab"]): {k: r.get(k) for k in ("param_memory_ratio", "step_time_ratio", "max_loss_rel_diff")}
            for r in d.get("results", [])}


def tests_env(ctx: Ctx) -> dict:
    return {"RAD_DS_REQUIRE_MAMBA_REF": "1"} if ctx.rehearse else {"RAD_DS_REQUIRE_KERNELS": "1"}


# the registry: the order is the order of value; budgets in seconds (device: sum <= 300, so a rerun still fits a
# 15-minute lease with its start; rehearsal: sum <= 120 on a 2-core CPU)
STEPS = (
    Step("install", "carried wheels the image lacks (--target, --no-deps, --no-index)", 10, 5, install_cmds,
         install_figures),
    Step("env", "versions, kernels, copy bandwidth, bf16 matmul rate", 20, 10, env_cmds, env_figures,
         after=env_after),
    Step("tests", "pytest -m gpu: kernels vs torch path, ZeRO-3 + one-copy in bf16, CUDA graph = eager", 100, 25,
         tests_cmds, tests_figures, tests_judge, tests_env, pack_triton_cache=True),
    Step("distill", "bf16 distillation step, ~1B-shaped student: tokens/s, MFU", 70, 28, distill_cmds,
         distill_figures),
    Step("decode", "hybrid vs base decode at 4k/16k/32k, batch 1 and 8, CUDA graphs, vs bandwidth", 40, 15,
         decode_cmds, decode_figures, after=decode_after),
    Step("scan", "SSD scan bf16 + fp32: Triton vs torch vs mamba-ssm references", 30, 17, scan_cmds, scan_figures),
    Step("one_copy", "one-copy teacher vs two engines, bf16", 30, 20, one_copy_cmds, one_copy_figures),
)
BY_NAME = {s.name: s for s in STEPS}
