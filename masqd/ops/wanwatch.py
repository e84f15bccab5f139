"""Follow the WAN address of a kernel interface (``wan.address_source = "interface:NAME"``).

The ip_dynaddr case of a PPP or DHCP link: the public address is whatever the
kernel interface NAME in masqd's own network namespace has right now.

Design:

- A thread (``WanWatcher``) owns the netlink side. It listens on a plain
  netlink route socket bound to the link and IPv4-address multicast groups;
  any message (or ENOBUFS, or a slow fallback poll) only means "look again":
  it then reads NAME's state with pyroute2's *synchronous* ``IPRoute`` (its
  asyncio API does not work under uvloop) and, when the state differs from
  the last one sent, hands an :class:`InterfaceState` to the event loop with
  ``call_soon_threadsafe``. Stopping wakes the thread through a pipe and joins it.
- On the loop, :class:`WanAddressFollower` decides: a new address goes
  through the same path as ``masqd wan-address set`` (the ``apply`` callable:
  engine, TAP gratuitous ARP, counters, log event); an address removed or the
  interface gone keeps the last address, with a warning and a counter; an
  unusable address (overlapping the LAN, multicast...) is refused and counted.
- ``initial_config(cfg)`` runs before the engine exists: it reads NAME once and
  puts its address in the configuration the engine starts with, or raises
  :class:`StartError` (a clear refusal) when NAME does not exist.

Counters (``counters`` dict, exported by ops with the engine's): ``wanwatch_*``.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import select
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

RTMGRP_LINK = 0x1
RTMGRP_IPV4_IFADDR = 0x10
IFA_F_SECONDARY = 0x01
IFA_F_TENTATIVE = 0x40
RT_SCOPE_HOST = 254
#: Re-read the interface this often even without netlink news (a lost event cannot last).
FALLBACK_POLL = 5.0


class StartError(Exception):
    """masqd cannot start with this address source (a message for the operator)."""


@dataclass(frozen=True)
class InterfaceState:
    """What the kernel says about the followed interface at one moment."""

    ifname: str
    present: bool
    addresses: tuple[ipaddress.IPv4Interface, ...] = ()  # primary first
    error: str | None = None  # the query itself failed (netlink error)


def read_interface(ipr: Any, ifname: str) -> InterfaceState:
    """Query ``ifname`` through a pyroute2 ``IPRoute``: present? which IPv4 addresses (primary first)?"""
    idx = ipr.link_lookup(ifname=ifname)
    if not idx:
        return InterfaceState(ifname, False)
    primary: list[ipaddress.IPv4Interface] = []
    secondary: list[ipaddress.IPv4Interface] = []
    for msg in ipr.get_addr(family=socket.AF_INET, index=idx[0]):
        addr = msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS")
        flags = msg.get("IFA_FLAGS") or msg["flags"]
        if not addr or flags & IFA_F_TENTATIVE or msg["scope"] >= RT_SCOPE_HOST:
            continue
        try:
            a = ipaddress.IPv4Interface(f"{addr}/{msg['prefixlen']}")
        except ValueError:
            continue
        (secondary if flags & IFA_F_SECONDARY else primary).append(a)
    return InterfaceState(ifname, True, tuple(primary + secondary))


def query_interface(ifname: str) -> InterfaceState:
    """One-shot :func:`read_interface` with its own netlink socket."""
    from pyroute2 import IPRoute

    try:
        with IPRoute() as ipr:
            return read_interface(ipr, ifname)
    except Exception as exc:  # noqa: BLE001 - netlink trouble is reported, not raised
        return InterfaceState(ifname, False, error=f"{type(exc).__name__}: {exc}")


def choose(addresses: Sequence[ipaddress.IPv4Interface], current: int | None) -> ipaddress.IPv4Interface | None:
    """The address to use: the current one while the interface still has it, else the primary."""
    for a in addresses:
        if current is not None and int(a.ip) == current:
            return a
    return addresses[0] if addresses else None


def initial_config(cfg: Any) -> Any:
    """``cfg`` with the WAN address read from the followed interface (unchanged for other sources).

    Raises StartError if the interface does not exist. An interface without an
    IPv4 address yet keeps the configured address until one appears.
    """
    ifname = cfg.wan.address_interface
    if ifname is None:
        return cfg
    st = query_interface(ifname)
    if st.error is not None:
        raise StartError(f"wan.address_source {cfg.wan.address_source}: cannot read interface {ifname}: "
                         f"{st.error}")
    if not st.present:
        raise StartError(f"wan.address_source {cfg.wan.address_source}: there is no interface {ifname!r} in "
                         "masqd's network namespace (create it first, or use address_source = \"config\")")
    addr = choose(st.addresses, None)
    if addr is None or addr == cfg.wan.address:
        return cfg
    if addr.network.overlaps(cfg.lan.address.network):
        raise StartError(f"wan.address_source {cfg.wan.address_source}: {ifname} has {addr}, "
                         "which overlaps the LAN network")
    return cfg.model_copy(update={"wan": cfg.wan.model_copy(update={"address": addr})})


class WanWatcher:
    """A thread that reports ``InterfaceState`` changes of one interface to an asyncio loop."""

    def __init__(self, ifname: str, loop: asyncio.AbstractEventLoop, report: Callable[[InterfaceState], None],
                 *, poll: float = FALLBACK_POLL) -> None:
        self.ifname = ifname
        self.loop = loop
        self.report = report
        self.poll = poll
        self.queries = 0
        self.errors = 0
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        self._thread: threading.Thread | None = None
        self._last: InterfaceState | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"masqd-wanwatch-{self.ifname}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> bool:
        """Stop the thread; True if it ended within ``timeout``."""
        self._stop.set()
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        t = self._thread
        if t is not None:
            t.join(timeout)
        alive = t is not None and t.is_alive()
        if not alive:
            for fd in (self._wake_r, self._wake_w):
                try:
                    os.close(fd)
                except OSError:
                    pass
        return not alive

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------------ thread side

    def _run(self) -> None:
        from pyroute2 import IPRoute

        events: socket.socket | None = None
        ipr: Any = None
        try:
            events = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK, socket.NETLINK_ROUTE)
            events.bind((0, RTMGRP_LINK | RTMGRP_IPV4_IFADDR))
            ipr = IPRoute()
            self._look(ipr)
            while not self._stop.is_set():
                ready, _, _ = select.select([events.fileno(), self._wake_r], [], [], self.poll)
                if self._stop.is_set():
                    break
                if events.fileno() in ready:
                    self._drain(events)
                self._look(ipr)
        except Exception as exc:  # noqa: BLE001 - the thread reports, never dies silently
            self.errors += 1
            self._post(InterfaceState(self.ifname, False, error=f"{type(exc).__name__}: {exc}"))
        finally:
            if ipr is not None:
                try:
                    ipr.close()
                except Exception:  # noqa: BLE001
                    pass
            if events is not None:
                events.close()

    @staticmethod
    def _drain(sock: socket.socket) -> None:
        """Empty the socket: the messages only say 'something changed' (ENOBUFS says the same)."""
        for _ in range(10_000):
            try:
                sock.recv(65536)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise

    def _look(self, ipr: Any) -> None:
        self.queries += 1
        try:
            st = read_interface(ipr, self.ifname)
        except Exception as exc:  # noqa: BLE001 - one failed query is counted, the next one may work
            self.errors += 1
            st = InterfaceState(self.ifname, False, error=f"{type(exc).__name__}: {exc}")
        if st != self._last:
            self._last = st
            self._post(st)

    def _post(self, st: InterfaceState) -> None:
        try:
            self.loop.call_soon_threadsafe(self.report, st)
        except RuntimeError:  # the loop is closed: we are shutting down
            self._stop.set()


@dataclass
class WanAddressFollower:
    """Loop side: turns interface states into WAN address changes, warnings and counters.

    ``apply(addr, by)`` is the control path's address change (raises ValueError
    for an unusable address); ``current()`` is the engine's WAN address.
    """

    ifname: str
    apply: Callable[[ipaddress.IPv4Interface, str], Any]
    current: Callable[[], ipaddress.IPv4Interface | None]
    log: Any
    counters: dict[str, int] = field(default_factory=dict)
    _last: InterfaceState | None = None

    @property
    def source(self) -> str:
        return f"interface:{self.ifname}"

    def _bump(self, name: str) -> None:
        key = f"wanwatch_{name}"
        self.counters[key] = self.counters.get(key, 0) + 1

    def __call__(self, st: InterfaceState) -> None:
        prev, self._last = self._last, st
        self._bump("events")
        keep = self.current()
        kept = str(keep) if keep is not None else None
        if st.error is not None:
            self._bump("errors")
            self.log.warning("wan_interface_error", interface=self.ifname, error=st.error, kept=kept)
            return
        if not st.present:
            if prev is None or prev.present or prev.error is not None:
                self._bump("interface_missing")
                self.log.warning("wan_interface_missing", interface=self.ifname, kept=kept)
            return
        addr = choose(st.addresses, int(keep.ip) if keep is not None else None)
        if addr is None:
            if prev is None or prev.addresses or not prev.present:
                self._bump("address_removed")
                self.log.warning("wan_address_removed", interface=self.ifname, kept=kept)
            return
        if addr == keep:
            return
        try:
            self.apply(addr, self.source)
        except ValueError as exc:
            self._bump("refused")
            self.log.warning("wan_address_refused", interface=self.ifname, address=str(addr), reason=str(exc),
                             kept=kept)
            return
        self._bump("updates")
