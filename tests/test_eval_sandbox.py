"""The sandbox contains what model-generated code can do wrong: loops, huge allocations, shell commands,
writes outside its directory, network, new processes, crashes, early exits; none of it stops a run."""

from __future__ import annotations

import socket
import threading

import pytest

from rad_ds.eval.sandbox import KERNEL_GUARDS, SandboxLimits, run_program, run_programs, sandbox_guards

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


def test_root_runs_programs_as_nobody_when_the_interpreter_allows(outside):
    """Where Python is installed readable by all (a system python), root drops to nobody; this machine's
    venv python may live under /root, where the sandbox keeps uid 0 without capabilities instead."""
    import os
    import shutil

    system_python = shutil.which("python3", path="/usr/bin:/bin")
    if os.geteuid() != 0 or system_python is None:
        pytest.skip("needs root and a system python3")
    limits = SandboxLimits(timeout_s=5.0, python=system_python)
    r = run_program("import os\nopen('mine.txt', 'w').write('x')\nprint(os.getuid())", limits)
    if "uid-nobody" not in r.guards:
        pytest.skip(f"{system_python}'s library is not readable by nobody")
    assert r.passed and r.stdout.strip() == "65534"
    for src in (f"open('{outside}/x', 'w')", "import os; os.system('true')"):
        assert not run_program(src, limits).passed
    assert not run_program(f"open('{outside}/y', 'w')", SandboxLimits(timeout_s=5.0, python=system_python,
                                                                        python_guards=False)).passed
    assert list(outside.iterdir()) == []
