"""Run model-generated Python where it can do no harm, and say whether it ran to its end.

Each program runs in a fresh interpreter (``python -s -B -c <_sandbox_child.py>``), in its own process
group and a temporary working directory that is deleted afterwards. What is enforced, in order:

* **time**: a wall-clock limit (the process group is killed with SIGKILL) and ``RLIMIT_CPU``;
* **memory**: ``RLIMIT_AS`` (an allocation past it raises ``MemoryError``); ``RLIMIT_FSIZE`` caps files,
  ``RLIMIT_NOFILE`` open files, no core dumps;
* **network**: a new network namespace (``unshare(CLONE_NEWNET)``, as root or inside a new user
  namespace) with no interface up, Landlock's TCP bind/connect rules (kernel ABI >= 4), proxy variables
  absent from a minimal environment;
* **files**: Landlock (Linux >= 5.13) lets the process create, write, remove or rename only inside its
  working directory (and write ``/dev/null``); reads are allowed;
* **processes**: seccomp refuses fork, vfork, exec and clone without ``CLONE_THREAD`` (threads stay
  allowed; x86-64 and aarch64); where seccomp is missing and the child is not root, ``RLIMIT_NPROC`` = 0;
* **privileges**: root drops to ``nobody``, or, where the interpreter lives somewhere ``nobody`` cannot
  read (e.g. a pyenv under ``/root``), stays uid 0 without any capability (bounding set emptied too);
  with Landlock ABI >= 6 no signals to processes outside the sandbox; the child dies with its parent
  (``PR_SET_PDEATHSIG``);
* **Python level**, behind all of the above and with clear messages: an audit hook refuses
  ``os.system``, ``subprocess``, ``fork``/``exec``/``spawn``, ``os.kill``, sockets, ``ctypes`` and
  writes, removals or renames outside the working directory.

A kernel guard the machine does not offer (an old kernel, a container without user namespaces) is left
out and the rest still apply; :func:`sandbox_guards` reports what this machine enforces, and the
evaluation records it in ``results.json``. A program *passes* only if the child reports, with a
per-run nonce on a private pipe, that the whole program ran without an exception: a timeout, a crash,
``sys.exit()`` / ``os._exit()`` before the end, or a refused operation is a failure, never an error of
the evaluation. This is containment for untrusted-but-not-hostile code (model samples), as in
HumanEval's ``execution.py``; it is not a security boundary against code written to break it.
"""

from __future__ import annotations

import json
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

_CHILD_SOURCE = (Path(__file__).with_name("_sandbox_child.py")).read_text()
_OUTPUT_LIMIT = 4096  # characters of stdout / stderr kept per program


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 10.0  # wall clock
    memory_mb: int = 1024  # address space
    file_mb: int = 16  # largest file the program may write
    workers: int = 2  # programs run at once by run_programs
    python_guards: bool = True  # the audit hook; tests turn it off to check that the kernel guards hold alone
    python: str | None = None  # interpreter for the programs (default: this one), e.g. a bare system python


@dataclass
class SandboxResult:
    passed: bool
    status: str  # passed | failed (exception) | timeout | crashed (died without a report)
    error: str | None = None
    stdout: str = ""
    stderr: str = ""
    seconds: float = 0.0
    returncode: int | None = None
    guards: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _child_env(workdir: str) -> dict:
    # built from scratch: no proxies, no tokens, nothing of the evaluator's environment
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8", "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONIOENCODING": "utf-8",
            "OMP_NUM_THREADS": "1"}


