"""Run model-generated Python where it can do no harm, and score it from outside.

**Scoring** (:func:`run_check`): two sandboxed processes. The *program* process runs the model's code and
then answers calls; the *harness* process runs trusted code only (HumanEval's prompt helpers and
``check``, CRUXEval's ``f`` and expected output) and calls the program through a proxy that sends the
arguments and receives the result over two pipes as plain data (tagged JSON, decoded into built-in values
only: never pickle, never an object of the program's making; ``_sandbox_wire.py``). The verdict is the
harness's: it passes only if the check ran to its end and every answer was well formed. It comes back on
a pipe that the program's process never holds, with a per-run nonce only the harness knows. An exception,
a result that is not plain data, a crash, an early exit or a timeout of the program is a failure. Nothing
the program does inside its own process (walking ``sys._getframe`` or ``gc`` to find a reporting object,
``os._exit(0)``, patching ``builtins`` or ``AssertionError``) reaches the verdict: the check and its
reporting live in another process, which the program may not ptrace, open through ``/proc`` or signal.

**Containment**, for both processes alike: each runs in a fresh interpreter (``python -s -B -c
<_sandbox_child.py>``), in its own process group and a temporary working directory that is deleted
afterwards. What is enforced, in order:

* **time**: a wall-clock limit (the process groups are killed with SIGKILL) and ``RLIMIT_CPU``;
* **memory**: ``RLIMIT_AS`` (an allocation past it raises ``MemoryError``), no core dumps,
  ``RLIMIT_NOFILE`` open files;
* **disk**: the working directory is a tmpfs of ``disk_mb`` (bytes and a number of files) mounted in a
  private mount namespace, seen by nobody else and gone with the process; where no mount namespace can be
  had, the evaluator measures the directory every 50 ms and kills a program past ``disk_mb``.
  ``RLIMIT_FSIZE`` caps each file, the captured stdout and stderr included;
* **network**: a new network namespace (``unshare(CLONE_NEWNET)``, as root or inside a new user
  namespace) with no interface up, Landlock's TCP bind/connect rules (kernel ABI >= 4), proxy variables
  absent from a minimal environment;
* **files**: Landlock (Linux >= 5.13) lets the process create, write, remove or rename only inside its
  working directory (and write ``/dev/null``); reads are allowed, as far as the uid allows;
* **processes**: seccomp refuses fork, vfork, exec, clone without ``CLONE_THREAD`` (threads stay
  allowed), ptrace, ``process_vm_readv``/``writev`` and ``pidfd_getfd`` (x86-64 and aarch64); where
  seccomp is missing and the child is not root, ``RLIMIT_NPROC`` = 0; each process is made non-dumpable,
  so no other process without ``CAP_SYS_PTRACE`` may trace it or open its ``/proc/<pid>/mem`` or ``fd``;
* **privileges**: root drops to ``nobody``. By default (:func:`default_python`) the programs run with this
  interpreter, or, when the evaluator is root and ``nobody`` cannot run it (a pyenv or venv under
  ``/root``), with a system ``python3`` that ``nobody`` can run (the programs get the standard library
  only). Given an interpreter ``nobody`` cannot read, root stays uid 0 without any capability (bounding
  set emptied too), and can then read root's files. With Landlock ABI >= 6 no signals to processes
  outside the sandbox; the child dies with its parent (``PR_SET_PDEATHSIG``);
* **Python level**, behind all of the above and with clear messages: an audit hook refuses
  ``os.system``, ``subprocess``, ``fork``/``exec``/``spawn``, ``os.kill``, sockets, ``ctypes`` and
  writes, removals or renames outside the working directory.

A kernel guard the machine does not offer (an old kernel, a container without user namespaces) is left
out and the rest still apply; :func:`sandbox_guards` reports what this machine enforces (each child says
so before any untrusted code runs), and the evaluation records it in ``results.json``.

:func:`run_program` runs one whole program in one such process and says whether it ran to its end. That
answer is the program's own word (its process holds the report pipe), so it serves containment tests and
trusted programs, and no score is taken from it.

What this is not: a boundary against kernel exploits or CPU side channels, and it does not hide a check's
arguments from the program (it is called with them). It contains model samples and stops a sample from
grading itself; a machine without the kernel guards has the Python hook only, which code written to break
out can get past.
"""

from __future__ import annotations

import functools
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

