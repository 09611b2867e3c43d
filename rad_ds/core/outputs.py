"""One discipline for every launcher's ``--out``: what a directory holds, whether it is finished, who writes it.

A stage claims its output directory before any real work (:func:`claim`) and marks it finished last
(:meth:`Output.finish`). The claim

* refuses a directory that holds something else (files rad-ds did not write, or another stage's output),
  whatever the flags: nothing a user did not ask rad-ds to make is ever removed;
* refuses a *finished* output of the same stage unless ``--overwrite`` is given, or, for a resumable stage,
  ``--resume auto``. With ``--overwrite`` the old contents are moved aside (``OUT/.previous.tmp-*``), removed
  when the new output finishes and moved back if the run fails, so a failed run loses nothing and no file of
  the old output lingers beside the new one;
* holds an exclusive lock (``flock`` on ``OUT/.rad_ds_output.lock``) for the run's lifetime: a second run on
  the same ``--out`` gets one line naming the holder's pid and host. The kernel releases the lock when its
  process dies, so a killed run never leaves a stale lock;
* removes the temporaries (``.*.tmp*``) that a dead holder left behind;
* says in one line that an unwritable ``--out`` (read-only filesystem, no permission) cannot be used.

The marker ``OUT/.rad_ds_output.json`` records the stage (``kind``), ``status`` (``running`` or
``complete``), pid, host and times. Outputs written before markers existed are recognised by their files
(:data:`KINDS`). On several ranks, rank 0 decides and every rank raises the same error.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from .io import write_json_atomic
from .logs import LOG_FILE, attach_log_file, detach_log_file

logger = logging.getLogger(__name__)

MARKER = ".rad_ds_output.json"
LOCK = ".rad_ds_output.lock"


class OutputError(FileExistsError):
    """An ``--out`` that cannot be used as asked; the message names the directory and what to do."""


@dataclass(frozen=True)
class OutputKind:
    """A stage's output: ``name`` (the marker's ``kind``), ``label`` for messages, ``signature``: files that
    identify an output of this kind written before markers existed, ``resumable``: an unfinished output is
    continued (``--resume auto``) rather than started over; ``done``: files whose presence says that an
    unmarked (older) resumable output finished."""

    name: str
    label: str
    signature: tuple[str, ...] = ()
    resumable: bool = False
    done: tuple[str, ...] = ()


# the registry of output kinds; a stage with an --out adds one line here
KINDS: dict[str, OutputKind] = {k.name: k for k in (
    OutputKind("distill", "distillation run", ("checkpoints", "run_config.json", "metrics.jsonl"), resumable=True,
               done=("summary.json",)),
    OutputKind("diagnosis", "diagnosis", ("report.json",)),
    OutputKind("evaluation", "evaluation", ("results.json",)),
    OutputKind("teacher_cache", "teacher cache", ("manifest.json",), resumable=True),
    OutputKind("student", "student model", ("replacement.json",)),
    OutputKind("export", "exported model", ("distill.json", "rad_ds_native.json")),
    OutputKind("corpus", "corpus", ("corpus.json",)),
    OutputKind("study", "placement study", ("study_config.json", "placements.json", "study_wall.json"), resumable=True),
    OutputKind("pipeline", "pipeline run", ("pipeline.json",), resumable=True),
)}

_TEMPORARY = (".tmp", ".rad_hybrid-", ".old")


def _is_temporary(name: str) -> bool:
    return name.startswith(".") and any(t in name for t in _TEMPORARY)


def _own_file(name: str) -> bool:
    return name in _KEPT


_KEPT = (MARKER, LOCK, LOG_FILE)  # rad-ds' own files in every output; the lock and the log stay across runs


def read_marker(path: str | Path) -> dict | None:
    """The marker of ``path``, or ``None`` (none, or unreadable: treated as no marker)."""
    try:
        data = json.loads((Path(path) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("kind") in KINDS else None


def kind_of(path: str | Path) -> str | None:
    """What ``path`` holds: a kind's name, ``"empty"`` (absent, or only rad-ds' own lock/temporaries), or
    ``"foreign"`` (files rad-ds does not recognise)."""
    p = Path(path)
    if not p.is_dir():
        return "empty" if not p.exists() else "foreign"
    marker = read_marker(p)
    if marker is not None:
        return marker["kind"]
    names = {q.name for q in p.iterdir() if not _own_file(q.name) and not _is_temporary(q.name)}
    if not names:
        return "empty"
    for k in KINDS.values():
        if any(s in names for s in k.signature):
            return k.name
    return "foreign"


def _a(label: str) -> str:
    return f"{'an' if label[0] in 'aeiou' else 'a'} {label}"


def _describe(kind: str) -> str:
    return {"foreign": "files that rad-ds did not write"}.get(kind, _a(KINDS[kind].label) if kind in KINDS else kind)


@dataclass
class Output:
    """A claimed output directory; ``state`` is ``"fresh"``, ``"unfinished"`` (resumable and not finished)
    or ``"complete"`` (finished, claimed with ``resume``). Call :meth:`finish` when the output is whole and
    :meth:`release` (or leave the ``with`` block) at the end."""

    path: Path
    kind: str
    state: str = "fresh"
    owner: bool = True
    created: bool = False  # the claim made the directory
    aside: Path | None = None  # the previous output, moved aside by --overwrite until this one finishes
    _fd: int | None = field(default=None, repr=False)
    _log: object = field(default=None, repr=False)

    def finish(self, **info) -> None:
        """Mark the output finished (rank 0; atomic): from now on it is refused without ``--overwrite``."""
        if self.owner:
            marker = read_marker(self.path) or {"kind": self.kind}
            marker.update(status="complete", finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"), **info)
            write_json_atomic(self.path / MARKER, marker)
        self.commit()
        self.state = "complete"

    def commit(self) -> None:
        """Drop the previous output now (``--overwrite``), not when this one finishes: for a long run whose
        set-up succeeded, so two outputs do not share the disk for its whole length."""
        if self.owner and self.aside is not None:
            shutil.rmtree(self.aside, ignore_errors=True)
            self.aside = None

    def reopen(self) -> None:
        """Mark a finished output running again (a resumable stage asked to go further, e.g. more steps)."""
        if self.owner:
            marker = read_marker(self.path) or {"kind": self.kind}
            marker.update(status="running", pid=os.getpid(), host=socket.gethostname(),
                          started=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
            write_json_atomic(self.path / MARKER, marker)
        self.state = "unfinished"

    def release(self) -> None:
        detach_log_file(self._log)
        self._log = None
        if self._fd is not None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> "Output":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        """Release the lock; after a failure, a directory the claim created that holds nothing but the
        marker is removed (a run that failed to start leaves no ``--out`` behind)."""
        if exc_type is not None and self.owner and self.aside is not None and self.aside.is_dir():
            # the run failed: what it wrote goes, the previous output comes back
            for q in self.path.iterdir():
                if q.name not in (LOCK, LOG_FILE) and q != self.aside:
                    shutil.rmtree(q) if q.is_dir() and not q.is_symlink() else q.unlink()
            for q in self.aside.iterdir():
                q.rename(self.path / q.name)
            self.aside.rmdir()
            self.aside = None
        if exc_type is not None and self.owner and self.created and self.path.is_dir():
            if {q.name for q in self.path.iterdir()} <= set(_KEPT):
                shutil.rmtree(self.path, ignore_errors=True)
        self.release()
        return False


def _unwritable(path: Path, e: OSError) -> OutputError:
    why = e.strerror or type(e).__name__
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return OutputError(f"--out {path}: cannot write there ({why}); choose a writable --out")
    return OutputError(f"--out {path}: cannot be used ({why}); choose another --out")


def _lock(path: Path) -> int:
    """Take the directory's lock without waiting; its file records the holder (pid, host, since)."""
    lock = path / LOCK
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise _unwritable(path, e) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = json.loads(os.read(fd, 4096).decode() or "{}")
        except ValueError:
            holder = {}
        os.close(fd)
        raise OutputError(
            f"--out {path} is in use by pid {holder.get('pid', '?')} on {holder.get('host', '?')} "
            f"(since {holder.get('since', '?')}); wait for that run to end or choose another --out"
        ) from None
    me = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                     "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, me, 0)
    return fd


