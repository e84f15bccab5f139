"""Expiry without scanning: a one-second timer wheel with lazy re-insertion.

An entry is filed under the second its deadline falls in. Refreshing an entry
only moves its ``expires`` attribute forward (one store on the fast path);
when its bucket comes due, an entry whose deadline moved is filed again. Each
entry is therefore touched about once per timeout period, whatever its
traffic, and ``expire(now)`` visits only the buckets that came due.

``take`` serves the table's early drop: it looks for one item a predicate
accepts, visiting at most a given number of items per call from where the
last call stopped (buckets in deadline order, around the wheel), removes it,
and clears away the dead items it passes: bounded work per call, no extra
memory per item.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class TimerWheel:
    __slots__ = ("_buckets", "_pos", "_keys", "_kj", "_ci")

    def __init__(self) -> None:
        self._buckets: dict[int, list[Any]] = {}
        self._pos: int | None = None
        # take()'s cursor: the bucket keys of the current pass, the index in them, in the bucket
        self._keys: list[int] = []
        self._kj = 0
        self._ci = 0

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
        if self._keys and self._keys[-1] <= upto:
            # every bucket of take()'s pass is gone: its cursor holds nothing but stale keys
            self._keys = []
            self._kj = self._ci = 0
        return out

    def take(self, is_dead: Callable[[Any], bool], pred: Callable[[Any], bool], budget: int) -> Any:
        """Remove and return an item that is not dead and for which ``pred`` is true, looking at no
        more than ``budget`` items (dead ones passed on the way are removed); None if none found."""
        buckets = self._buckets
        keys, j, i = self._keys, self._kj, self._ci
        steps = 0
        wrapped = False
        found = None
        while steps < budget:
            if j >= len(keys):
                if wrapped or not buckets:
                    break
                keys = self._keys = sorted(buckets)  # a new pass, earliest deadlines first
                j = i = 0
                wrapped = True
                continue
            k = keys[j]
            lst = buckets.get(k)
            if lst is None or i >= len(lst):
                j += 1
                i = 0
                steps += 1
                continue
            x = lst[i]
            steps += 1
            dead = is_dead(x)
            if dead or pred(x):
                last = lst.pop()
                if i < len(lst):
                    lst[i] = last
                if not lst:
                    del buckets[k]
                if not dead:
                    found = x
                    break
                continue
            i += 1
        self._kj, self._ci = j, i
        return found

    def __len__(self) -> int:
        return sum(len(v) for v in self._buckets.values())