_HERE = Path(__file__).parent
_CHILD_SOURCE = (_HERE / "_sandbox_child.py").read_text()
_WIRE_SOURCE = (_HERE / "_sandbox_wire.py").read_text()
_OUTPUT_LIMIT = 4096  # characters of stdout / stderr kept per program
_POLL_S = 0.05  # how often the evaluator looks at the clock and at the disk use
_SYSTEM_PYTHONS = ("/usr/bin/python3", "/usr/local/bin/python3", "/bin/python3")
NOBODY = 65534


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 10.0  # wall clock
    memory_mb: int = 1024  # address space
    file_mb: int = 16  # largest file the program may write
    disk_mb: int = 64  # everything the program may keep in its directory (a tmpfs: memory, not disk)
    workers: int = 2  # programs run at once by run_programs / run_checks
    python_guards: bool = True  # the audit hook; tests turn it off to check that the kernel guards hold alone
    disk_tmpfs: bool = True  # the private tmpfs; tests turn it off to check the evaluator's disk watch alone
    python: str | None = None  # interpreter for the programs (default: default_python()), e.g. a bare system python


@dataclass
class SandboxResult:
    passed: bool
    status: str  # passed | failed (exception, wrong answer) | timeout | crashed (no verdict; disk cap)
    error: str | None = None
    stdout: str = ""
    stderr: str = ""
    seconds: float = 0.0
    returncode: int | None = None
    guards: list[str] = field(default_factory=list)
    uid: int | None = None  # the uid the (untrusted) program ran as

    def to_dict(self) -> dict:
        return asdict(self)


@functools.lru_cache(maxsize=None)
def _python_version(python: str, as_nobody: bool) -> tuple[int, int] | None:
    """(major, minor) of ``python`` if it starts (as ``nobody``) and imports what the child needs; else None."""
    probe = "import ctypes, json, resource, sys; print(*sys.version_info[:2])"
    kw = dict(user=NOBODY, group=NOBODY, extra_groups=[]) if as_nobody else {}
    try:
        r = subprocess.run([python, "-s", "-B", "-c", probe], capture_output=True, text=True, timeout=60, cwd="/",
                           env=_child_env("/"), **kw)
        major, minor = map(int, r.stdout.split())
    except (OSError, ValueError, subprocess.SubprocessError):
        return None
    return (major, minor) if r.returncode == 0 else None


def default_python() -> str:
    """The interpreter programs run with when ``SandboxLimits.python`` is unset: this one, unless the evaluator
    is root and ``nobody`` cannot run it (then the first system ``python3`` that ``nobody`` can, so that the
    programs run as ``nobody``; if there is none, this one, as uid 0 without capabilities)."""
    if os.geteuid() != 0 or _python_version(sys.executable, True):
        return sys.executable
    for python in _SYSTEM_PYTHONS:
        if os.access(python, os.X_OK) and (_python_version(python, True) or (0, 0)) >= (3, 8):
            return python
    return sys.executable


def _command(limits: SandboxLimits) -> list[str]:
    python = limits.python or default_python()
    # -P (3.11+): the working directory, which the program writes, is not on sys.path
    safe_path = ["-P"] if (_python_version(python, False) or (0, 0)) >= (3, 11) else []
    return [python, "-s", "-B", *safe_path, "-c", _CHILD_SOURCE]


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


def _disk_used(path: Path) -> int:
    """Bytes under ``path`` as a tmpfs would count them: each entry at least a page."""
    total, stack = 0, [str(path)]
    while stack:
        try:
            entries = os.scandir(stack.pop())
        except OSError:
            continue
        with entries:
            for e in entries:
                try:
                    st = e.stat(follow_symlinks=False)
                    total += max(st.st_blocks * 512, 4096)
                    if e.is_dir(follow_symlinks=False):
                        stack.append(e.path)
                except OSError:
                    pass
    return total


