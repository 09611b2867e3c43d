"""The sandbox contains what model-generated code can do wrong: loops, huge allocations, shell commands,
writes outside its directory, network, new processes, crashes, early exits, filling the disk, reading
root's files; none of it stops a run. A check's verdict comes from the trusted harness, in another
process: a program that forges a pass report, exits with success or returns an always-equal object fails."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import tempfile
import threading
from collections import namedtuple
from enum import IntEnum
from pathlib import Path

import pytest

from rad_ds.eval import _sandbox_wire as wire
from rad_ds.eval.sandbox import (KERNEL_GUARDS, SandboxLimits, default_python, run_check, run_checks, run_program,
                                 run_programs, sandbox_guards, sandbox_uid)

FAST = SandboxLimits(timeout_s=2.0, memory_mb=512)


@pytest.fixture()
def outside(tmp_path):
    """A directory outside the sandbox that the evaluator can see; nothing may appear in it."""
    d = tmp_path / "outside"
    d.mkdir(mode=0o777)
    d.chmod(0o777)  # even world-writable
    return d


def test_a_correct_program_passes_and_may_use_its_own_directory():
    r = run_program("import os\nopen('scratch.txt', 'w').write('x')\nassert open('scratch.txt').read() == 'x'\n"
                    "os.remove('scratch.txt')\nprint('done')", FAST)
    assert r.passed and r.status == "passed", r
    assert r.stdout.strip() == "done"


def test_failing_asserts_syntax_errors_and_early_exits_fail():
    assert run_program("assert 1 + 1 == 3", FAST).status == "failed"
    r = run_program("def f(:\n  pass", FAST)
    assert r.status == "failed" and r.error.startswith("SyntaxError")
    # leaving before the tests ran is never a pass
    assert run_program("import sys; sys.exit(0)\nassert False", FAST).status == "failed"
    r = run_program("import os; os._exit(0)\nassert False", FAST)
    assert not r.passed and r.status == "crashed"


def test_infinite_loop_and_sleep_are_killed():
    for src in ("while True:\n    pass", "import time\ntime.sleep(60)"):
        r = run_program(src, SandboxLimits(timeout_s=1.0))
        assert not r.passed and r.status == "timeout", r


def test_huge_allocation_fails_without_harming_the_evaluator():
    for src in ("x = bytearray(64 * 2**30)", "x = [0] * (10**10)", "x = 'a' * (8 * 2**30)"):
        r = run_program(src, FAST)
        assert not r.passed and "MemoryError" in (r.error or ""), r


def test_crash_is_a_failure():
    r = run_program("import os\nos.abort()", FAST)
    assert not r.passed and r.status == "crashed" and "signal" in r.error


def test_shell_and_subprocess_and_fork_are_refused(outside):
    cases = [
        f"import os\nos.system('touch {outside}/by_system')",
        f"import subprocess\nsubprocess.run(['touch', '{outside}/by_subprocess'])",
        f"import os\nif os.fork() == 0:\n    open('{outside}/by_fork', 'w').close()",
        f"import os\nos.execv('/usr/bin/touch', ['touch', '{outside}/by_exec'])",
        f"import ctypes\nctypes.CDLL(None).system(b'touch {outside}/by_ctypes')",
    ]
    for src in cases:
        r = run_program(src, FAST)
        assert not r.passed, (src, r)
    assert list(outside.iterdir()) == []


def test_writing_outside_its_directory_is_refused(outside, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    cases = [
        f"open('{outside}/new.txt', 'w').write('x')",
        f"open('{victim}', 'a').write('x')",
        f"open('{victim}', 'w')",
        f"import os\nos.remove('{victim}')",
        f"import os\nos.rename('{victim}', '{outside}/moved')",
        f"import os\nos.mkdir('{outside}/d')",
        f"import shutil\nshutil.rmtree('{tmp_path}')",
        f"import os\nos.symlink('/etc/passwd', '{outside}/link')",
        "open('../escape.txt', 'w').write('x')",
        "import pathlib\npathlib.Path('/tmp/rad_ds_sandbox_escape.txt').write_text('x')",
    ]
    for src in cases:
        r = run_program(src, FAST)
        assert not r.passed, (src, r)
    assert list(outside.iterdir()) == []
    assert victim.read_text() == "keep me"


@pytest.fixture()
def server():
    """A TCP server on the evaluator's loopback that records every connection."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.2)
    seen, stop = [], threading.Event()

    def accept():
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
                seen.append(conn.recv(100))
                conn.close()
            except OSError:
                pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield srv.getsockname()[1], seen
    stop.set()
    t.join()
    srv.close()