def clean_temporaries(path: Path, depth: int = 2) -> list[Path]:
    """Remove what an interrupted writer left in ``path`` (and its subdirectories, ``depth`` levels):
    ``.<name>.tmp-*``, ``.<name>.*.tmp``, ``.rad_hybrid-*`` and ``.<name>.old``. Call it holding the lock."""
    removed = []
    if depth <= 0 or not path.is_dir():
        return removed
    for q in path.iterdir():
        if _is_temporary(q.name):
            if q.is_dir() and not q.is_symlink():
                shutil.rmtree(q, ignore_errors=True)
            else:
                q.unlink(missing_ok=True)
            removed.append(q)
        elif q.is_dir() and not q.is_symlink():
            removed += clean_temporaries(q, depth - 1)
    return removed


def _move_aside(path: Path) -> Path:
    """Move the contents of ``path`` but the lock (the caller holds it) into a hidden temporary inside it."""
    aside = path / f".previous.tmp-{os.getpid()}"
    aside.mkdir()
    for q in path.iterdir():
        if q.name not in (LOCK, LOG_FILE) and q != aside:
            q.rename(aside / q.name)
    return aside


def _decide(path: Path, kind: str, overwrite: bool, resume: bool) -> tuple[str, bool]:
    """(state, clear) for a claim of ``path`` by ``kind``, or an OutputError. Read-only."""
    found = kind_of(path)
    if found == "empty":
        return "fresh", False
    if found != kind:
        raise OutputError(f"--out {path} holds {_describe(found)}; choose another --out "
                          f"({_a(KINDS[kind].label)} never replaces them, not even with --overwrite)")
    marker = read_marker(path)
    spec = KINDS[kind]
    if marker:
        status = marker.get("status")
    else:  # written before markers: finished unless resumable and without its final files
        done = not spec.resumable or (spec.done and all((path / f).exists() for f in spec.done))
        status = "complete" if done else "unfinished"
    if status == "complete":
        if overwrite:
            return "fresh", True
        if resume and spec.resumable:
            return "complete", False
        raise OutputError(f"--out {path} holds a finished {spec.label}; pass --overwrite to replace it, "
                          "or choose another --out")
    # an unfinished output whose writer is gone (we are about to hold the lock)
    if overwrite:
        return "fresh", True
    if spec.resumable:
        return "unfinished", False
    logger.info("--out %s holds an unfinished %s (its run stopped before the end): starting it again", path,
                spec.label)
    return "fresh", True