class _Child:
    """One sandboxed interpreter in its own directory, playing ``role`` (see ``_sandbox_child.py``)."""

    def __init__(self, role: str, source: str, limits: SandboxLimits, filename: str, nonce: str,
                 fds: dict[str, int] | None = None):
        fds = fds or {}
        self.root = Path(tempfile.mkdtemp(prefix=f"rad-sandbox-{role}-"))
        self.work = self.root / "work"
        self.work.mkdir()
        self.proc: subprocess.Popen | None = None
        self.report_fd, report_w = os.pipe()
        try:
            if os.geteuid() == 0:  # the child may drop to nobody (it then owns work/): let it through root/
                os.chmod(self.root, 0o711)
            cfg = {"role": role, "report_fd": report_w, "nonce": nonce, "workdir": str(self.work),
                   "memory_mb": int(limits.memory_mb), "cpu_seconds": max(1, int(limits.timeout_s + 0.999)),
                   "file_mb": int(limits.file_mb), "disk_mb": int(limits.disk_mb) if limits.disk_tmpfs else 0,
                   "filename": filename, "python_guards": bool(limits.python_guards), **fds}
            if role != "program":
                cfg["wire"] = _WIRE_SOURCE
            with open(self.root / "stdout", "wb") as fo, open(self.root / "stderr", "wb") as fe:
                self.proc = subprocess.Popen(
                    _command(limits), stdin=subprocess.PIPE, stdout=fo, stderr=fe, cwd=str(self.work),
                    env=_child_env(str(self.work)), pass_fds=(report_w, *fds.values()), start_new_session=True,
                    close_fds=True)
            try:
                self.proc.stdin.write((json.dumps(cfg) + "\n" + source).encode())
                self.proc.stdin.close()
            except (BrokenPipeError, OSError):
                pass
        except BaseException:
            self.close()
            raise
        finally:
            os.close(report_w)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # also whatever it left behind in its group
            except (ProcessLookupError, PermissionError):
                pass
            self.proc.wait()

    def report(self) -> list[dict | None]:
        """The lines the child wrote on its report pipe (None for a line that is not a JSON object)."""
        chunks, size = [], 0
        while size < 1 << 20 and select.select([self.report_fd], [], [], 0)[0]:
            b = os.read(self.report_fd, 65536)
            if not b:
                break
            chunks.append(b)
            size += len(b)
        lines = []
        for line in b"".join(chunks).split(b"\n")[:-1]:  # a last line without its newline is cut off: dropped
            try:
                obj = json.loads(line.decode())
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
                obj = None
            lines.append(obj if isinstance(obj, dict) else None)
        return lines

    def output(self) -> tuple[str, str]:
        return _read_tail(self.root / "stdout"), _read_tail(self.root / "stderr")

    def close(self) -> None:
        self.kill()
        os.close(self.report_fd)
        shutil.rmtree(self.root, ignore_errors=True)


def _wait(children: list[_Child], judge: _Child, limits: SandboxLimits) -> tuple[bool, bool]:
    """Until ``judge`` exits, the time is up, or a child's directory outgrows ``disk_mb``; then every child is
    killed. (timed out, over the disk cap)."""
    deadline = time.monotonic() + limits.timeout_s
    timed_out = over_disk = False
    cap = limits.disk_mb << 20
    while True:
        try:
            judge.proc.wait(timeout=_POLL_S)
            break
        except subprocess.TimeoutExpired:
            pass
        if time.monotonic() > deadline:
            timed_out = True
            break
        if any(_disk_used(c.work) > cap for c in children):  # empty on the evaluator's side under a tmpfs
            over_disk = True
            break
    for c in children:
        c.kill()
    return timed_out, over_disk


def _setup(lines: list[dict | None]) -> tuple[list[str], int | None]:
    """(guards, uid) from a child's first report line, written before any untrusted code ran; the evaluator's
    disk watch is added where the child has no tmpfs."""
    first = lines[0] if lines else None
    if not first or not isinstance(first.get("guards"), list):
        return [], None
    guards = [str(g) for g in first["guards"]]
    uid = first.get("uid")
    return guards + ([] if "disk-tmpfs" in guards else ["disk-watch"]), uid if type(uid) is int else None


def _outcome(verdict: dict | None, nonce: str | None, timed_out: bool, over_disk: bool, cpu_killed: bool,
             limits: SandboxLimits, **common) -> SandboxResult:
    if over_disk:
        return SandboxResult(False, "crashed", f"killed: it kept more than {limits.disk_mb} MB in its directory",
                             **common)
    if verdict is not None and verdict.get("nonce") == nonce and type(verdict.get("passed")) is bool:
        passed, error = verdict["passed"], verdict.get("error")
        if passed or not cpu_killed:
            return SandboxResult(passed, "passed" if passed else "failed", None if passed else str(error)[:1000],
                                 **common)
    if timed_out or cpu_killed:  # RLIMIT_CPU (= the wall limit) may fire first on a busy machine
        return SandboxResult(False, "timeout", f"killed after {limits.timeout_s:g} s", **common)
    rc = common["returncode"]
    why = f"killed by signal {-rc}" if rc is not None and rc < 0 else f"exited with {rc} before the end"
    return SandboxResult(False, "crashed", why, **common)


def run_program(source: str, limits: SandboxLimits | None = None, filename: str = "program.py") -> SandboxResult:
    """Run ``source`` as ``__main__`` in one sandboxed process; ``passed``: it says it ran to its end without an
    exception (its own word: use :func:`run_check` to score untrusted code). Never raises for what it does."""
    limits = limits or SandboxLimits()
    nonce = secrets.token_hex(16)
    t0 = time.perf_counter()
    child = _Child("program", source, limits, filename, nonce)
    try:
        timed_out, over_disk = _wait([child], child, limits)
        lines = child.report()
        guards, uid = _setup(lines)
        verdict = lines[1] if len(lines) == 2 else None
        out, err = child.output()
        rc = child.proc.returncode
        return _outcome(verdict, nonce, timed_out, over_disk, rc == -signal.SIGXCPU, limits, stdout=out,
                        stderr=err, seconds=time.perf_counter() - t0, returncode=rc, guards=guards, uid=uid)
    finally:
        child.close()


