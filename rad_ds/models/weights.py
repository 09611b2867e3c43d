"""Safetensors checkpoints read and written one tensor at a time, so no process holds a whole model.

``WeightSource`` reads a transformers directory (``model.safetensors`` or a sharded
``model.safetensors.index.json``): names, shapes, whole tensors or a range of rows. Each read maps the file
only for that read, so the pages it touched leave the process when it returns (a mapping kept open for a
whole load would count the whole file in the process's memory). ``SafetensorsWriter`` writes one
``model.safetensors`` from a list of (name, shape, dtype) given up front, then the tensors in that order:
at most one tensor is in memory at a time. The files are the safetensors format (8-byte little-endian
header length, JSON header with byte offsets, raw little-endian data), readable by ``safetensors`` itself.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch
from safetensors import safe_open

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"

_DTYPE_CODES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


_DTYPES_BY_CODE = {code: dtype for dtype, code in _DTYPE_CODES.items()}


class WeightSourceError(ValueError):
    """A directory whose weights cannot be read tensor by tensor; the message says why."""


def check_safetensors(path: str | os.PathLike, fix: str = "re-create it with the stage that wrote it") -> None:
    """Refuse, in one line naming the file, a safetensors file that is truncated or whose header is corrupt:
    its size must be the 8-byte length, the JSON header and every tensor's bytes (header offsets). Reads only
    the header."""
    p = Path(path)
    size = p.stat().st_size
    why = None
    with open(p, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        if n is None or n > size - 8:
            why = f"{size} bytes, too short for its header"
        else:
            try:
                header = json.loads(f.read(n))
                end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
            except (ValueError, KeyError, TypeError, IndexError) as e:
                why = f"its header is not valid ({type(e).__name__})"
            else:
                if size != 8 + n + end:
                    why = f"{size} bytes where its header describes {8 + n + end}"
    if why is not None:
        raise WeightSourceError(f"{p}: truncated or corrupt safetensors file ({why}); {fix}")


def check_weight_files(directory: str | os.PathLike, fix: str = "re-create it with the stage that wrote it") -> None:
    """:func:`check_safetensors` on every ``*.safetensors`` file of a model directory."""
    for f in sorted(Path(directory).glob("*.safetensors")):
        check_safetensors(f, fix)


class WeightSource:
    """The tensors of a safetensors checkpoint directory, read on demand."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        check_weight_files(self.dir)
        index, single = self.dir / INDEX, self.dir / SINGLE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise WeightSourceError(f"{index}: not a safetensors index ({e}); re-save the model") from None
            self.files = {name: self.dir / f for name, f in weight_map.items()}
        elif single.is_file():
            with safe_open(str(single), framework="pt") as f:
                self.files = {name: single for name in f.keys()}
        else:
            raise WeightSourceError(f"{self.dir}: no {SINGLE} or {INDEX}")

    @classmethod
    def find(cls, directory) -> WeightSource | None:
        """The source of ``directory``, or ``None`` when it holds no safetensors weights (GGUF, .bin)."""
        d = Path(directory)
        return cls(d) if d.is_dir() and ((d / INDEX).is_file() or (d / SINGLE).is_file()) else None

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def names(self) -> list[str]:
        return list(self.files)

    def _open(self, name: str):
        if name not in self.files:
            raise WeightSourceError(f"{self.dir}: no tensor {name!r}")
        return safe_open(str(self.files[name]), framework="pt")

    def shape(self, name: str) -> list[int]:
        with self._open(name) as f:
            return list(f.get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        with self._open(name) as f:
            code = f.get_slice(name).get_dtype()
        return _DTYPES_BY_CODE[code]

    def read(self, name: str) -> torch.Tensor:
        with self._open(name) as f:
            return f.get_tensor(name)

    def rows(self, name: str, lo: int, hi: int) -> torch.Tensor:
        """Rows ``lo:hi`` of the tensor's first dimension (the whole of a 0-d tensor)."""
        with self._open(name) as f:
            sl = f.get_slice(name)
            if not sl.get_shape():
                return f.get_tensor(name)
            return sl[lo:hi]


def _align(n: int, to: int = 8) -> int:
    return (n + to - 1) // to * to


class SafetensorsWriter:
    """Stream tensors into one safetensors file; the layout is fixed by ``specs`` given up front.

    ``with SafetensorsWriter(path, [(name, shape, dtype), ...]) as w: w.write(name, tensor)`` in the order of
    ``specs``; closing checks that every tensor was written. Written to ``path`` directly: callers write into
    a temporary directory that they rename into place."""

    def __init__(self, path: str | os.PathLike, specs, metadata: dict | None = None):
        self.path = Path(path)
        header, offset, self.order = {}, 0, []
        for name, shape, dtype in specs:
            if dtype not in _DTYPE_CODES:
                raise ValueError(f"tensor {name}: dtype {dtype} has no safetensors code")
            nbytes = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": _DTYPE_CODES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            self.order.append((name, tuple(shape), dtype, nbytes))
            offset += nbytes
        if metadata:
            header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (_align(len(raw)) - len(raw))  # the data starts 8-byte aligned
        self._fh = open(self.path, "wb")
        self._fh.write(struct.pack("<Q", len(raw)) + raw)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self.order):
            raise ValueError(f"{self.path}: tensor {name} is one more than the {len(self.order)} announced")
        want, shape, dtype, nbytes = self.order[self._next]
        if name != want:
            raise ValueError(f"{self.path}: expected tensor {want} next, got {name}")
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{self.path}: tensor {name} has shape {tuple(tensor.shape)}, announced {shape}")
        t = tensor.detach().to(device="cpu", dtype=dtype).contiguous()
        if t.numel():
            self._fh.write(t.reshape(-1).view(torch.uint8).numpy().data)  # the tensor's own bytes, no copy
        assert t.numel() * t.element_size() == nbytes
        self._next += 1

    def close(self) -> None:
        if self._fh.closed:
            return
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        if self._next != len(self.order):
            missing = self.order[self._next][0]
            raise ValueError(f"{self.path}: {len(self.order) - self._next} tensor(s) not written, first {missing}")

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.close()
        else:
            self._fh.close()


__all__ = ["SafetensorsWriter", "WeightSource", "WeightSourceError", "check_safetensors", "check_weight_files"]
