"""The first code a sandboxed interpreter runs (``sandbox.py`` passes this file's text with ``-c``).

It reads one JSON line of settings and then a program from stdin, locks itself down, writes one line
saying which guards hold (before any untrusted code runs), and then plays its role:

* ``program``: run a whole program and report on the report pipe whether it ran to its end. That
  report is the program's own word (the program can reach this process's memory), so nothing is scored
  on it; ``sandbox.run_program`` uses it for containment checks and trusted programs;
* ``serve``: close the report pipe, run the untrusted program, then answer the harness's calls over the
  two channel pipes (``_sandbox_wire.serve``);
* ``harness``: run the trusted check, which calls the program through ``_sandbox_wire.Program``, and
  report its verdict on the report pipe, which the program's process never holds.

Kernel-level guards come first, while the process still has the rights to set them up; the Python-level
audit hook comes last, after the last use of ctypes here. Nothing from rad_ds is imported: the child
may run as an unprivileged user that cannot read the repo (the channel code arrives in the settings).
"""

import ctypes
import json
import os
import platform
import resource
import stat
import sys
import sysconfig
import types

# Landlock (Linux >= 5.13), uapi/linux/landlock.h; the syscall numbers are the same on every architecture
SYS_LANDLOCK_CREATE_RULESET, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_RULE_PATH_BENEATH = 1
FS_WRITE_FILE, FS_REMOVE_DIR, FS_REMOVE_FILE = 1 << 1, 1 << 4, 1 << 5
# MAKE_CHAR, MAKE_DIR, MAKE_REG, MAKE_SOCK, MAKE_FIFO, MAKE_BLOCK, MAKE_SYM
FS_MAKE = (1 << 6) | (1 << 7) | (1 << 8) | (1 << 9) | (1 << 10) | (1 << 11) | (1 << 12)
FS_REFER, FS_TRUNCATE = 1 << 13, 1 << 14  # ABI 2, ABI 3
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1  # ABI 4
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1  # ABI 6
PR_SET_NO_NEW_PRIVS, PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 38, 1, 24, 47, 4
PR_SET_DUMPABLE = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWNET = 0x00020000, 0x10000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 2, 4, 8, 0x4000, 1 << 18
NOBODY = 65534


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


def _set_limits(cfg, guards):
    mb = 1 << 20
    limits = [(resource.RLIMIT_AS, cfg["memory_mb"] * mb), (resource.RLIMIT_CPU, cfg["cpu_seconds"]),
              (resource.RLIMIT_FSIZE, cfg["file_mb"] * mb), (resource.RLIMIT_CORE, 0),
              (resource.RLIMIT_NOFILE, 64)]
    for what, soft in limits:
        # CPU time: SIGXCPU at the soft limit, SIGKILL one second later
        hard = soft + 1 if what == resource.RLIMIT_CPU else soft
        old_hard = resource.getrlimit(what)[1]
        if old_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, old_hard), min(hard, old_hard)
        resource.setrlimit(what, (soft, hard))
    guards.append("rlimits")


def _namespaces(libc, guards):
    """New network and mount namespaces (as root, or inside a new user namespace that maps only our own
    uid); True when the mount namespace is there for a private tmpfs."""
    uid, gid = os.geteuid(), os.getegid()
    user = 0 if uid == 0 else CLONE_NEWUSER
    for flags in (user | CLONE_NEWNET | CLONE_NEWNS, user | CLONE_NEWNET):
        if libc.unshare(ctypes.c_int(flags)) == 0:
            break
    else:
        return False
    guards.append("netns")  # a fresh network namespace: only a loopback device, and it is down
    if user:
        try:  # keep our own ids, so files on the tmpfs can be created
            for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
                with open(f"/proc/self/{name}", "w") as f:
                    f.write(text)
        except OSError:
            return False
    return bool(flags & CLONE_NEWNS)


