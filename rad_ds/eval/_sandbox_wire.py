"""The channel between a check's trusted harness and the untrusted program it calls (see ``sandbox.run_check``).

Both ends run in sandboxed children, and ``_sandbox_child.py`` loads this file's text into each of them
before it locks itself down. Values travel as tagged JSON built only from ``None``, ``bool``, ``int``,
``float``, ``complex``, ``str``, ``bytes``, ``list``, ``tuple``, ``set``, ``frozenset`` and ``dict``
(exact types: a subclass, such as a ``str`` whose ``__eq__`` is always true, is refused). Decoding makes
nothing but those built-ins and runs no code, so whatever the program sends, the harness compares plain
values with its own code. Nothing here trusts the program's side: :func:`serve` runs inside the program's
process, where the program may replace it.
"""

import json
import os
import struct

MAX_MESSAGE = 32 << 20  # bytes of one encoded message
_HEADER = struct.Struct(">Q")
_SCALARS = (type(None), bool, str)
_SEQUENCES = {list: "list", tuple: "tuple", set: "set", frozenset: "frozenset"}
_BUILD = {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset}


class WireError(Exception):
    """A value that is not plain data, or a malformed message."""


def encode(value):
    """``value`` as a JSON-serialisable tree; :class:`WireError` for anything but the built-in data types."""
    t = type(value)
    if t in _SCALARS:
        return value
    if t is int:
        return ["int", format(value, "x")]  # hex: exact, and no str-digits limit on big ints
    if t is float:
        return ["float", value.hex()]  # exact, inf and nan included
    if t is complex:
        return ["complex", value.real.hex(), value.imag.hex()]
    if t is bytes:
        return ["bytes", value.hex()]
    if t in _SEQUENCES:
        return [_SEQUENCES[t], *(encode(v) for v in value)]
    if t is dict:
        return ["dict", *([encode(k), encode(v)] for k, v in value.items())]
    raise WireError(f"a {t.__module__}.{t.__qualname__} is not plain data")


def decode(tree):
    """The value :func:`encode` made ``tree`` from; :class:`WireError` for any other tree."""
    t = type(tree)
    if t in _SCALARS:
        return tree
    if t is not list or not tree or type(tree[0]) is not str:
        raise WireError(f"not an encoded value: {t.__name__}")
    tag, rest = tree[0], tree[1:]
    try:
        if tag in _BUILD:
            return _BUILD[tag](decode(v) for v in rest)
        if tag == "dict":
            if not all(type(kv) is list and len(kv) == 2 for kv in rest):
                raise WireError("malformed dict")
            return {decode(k): decode(v) for k, v in rest}
        if len(rest) == 1 and type(rest[0]) is str:
            if tag == "int":
                return int(rest[0], 16)
            if tag == "float":
                return float.fromhex(rest[0])
            if tag == "bytes":
                return bytes.fromhex(rest[0])
        if tag == "complex" and len(rest) == 2 and all(type(x) is str for x in rest):
            return complex(float.fromhex(rest[0]), float.fromhex(rest[1]))
    except WireError:
        raise
    except (TypeError, ValueError, RecursionError, MemoryError) as e:  # unhashable key, bad hex, too deep
        raise WireError(f"malformed {tag}: {type(e).__name__}") from None
    raise WireError(f"unknown tag {tag[:40]!r}")


