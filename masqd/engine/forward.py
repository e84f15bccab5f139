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

from typing import TYPE_CHECKING, Any

from masqd.engine.nat import S_REPLIED, T_SYN_SENT, Mapping, Session
from masqd.wire.checksum import addr_delta, apply_delta
from masqd.wire.ipv4 import PROTO_NAMES, TCP, UDP, ip_str

if TYPE_CHECKING:
    from masqd.config import Config
    from masqd.engine.core import Engine


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
    def __init__(self, eng: Engine, cfg: Config) -> None:
        self.eng = eng
        self.groups: dict[tuple[int, int], PortGroup] = {}
        self.proto_hosts: dict[int, int] = {}  # IP protocol -> LAN host
        self.proto_hits: dict[int, int] = {}
        self.configure(cfg)

    # ----------------------------------------------------------------- config
    def configure(self, cfg: Config) -> None:
        eng = self.eng
        for old in self.groups.values():
            eng.pool.release(old.proto, old.port, old)
            for sv in old.servers:
                if sv.m is not None:
                    sv.m.static = False
                    if sv.m.empty():
                        eng.drop_mapping(sv.m)
        self.groups = {}
        # the ruleset holds the config's structured forwards and those written as rule lines
        pf = list(eng.rules.portfw)
        for f in pf:
            proto = TCP if f.proto == "tcp" else UDP
            listen = None if f.listen in ("wan", "$WAN", "${4}", "") else int(_ip(f.listen))
            key = (proto, f.port)
            g = self.groups.get(key)
            if g is None:
                g = PortGroup(proto, listen, f.port)
                self.groups[key] = g
            g.servers.append(_Server(int(f.to), f.to_port, f.pref))
        for (proto, port), grp in self.groups.items():
            owner = eng.pool.owner(proto, port)
            if isinstance(owner, Mapping):  # a dynamic mapping holds it: it keeps it until it ends
                eng.event("warning", "portfw_port_busy", proto=PROTO_NAMES[proto], port=port)
                continue
            eng.pool.take(proto, port, grp)
        self.proto_hosts = {}
        pr = list(eng.rules.protofw)
        for p in pr:
            self.proto_hosts[p.proto] = int(p.to)

    # ------------------------------------------------------------- port forward
    def inbound_session(self, proto: int, pkt: bytearray, ihl: int, src: int, sport: int, dport: int,
                        now: float) -> Session | None:
        g = self.groups.get((proto, dport))
        if g is None or (g.listen is not None and g.listen != self.eng.wan_ip):
            return None
        if proto == TCP and not pkt[ihl + 13] & 0x02:
            self.eng.drop("portfw_not_syn")
            return None
        sv = g.pick()
        m = sv.m
        eng = self.eng
        if m is None or m.wan_ip != eng.wan_ip:
            m = eng.static_mapping(proto, sv.ip, sv.port, dport)
            sv.m = m
            m.fwd = g
        s = eng.new_session(m, src, sport, now, T_SYN_SENT if proto == TCP else S_REPLIED)
        if s is None:
            return None
        s.inbound = True
        h = eng.tcp_helper_for(sv.port) if proto == TCP else None
        if h is not None:
            s.helper = h
            h.session_created(s, now)
        g.hits += 1
        sv.hits += 1
        eng._count("portfw_connections")
        return s

    # -------------------------------------------------------- protocol forward
    def owns_outbound(self, proto: int, src: int) -> bool:
        return self.proto_hosts.get(proto) == src

    def masq_out(self, pkt: bytearray) -> None:
        src = int.from_bytes(pkt[12:16], "big")
        c = (pkt[10] << 8) | pkt[11]
        c = apply_delta(c, addr_delta(src, self.eng.wan_ip))
        pkt[10] = c >> 8
        pkt[11] = c & 255
        pkt[12:16] = self.eng.wan_ip_b

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
        self.eng._count("protofw_packets")
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
        for g in self.groups.values():
            listen = ip_str(g.listen) if g.listen is not None else f"wan({ip_str(self.eng.wan_ip)})"
            for sv in g.servers:
                rows.append({"proto": "portfw", "lan": f"{ip_str(sv.ip)}:{sv.port}",
                             "wan": f"{listen}:{g.port}", "remote": PROTO_NAMES[g.proto],
                             "state": f"pref={sv.pref}", "hits": sv.hits, "expires_in": None})
        for proto, host in self.proto_hosts.items():
            rows.append({"proto": "protofw", "lan": ip_str(host), "wan": ip_str(self.eng.wan_ip),
                         "remote": PROTO_NAMES.get(proto, str(proto)), "state": "forward",
                         "hits": self.proto_hits.get(proto, 0), "expires_in": None})
        return rows


def _ip(s: str) -> Any:
    import ipaddress

    return ipaddress.IPv4Address(s)