def _private_tmpfs(libc, workdir, disk_mb, owner, guards):
    """Mount a tmpfs of ``disk_mb`` over the working directory, seen only in this mount namespace: the
    program's whole disk use is capped (bytes and files) and vanishes with the process."""
    if libc.mount(b"none", b"/", None, ctypes.c_ulong(MS_REC | MS_PRIVATE), None) != 0:
        return  # without this, the mount could propagate to the evaluator's namespace
    opts = f"size={disk_mb}m,nr_inodes={max(256, disk_mb * 64)},mode=0700,uid={owner},gid={owner}"
    if libc.mount(b"tmpfs", workdir.encode(), b"tmpfs", ctypes.c_ulong(MS_NOSUID | MS_NODEV | MS_NOEXEC),
                  opts.encode()) == 0:
        guards.append("disk-tmpfs")


def _landlock(libc, workdir, guards):
    abi = libc.syscall(SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0),
                       ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION))
    if abi < 1:
        return
    fs = FS_WRITE_FILE | FS_REMOVE_DIR | FS_REMOVE_FILE | FS_MAKE
    fs |= FS_REFER if abi >= 2 else 0
    fs |= FS_TRUNCATE if abi >= 3 else 0
    attr = _RulesetAttr(fs, NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 else 0,
                        SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= 6 else 0)
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    rs = libc.syscall(SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if rs < 0:
        return
    file_rights = FS_WRITE_FILE | (FS_TRUNCATE if abi >= 3 else 0)
    for path, rights in ((workdir, fs), (os.devnull, file_rights)):
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        rule = _PathBeneathAttr(rights, fd)
        libc.syscall(SYS_LANDLOCK_ADD_RULE, ctypes.c_int(rs), ctypes.c_int(LANDLOCK_RULE_PATH_BENEATH),
                     ctypes.byref(rule), ctypes.c_uint32(0))
        os.close(fd)
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    if libc.syscall(SYS_LANDLOCK_RESTRICT_SELF, ctypes.c_int(rs), ctypes.c_uint32(0)) == 0:
        guards.append("landlock-fs")
        if abi >= 4:
            guards.append("landlock-tcp")
        if abi >= 6:
            guards.append("landlock-signals")
    os.close(rs)


def _readable_by_all(path):
    """Every directory from / to ``path`` lets others through, and ``path`` lets them read."""
    path = os.path.realpath(path)
    parts = path.split(os.sep)
    for i in range(1, len(parts) + 1):
        d = os.sep.join(parts[:i]) or os.sep
        try:
            mode = os.stat(d).st_mode
        except OSError:
            return False
        if not mode & stat.S_IXOTH or (i == len(parts) and not mode & stat.S_IROTH):
            return False
    return True


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _nobody_can_import():
    """Whether this interpreter's library stays readable after a switch to ``nobody``."""
    libs = {os.path.dirname(os.__file__), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    return all(_readable_by_all(p) for p in libs if os.path.isdir(p))


def _drop_root(libc, workdir, to_nobody, guards):
    """As root: become ``nobody`` (``to_nobody``: the interpreter can still import its library as
    ``nobody``); otherwise (Python installed under a private home) stay uid 0 but give up every capability."""
    if to_nobody:
        if "disk-tmpfs" not in guards:
            os.chown(workdir, NOBODY, NOBODY)  # the tmpfs is mounted as nobody's already
        os.setgroups([])
        os.setresgid(NOBODY, NOBODY, NOBODY)
        os.setresuid(NOBODY, NOBODY, NOBODY)  # clears every capability
        guards.append("uid-nobody")
        return
    _drop_capabilities(libc, guards)


def _drop_capabilities(libc, guards):
    """Give up every capability (of the user namespace we are in), for good: the bounding set too."""
    try:
        last = int(open("/proc/sys/kernel/cap_last_cap").read())
    except (OSError, ValueError):
        last = 63
    for cap in range(last + 1):
        libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)  # nothing regained by an exec either
    libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    data = (_CapData * 2)()
    if libc.capset(ctypes.byref(_CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)), data) == 0:
        guards.append("no-capabilities")