def send(fd, message):
    data = json.dumps(message, separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE:
        raise WireError(f"message of {len(data)} bytes (limit {MAX_MESSAGE})")
    data = _HEADER.pack(len(data)) + data
    while data:
        data = data[os.write(fd, data):]


def _read_exactly(fd, n):
    chunks = []
    while n:
        b = os.read(fd, min(n, 1 << 20))
        if not b:
            raise EOFError("the other side closed the channel")
        chunks.append(b)
        n -= len(b)
    return b"".join(chunks)


def receive(fd):
    (n,) = _HEADER.unpack(_read_exactly(fd, _HEADER.size))
    if n > MAX_MESSAGE:
        raise WireError(f"message of {n} bytes (limit {MAX_MESSAGE})")
    return json.loads(_read_exactly(fd, n))


# ---- the program's side: runs the untrusted program, then answers calls ------------------------------------

def _describe(e):
    return f"{type(e).__name__}: {e}"[:1000]


def serve(source, filename, request_fd, reply_fd):
    """Run the program ``source`` as ``__main__``, say whether it ran, then answer the harness's requests
    (``call`` a global with arguments, ``get`` a global's value) until the harness hangs up."""
    scope = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        exec(compile(source, filename, "exec"), scope)
        send(reply_fd, {"ready": True})
    except BaseException as e:  # noqa: BLE001 - SystemExit too: the program did not finish
        import traceback  # deferred: the error path only (~8 ms at each sandboxed program's start otherwise)

        traceback.print_exc()
        send(reply_fd, {"ready": False, "error": _describe(e)})
        return
    while True:
        try:
            request = receive(request_fd)
        except (EOFError, OSError):
            return
        try:
            target = scope[request["name"]]
            if request["op"] == "call":
                args = [decode(a) for a in request["args"]]
                kwargs = {k: decode(v) for k, v in request["kwargs"].items()}
                target = target(*args, **kwargs)
            reply = {"value": encode(target)}
        except BaseException as e:  # noqa: BLE001
            reply = {"raised": _describe(e)}
        send(reply_fd, reply)


# ---- the harness's side: a trusted check calls the program through a proxy ----------------------------------

class ProgramError(Exception):
    """The program raised, or returned something that is not plain data (its own account, in the message)."""


class ProgramBroken(BaseException):
    """The channel failed (the program died, hung up or sent a malformed message): the check fails whatever
    the harness does with the exception (a ``BaseException``, so ``except Exception`` does not swallow it)."""


class Program:
    """The untrusted program as the harness sees it; every exchange goes through :func:`encode` / :func:`decode`."""

    def __init__(self, request_fd, reply_fd):
        self._request_fd, self._reply_fd = request_fd, reply_fd
        self.broken = None  # why the channel failed, once it has

    def _fail(self, why):
        self.broken = self.broken or why
        raise ProgramBroken(why)

    def _exchange(self, request):
        if self.broken:
            raise ProgramBroken(self.broken)
        try:
            send(self._request_fd, request)
        except WireError as e:
            raise ProgramError(f"the check's own arguments are not plain data: {e}") from None
        except OSError as e:
            self._fail(f"the program hung up ({type(e).__name__})")
        try:
            reply = receive(self._reply_fd)
        except (EOFError, OSError, WireError, ValueError, RecursionError, MemoryError) as e:
            self._fail(f"no answer from the program ({_describe(e)})")
        if type(reply) is dict and set(reply) == {"raised"} and type(reply["raised"]) is str:
            raise ProgramError(f"the program raised {reply['raised'][:1000]}")
        if type(reply) is not dict or set(reply) != {"value"}:
            self._fail("malformed answer from the program")
        try:
            return decode(reply["value"])
        except WireError as e:
            self._fail(f"malformed answer from the program ({e})")

    def wait_ready(self):
        """The program's first message: whether its top level ran (a failure ends the check)."""
        try:
            hello = receive(self._reply_fd)
        except (EOFError, OSError, WireError, ValueError, RecursionError, MemoryError) as e:
            self._fail(f"the program did not start ({_describe(e)})")
        if type(hello) is dict and hello.get("ready") is True:
            return
        error = hello.get("error") if type(hello) is dict else None
        self._fail(f"the program raised {error[:1000]}" if type(error) is str else "the program did not start")

    def function(self, name):
        """A function that calls the program's global ``name`` with copies of its arguments."""
        def call(*args, **kwargs):
            return self._exchange({"op": "call", "name": name, "args": [encode(a) for a in args],
                                   "kwargs": {k: encode(v) for k, v in kwargs.items()}})

        call.__name__ = call.__qualname__ = name
        return call

    def value(self, name):
        """The value of the program's global ``name``."""
        return self._exchange({"op": "get", "name": name, "args": [], "kwargs": {}})


def judge(code, request_fd, reply_fd):
    """Run the trusted harness ``code`` with ``__program__`` bound to the program: it passes iff the harness
    ran to its end without an exception and every exchange with the program was well formed."""
    program = Program(request_fd, reply_fd)
    try:
        program.wait_ready()
        exec(code, {"__name__": "__main__", "__builtins__": __builtins__, "__program__": program})
    except BaseException as e:  # noqa: BLE001
        import traceback  # deferred: the error path only (~8 ms at each sandboxed program's start otherwise)

        traceback.print_exc()
        return False, program.broken or (str(e) if isinstance(e, ProgramError) else _describe(e))
    if program.broken:
        return False, program.broken
    return True, None
