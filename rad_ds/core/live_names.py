"""A registry's names read at each use: ``in`` checks and lists in messages that must see the table as it is when
they run, not as it was when a config module was imported (a name registered later by a test or a plug-in)."""

from __future__ import annotations

from collections.abc import Callable, Sequence


class LiveNames(Sequence):
    """The tuple ``read()`` returns, re-read on every use; equal to a tuple (or list) of the same names."""

    def __init__(self, read: Callable[[], tuple[str, ...]]):
        self._read = read

    def __getitem__(self, i):
        return self._read()[i]

    def __len__(self) -> int:
        return len(self._read())

    def __eq__(self, other) -> bool:
        return tuple(self) == tuple(other) if isinstance(other, Sequence) and not isinstance(other, str) else False

    __hash__ = None

    def __repr__(self) -> str:
        return repr(self._read())


__all__ = ["LiveNames"]