def run_check(program: str, harness: str, limits: SandboxLimits | None = None,
              filename: str = "program.py") -> SandboxResult:
    """Score the untrusted ``program`` with the trusted ``harness``, each in its own sandboxed process.

    ``program`` runs as ``__main__`` and then answers calls. ``harness`` runs with ``__program__`` bound to
    the program: ``__program__.function(name)`` is a function that calls the program's global ``name`` with
    copies of its arguments, ``__program__.value(name)`` a copy of that global's value; values cross as
    plain data only. Passes iff the harness runs to its end. Never raises for what the program does."""
    limits = limits or SandboxLimits()
    nonce = secrets.token_hex(16)
    t0 = time.perf_counter()
    request_r, request_w = os.pipe()  # harness -> program
    reply_r, reply_w = os.pipe()  # program -> harness
    children: list[_Child] = []
    try:
        children.append(_Child("serve", program, limits, filename, secrets.token_hex(16),
                               {"request_fd": request_r, "reply_fd": reply_w}))
        children.append(_Child("harness", harness, limits, "check.py", nonce,
                               {"request_fd": request_w, "reply_fd": reply_r}))
        for fd in (request_r, request_w, reply_r, reply_w):  # only the children hold the channel now
            os.close(fd)
        request_r = request_w = reply_r = reply_w = -1
        prog, judge = children
        timed_out, over_disk = _wait(children, judge, limits)
        lines = judge.report()
        verdict = lines[1] if len(lines) == 2 else None
        guards, uid = _setup(prog.report())
        out, err = prog.output()
        judge_err = judge.output()[1]
        if judge_err.strip():
            err = f"{err}\n--- check ---\n{judge_err}" if err else f"--- check ---\n{judge_err}"
        cpu_killed = -signal.SIGXCPU in (prog.proc.returncode, judge.proc.returncode)
        return _outcome(verdict, nonce, timed_out, over_disk, cpu_killed, limits, stdout=out, stderr=err,
                        seconds=time.perf_counter() - t0, returncode=judge.proc.returncode, guards=guards,
                        uid=uid)
    finally:
        for fd in (request_r, request_w, reply_r, reply_w):
            if fd >= 0:
                os.close(fd)
        for c in children:
            c.close()


def _pool(fn, items, limits: SandboxLimits) -> list[SandboxResult]:
    if not items:
        return []
    with ThreadPoolExecutor(max_workers=max(1, limits.workers)) as pool:
        return list(pool.map(fn, items))


def run_programs(sources: list[str], limits: SandboxLimits | None = None) -> list[SandboxResult]:
    """Run many programs, ``limits.workers`` at a time; results in input order."""
    limits = limits or SandboxLimits()
    return _pool(lambda s: run_program(s, limits), sources, limits)


def run_checks(checks: list[tuple[str, str]], limits: SandboxLimits | None = None) -> list[SandboxResult]:
    """:func:`run_check` for many ``(program, harness)`` pairs, ``limits.workers`` at a time; in input order."""
    limits = limits or SandboxLimits()
    return _pool(lambda c: run_check(c[0], c[1], limits), checks, limits)


_GUARDS: dict[tuple, tuple[list[str], int | None]] = {}
KERNEL_GUARDS = ("netns", "landlock-fs", "landlock-tcp", "landlock-signals", "seccomp-noproc", "uid-nobody",
                 "no-capabilities", "nproc-0", "not-dumpable", "disk-tmpfs")


def _probe(limits: SandboxLimits | None) -> tuple[list[str], int | None]:
    limits = limits or SandboxLimits()
    key = (limits.python or default_python(), limits.disk_tmpfs, limits.python_guards)
    if key not in _GUARDS:
        r = run_program("pass\n", SandboxLimits(timeout_s=30, python=limits.python, disk_tmpfs=limits.disk_tmpfs,
                                                python_guards=limits.python_guards))
        _GUARDS[key] = (r.guards, r.uid)
    return _GUARDS[key]


def sandbox_guards(limits: SandboxLimits | None = None) -> list[str]:
    """The guards this machine enforces for ``limits`` (probed once with an empty program): kernel guards,
    ``uid-nobody`` or ``no-capabilities``, ``disk-tmpfs`` or the evaluator's ``disk-watch``, ``audit-hook``."""
    return list(_probe(limits)[0])


def sandbox_uid(limits: SandboxLimits | None = None) -> int | None:
    """The uid programs run as on this machine under ``limits`` (probed once with an empty program)."""
    return _probe(limits)[1]


__all__ = ["KERNEL_GUARDS", "SandboxLimits", "SandboxResult", "default_python", "run_check", "run_checks",
           "run_program", "run_programs", "sandbox_guards", "sandbox_uid"]