def check(path: str | Path, kind: str, *, overwrite: bool = False, resume: bool = False) -> str:
    """Would a ``kind`` run be allowed to write ``path``? Its state (see :class:`Output`), or an
    :class:`OutputError`; nothing is written. For stages whose output appears whole in one rename
    (``core.io.atomic_dir``: the student and exported models), this is the whole discipline."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"--out {path} is a file; give a directory")
    state, _ = _decide(path, kind, overwrite, resume)
    anc = path
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not os.access(anc, os.W_OK):
        raise _unwritable(path, OSError(errno.EROFS if _read_only(anc) else errno.EACCES,
                                        os.strerror(errno.EROFS if _read_only(anc) else errno.EACCES)))
    return state


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _claim_here(path: Path, kind: str, overwrite: bool, resume: bool) -> Output:
    check(path, kind, overwrite=overwrite, resume=resume)  # refuse before creating or locking anything
    existed = path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _unwritable(path, e) from None
    try:
        fd = _lock(path)
    except OutputError:
        if not existed:
            shutil.rmtree(path, ignore_errors=True)
        raise
    out = Output(path, kind, created=not existed, _fd=fd)
    try:
        state, clear = _decide(path, kind, overwrite, resume)  # again, now that no one else can change it
        for q in clean_temporaries(path):
            logger.info("removed %s (left by an interrupted run)", q)
        if clear:
            out.aside = _move_aside(path)
        out.state = state
        if state != "complete":
            marker = {"kind": kind, "status": "running", "pid": os.getpid(), "host": socket.gethostname(),
                      "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            write_json_atomic(path / MARKER, marker)
        out._log = attach_log_file(path)  # every line of this run, DeepSpeed's included, in OUT/rad_ds.log
    except OSError as e:
        out.release()
        raise _unwritable(path, e) from None
    except BaseException:
        out.release()
        raise
    return out


def claim(path: str | Path, kind: str, *, overwrite: bool = False, resume: bool = False, rank: int = 0) -> Output:
    """Claim ``path`` as this run's ``kind`` output (see the module docstring). Collective when a process
    group is initialised: rank 0 decides and locks, every rank gets the same :class:`Output` state or raises
    the same :class:`OutputError`."""
    if kind not in KINDS:
        raise ValueError(f"unknown output kind {kind!r}; known: {', '.join(KINDS)}")
    path = Path(path)
    out, err = None, None
    if rank == 0:
        try:
            out = _claim_here(path, kind, overwrite, resume)
        except OutputError as e:
            err = str(e)
    from .dist import broadcast_object  # deferred: torch, only when a claim is made (configs use check())

    state, err = broadcast_object((out.state if out else None, err))
    if rank != 0 and err is None:
        out = Output(path, kind, state=state, owner=False)
    if err is not None:
        raise OutputError(err)
    return out


__all__ = ["KINDS", "LOCK", "MARKER", "Output", "OutputError", "OutputKind", "check", "claim", "clean_temporaries",
           "kind_of", "read_marker"]
