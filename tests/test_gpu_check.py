"""The GPU check (``scripts/gpu_check.sh``) rehearsed on the CPU, so that the first lent GPU is not spent on a typo,
a wrong flag, a missing wheel or a path that exists only here: the rehearsal runs the same steps, commands and writers
at toy sizes and must pass with every step ``ok`` and at most 6 files to bring back; a run killed part-way leaves a
valid ``summary.json`` of the steps that finished; the wheel checker refuses what pip on the device would refuse; the
device's own commands use only flags their scripts accept; the budgets fit the lease."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts" / "gpu_check"))
import outputs  # noqa: E402  (scripts/gpu_check/outputs.py: the writers)
import steps  # noqa: E402  (scripts/gpu_check/steps.py: the step registry)
import wheels  # noqa: E402  (scripts/gpu_check/wheels.py: the carried wheels)

OUT_FILES = {"summary.json", "gpu_check.log", "gpu_tests.xml", "decode.png", "results.tar.gz"}


def _check(tmp_path: Path, *args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "RAD_DS_REQUIRE_KERNELS")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--rehearse", "--out", str(tmp_path / "out"), "--work",
           str(tmp_path / "work"), *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _summary(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "out" / "summary.json").read_text())


# -- the rehearsal ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_rehearsal_passes_every_step_with_figures_and_at_most_six_files(tmp_path):
    t0 = time.monotonic()
    p = _check(tmp_path)
    out, _ = p.communicate(timeout=300)
    wall = time.monotonic() - t0
    assert p.returncode == 0, out[-4000:]
    s = _summary(tmp_path)
    assert s["mode"] == "rehearsal" and s["status"] == "ok"
    assert s["kernels"] == "torch reference (rehearsal)"
    assert [r["step"] for r in s["steps"]] == [st.name for st in steps.STEPS]
    for r in s["steps"]:
        assert r["status"] == "ok", r
        assert r["seconds"] <= r["budget_s"] and r["commands"], r
        if r["step"] != "install":  # the venv has every distribution: nothing to install, and nothing to show
            assert r["figures"], r
    by = {r["step"]: r for r in s["steps"]}
    assert by["install"]["figures"]["missing"] == []
    assert {"torch", "transformers", "deepspeed", "mamba-ssm", "python"} <= set(s["versions"])
    assert s["versions"]["torch"] and s["versions"]["deepspeed"] and s["versions"]["mamba-ssm"]
    t = by["tests"]["figures"]
    assert t["tests"] == t["skipped"] == t["skipped_no_cuda"] > 0  # pytest -m gpu: every gpu test skips here
    assert t["standin"]["passed"] > 0 and t["standin"]["failed"] == t["standin"]["errors"] == 0
    assert "skipped (no CUDA, rehearsal)" in by["tests"]["note"]
    assert by["distill"]["figures"]["trainer_tokens_per_s"] > 0 and by["distill"]["figures"]["mfu"] > 0
    assert set(by["decode"]["figures"]["hybrid_vs_base"]) == {"64x1", "64x2", "256x1", "256x2"}
    assert by["scan"]["figures"]["bf16"]["seconds"] and by["scan"]["figures"]["fp32"]["seconds"]
    assert by["one_copy"]["figures"]["512"]["param_memory_ratio"] < 0.75
    # what comes back: at most 6 files, those the summary lists, each under 16 MiB
    files = sorted(f.name for f in (tmp_path / "out").iterdir())
    assert set(files) == OUT_FILES and len(files) <= outputs.MAX_OUT_FILES
    assert s["files"] == files
    assert all((tmp_path / "out" / f).stat().st_size < 16 * 2**20 for f in files)
    with tarfile.open(tmp_path / "out" / "results.tar.gz") as tar:
        names = set(tar.getnames())
    for r in ("env.json", "distill_cpu_rehearsal.json", "decode_cpu_rehearsal.json", "ssm_scan_cpu_rehearsal_bf16.json",
              "ssm_scan_cpu_rehearsal_fp32.json", "one_copy_cpu_rehearsal.json", "standin_tests.xml"):
        assert f"results/{r}" in names
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    assert "total" in log and "gpu_check: ok" in log
    assert s["budget_total_s"] <= 120 and wall <= s["budget_total_s"] + 30, wall


def _wait_for(pred, timeout: float, what: str, p: subprocess.Popen):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            if pred():
                return
        except (OSError, ValueError, KeyError):
            pass  # summary.json not written yet
        if p.poll() is not None:
            break
        time.sleep(0.2)
    p.kill()
    raise AssertionError(f"{what} not seen in {timeout} s (rc {p.poll()}): {p.communicate()[0][-3000:]}")


def test_killed_run_leaves_the_summary_of_what_finished_and_an_overrun_step_is_recorded(tmp_path):
    """env overruns a 0.5 s budget: killed, recorded as timeout, and decode still runs; then the whole check is killed
    (SIGKILL, as the device's call limit does) while one_copy runs: summary.json is valid JSON that lists install,
    env and decode as they finished and one_copy as running, and the tarball holds decode's results."""
    p = _check(tmp_path, "--steps", "install,env,decode,one_copy", "--budget", "env=0.5")
    running = lambda: {r["step"]: r["status"] for r in _summary(tmp_path)["steps"]}["one_copy"] == "running"  # noqa
    _wait_for(running, 120, "one_copy running", p)
    os.killpg(p.pid, signal.SIGKILL)  # the driver's process group; its step's child dies with it (PDEATHSIG)
    p.wait(10)
    s = _summary(tmp_path)
    status = {r["step"]: r["status"] for r in s["steps"]}
    assert status == {"install": "ok", "env": "timeout", "decode": "ok", "one_copy": "running"}
    env = next(r for r in s["steps"] if r["step"] == "env")
    assert env["seconds"] < 10 and "budget" in env["note"]
    assert next(r for r in s["steps"] if r["step"] == "decode")["figures"]["hybrid_vs_base"]
    files = sorted(f.name for f in (tmp_path / "out").iterdir() if not f.name.startswith("."))
    assert len(files) <= outputs.MAX_OUT_FILES and "summary.json" in files
    with tarfile.open(tmp_path / "out" / "results.tar.gz") as tar:
        assert "results/decode_cpu_rehearsal.json" in tar.getnames()


def test_terminated_run_marks_the_running_step_killed(tmp_path):
    p = _check(tmp_path, "--steps", "install,decode")
    running = lambda: {r["step"]: r["status"] for r in _summary(tmp_path)["steps"]}["decode"] == "running"  # noqa
    _wait_for(running, 60, "decode running", p)
    p.send_signal(signal.SIGTERM)
    p.wait(30)
    s = _summary(tmp_path)
    assert s["status"] == "killed (signal 15)"
    assert [r["status"] for r in s["steps"]] == ["ok", "killed"]


# -- what the device runs --------------------------------------------------------------------------------------------


def _device_ctx(tmp_path: Path) -> steps.Ctx:
    ctx = steps.Ctx(rehearse=False, py=sys.executable, out=tmp_path / "out", work=tmp_path / "work", env={})
    ctx.info = {"versions": {"pytest-xdist": "3.8"}, "datasheet_bf16_tflops": 989.4, "matmul_bf16_tflops": 790.0}
    return ctx


def test_budgets_fit_the_lease_and_the_device_commands_use_real_flags(tmp_path):
    """Device budgets sum to <= 300 s (a rerun fits 15 minutes with the starts), the rehearsal's to <= 120 s; every
    ``--flag`` of a device command is in its script's ``--help`` (the benchmarks' command lines change under us)."""
    assert sum(s.budget for s in steps.STEPS) <= 300
    assert sum(s.rehearse_budget for s in steps.STEPS) <= 120
    assert [s.name for s in steps.STEPS][:3] == ["install", "env", "tests"]
    ctx = _device_ctx(tmp_path)
    helps: dict[str, str] = {}
    for step in steps.STEPS:
        for cmd in step.commands(ctx):
            cmd = [str(c) for c in cmd]
            if cmd[1:3] == ["-m", "pytest"]:
                assert "-m" in cmd[3:] and "gpu" in cmd and "--junitxml=" + str(ctx.out / "gpu_tests.xml") in cmd
                assert all((ROOT / f).is_file() for f in cmd if f.startswith("tests/"))
                continue
            script = cmd[1]
            assert Path(script).is_file(), script
            if script not in helps:
                r = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True,
                                   timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
                assert r.returncode == 0, r.stderr[-2000:]
                helps[script] = r.stdout
            for flag in (c for c in cmd[2:] if c.startswith("--")):
                assert flag in helps[script], f"{step.name}: {Path(script).name} has no {flag}"
    assert "--peak-tflops" in steps.distill_cmds(ctx)[0] and "989.4" in steps.distill_cmds(ctx)[0]


def test_gpu_test_files_are_the_files_with_gpu_tests():
    files = steps.gpu_test_files()
    assert {"tests/test_gpu_ssm.py", "tests/test_gpu_zero3.py", "tests/test_static_decode.py"} <= set(files)
    assert "tests/test_gpu_check.py" not in files


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" time="3.5">
<testcase classname="tests.test_gpu_ssm" name="test_a" time="1"/>
<testcase classname="tests.test_gpu_ssm" name="test_b" time="1"><failure message="boom"/></testcase>
<testcase classname="tests.test_gpu_ssm" name="test_c" time="0"><skipped message="needs a CUDA device"/></testcase>
<testcase classname="tests.test_gpu_zero3" name="test_d" time="1"><error message="fixture"/></testcase>
</testsuite></testsuites>"""


def test_junit_counts_and_the_device_judge(tmp_path):
    (tmp_path / "j.xml").write_text(JUNIT)
    f = steps.junit_counts(tmp_path / "j.xml")
    assert (f["tests"], f["passed"], f["failed"], f["errors"], f["skipped"], f["skipped_no_cuda"]) == (4, 1, 1, 1, 1, 1)
    assert f["not_passed"] == ["tests.test_gpu_ssm::test_b", "tests.test_gpu_zero3::test_d"]
    ctx = _device_ctx(tmp_path)
    assert steps.tests_judge(ctx, {"rc": 1, "figures": f})[0] == "failed"
    clean = {**f, "failed": 0, "errors": 0, "not_passed": []}
    assert steps.tests_judge(ctx, {"rc": 0, "figures": clean})[0] == "failed"  # a skip on the device fails
    assert steps.tests_judge(ctx, {"rc": 0, "figures": {**clean, "skipped": 0}})[0] == "ok"
    assert steps.tests_judge(ctx, {"rc": 2, "figures": {}})[0] == "failed"


def test_pack_leaves_out_the_largest_files_to_fit(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "small.json").write_text("{}")
    (src / "big.bin").write_bytes(os.urandom(300_000))  # incompressible
    left = outputs.pack(src, tmp_path / "r.tar.gz", "results", limit=100_000)
    assert left == ["big.bin"]
    with tarfile.open(tmp_path / "r.tar.gz") as tar:
        assert tar.getnames() == ["results/small.json"]


# -- the carried wheels ----------------------------------------------------------------------------------------------

GOOD = ("deepspeed-0.19.8-py3-none-any.whl", "mamba_ssm-2.3.2.post1-py3-none-any.whl",
        "pydantic-2.14.4-py3-none-any.whl",
        "pydantic_core-2.50.5-cp312-cp312-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
        "hjson-3.1.0-py3-none-any.whl", "annotated_types-0.8.0-py3-none-any.whl",
        "typing_inspection-0.4.5-py3-none-any.whl", "cryptography-46.0.1-cp311-abi3-manylinux_2_34_x86_64.whl")


def _wheel_dir(path: Path, names) -> Path:
    path.mkdir()
    for n in names:
        (path / n).write_bytes(b"")
    return path


def test_wheel_check_accepts_the_device_set(tmp_path):
    report = wheels.check_wheels(_wheel_dir(tmp_path / "whl", GOOD), tree=3 * 2**20)
    assert report["ok"], report["problems"]
    assert report["total_bytes"] == 3 * 2**20


@pytest.mark.parametrize("name,why", [
    ("pydantic_core-2.50.5-cp311-cp311-manylinux_2_17_x86_64.whl", "not for Python 3.12"),
    ("numpy-2.3.0-cp312-cp312-macosx_14_0_arm64.whl", "platform tag"),
    ("numpy-2.3.0-cp312-cp312-manylinux_2_40_x86_64.whl", "glibc"),
    ("numpy-2.3.0-cp312-cp312-manylinux_2_28_aarch64.whl", "platform tag"),
    ("hjson-3.0.0-py3-none-any.whl", "2 versions"),
    ("notes.txt", "not a wheel file name"),
])
def test_wheel_check_refuses_what_pip_on_the_device_would(tmp_path, name, why):
    report = wheels.check_wheels(_wheel_dir(tmp_path / "whl", (*GOOD, name)), tree=0)
    assert not report["ok"]
    assert any(why in p for p in report["problems"]), report["problems"]


def test_wheel_check_wants_the_needed_wheels_and_the_size_limit(tmp_path):
    d = _wheel_dir(tmp_path / "whl", [g for g in GOOD if not g.startswith("deepspeed")])
    with open(d / "mamba_ssm-2.3.2.post1-py3-none-any.whl", "wb") as f:
        f.truncate(40 * 2**20)  # sparse: 40 MiB that take no disk
    report = wheels.check_wheels(d, tree=30 * 2**20)
    assert any("no deepspeed wheel" in p for p in report["problems"])
    assert any("> 64 MiB" in p for p in report["problems"])


def test_check_wheels_command(tmp_path):
    ok = _wheel_dir(tmp_path / "ok", GOOD)
    bad = _wheel_dir(tmp_path / "bad", (*GOOD, "x-1-cp311-cp311-linux_x86_64.whl"))
    sh = ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--check-wheels"]
    r = subprocess.run([*sh, str(ok)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "ok for the device" in r.stdout, r.stdout + r.stderr
    r = subprocess.run([*sh, str(bad)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1 and "x-1-cp311-cp311-linux_x86_64.whl" in r.stdout


def _tiny_wheel(d: Path, name: str, version: str = "0.1", requires: tuple[str, ...] = ()) -> Path:
    """A real, installable pure-Python wheel (offline: no pip download)."""
    whl = d / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(f"Requires-Dist: {r}\n"
                                                                                   for r in requires)
    files = {f"{name}/__init__.py": "VALUE = 42\n", f"{info}/METADATA": meta,
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{k},,\n" for k in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(whl, "w") as z:
        for k, v in files.items():
            z.writestr(k, v)
    return whl


def test_install_installs_only_what_the_interpreter_lacks(tmp_path):
    d = tmp_path / "whl"
    d.mkdir()
    _tiny_wheel(d, "rad_gpu_check_probe")
    (d / "deepspeed-0.0.1-py3-none-any.whl").write_bytes(b"")  # the venv has deepspeed: kept, never opened
    result = wheels.install_missing(d, tmp_path / "site")
    assert result["installed"] == {"rad-gpu-check-probe": "0.1"}
    assert "deepspeed" in result["kept"] and result["missing"] == [] and result["conflicts"] == []
    r = subprocess.run([sys.executable, "-c", "import rad_gpu_check_probe as m; print(m.VALUE)"], capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})
    assert r.stdout.strip() == "42", r.stderr


def test_install_upgrades_what_a_new_wheel_refuses_and_names_what_it_cannot(tmp_path):
    """A wheel being installed that wants a newer version of something the interpreter has gets the carried one (as
    pydantic 2.14 wants typing-extensions >= 4.16); a need no carried wheel meets is named."""
    d = tmp_path / "whl"
    d.mkdir()
    _tiny_wheel(d, "rad_gpu_check_a", requires=("hjson>=99", "einops>=99", "pytest>=1; extra == 'dev'"))
    _tiny_wheel(d, "hjson", version="99.0")
    result = wheels.install_missing(d, tmp_path / "site")
    assert result["installed"] == {"hjson": "99.0", "rad-gpu-check-a": "0.1"}
    assert "refused by rad-gpu-check-a" in result["upgraded"]["hjson"]
    assert len(result["conflicts"]) == 1 and "einops>=99" in result["conflicts"][0]
