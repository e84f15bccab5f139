"""Which masquerade entries an operator asked for: the filters of ``masqd table``, ``masqd flush``
and ``masqd events``, applied to the table's rows.

A filter is a string of ``key=value`` words (a bare word is a protocol)::

    proto=tcp lan=10.0.0.2 wan=203.0.113.200:61001 remote=198.51.100.1 state=established
    src=10.0.0.0/8 dst=198.51.100.1 sport=40000 dport=80

``proto`` is a row's protocol name (tcp, udp, icmp, esp, isakmp, gre, ...) or an IP
protocol number (6 = tcp). ``lan``, ``wan`` and ``remote`` match a row's field
exactly or its address part (before the ``:port``); ``state`` is compared without
case. ``src``, ``dst``, ``sport`` and ``dport`` are conntrack's (``-s``, ``-d``,
``--sport``, ``--dport``): the original direction of the entry, the way its first
packet went - LAN host -> remote for what the LAN opened, remote -> WAN address
for what came in through a port forward. ``src`` and ``dst`` take an address or
a network (``10.0.0.0/8``); the ports apply to TCP and UDP entries (ISAKMP's are
UDP), so an ICMP, ESP or GRE entry never matches a port filter. Every key given
must match. A bad key or value raises :class:`~masqd.ops.control.RequestError`.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Mapping
from typing import Any

from masqd.ops.control import RequestError

FILTER_KEYS = ("proto", "lan", "wan", "remote", "state", "src", "dst", "sport", "dport")
PROTO_NUMBERS = {"icmp": 1, "tcp": 6, "udp": 17, "gre": 47, "esp": 50, "ah": 51}
_PROTO_NAMES = {n: name for name, n in PROTO_NUMBERS.items()}
PORT_PROTOS = ("tcp", "udp", "isakmp")


@functools.lru_cache(maxsize=256)
def _network(text: str) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(text, strict=False)


def parse_filter(text: str) -> dict[str, str]:
    """``"proto=tcp lan=10.0.0.2"`` (or a bare protocol word) -> field -> value (validated)."""
    out: dict[str, str] = {}
    for tok in text.split():
        key, sep, val = tok.partition("=")
        if not sep:
            key, val = "proto", tok
        key = key.strip().lower()
        if key not in FILTER_KEYS:
            raise RequestError(f"filter: unknown field {key!r} (use {', '.join(FILTER_KEYS)})")
        if not val:
            raise RequestError(f"filter: {key} needs a value")
        if key in ("proto", "state"):
            val = val.lower()
        if key == "proto" and val.isdigit():
            val = _PROTO_NAMES.get(int(val), val)
        elif key in ("src", "dst"):
            try:
                _network(val)
            except ValueError:
                raise RequestError(f"filter: {key}={val!r} is not an IPv4 address or network") from None
        elif key in ("sport", "dport"):
            if not (val.isdigit() and 0 <= int(val) <= 65535):
                raise RequestError(f"filter: {key}={val!r} is not a port (0-65535)")
            val = str(int(val))
        out[key] = val
    return out


def _split(endpoint: Any) -> tuple[str, str]:
    """``"10.0.0.2:40000"`` -> ("10.0.0.2", "40000"); ``"10.0.0.2"`` -> ("10.0.0.2", "")."""
    text = str(endpoint or "")
    addr, sep, port = text.rpartition(":")
    return (addr, port) if sep else (text, "")


def original(row: Mapping[str, Any]) -> tuple[str, str, str, str]:
    """(src, dst, sport, dport) of an entry's original direction, as strings ("" when none)."""
    if row.get("inbound"):
        (src, sport), (dst, dport) = _split(row.get("remote")), _split(row.get("wan"))
    else:
        (src, sport), (dst, dport) = _split(row.get("lan")), _split(row.get("remote"))
    return src, dst, sport, dport


def _in(addr: str, net: str) -> bool:
    try:
        return ipaddress.IPv4Address(addr) in _network(net)
    except ValueError:
        return False


def entry_matches(entry: Mapping[str, Any], flt: Mapping[str, str]) -> bool:
    """Does the row ``entry`` pass every key of the (parsed) filter ``flt``?"""
    orig: tuple[str, str, str, str] | None = None
    for key, want in flt.items():
        if key in ("proto", "state"):
            if str(entry.get(key, "")).lower() != want:
                return False
            continue
        if key in ("lan", "wan", "remote"):
            have = str(entry.get(key, ""))
            if have != want and have.rsplit(":", 1)[0] != want:
                return False
            continue
        if orig is None:
            orig = original(entry)
        if key == "src" and not _in(orig[0], want):
            return False
        if key == "dst" and not _in(orig[1], want):
            return False
        if key in ("sport", "dport"):
            if str(entry.get("proto", "")).lower() not in PORT_PROTOS:
                return False
            if (orig[2] if key == "sport" else orig[3]) != want:
                return False
    return True