def test_network_is_unreachable(server):
    port, seen = server
    cases = [
        f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\ns.sendall(b'leak')",
        f"import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/', timeout=1)",
        "import socket\nsocket.getaddrinfo('example.com', 80)",
    ]
    for src in cases:
        r = run_program(src, FAST)
        assert not r.passed, (src, r)
    assert seen == []


def test_kernel_guards_hold_without_the_python_hooks(outside, server):
    """With the audit hook off, Landlock, the network namespace and seccomp still contain the program."""
    guards = sandbox_guards()
    if not {"landlock-fs", "netns"} <= set(guards):
        pytest.skip(f"this kernel offers only {guards}")
    port, seen = server
    raw = SandboxLimits(timeout_s=2.0, memory_mb=512, python_guards=False)
    results = run_programs([
        f"open('{outside}/raw.txt', 'w').write('x')",
        f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\ns.sendall(b'leak')",
        f"import subprocess\nsubprocess.run(['touch', '{outside}/raw_sub'])",
        f"import os\nassert os.system('touch {outside}/raw_sys') == 0",
        f"import ctypes\nassert ctypes.CDLL(None).system(b'touch {outside}/raw_ct'.decode().encode()) == 0",
    ], raw)
    assert not any(r.passed for r in results), results
    assert list(outside.iterdir()) == [] and seen == []
    assert run_program("print('ok')", raw).passed
    assert set(KERNEL_GUARDS) & set(guards)


def test_a_bad_program_never_stops_the_others():
    srcs = ["while True: pass", "assert True", "x = bytearray(64 * 2**30)", "import os; os.abort()", "pass",
            "import os; os.system('true')"]
    rs = run_programs(srcs, SandboxLimits(timeout_s=1.0, memory_mb=512, workers=2))
    assert [r.status for r in rs] == ["timeout", "passed", "failed", "crashed", "passed", "failed"]


def _nobody_can_run(python: str) -> bool:
    """Independent of the sandbox's own probe: can uid 65534 start ``python``?"""
    try:
        return subprocess.run([python, "-c", "pass"], user=65534, group=65534, extra_groups=[], cwd="/",
                              capture_output=True, timeout=60).returncode == 0
    except OSError:
        return False


