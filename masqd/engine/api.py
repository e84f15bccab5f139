"""The narrow interface the engine offers its protocol helpers (IPsec, PPTP, ...).

A helper never reaches into the engine's state: it counts, drops, records
events, announces changes of its own entries on the table's change stream, asks
whether a port or protocol is forwarded, and, on its fast path, asks for the
firewall decision cached on an entry and reports the packet it forwarded. The
engine (:class:`masqd.engine.core.Engine`) provides all of it; tests may provide
a stand-in. Directions are 0 (LAN -> WAN, "out") and 1 (WAN -> LAN, "in");
counter slots are those of :mod:`masqd.engine.counters`.
"""

from __future__ import annotations

from typing import Any, Protocol


class EngineAPI(Protocol):
    @property
    def wan_ip(self) -> int: ...

    @property
    def wan_ip_b(self) -> bytes: ...

    @property
    def wan_mtu(self) -> int: ...

    @property
    def lan_mtu(self) -> int: ...

    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to the named counter."""

    def drop(self, reason: str) -> None:
        """A packet was dropped (counted as ``drop_<reason>``)."""

    def gauge(self, name: str, value: int) -> None:
        """Set a named value (not a counter)."""

    def event(self, level: str, name: str, **kw: Any) -> None:
        """Record a state change for the log."""

    def changed(self, kind: str, entry: Any, reason: str = "") -> None:
        """Announce a change of one of the helper's entries (kinds and reasons of
        :mod:`masqd.engine.table`)."""

    def fast_hits(self, entry: Any, d: int) -> tuple[Any, ...] | None:
        """The firewall rules a packet of ``entry`` in direction ``d`` passes, as cached by the
        full path under the current rules; None: the packet must take the full path."""

    def fast_account(self, hits: tuple[Any, ...], rx: int, tx: int, n: int) -> None:
        """A packet of ``n`` bytes was forwarded by a fast path: count it in slots ``rx`` and
        ``tx`` and on the rules ``hits``."""

    def fast_void(self) -> None:
        """An entry whose fast-path rewrite a cache outside the engine may repeat (the data
        plane's flow cache learns ESP pairs and PPTP calls through ``fast_entry``) was removed,
        or its rewrite changed: such cached decisions are void from now on."""

    def port_forwarded(self, proto: int, port: int) -> bool:
        """A port forward of (``proto``, ``port``) on the current WAN address exists."""

    def proto_forwarded(self, proto: int) -> bool:
        """A protocol forward (ipfwd) of the IP protocol ``proto`` exists."""

    def find_session(self, proto: int, out_key: bytes) -> Any:
        """The live session of ``proto`` whose outbound lookup key is ``out_key`` (LAN address,
        remote address, LAN port, remote port), or None: how a helper's restored record finds
        the session it belongs to."""