def _read_tail(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - _OUTPUT_LIMIT))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_program(source: str, limits: SandboxLimits | None = None, filename: str = "program.py") -> SandboxResult:
    """Run ``source`` as ``__main__`` in a sandboxed child process; never raises for what the program does."""
    limits = limits or SandboxLimits()
    root = Path(tempfile.mkdtemp(prefix="rad-sandbox-"))
    work = root / "work"
    work.mkdir()
    nonce = secrets.token_hex(16)
    r_fd, w_fd = os.pipe()
    proc = None
    t0 = time.perf_counter()
    try:
        if os.geteuid() == 0:  # the child may drop to nobody (it then takes over work/): let it through root/
            os.chmod(root, 0o711)
        cfg = {"result_fd": w_fd, "nonce": nonce, "workdir": str(work), "memory_mb": int(limits.memory_mb),
               "cpu_seconds": max(1, int(limits.timeout_s + 0.999)), "file_mb": int(limits.file_mb),
               "filename": filename, "python_guards": bool(limits.python_guards)}
        flags = ["-s", "-B"] + (["-P"] if limits.python is None and sys.version_info >= (3, 11) else [])
        with open(root / "stdout", "wb") as fo, open(root / "stderr", "wb") as fe:
            proc = subprocess.Popen(
                [limits.python or sys.executable, *flags, "-c", _CHILD_SOURCE], stdin=subprocess.PIPE,
                stdout=fo, stderr=fe,
                cwd=str(work), env=_child_env(str(work)), pass_fds=(w_fd,), start_new_session=True,
                close_fds=True,
            )
        os.close(w_fd)
        w_fd = -1
        try:
            proc.stdin.write((json.dumps(cfg) + "\n" + source).encode())
            proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        timed_out = False
        try:
            proc.wait(timeout=limits.timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        _kill_group(proc)  # also whatever the program left behind in its group
        proc.wait()
        report = _read_report(r_fd)
        seconds = time.perf_counter() - t0
        out, err = _read_tail(root / "stdout"), _read_tail(root / "stderr")
        if report is not None and report.get("nonce") == nonce:
            passed = bool(report.get("passed"))
            return SandboxResult(passed, "passed" if passed else "failed", report.get("error"), out, err, seconds,
                                 proc.returncode, list(report.get("guards") or []))
        rc = proc.returncode
        if timed_out or rc == -signal.SIGXCPU:  # RLIMIT_CPU (= the wall limit) may fire first on a busy machine
            return SandboxResult(False, "timeout", f"killed after {limits.timeout_s:g} s", out, err, seconds, rc)
        why = f"killed by signal {-rc}" if rc is not None and rc < 0 else f"exited with {rc} before the end"
        return SandboxResult(False, "crashed", why, out, err, seconds, rc)
    finally:
        if w_fd >= 0:
            os.close(w_fd)
        os.close(r_fd)
        if proc is not None and proc.poll() is None:
            _kill_group(proc)
            proc.wait()
        shutil.rmtree(root, ignore_errors=True)


def _read_report(fd: int) -> dict | None:
    """The child's report; non-blocking, since a leftover grandchild may still hold the write end."""
    chunks = []
    while select.select([fd], [], [], 0)[0]:
        b = os.read(fd, 65536)
        if not b:
            break
        chunks.append(b)
    try:
        return json.loads(b"".join(chunks).decode()) if chunks else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def run_programs(sources: list[str], limits: SandboxLimits | None = None) -> list[SandboxResult]:
    """Run many programs, ``limits.workers`` at a time; results in input order."""
    limits = limits or SandboxLimits()
    if not sources:
        return []
    with ThreadPoolExecutor(max_workers=max(1, limits.workers)) as pool:
        return list(pool.map(lambda s: run_program(s, limits), sources))


_GUARDS: dict[str | None, list[str]] = {}
KERNEL_GUARDS = ("netns", "landlock-fs", "landlock-tcp", "landlock-signals", "seccomp-noproc", "uid-nobody",
                 "no-capabilities", "nproc-0")


def sandbox_guards(limits: SandboxLimits | None = None) -> list[str]:
    """The guards this machine enforces for ``limits.python`` (probed once with an empty program)."""
    python = limits.python if limits else None
    if python not in _GUARDS:
        _GUARDS[python] = run_program("pass\n", SandboxLimits(timeout_s=30, python=python)).guards
    return list(_GUARDS[python])


__all__ = ["KERNEL_GUARDS", "SandboxLimits", "SandboxResult", "run_program", "run_programs", "sandbox_guards"]
