"""The sans-IO masquerade engine: ``Engine(config).process(iface, packet, now)``.

Bytes in, bytes out: masquerade (NAT table, timeouts, filtering), defragmentation,
ICMP errors, the forwarders and the protocol helpers (IPsec, PPTP). Time is the
``now`` argument; the engine never reads a clock, a device or a socket.

May import: ``masqd.wire``, ``masqd.firewall``, ``masqd.config`` (its types) and
the standard library; nothing above it (the data plane, ops, the cli, the lab);
no asyncio, socket, uvloop, pytun, pyroute2, prometheus_client or structlog.
"""

from masqd.engine.core import Engine

__all__ = ["Engine"]
