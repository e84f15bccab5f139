"""Expiry without scanning: a one-second timer wheel with lazy re-insertion.

An entry is filed under the second its deadline falls in. Refreshing an entry
only moves its ``expires`` attribute forward (one store on the fast path);
when its bucket comes due, an entry whose deadline moved is filed again. Each
entry is therefore touched about once per timeout period, whatever its
traffic, and ``expire(now)`` visits only the buckets that came due.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class TimerWheel:
    __slots__ = ("_buckets", "_pos")

    def __init__(self) -> None:
        self._buckets: dict[int, list[Any]] = {}
        self._pos: int | None = None

    def add(self, item: Any, deadline: float) -> None:
        b = int(deadline) + 1
        if self._pos is not None and b <= self._pos:
            b = self._pos + 1
        lst = self._buckets.get(b)
        if lst is None:
            self._buckets[b] = [item]
        else:
            lst.append(item)

    def due(self, now: float, is_dead: Callable[[Any], bool], deadline_of: Callable[[Any], float]) -> list[Any]:
        """Return the items whose deadline has passed; file again those that were refreshed."""
        upto = int(now)
        if self._pos is None:
            self._pos = min(self._buckets, default=upto)
        if upto < self._pos:
            return []
        if upto - self._pos <= len(self._buckets):
            keys = [k for k in range(self._pos, upto + 1) if k in self._buckets]
        else:
            keys = sorted(k for k in self._buckets if k <= upto)
        self._pos = upto
        out: list[Any] = []
        buckets = self._buckets
        for k in keys:
            for item in buckets.pop(k):
                if is_dead(item):
                    continue
                d = deadline_of(item)
                if d <= now:
                    out.append(item)
                else:
                    self.add(item, d)
        return out

    def __len__(self) -> int:
        return sum(len(v) for v in self._buckets.values())