# seccomp: no new processes, no exec, no ptrace or cross-process memory access; threads (clone with
# CLONE_THREAD) stay allowed. clone3 answers ENOSYS so that libc falls back to clone, whose flags a
# filter can read.
_SECCOMP_ARCH = {  # machine: (AUDIT_ARCH_*, clone, clone3, (fork, vfork, execve, execveat, ptrace,
    # process_vm_readv, process_vm_writev, pidfd_getfd)): no new processes, no reaching into another one
    "x86_64": (0xC000003E, 56, 435, (57, 58, 59, 322, 101, 310, 311, 438)),
    "aarch64": (0xC00000B7, 220, 435, (221, 281, 117, 270, 271, 438)),
}
PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2
CLONE_THREAD = 0x00010000


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def _seccomp(libc, guards):
    spec = _SECCOMP_ARCH.get(platform.machine())
    if spec is None:
        return
    arch, clone, clone3, denied = spec
    LD, JEQ, JSET, RET = 0x20, 0x15, 0x45, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_JMP|JSET|K, BPF_RET|K
    ALLOW, EPERM, ENOSYS = 0x7FFF0000, 0x00050000 | 1, 0x00050000 | 38
    prog = [(LD, 0, 0, 4), (JEQ, 1, 0, arch), (RET, 0, 0, ALLOW), (LD, 0, 0, 0)]
    if platform.machine() == "x86_64":
        prog += [(JSET, 0, 1, 0x40000000), (RET, 0, 0, EPERM)]  # no x32 syscalls
    for nr in denied:
        prog += [(JEQ, 0, 1, nr), (RET, 0, 0, EPERM)]
    prog += [(JEQ, 0, 1, clone3), (RET, 0, 0, ENOSYS)]
    prog += [(JEQ, 0, 3, clone), (LD, 0, 0, 16), (JSET, 1, 0, CLONE_THREAD), (RET, 0, 0, EPERM)]
    prog += [(RET, 0, 0, ALLOW)]
    filt = (_SockFilter * len(prog))(*[_SockFilter(*ins) for ins in prog])
    fprog = _SockFprog(len(prog), filt)
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) == 0:
        guards.append("seccomp-noproc")


def _no_new_processes(guards):
    # without seccomp: RLIMIT_NPROC is counted per user, so at 0 every fork/clone of a non-root user fails
    if os.geteuid() != 0 and "seccomp-noproc" not in guards:
        resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
        guards.append("nproc-0")


_DENIED = frozenset({
    "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "subprocess.Popen",
    "os.kill", "os.killpg", "pty.spawn", "socket.__new__", "socket.connect", "socket.bind", "socket.sendto",
    "socket.getaddrinfo", "socket.gethostbyname", "urllib.Request", "ctypes.dlopen", "ctypes.dlsym",
    "ctypes.dlsym/handle", "ctypes.call_function", "ctypes.cdata", "ctypes.cdata/buffer", "ctypes.string_at",
    "ctypes.PyObj_FromPtr", "resource.setrlimit", "resource.prlimit", "os.chroot", "webbrowser.open",
    "_winapi.CreateProcess", "os.startfile",
})
_PATH_EVENTS = frozenset({"os.remove", "os.rmdir", "os.rename", "os.mkdir", "os.symlink", "os.link", "os.chmod",
                          "os.chown", "os.truncate", "os.utime", "os.chflags", "os.lchflags", "os.mkfifo",
                          "os.mknod", "shutil.rmtree", "shutil.copyfile", "shutil.copymode", "shutil.copystat",
                          "shutil.copytree", "shutil.move", "shutil.chown", "os.removexattr", "os.setxattr"})
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _audit_hook(workdir, guards):
    """Deny processes, sockets, ctypes and writes outside ``workdir`` at the Python level (a second line
    behind the kernel guards, with clear error messages; also the only line where those are missing)."""
    root = os.path.realpath(workdir)
    allowed = (root, os.devnull)
    realpath, join, fspath = os.path.realpath, os.path.join, os.fspath

    def inside(path):
        if isinstance(path, int):
            return True  # an already open descriptor
        try:
            p = fspath(path)
            p = p.decode(errors="replace") if isinstance(p, bytes) else p
            p = realpath(join(root, p))
        except Exception:  # noqa: BLE001 - an unparseable path is refused
            return False
        return p in allowed or p.startswith(root + os.sep)

    def hook(event, args):
        if event in _DENIED:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open":
            path, mode, flags = (tuple(args) + (None, None))[:3]
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & _WRITE_FLAGS)
            if writing and not inside(path):
                raise PermissionError(f"sandbox: writing {path!r} (outside the working directory) is not allowed")
        elif event in _PATH_EVENTS:
            paths = [a for a in args if isinstance(a, (str, bytes, os.PathLike))]
            if not all(inside(p) for p in paths):
                raise PermissionError(f"sandbox: {event} outside the working directory is not allowed")

    sys.addaudithook(hook)
    guards.append("audit-hook")