@pytest.fixture()
def shared_dir():
    """A directory under /tmp that every user may traverse (pytest's tmp_path sits under a 0700 directory)."""
    d = Path(tempfile.mkdtemp(prefix="rad-sandbox-test-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_root_runs_programs_as_nobody_who_cannot_read_root_only_files(shared_dir, outside):
    """As root with an interpreter that nobody can run (here: a system python, picked by default when this
    one lives under /root), both processes of a check run as uid 65534: root's 0600 file is unreadable, a
    0644 one is readable, and nobody still cannot write outside its directory."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    python = default_python()
    if not _nobody_can_run(python):
        pytest.skip(f"no interpreter that nobody can run (tried {python})")
    secret, public = shared_dir / "secret", shared_dir / "public"
    secret.write_text("s3cret")
    secret.chmod(0o600)
    public.write_text("public")
    public.chmod(0o644)
    program = "import os\ndef read(path):\n    return open(path).read()\ndef uid():\n    return os.getuid()\n"
    harness = (f"read = __program__.function('read')\nassert __program__.function('uid')() == 65534\n"
               f"assert read({str(public)!r}) == 'public'\n"
               f"try:\n    read({str(secret)!r})\nexcept Exception as e:\n    assert 'PermissionError' in str(e), e\n"
               "else:\n    raise AssertionError('read a root-only file')\n"
               # the harness runs as nobody too
               f"try:\n    open({str(secret)!r}).read()\nexcept PermissionError:\n    pass\n"
               "else:\n    raise AssertionError('the harness read a root-only file')\n")
    limits = SandboxLimits(timeout_s=10.0)
    r = run_check(program, harness, limits)
    assert r.passed, (r.error, r.stderr)
    assert r.uid == 65534 and "uid-nobody" in r.guards and sandbox_uid(limits) == 65534
    r = run_program(f"print(open({str(secret)!r}).read())", limits)
    assert not r.passed and "PermissionError" in r.error and "s3cret" not in r.stdout
    for limits in (SandboxLimits(timeout_s=5.0), SandboxLimits(timeout_s=5.0, python_guards=False)):
        assert not run_program(f"open('{outside}/x', 'w')", limits).passed
    assert list(outside.iterdir()) == []


# ---- the wire: plain data only -------------------------------------------------------------------------------

def _through_the_wire(value):
    return wire.decode(json.loads(json.dumps(wire.encode(value))))


def _same(a, b) -> bool:
    """Equal, and of the same exact types all the way down (nan equals nan, -0.0 differs from 0.0)."""
    if type(a) is not type(b):
        return False
    if type(a) is float:
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    if type(a) in (list, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if type(a) is dict:
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def test_the_wire_carries_plain_data_exactly():
    values = [None, True, False, 0, -7, 10**5000, -(2**200), 0.1, -0.0, float("inf"), float("nan"), 1e-310,
              3 + 4j, "", "héllo\n\udc80", b"\x00\xff", [], (), (1,), [1, (2, [3.5])], {1, (2, 3)}, frozenset({"a"}),
              {"a": [1], (1, 2): {"b": None}, 3: frozenset({(4,)})}, [True, 1, 1.0]]
    for v in values:
        got = _through_the_wire(v)
        assert _same(got, v), (v, got)
    assert _same(_through_the_wire(values), values)


def test_the_wire_refuses_what_is_not_plain_data():
    Point = namedtuple("Point", "x y")

    class Color(IntEnum):
        RED = 1

    class Equal(str):
        def __eq__(self, other):
            return True

        __hash__ = str.__hash__

    for v in (object(), Point(1, 2), Color.RED, Equal("x"), [1, Equal("x")], {"k": Point(1, 2)}, bytearray(b"x"),
              lambda: 1, range(3), iter([1]), type("Any", (), {"__eq__": lambda s, o: True})()):
        with pytest.raises(wire.WireError):
            wire.encode(v)
    malformed = [1, 1.5, {"a": 1}, ["nope", 1], [], ["int", 5], ["int", "zz"], ["float", 1.0], ["dict", "ab"],
                 ["dict", ["x"]], ["set", ["list"]], ["dict", [["list"], 1]], ["list", {"a": 1}], ["complex", "1"],
                 ["bytes", "0"]]
    for tree in malformed:
        with pytest.raises(wire.WireError):
            wire.decode(tree)


# ---- the verdict comes from the harness ---------------------------------------------------------------------

DOUBLE = "    return x * 2\n"
HARNESS = "f = __program__.function('f')\nassert f(2) == 4\nassert f(5) == 10\n"

# each a body for ``def f(x):`` that tries to pass without computing x * 2
FORGERS = {
    # the issue's program: a caller's frame (or any dict) holds the nonce and the result fd; write one pass
    # report with them and leave
    "frames": """\
    import gc, json, os, sys
    def forge(scope):
        nonce = scope.get("nonce")
        for name in ("result_fd", "report_fd"):
            fd = scope.get(name)
            if isinstance(nonce, str) and type(fd) is int:
                report = {"nonce": nonce, "passed": True, "error": None, "guards": list(scope.get("guards") or [])}
                try:
                    os.write(fd, (json.dumps(report) + ("\\n" if name == "report_fd" else "")).encode())
                except OSError:
                    continue
                os._exit(0)
    frame = sys._getframe(1)
    while frame is not None:
        forge(frame.f_locals)
        frame = frame.f_back
    for obj in gc.get_objects():
        if type(obj) is dict:
            forge(obj)
    os._exit(0)
""",
    # every 32-character string and small int in reach, as nonce and fd: pass reports and channel messages
    # to every descriptor
    "every-fd": """\
    import gc, json, os, sys
    nonces, fds = {None}, set(range(64))
    frame = sys._getframe(1)
    while frame is not None:
        for scope in (frame.f_locals, frame.f_globals):
            for value in list(scope.values()):
                if isinstance(value, str) and len(value) == 32:
                    nonces.add(value)
                elif type(value) is int and 0 <= value < 1024:
                    fds.add(value)
        frame = frame.f_back
    for obj in gc.get_objects():
        if isinstance(obj, dict):
            nonces.update(v for v in list(obj.values()) if isinstance(v, str) and len(v) == 32)
    reports = [json.dumps({"nonce": n, "passed": True, "error": None}) + "\\n" for n in nonces]
    reports += [json.dumps({"ready": True}), json.dumps({"value": ["int", "4"]})]
    for fd in fds:
        for report in reports:
            try:
                os.write(fd, report.encode())
            except OSError:
                pass
    os._exit(0)
""",
    # other processes' descriptors reopened through /proc (a pipe's read end can be opened for writing)
    "proc-fds": """\
    import json, os
    report = (json.dumps({"passed": True, "error": None}) + "\\n").encode()
    for pid in os.listdir("/proc"):
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                fds = os.listdir(f"/proc/{pid}/fd")
            except OSError:
                continue
            for fd in fds:
                try:
                    os.write(os.open(f"/proc/{pid}/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK), report)
                except OSError:
                    pass
    os._exit(0)
""",
    "exit-0": "    import os\n    os._exit(0)\n",
    "system-exit": "    raise SystemExit(0)\n",
    "patched-builtins": """\
    import builtins
    builtins.AssertionError = type("Never", (BaseException,), {})
    builtins.print = builtins.__import__ = None
    return None
""",
    "always-equal": "    return type('Any', (), {'__eq__': lambda s, o: True, '__hash__': None})()\n",
    "equal-int": "    return type('Equal', (int,), {'__eq__': lambda s, o: True, '__hash__': int.__hash__})(0)\n",
    "kill-parent": "    import os, signal\n    os.kill(os.getppid(), signal.SIGKILL)\n    return 0\n",
}


@pytest.mark.parametrize("python_guards", [True, False], ids=["all-guards", "kernel-guards-only"])
def test_a_program_cannot_forge_its_verdict(python_guards):
    """Every forger fails and the honest program passes, with and without the audit hook. The forgers are
    real: run as one process with the check (as the sandbox scored before, and as run_program still
    runs), 'frames', 'always-equal' and 'equal-int' pass."""
    limits = SandboxLimits(timeout_s=5.0, python_guards=python_guards)
    names = list(FORGERS)
    rs = run_checks([(f"def f(x):\n{FORGERS[n]}", HARNESS) for n in names] + [(f"def f(x):\n{DOUBLE}", HARNESS)],
                    limits)
    assert rs[-1].passed, rs[-1]
    assert {n: r.status for n, r in zip(names, rs)} == {n: "failed" for n in names}, [r.error for r in rs]
    assert "not plain data" in rs[names.index("always-equal")].error
    assert "not plain data" in rs[names.index("equal-int")].error
    inline = HARNESS.replace("f = __program__.function('f')\n", "")
    own_word = run_programs([f"def f(x):\n{FORGERS[n]}\n{inline}" for n in ("frames", "always-equal", "equal-int")],
                            limits)
    assert all(r.passed for r in own_word), own_word


def test_the_verdict_is_the_check_s():
    """Right, wrong, raising, unfinished and missing programs, and a value read (CRUXEval's case)."""
    checks = [
        (f"def f(x):\n{DOUBLE}", HARNESS),
        ("def f(x):\n    return x + 2\n", HARNESS),  # right for 2, wrong for 5
        ("def f(x):\n    return 1 / 0\n", HARNESS),
        ("def f(x):\n    return x * 2\nraise ValueError('top level')\n", HARNESS),
        ("def g(x):\n    return x * 2\n", HARNESS),
        ("def f(x):\n    while True:\n        pass\n", HARNESS),
        ("def f(x):\n    import os\n    os.abort()\n", HARNESS),
        ("answer = [1, (2, 3), {4}]\n", "assert __program__.value('answer') == [1, (2, 3), {4}]\n"),
        ("answer = [1, [2, 3], {4}]\n", "assert __program__.value('answer') == [1, (2, 3), {4}]\n"),
        # an exception of the program reaches the check as an exception it may expect
        ("def f(x):\n    raise KeyError(x)\n",
         "try:\n    __program__.function('f')(1)\nexcept Exception as e:\n    assert 'KeyError' in str(e)\n"),
    ]
    rs = run_checks(checks, SandboxLimits(timeout_s=2.0))
    assert [r.passed for r in rs] == [True, False, False, False, False, False, False, True, False, True]
    assert [r.status for r in rs][5] == "timeout"
    assert "AssertionError" in rs[1].error and "ZeroDivisionError" in rs[2].error
    assert "ValueError: top level" in rs[3].error and "KeyError" in rs[4].error
    assert "no answer from the program" in rs[6].error


def test_the_program_of_a_check_is_contained_like_any_program(outside, server):
    """The escapes, now from inside a checked function, with the kernel guards alone."""
    port, seen = server
    raw = SandboxLimits(timeout_s=2.0, memory_mb=512, python_guards=False)
    bodies = [
        f"open('{outside}/raw.txt', 'w').write('x')",
        f"import socket\n    socket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'leak')",
        f"import subprocess\n    subprocess.run(['touch', '{outside}/raw_sub'])",
        f"import os\n    assert os.system('touch {outside}/raw_sys') == 0",
        "import os\n    assert os.fork() != 0",
    ]
    rs = run_checks([(f"def f():\n    {b}\n    return 1\n", "assert __program__.function('f')() == 1\n")
                     for b in bodies], raw)
    assert not any(r.passed for r in rs), rs
    assert list(outside.iterdir()) == [] and seen == []
    assert rs[0].guards == sandbox_guards(raw)


# ---- disk --------------------------------------------------------------------------------------------------

@pytest.fixture()
def host_tmp(monkeypatch, shared_dir):
    """The evaluator's temporary directory for this test: the sandbox's directories are made here."""
    monkeypatch.setattr(tempfile, "tempdir", str(shared_dir))
    return shared_dir


MANY_FILES = "for i in range(100000):\n    open(f'f{i}', 'w').write('x' * 100)\n"
FITS = ("for i in range(100):\n    open(f'f{i}', 'wb').write(b'x' * 8192)\n"
        "import os\nassert len(os.listdir('.')) == 100\n")


def test_total_disk_use_is_capped_by_a_private_tmpfs(host_tmp):
    """Many small files, or one file under the per-file limit but over the total, fail the program with
    ENOSPC; nothing the program writes ever appears in the evaluator's directory, and nothing is left."""
    limits = SandboxLimits(timeout_s=20.0, disk_mb=4)
    if "disk-tmpfs" not in sandbox_guards(limits):
        pytest.skip(f"no private tmpfs here: {sandbox_guards(limits)}")
    seen, done = [], threading.Event()

    def look():  # while a program keeps a file, the evaluator's side of its directory stays empty
        while not done.is_set():
            try:
                seen.append(sorted(str(p.relative_to(host_tmp)) for p in host_tmp.rglob("*")))
            except FileNotFoundError:  # a directory removed while we walked it (a run's start or end)
                continue

    watcher = threading.Thread(target=look, daemon=True)
    watcher.start()
    held = run_program("open('kept', 'w').write('x')\nimport time\ntime.sleep(1)\n", limits)
    done.set()
    watcher.join()
    assert held.passed and not any("kept" in p for ps in seen for p in ps), seen
    assert any(p.endswith("/work") for ps in seen for p in ps)  # we were looking at the right place
    big = "open('big', 'wb').write(b'x' * (8 << 20))\n"  # file_mb is 16
    rs = run_programs([MANY_FILES, big, FITS], limits)
    assert [r.passed for r in rs] == [False, False, True], rs
    assert "No space left on device" in rs[0].error and "No space left on device" in rs[1].error
    assert list(host_tmp.iterdir()) == []


def test_without_a_tmpfs_the_evaluator_kills_a_program_past_the_disk_cap(host_tmp):
    limits = SandboxLimits(timeout_s=20.0, disk_mb=4, disk_tmpfs=False)
    guards = sandbox_guards(limits)
    assert "disk-watch" in guards and "disk-tmpfs" not in guards
    slow = "for i in range(2000):\n    open(f'f{i}', 'w').write('x')\nimport time\ntime.sleep(10)\n"
    rs = run_programs([slow, FITS], limits)
    assert rs[0].status == "crashed" and "more than 4 MB" in rs[0].error and rs[0].seconds < 10, rs[0]
    assert rs[1].passed, rs[1]
    assert list(host_tmp.iterdir()) == []
