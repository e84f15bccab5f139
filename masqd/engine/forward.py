"""Inbound forwarders: ipportfw / ipmasqadm portfw and ipfwd protocol forwarding.

A port forward sends new inbound TCP/UDP connections to the WAN address and a
port to a LAN server (several servers for one port share the connections by
preference weight, smooth weighted round-robin, as ipmasqadm's preference
did); the server's replies are masqueraded through the same mapping. A
protocol forward sends unsolicited inbound packets of an IP protocol (GRE,
ESP) to one LAN host and masquerades that host's outbound packets of the
protocol by address. Forwards written against the WAN symbol follow the WAN
address when it changes.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, Any

from masqd.engine.nat import Mapping
from masqd.wire.checksum import addr_delta, apply_delta
from masqd.wire.ipv4 import PROTO_NAMES, TCP, UDP, ip_str

if TYPE_CHECKING:
    from masqd.engine.counters import Counters
    from masqd.engine.table import NatTable


class _Server:
    __slots__ = ("ip", "port", "pref", "current", "hits", "m")

    def __init__(self, ip: int, port: int, pref: int) -> None:
        self.ip = ip
        self.port = port
        self.pref = pref
        self.current = 0
        self.hits = 0
        self.m: Mapping | None = None


class PortGroup:
    """All servers behind one (protocol, listen address, port)."""

    __slots__ = ("proto", "listen", "port", "servers", "hits")

    def __init__(self, proto: int, listen: int | None, port: int) -> None:
        self.proto = proto
        self.listen = listen  # None: the WAN address, whatever it is
        self.port = port
        self.servers: list[_Server] = []
        self.hits = 0

    def pick(self) -> _Server:
        total = 0
        best: _Server | None = None
        for s in self.servers:
            s.current += s.pref
            total += s.pref
            if best is None or s.current > best.current:
                best = s
        assert best is not None
        best.current -= total
        return best


class Forwarders:
    """The configured port and protocol forwards, their servers' mappings and hit counts."""

    def __init__(self, table: NatTable, counters: Counters, rules: Any) -> None:
        self.t = table
        self.ctr = counters
        self.groups: dict[tuple[int, int], PortGroup] = {}
        self.proto_hosts: dict[int, int] = {}  # IP protocol -> LAN host
        self.proto_hits: dict[int, int] = {}
        self.configure(rules)

    # ----------------------------------------------------------------- config
    def configure(self, rules: Any) -> None:
        """Take the forwards of a ruleset (the config's structured ones and those written as
        rule lines: ``rules.portfw``, ``rules.protofw``); reserve their WAN ports."""
        t = self.t
        for old in self.groups.values():
            t.pool.release(old.proto, old.port, old)
            for sv in old.servers:
                if sv.m is not None:
                    sv.m.static = False
                    if sv.m.empty():
                        t.drop_mapping(sv.m)
        self.groups = {}
        for f in list(rules.portfw):
            proto = TCP if f.proto == "tcp" else UDP
            listen = None if f.listen in ("wan", "$WAN", "${4}", "") else int(ipaddress.IPv4Address(f.listen))
            key = (proto, f.port)
            g = self.groups.get(key)
            if g is None:
                g = PortGroup(proto, listen, f.port)
                self.groups[key] = g
            g.servers.append(_Server(int(f.to), f.to_port, f.pref))
        for (proto, port), grp in self.groups.items():
            owner = t.pool.owner(proto, port)
            if isinstance(owner, Mapping):  # a dynamic mapping holds it: it keeps it until it ends
                self.ctr.event("warning", "portfw_port_busy", proto=PROTO_NAMES[proto], port=port)
                continue
            t.pool.take(proto, port, grp)
        self.proto_hosts = {}
        for p in list(rules.protofw):
            self.proto_hosts[p.proto] = int(p.to)

    def port_forwarded(self, proto: int, port: int) -> bool:
        """A port forward of (``proto``, ``port``) on the current WAN address."""
        g = self.groups.get((proto, port))
        return g is not None and (g.listen is None or g.listen == self.t.wan_ip)

    # ------------------------------------------------------------- port forward
    def inbound_mapping(self, proto: int, pkt: bytearray, ihl: int, dport: int) -> Mapping | None:
        """A new inbound connection to ``dport``: the mapping of the server it goes to (chosen by
        preference weight), or None (no forward of that port, or a TCP segment that is not a SYN,
        counted)."""
        g = self.groups.get((proto, dport))
        if g is None or (g.listen is not None and g.listen != self.t.wan_ip):
            return None
        if proto == TCP and not pkt[ihl + 13] & 0x02:
            self.ctr.drop("portfw_not_syn")
            return None
        sv = g.pick()
        m = sv.m
        if m is None or m.wan_ip != self.t.wan_ip:
            m = self.t.static_mapping(proto, sv.ip, sv.port, dport)
            sv.m = m
            m.fwd = g
        return m

    def restore_mapping(self, proto: int, lan_ip: int, lan_port: int, wan_port: int) -> Mapping | None:
        """The mapping of a restored session through a port forward (state file, sync): the
        server's, when the configuration still forwards ``wan_port`` to that server; else None."""
        g = self.groups.get((proto, wan_port))
        if g is None or (g.listen is not None and g.listen != self.t.wan_ip):
            return None
        for sv in g.servers:
            if sv.ip == lan_ip and sv.port == lan_port:
                m = sv.m
                if m is None or m.wan_ip != self.t.wan_ip:
                    m = self.t.static_mapping(proto, sv.ip, sv.port, wan_port)
                    sv.m = m
                    m.fwd = g
                return m
        return None

    def connected(self, m: Mapping) -> None:
        """A session through a forward's mapping was made: count it."""
        g = m.fwd
        if isinstance(g, PortGroup):
            g.hits += 1
            for sv in g.servers:
                if sv.m is m:
                    sv.hits += 1
                    break
        self.ctr.count("portfw_connections")

    # -------------------------------------------------------- protocol forward
    def owns_outbound(self, proto: int, src: int) -> bool:
        return self.proto_hosts.get(proto) == src

    def masq_out(self, pkt: bytearray) -> None:
        src = int.from_bytes(pkt[12:16], "big")
        c = (pkt[10] << 8) | pkt[11]
        c = apply_delta(c, addr_delta(src, self.t.wan_ip))
        pkt[10] = c >> 8
        pkt[11] = c & 255
        pkt[12:16] = self.t.wan_ip_b

    def protocol_inbound(self, proto: int, pkt: bytearray, ihl: int, now: float) -> list[bytearray] | None:
        host = self.proto_hosts.get(proto)
        if host is None:
            return None
        dst = int.from_bytes(pkt[16:20], "big")
        c = (pkt[10] << 8) | pkt[11]
        c = apply_delta(c, addr_delta(dst, host))
        pkt[10] = c >> 8
        pkt[11] = c & 255
        pkt[16:20] = host.to_bytes(4, "big")
        self.proto_hits[proto] = self.proto_hits.get(proto, 0) + 1
        self.ctr.count("protofw_packets")
        return [pkt]

    # ------------------------------------------------------------ housekeeping
    def expire(self, now: float) -> None:
        pass

    def wan_changed(self, old: int, new: int, mode: str, now: float) -> None:
        for g in self.groups.values():
            for sv in g.servers:
                if sv.m is not None and sv.m.empty():
                    sv.m.set_wan(new)

    def entries(self, now: float) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        wan_ip = self.t.wan_ip
        for g in self.groups.values():
            listen = ip_str(g.listen) if g.listen is not None else f"wan({ip_str(wan_ip)})"
            for sv in g.servers:
                rows.append({"proto": "portfw", "lan": f"{ip_str(sv.ip)}:{sv.port}",
                             "wan": f"{listen}:{g.port}", "remote": PROTO_NAMES[g.proto],
                             "state": f"pref={sv.pref}", "hits": sv.hits, "expires_in": None})
        for proto, host in self.proto_hosts.items():
            rows.append({"proto": "protofw", "lan": ip_str(host), "wan": ip_str(wan_ip),
                         "remote": PROTO_NAMES.get(proto, str(proto)), "state": "forward",
                         "hits": self.proto_hits.get(proto, 0), "expires_in": None})
        return rows
