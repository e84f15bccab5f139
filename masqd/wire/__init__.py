"""Packet formats: validated views and field patches for the protocols masqd reads.

Nothing here does I/O. ``Malformed`` is the only exception raised, by the checks
at the edge; a packet that passed them can be read without further checks.

May import: the standard library and nothing else from masqd (the bottom layer);
no asyncio, socket, uvloop, pytun, pyroute2, prometheus_client or structlog.
"""

from masqd.wire.checksum import (
    addr_delta,
    apply_delta,
    apply_delta_udp,
    checksum,
    fold,
    ones_sum,
    pseudo_header_sum,
    word_delta,
)
from masqd.wire.ipv4 import Malformed, build_icmp, build_ipv4, check_ipv4, ip_int, ip_str

__all__ = [
    "Malformed",
    "addr_delta",
    "apply_delta",
    "apply_delta_udp",
    "build_icmp",
    "build_ipv4",
    "check_ipv4",
    "checksum",
    "fold",
    "ip_int",
    "ip_str",
    "ones_sum",
    "pseudo_header_sum",
    "word_delta",
]