def _lock_down(cfg, libc):
    """Every kernel guard this machine offers, in the order that lets each be set up; the guards that hold."""
    guards, workdir = [], cfg["workdir"]
    root = os.geteuid() == 0
    to_nobody = root and _nobody_can_import()
    _set_limits(cfg, guards)
    if _namespaces(libc, guards) and cfg["disk_mb"]:
        _private_tmpfs(libc, workdir, cfg["disk_mb"], NOBODY if to_nobody else os.geteuid(), guards)
    os.chdir(workdir)  # again: the tmpfs now covers the directory we started in
    _landlock(libc, workdir, guards)  # after the mount (Landlock forbids mounts), on the tmpfs
    if root:
        _drop_root(libc, workdir, to_nobody, guards)
    elif "netns" in guards:
        _drop_capabilities(libc, guards)  # those the new user namespace gave us
    # another process (even one of the same uid) may no longer ptrace this one or open its /proc/<pid>/mem
    # or /proc/<pid>/fd without CAP_SYS_PTRACE
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) == 0:
        guards.append("not-dumpable")
    libc.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0)  # die with the evaluator (after the uid change, which clears it)
    _seccomp(libc, guards)
    _no_new_processes(guards)
    return guards


def _load_module(name, source):
    module = types.ModuleType(name)
    exec(compile(source, f"{name}.py", "exec"), module.__dict__)
    sys.modules[name] = module
    return module


def _run(source, filename):
    """Run a whole program as ``__main__``: (ran to its end, the exception that stopped it)."""
    try:
        code = compile(source, filename, "exec")
        del source
        exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
        return True, None
    except BaseException as e:  # noqa: BLE001 - SystemExit too: a program that exits early did not finish
        _print_traceback()
        return False, f"{type(e).__name__}: {e}"[:1000]


def _print_traceback():
    try:
        import traceback  # deferred: the error path only (~8 ms at each sandboxed program's start otherwise)

        traceback.print_exc()
    except BaseException:  # noqa: BLE001
        pass


def _flush():
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # noqa: BLE001
        pass


def main():
    cfg = json.loads(sys.stdin.readline())
    source = sys.stdin.read()
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    role, report_fd, workdir = cfg["role"], cfg["report_fd"], cfg["workdir"]
    wire = _load_module("_sandbox_wire", cfg["wire"]) if role in ("serve", "harness") else None
    libc = _libc()
    guards = _lock_down(cfg, libc)
    filename, nonce = cfg["filename"], cfg["nonce"]
    request_fd, reply_fd = cfg.get("request_fd"), cfg.get("reply_fd")
    python_guards = cfg["python_guards"]
    del cfg, libc
    for name in ("ctypes", "_ctypes"):
        sys.modules.pop(name, None)
    if python_guards:
        _audit_hook(workdir, guards)
    # written before any untrusted code runs, so the evaluator can believe it
    os.write(report_fd, (json.dumps({"guards": guards, "uid": os.getuid()}) + "\n").encode())
    if role == "serve":
        os.close(report_fd)  # the program gets no line to the evaluator
        wire.serve(source, filename, request_fd, reply_fd)
        _flush()
        os._exit(0)
    if role == "harness":
        passed, error = wire.judge(source, request_fd, reply_fd)
    else:
        passed, error = _run(source, filename)
    _flush()
    os.write(report_fd, (json.dumps({"nonce": nonce, "passed": passed, "error": error}) + "\n").encode())
    os._exit(0)


if __name__ == "__main__":
    main()
