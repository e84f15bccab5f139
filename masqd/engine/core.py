"""The sans-IO router: one IPv4 packet in, the packets to send out.

Packet path (Linux 2.2 ipchains order): sanity checks -> reassembly -> input
chain of the incoming interface -> demasquerade (replies skip the forward
chain) -> local delivery (echo) -> routing -> TTL and MTU -> forward chain
(MASQ) -> masquerade -> output chain of the outgoing interface -> fragment.

Established TCP/UDP flows take a short fast path: one slice of the packet is
the lookup key, one dict lookup finds the session, and the rewrite folds
precomputed checksum deltas (RFC 1624). Anything unusual (fragments, options,
TCP flags other than ACK/PSH/URG, oversize, expired firewall cache) falls back
to the full path, which is also where every drop is counted by reason.
"""

from __future__ import annotations

import ipaddress
import struct
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

from masqd import firewall as fwmod
from masqd.config import Config
from masqd.engine.defrag import Reassembler, fragment
from masqd.engine.expiry import TimerWheel
from masqd.engine.forward import Forwarders
from masqd.engine.helpers import HELPERS, Helper
from masqd.engine.nat import (
    S_REPLIED,
    S_UNREPLIED,
    T_ESTABLISHED,
    T_FIN,
    T_NEW,
    T_RST,
    T_SYN_SENT,
    TCP_STATE_NAMES,
    TTL_DELTA,
    Mapping,
    PortPool,
    Session,
)
from masqd.wire import vnet
from masqd.wire.checksum import (
    addr_delta,
    apply_delta,
    apply_delta_udp,
    checksum,
    ones_sum,
    pseudo_header_sum,
    word_delta,
)
from masqd.wire.ipv4 import (
    ICMP,
    ICMP_ECHO,
    ICMP_ECHOREPLY,
    ICMP_ERRORS,
    ICMP_QUERIES,
    ICMP_REPLIES,
    ICMP_TIMXCEED,
    ICMP_UNREACH,
    IP_MF,
    IP_OFFMASK,
    PROTO_NAMES,
    TCP,
    TH_ACK,
    TH_FIN,
    TH_RST,
    TH_SYN,
    UDP,
    UNREACH_NEEDFRAG,
    Malformed,
    build_icmp,
    build_ipv4,
    check_ipv4,
    ip_str,
    rewrite_tos,
    set_ip_checksum,
)

_H = struct.Struct("!H")
_pack_H = _H.pack_into
_pack_H4s = struct.Struct("!H4s").pack_into

LAN, WAN = "lan", "wan"
# protocol index for per-packet counters
_PIDX = {TCP: 0, UDP: 1, ICMP: 2, 47: 3, 50: 4}
_PNAMES = ("tcp", "udp", "icmp", "gre", "esp", "other")


def _pidx(proto: int) -> int:
    return _PIDX.get(proto, 5)


def _net(n: ipaddress.IPv4Network) -> tuple[int, int]:
    return int(n.network_address), int(n.netmask)


class Engine:
    """The masquerade router. See the module docstring for the packet path."""

    def __init__(self, cfg: Config) -> None:
        self.c: dict[str, int] = {}
        # per-packet counters: index = iface(0 lan, 1 wan) * 6 + protocol index
        self.rx_pkts = [0] * 12
        self.rx_bytes = [0] * 12
        self.tx_pkts = [0] * 12
        self.tx_bytes = [0] * 12
        self._events: deque[tuple[str, str, dict[str, Any]]] = deque(maxlen=4096)
        self._out: dict[int, dict[bytes, Session]] = {TCP: {}, UDP: {}, ICMP: {}}
        self._in: dict[int, dict[bytes, Session]] = {TCP: {}, UDP: {}, ICMP: {}}
        self._out_tcp = self._out[TCP]
        self._out_udp = self._out[UDP]
        self._in_tcp = self._in[TCP]
        self._in_udp = self._in[UDP]
        self._out_icmp = self._out[ICMP]
        self._in_icmp = self._in[ICMP]
        self._maps: dict[tuple[int, int, int], Mapping] = {}
        self._wheel = TimerWheel()
        self.nsessions = 0
        self._icmp_tokens = 100.0
        self._icmp_last = 0.0
        self._reset_keys: dict[bytes, float] = {}
        self._gen = 0  # firewall generation: bumped by every (re)load, invalidates cached decisions
        # the packet being routed by process_vnet (offload metadata), its segment size, what was sent
        self._vpkt: bytearray | None = None
        self._vseg = 0
        self._vsent: list[int] = []
        # Decisions cached outside the engine (the native fast path of the data plane): ``epoch``
        # is bumped whenever one could be void (a session removed or rebound, a new config);
        # ``fast_hit`` is the session whose packet the fast path just forwarded; ``sync_hook``
        # folds the counts kept outside back in before anyone reads them.
        self.epoch = 0
        self.fast_hit: Session | None = None
        self.sync_hook: Callable[[], None] | None = None
        self._apply(cfg, first=True)

    # ------------------------------------------------------------------ config
    def _apply(self, cfg: Config, first: bool = False) -> None:
        self.cfg = cfg
        self.epoch += 1
        m = cfg.masquerade
        self.tmo = m.effective_timeouts
        self.lan_ip = int(cfg.lan.address.ip)
        self.lan_net = _net(cfg.lan.address.network)
        self.lan_routes = [(_net(r.prefix), int(r.via) if r.via else 0) for r in cfg.lan.routes]
        if first:
            self._set_wan(cfg.wan.address)
        self.wan_gw = int(cfg.wan.gateway) if cfg.wan.gateway else 0
        self.lan_mtu = cfg.lan.mtu
        self.wan_mtu = cfg.wan.mtu
        self.max_sessions = m.max_entries
        lo, hi = m.port_range
        if first:
            self.pool = PortPool(lo, hi, m.port_preservation)
            self.defrag = Reassembler(m.defrag_timeout, m.defrag_max_datagrams, m.defrag_max_bytes, self.c)
        else:
            self.pool.low, self.pool.high, self.pool.size = lo, hi, hi - lo + 1
            self.pool.preserve = m.port_preservation
            self.defrag.timeout = m.defrag_timeout
            self.defrag.max_datagrams = m.defrag_max_datagrams
            self.defrag.max_bytes = m.defrag_max_bytes
        self.filtering = {"endpoint-independent": 0, "address-dependent": 1, "address-and-port-dependent": 2}[
            m.inbound_filtering
        ]
        old_rules = getattr(self, "rules", None)
        self.rules = fwmod.build_ruleset(cfg)
        if old_rules is not None:
            self.rules.carry_counters(old_rules)  # a reload keeps the hits of rules that stay
        self._gen += 1
        self._fw_trivial: list[Any] = [self._gen, (), ()]
        if first:
            self.helpers: list[Helper] = [cls(self, cfg) for cls in HELPERS]
        else:
            for h in self.helpers:
                h.reload(cfg)
        self._proto_helpers: dict[int, Helper] = {}
        self._udp_helpers: dict[int, Helper] = {}
        self._tcp_helpers: dict[int, Helper] = {}
        self._fast_po: dict[int, Any] = {}
        self._fast_pi: dict[int, Any] = {}
        if first:
            self.forwarders = Forwarders(self, cfg)
        else:
            self.forwarders.configure(cfg)
        for h in self.helpers:
            if not h.enabled():
                continue
            for p in h.ip_protocols:
                self._proto_helpers.setdefault(p, h)
                # optional per-protocol fast paths (established ESP): fast_out/fast_in(data, now)
                fo, fi = getattr(h, "fast_out", None), getattr(h, "fast_in", None)
                if fo is not None and fi is not None and self._proto_helpers[p] is h:
                    self._fast_po.setdefault(p, fo)
                    self._fast_pi.setdefault(p, fi)
            for p in h.udp_ports:
                self._udp_helpers.setdefault(p, h)
            for p in h.tcp_ports:
                self._tcp_helpers.setdefault(p, h)

    def _set_wan(self, addr: ipaddress.IPv4Interface) -> None:
        self.epoch += 1
        self.wan_if = addr
        self.wan_ip = int(addr.ip)
        self.wan_ip_b = self.wan_ip.to_bytes(4, "big")
        self.wan_net = _net(addr.network)

    def reload(self, cfg: Config) -> None:
        """Swap the configuration atomically, keeping the masquerade table."""
        old_wan = self.wan_if
        self.sync()
        self._apply(cfg)
        self._count("reloads")
        if cfg.wan.address != old_wan and cfg.wan.address_source == "config":
            self.set_wan_address(cfg.wan.address, self._icmp_last)

    # ---------------------------------------------------------------- counters
    def _count(self, name: str, n: int = 1) -> None:
        self.c[name] = self.c.get(name, 0) + n

    def drop(self, reason: str) -> None:
        k = "drop_" + reason
        self.c[k] = self.c.get(k, 0) + 1

    def event(self, level: str, name: str, **kw: Any) -> None:
        if len(self._events) == self._events.maxlen:
            self._count("events_lost")
        self._events.append((level, name, kw))

    def drain_events(self) -> list[tuple[str, str, dict[str, Any]]]:
        ev = list(self._events)
        self._events.clear()
        return ev

    def sync(self) -> None:
        """Fold in what was counted outside the engine (see ``sync_hook``)."""
        if self.sync_hook is not None:
            self.sync_hook()

    @property
    def counters(self) -> dict[str, int]:
        self.sync()
        out = dict(self.c)
        for i, ifn in enumerate((LAN, WAN)):
            for j, pn in enumerate(_PNAMES):
                k = i * 6 + j
                if self.rx_pkts[k]:
                    out[f"rx_{ifn}_{pn}_packets"] = self.rx_pkts[k]
                    out[f"rx_{ifn}_{pn}_bytes"] = self.rx_bytes[k]
                if self.tx_pkts[k]:
                    out[f"tx_{ifn}_{pn}_packets"] = self.tx_pkts[k]
                    out[f"tx_{ifn}_{pn}_bytes"] = self.tx_bytes[k]
        out["sessions"] = self.nsessions
        out["mappings"] = len(self._maps)
        for p, name in ((TCP, "tcp"), (UDP, "udp"), (ICMP, "icmp")):
            out[f"pool_used_{name}"] = self.pool.use(p)
        out["pool_size"] = self.pool.size
        out["frag_queue"] = len(self.defrag)
        return out

    # ----------------------------------------------------------------- routing
    def _route(self, dst: int) -> str:
        net, mask = self.lan_net
        if dst & mask == net:
            return LAN
        for (n, m), _via in self.lan_routes:
            if dst & m == n:
                return LAN
        return WAN

    def next_hop(self, iface: str, dst: int) -> int:
        """The IPv4 address to resolve on ``iface`` to reach ``dst`` (TAP mode)."""
        if iface == LAN:
            net, mask = self.lan_net
            if dst & mask == net:
                return dst
            for (n, m), via in self.lan_routes:
                if dst & m == n:
                    return via or dst
            return dst
        net, mask = self.wan_net
        if dst & mask == net or not self.wan_gw:
            return dst
        return self.wan_gw

    def _is_martian(self, iface: str, src: int) -> bool:
        if src == 0 or src >> 24 in (0, 127) or src >= 0xE0000000:
            return True
        if iface == WAN:
            net, mask = self.lan_net
            return src & mask == net or src == self.wan_ip
        return src == self.lan_ip

    # --------------------------------------------------------------- entry API
    def process(self, iface: str, packet: bytes | bytearray, now: float) -> list[tuple[str, bytes]]:
        """Route one IPv4 packet that arrived on ``iface``; return what to send."""
        data = packet if type(packet) is bytes else bytes(packet)
        try:
            if iface == LAN:
                r = self._fast_out(data, now)
            elif iface == WAN:
                r = self._fast_in(data, now)
            else:
                self.drop("bad_iface")
                return []
            if r is not None:
                return r
            out: list[tuple[str, bytes]] = []
            self._slow(iface, data, now, out)
            return out
        except Exception as exc:  # never let one packet take the router down
            return self._refused(exc)

    def _refused(self, exc: Exception) -> list[Any]:
        """A packet that raised: a Malformed one is dropped by its reason, anything else is
        counted as an internal error with an event. Nothing is sent."""
        if isinstance(exc, Malformed):
            self.drop(exc.reason)
        else:
            self.drop("internal_error")
            self.event("error", "internal_error", error=repr(exc))
        return []

    def process_vnet(self, iface: str, packet: bytes | bytearray, now: float,
                     vh: bytes, base: int = 0) -> list[tuple[str, bytes, bytes]]:
        """Route a packet read with a virtio-net header ``vh`` whose offsets count ``base`` bytes
        before the IPv4 header (14 when it was read behind an Ethernet header).

        Returns (iface, packet, header) triples. The header is ``vh`` itself (the
        same object, offsets unchanged) when the forwarded packet keeps its offload
        work as it came (a partial checksum, a super-packet); a new header with
        offsets relative to the IPv4 header when the full path re-armed one; or
        ``b""`` for an ordinary packet (write it with a zero header). Super-packets
        are never split here: the rewrite is done once and the kernel segments on
        the way out. See ``masqd.wire.vnet``.
        """
        data = packet if type(packet) is bytes else bytes(packet)
        flags, gso, hlen, gsz, cstart, coff = vnet.unpack(vh)
        cstart -= base
        hlen -= base
        partial = flags & vnet.F_NEEDS_CSUM
        if not partial and not gso:
            return [(o, p, b"") for o, p in self.process(iface, data, now)]
        try:
            n = len(data)
            if n < 28 or data[0] >> 4 != 4:
                raise Malformed("truncated_ip" if n < 28 else "not_ipv4")
            ihl = (data[0] & 15) << 2
            proto = data[9]
            if partial and (cstart != ihl or proto not in (TCP, UDP)
                            or coff != (16 if proto == TCP else 6) or ihl + coff + 2 > n):
                raise Malformed("bad_offload_header")
            seg = 0
            if gso:
                seg = vnet.segment_size(data, ihl, gso, gsz)
                if not seg or proto != (TCP if gso & 0x7F == vnet.GSO_TCPV4 else UDP):
                    raise Malformed("bad_offload_header")
                self.c["rx_super_packets"] = self.c.get("rx_super_packets", 0) + 1
            if iface == LAN:
                r = self._fast_out(data, now, partial, seg)
            elif iface == WAN:
                r = self._fast_in(data, now, partial, seg)
            else:
                self.drop("bad_iface")
                return []
            if r is not None:
                if not r:
                    return []
                if seg:
                    self._count_segments(iface, proto, r[0][0], n, seg, gsz)
                return [(r[0][0], r[0][1], vh)]
            # The full path works on ordinary packets: finish the checksum here (what the
            # kernel would do for a device without offload) and, for a super-packet, make it
            # partial again on the way out.
            pkt = bytearray(data)
            if partial:
                vnet.complete_checksum(pkt, ihl, coff, proto == UDP)
            out: list[tuple[str, bytes]] = []
            self._vpkt = pkt
            self._vseg = seg
            self._vsent = []
            try:
                self._slow(iface, pkt, now, out)
            finally:
                self._vpkt = None
                self._vseg = 0
            sent, self._vsent = self._vsent, []
            if not sent:
                return [(o, p, b"") for o, p in out]
            self._count_segments(iface, proto, out[sent[0]][0], n, seg, gsz)
            res: list[tuple[str, bytes, bytes]] = []
            for i, (o, p) in enumerate(out):
                if i in sent and gso:
                    q = bytearray(p)
                    ql = (q[0] & 15) << 2
                    qo = ql + (16 if q[9] == TCP else 6)
                    _pack_H(q, qo, vnet.partial_seed(q, ql))
                    set_ip_checksum(q, ql)
                    res.append((o, bytes(q), vnet.pack(vnet.F_NEEDS_CSUM, gso, max(hlen, 0), gsz, ql, qo - ql)))
                else:
                    res.append((o, p, b""))
            return res
        except Exception as exc:  # never let one packet take the router down
            return self._refused(exc)

    def _count_segments(self, iface: str, proto: int, oif: str, n: int, seg: int, gsz: int) -> None:
        """A forwarded super-packet counts as the packets it will be cut into (one is counted already)."""
        nseg = -(-(n - (seg - gsz)) // gsz) if gsz else 1
        pi = _pidx(proto)
        self.rx_pkts[(0 if iface == LAN else 6) + pi] += nseg - 1
        self.tx_pkts[(6 if oif == WAN else 0) + pi] += nseg - 1
        self.c["rx_super_segments"] = self.c.get("rx_super_segments", 0) + nseg

    # --------------------------------------------------------------- fast path
    def _fast_out(self, data: bytes, now: float, partial: int = 0, seg: int = 0) -> list[tuple[str, bytes]] | None:
        n = len(data)
        if n < 40 or data[0] != 0x45 or data[6] & 0x3F or data[7] or data[8] <= 1:
            return None
        proto = data[9]
        if proto == UDP:
            s = self._out_udp.get(data[12:24])
        elif proto == TCP:
            if data[33] & 7:
                return None
            s = self._out_tcp.get(data[12:24])
        elif proto == ICMP:
            return self._fast_icmp(data, now, True) if data[20] in ICMP_QUERIES else None
        else:
            fp = self._fast_po.get(proto)
            return None if fp is None else fp(data, now)  # type: ignore[no-any-return]
        if s is None or (seg or n) > self.wan_mtu or (data[2] << 8 | data[3]) != n:
            return None
        fw = s.fw
        if fw is None or fw[0] != self._gen or fw[1] is None or (partial and s.helper is not None):
            return None
        m = s.m
        pkt = bytearray(data)
        pkt[8] -= 1
        c = ((pkt[10] << 8 | pkt[11]) ^ 0xFFFF) + m.dip_out
        c = (c & 0xFFFF) + (c >> 16)
        c = (c & 0xFFFF) + (c >> 16)
        _pack_H4s(pkt, 10, c ^ 0xFFFF, m.wan_ip_b)
        _pack_H(pkt, 20, m.wan_port)
        if partial:  # the field holds the pseudo-header sum: addresses only, not inverted
            o = 26 if proto == UDP else 36
            u = (pkt[o] << 8 | pkt[o + 1]) + m.dip_out - TTL_DELTA
            u = (u & 0xFFFF) + (u >> 16)
            _pack_H(pkt, o, (u & 0xFFFF) + (u >> 16))
            k = 7 if proto == UDP else 6
        elif proto == UDP:
            u = pkt[26] << 8 | pkt[27]
            if u:
                u = (u ^ 0xFFFF) + m.dl4_out
                u = (u & 0xFFFF) + (u >> 16)
                u = ((u & 0xFFFF) + (u >> 16)) ^ 0xFFFF
                _pack_H(pkt, 26, u or 0xFFFF)
            k = 7
        else:
            u = ((pkt[36] << 8 | pkt[37]) ^ 0xFFFF) + m.dl4_out
            u = (u & 0xFFFF) + (u >> 16)
            u = (u & 0xFFFF) + (u >> 16)
            _pack_H(pkt, 36, u ^ 0xFFFF)
            k = 6
            if s.helper is not None and not s.helper.tcp_segment(s, pkt, 20, True, now):
                return []
        if seg:  # a super-packet: the kernel reads this header as is (always recompute it)
            set_ip_checksum(pkt, 20)
        s.expires = now + s.tmo
        for r in fw[1]:
            r.pkts += 1
            r.bytes += n
        i = k - 6  # 0 tcp, 1 udp on the LAN side
        self.rx_pkts[i] += 1
        self.rx_bytes[i] += n
        self.tx_pkts[i + 6] += 1
        self.tx_bytes[i + 6] += n
        self.fast_hit = s
        return [(WAN, bytes(pkt))]

    def _fast_in(self, data: bytes, now: float, partial: int = 0, seg: int = 0) -> list[tuple[str, bytes]] | None:
        n = len(data)
        if n < 40 or data[0] != 0x45 or data[6] & 0x3F or data[7] or data[8] <= 1:
            return None
        proto = data[9]
        if proto == UDP:
            s = self._in_udp.get(data[12:24])
        elif proto == TCP:
            if data[33] & 7:
                return None
            s = self._in_tcp.get(data[12:24])
        elif proto == ICMP:
            return self._fast_icmp(data, now, False) if data[20] in ICMP_REPLIES else None
        else:
            fp = self._fast_pi.get(proto)
            return None if fp is None else fp(data, now)  # type: ignore[no-any-return]
        if s is None or (seg or n) > self.lan_mtu or (data[2] << 8 | data[3]) != n:
            return None
        fw = s.fw
        if (fw is None or fw[0] != self._gen or fw[2] is None or s.state == 0  # UNREPLIED / NEW
                or (partial and s.helper is not None)):
            return None
        m = s.m
        pkt = bytearray(data)
        pkt[8] -= 1
        c = ((pkt[10] << 8 | pkt[11]) ^ 0xFFFF) + m.dip_in
        c = (c & 0xFFFF) + (c >> 16)
        c = (c & 0xFFFF) + (c >> 16)
        _pack_H(pkt, 10, c ^ 0xFFFF)
        pkt[16:20] = m.lan_ip_b
        _pack_H(pkt, 22, m.lan_port)
        if partial:  # the field holds the pseudo-header sum: addresses only, not inverted
            o = 26 if proto == UDP else 36
            u = (pkt[o] << 8 | pkt[o + 1]) + m.dip_in - TTL_DELTA
            u = (u & 0xFFFF) + (u >> 16)
            _pack_H(pkt, o, (u & 0xFFFF) + (u >> 16))
            i = 7 if proto == UDP else 6
        elif proto == UDP:
            u = pkt[26] << 8 | pkt[27]
            if u:
                u = (u ^ 0xFFFF) + m.dl4_in
                u = (u & 0xFFFF) + (u >> 16)
                u = ((u & 0xFFFF) + (u >> 16)) ^ 0xFFFF
                _pack_H(pkt, 26, u or 0xFFFF)
            i = 7
        else:
            u = ((pkt[36] << 8 | pkt[37]) ^ 0xFFFF) + m.dl4_in
            u = (u & 0xFFFF) + (u >> 16)
            u = (u & 0xFFFF) + (u >> 16)
            _pack_H(pkt, 36, u ^ 0xFFFF)
            i = 6
            if s.helper is not None and not s.helper.tcp_segment(s, pkt, 20, False, now):
                return []
        if seg:
            set_ip_checksum(pkt, 20)
        s.expires = now + s.tmo
        for r in fw[2]:
            r.pkts += 1
            r.bytes += n
        self.rx_pkts[i] += 1
        self.rx_bytes[i] += n
        self.tx_pkts[i - 6] += 1
        self.tx_bytes[i - 6] += n
        self.fast_hit = s
        return [(LAN, bytes(pkt))]

    def _fast_icmp(self, data: bytes, now: float, outbound: bool) -> list[tuple[str, bytes]] | None:
        """An echo (or timestamp) request out, or its reply in, of a session whose firewall
        decisions are cached: the identifier is the port (``_translate_out``/``_in`` for ICMP)."""
        n = len(data)
        if outbound:
            s = self._out_icmp.get(data[12:20] + data[24:26] + b"\0\0")
            if s is None or n > self.wan_mtu or (data[2] << 8 | data[3]) != n:
                return None
            fw = s.fw
            if fw is None or fw[0] != self._gen or fw[1] is None:
                return None
        else:
            s = self._in_icmp.get(data[12:20] + b"\0\0" + data[24:26])
            if s is None or n > self.lan_mtu or (data[2] << 8 | data[3]) != n:
                return None
            fw = s.fw
            if fw is None or fw[0] != self._gen or fw[2] is None or s.state == 0:
                return None
        pkt = bytearray(data)
        if outbound:
            self._translate_out(s, pkt, 20)
        else:
            self._translate_in(s, pkt, 20)
        s.expires = now + s.tmo
        for r in fw[1] if outbound else fw[2]:
            r.pkts += 1
            r.bytes += n
        i = 2 if outbound else 8  # icmp on the receiving side
        self.rx_pkts[i] += 1
        self.rx_bytes[i] += n
        self.tx_pkts[10 - i] += 1
        self.tx_bytes[10 - i] += n
        self.fast_hit = s
        return [(WAN if outbound else LAN, bytes(pkt))]

    # ------------------------------------------- the fast path, cached outside the engine
    def fast_entry(self, s: Session, iface: str) -> tuple[int, int, bytes, Session, bytes, int, int, int, int] | None:
        """What the fast path does to the packets of ``s`` that arrive on ``iface``, for a cache
        outside the engine (the data plane's flow cache): (direction 0 out / 1 in, protocol, the
        lookup key, the session, the new address, the new port or ICMP identifier, the IPv4 and
        transport checksum deltas, the MTU to check). None: a session the engine must keep seeing
        (a helper follows its stream)."""
        if s.helper is not None or s.dead:
            return None
        m = s.m
        if iface == LAN:
            return (0, m.proto, s.out_key, s, m.wan_ip_b, m.wan_port, m.dip_out, m.dl4_out, self.wan_mtu)
        return (1, m.proto, s.in_key, s, m.lan_ip_b, m.lan_port, m.dip_in, m.dl4_in, self.lan_mtu)

    def count_fast(self, rows: list[tuple[Session, int, int, int, int, float]]) -> int:
        """Fold in what a cache outside the engine forwarded: per row (session, direction, protocol,
        packets, bytes, time of the last one), what the fast path would have counted and refreshed
        (expiry, firewall hits, packet and byte counters). Returns the packets."""
        total = 0
        for s, d, proto, pk, by, last in rows:
            total += pk
            if not s.dead and last + s.tmo > s.expires:
                s.expires = last + s.tmo
            fw = s.fw
            hits = fw[1 + d] if fw is not None else None
            if hits:
                for r in hits:
                    r.pkts += pk
                    r.bytes += by
            i = _pidx(proto)
            a, b = (i, i + 6) if d == 0 else (i + 6, i)  # (receiving, sending) side
            self.rx_pkts[a] += pk
            self.rx_bytes[a] += by
            self.tx_pkts[b] += pk
            self.tx_bytes[b] += by
        return total

    # --------------------------------------------------------------- full path
    def _slow(self, iface: str, data: bytes | bytearray, now: float, out: list[tuple[str, bytes]]) -> None:
        pkt = data if type(data) is bytearray else bytearray(data)
        ihl = check_ipv4(pkt)
        ii = 0 if iface == LAN else 6
        proto = pkt[9]
        pi = _pidx(proto)
        self.rx_pkts[ii + pi] += 1
        self.rx_bytes[ii + pi] += len(pkt)
        src = int.from_bytes(pkt[12:16], "big")
        dst = int.from_bytes(pkt[16:20], "big")
        if self._is_martian(iface, src):
            self.drop("martian_source")
            return
        if dst >= 0xE0000000 or dst == 0 or dst >> 24 == 127:
            self.drop("not_unicast")
            return
        ff = (pkt[6] << 8) | pkt[7]
        if ff & (IP_MF | IP_OFFMASK):
            whole = self.defrag.add(pkt, ihl, now)
            if whole is None:
                self._count("frag_queued")
                return
            self._count("frag_reassembled")
            pkt = whole
            ihl = (pkt[0] & 15) << 2
        # transport sanity
        sport = dport = 0
        flags = 0
        plen = len(pkt) - ihl
        if proto == TCP:
            if plen < 20:
                raise Malformed("truncated_tcp")
            doff = (pkt[ihl + 12] >> 4) << 2
            if doff < 20 or doff > plen:
                raise Malformed("bad_tcp_offset")
            sport = (pkt[ihl] << 8) | pkt[ihl + 1]
            dport = (pkt[ihl + 2] << 8) | pkt[ihl + 3]
            tfl = pkt[ihl + 13]
            if tfl & TH_SYN and not tfl & TH_ACK:
                flags = fwmod.FLAG_SYN
            elif tfl & TH_ACK:
                flags = fwmod.FLAG_ACK
        elif proto == UDP:
            if plen < 8:
                raise Malformed("truncated_udp")
            ulen = (pkt[ihl + 4] << 8) | pkt[ihl + 5]
            if ulen < 8 or ulen > plen:
                raise Malformed("bad_udp_length")
            sport = (pkt[ihl] << 8) | pkt[ihl + 1]
            dport = (pkt[ihl + 2] << 8) | pkt[ihl + 3]
        elif proto == ICMP:
            if plen < 8:
                raise Malformed("truncated_icmp")
            sport, dport = pkt[ihl], pkt[ihl + 1]
        # input chain of the incoming interface
        rules = self.rules
        trivial = rules.trivial and rules.policy["input"] == fwmod.ACCEPT
        hits: list[Any] = []
        if not trivial:
            d = rules.evaluate("input", iface, proto, src, dst, sport, dport, flags)
            if not self._fw_pass(d, "input", iface, pkt, ihl, out, hits):
                return
        # demasquerade: replies to masqueraded connections skip the forward chain
        if iface == WAN and dst == self.wan_ip:
            if self._demasq(pkt, ihl, proto, src, sport, dport, flags, now, out, hits):
                return
        hairpin = (iface == LAN and dst == self.wan_ip and proto in (TCP, UDP)
                   and self.cfg.masquerade.hairpinning)
        if (dst == self.lan_ip or dst == self.wan_ip) and not hairpin:
            self._local(iface, pkt, ihl, proto, src, dst, now, out)
            return
        oif = WAN if hairpin else self._route(dst)
        if iface == WAN and oif == WAN:
            self.drop("no_route")
            return
        # TTL
        if pkt[8] <= 1:
            self._icmp_error(iface, pkt, ihl, ICMP_TIMXCEED, 0, 0, now, out)
            self._count("ttl_exceeded")
            return
        mtu = self.wan_mtu if oif == WAN else self.lan_mtu
        if self._size(pkt) > mtu and pkt[6] & 0x40:
            self._icmp_error(iface, pkt, ihl, ICMP_UNREACH, UNREACH_NEEDFRAG, mtu, now, out)
            self._count("frag_needed_sent")
            return
        # forward chain
        d = rules.evaluate("forward", oif, proto, src, dst, sport, dport, flags)
        fhits: list[Any] = []
        if not self._fw_pass(d, "forward", iface, pkt, ihl, out, fhits):
            return
        hits.extend(fhits)
        if d.verdict == fwmod.MASQ and oif == WAN:
            s = self._masq(pkt, ihl, proto, src, dst, sport, dport, flags, now, out)
            if s is None:
                return
            if not self._output(WAN, pkt, ihl, out, hits, s, True):
                return
            return
        # plain routing, no translation
        self._decrement_ttl(pkt)
        self._output(oif, pkt, ihl, out, hits, None, True)

    def _fw_pass(self, d: fwmod.Decision, chain: str, iface: str, pkt: bytearray, ihl: int,
                 out: list[tuple[str, bytes]], hits: list[Any]) -> bool:
        n = len(pkt)
        for r in d.rules:
            r.pkts += 1
            r.bytes += n
        hits.extend(d.rules)
        if d.logged:
            for r in d.logged:
                self.event("info", "rule_match", chain=chain, iface=iface, rule=str(r),
                           verdict=fwmod.VERDICT_NAMES.get(d.verdict, "?"),
                           src=ip_str(int.from_bytes(pkt[12:16], "big")),
                           dst=ip_str(int.from_bytes(pkt[16:20], "big")), proto=pkt[9])
            hits.append(None)  # marks "do not cache": every match must be logged
        if not d.cache:
            hits.append(None)  # a decision for this packet only (a TOS rewrite, TCP flags)
        v = d.verdict
        if v == fwmod.ACCEPT or v == fwmod.MASQ:
            if d.tos is not None and rewrite_tos(pkt, *d.tos):  # ipchains -t
                self._count("tos_rewritten")
            return True
        self.drop(f"{chain}_{'reject' if v == fwmod.REJECT else 'deny'}")
        if v == fwmod.REJECT:
            self._icmp_error(iface, pkt, ihl, ICMP_UNREACH, d.code, 0, 0.0, out,
                             limit=False)
        return False

    def _output(self, oif: str, pkt: bytearray, ihl: int, out: list[tuple[str, bytes]], hits: list[Any],
                s: Session | None, outbound: bool) -> bool:
        """Output chain of ``oif``, then send (fragmenting if needed). Caches the decision on ``s``."""
        rules = self.rules
        if not (rules.trivial and rules.policy["output"] == fwmod.ACCEPT):
            proto = pkt[9]
            sport = dport = 0
            if proto in (TCP, UDP) and len(pkt) >= ihl + 4:
                sport = (pkt[ihl] << 8) | pkt[ihl + 1]
                dport = (pkt[ihl + 2] << 8) | pkt[ihl + 3]
            elif proto == ICMP:
                sport, dport = pkt[ihl], pkt[ihl + 1]
            tfl = pkt[ihl + 13] if proto == TCP else 0
            flags = fwmod.FLAG_SYN if tfl & TH_SYN and not tfl & TH_ACK else fwmod.FLAG_ACK if tfl & TH_ACK else 0
            d = rules.evaluate("output", oif, proto, int.from_bytes(pkt[12:16], "big"),
                               int.from_bytes(pkt[16:20], "big"), sport, dport, flags)
            if not self._fw_pass(d, "output", oif, pkt, ihl, out, hits):
                return False
        if s is not None and None not in hits and not self._helper_port_session(s):
            fw = s.fw
            if fw is None or fw[0] != self._gen:
                fw = self._fw_trivial if self.rules.trivial else [self._gen, None, None]
                s.fw = fw
            if fw is not self._fw_trivial:
                if outbound:
                    fw[1] = tuple(hits)
                else:
                    fw[2] = tuple(hits)
        self._send(oif, pkt, ihl, out)
        return True

    def _size(self, pkt: bytearray) -> int:
        """Length that must fit the MTU: a super-packet's segments, else the packet."""
        return self._vseg if self._vseg and pkt is self._vpkt else len(pkt)

    def _helper_port_session(self, s: Session) -> bool:
        """A UDP session on a helper's port pair (ISAKMP 500<->500, 4500<->4500), e.g. a port
        forward's: the helper tells exchanges apart by cookies, so it never takes the fast path."""
        if type(s) is not Session:  # a helper's own entry (ESP pair, GRE call)
            return False
        m = s.m
        return m.proto == UDP and m.wan_port in self._udp_helpers and s.in_key[8:10] == s.in_key[10:12]

    def _send(self, oif: str, pkt: bytearray, ihl: int, out: list[tuple[str, bytes]]) -> None:
        mtu = self.wan_mtu if oif == WAN else self.lan_mtu
        k = (0 if oif == LAN else 6) + _pidx(pkt[9])
        if self._vseg and pkt is self._vpkt:  # a super-packet: the caller adds its offload header back
            if self._vseg > mtu:
                self.drop("too_big_super_packet")
                return
            self._vsent.append(len(out))
            self.tx_pkts[k] += 1
            self.tx_bytes[k] += len(pkt)
            out.append((oif, bytes(pkt)))
            return
        if len(pkt) > mtu:
            if pkt[6] & 0x40:
                self.drop("too_big_df")
                return
            frags = fragment(pkt, ihl, mtu)
            self._count("fragments_sent", len(frags))
            for f in frags:
                self.tx_pkts[k] += 1
                self.tx_bytes[k] += len(f)
                out.append((oif, bytes(f)))
            return
        self.tx_pkts[k] += 1
        self.tx_bytes[k] += len(pkt)
        out.append((oif, bytes(pkt)))

    def emit(self, oif: str, pkt: bytearray, out: list[tuple[str, bytes]]) -> None:
        """For helpers: send an already translated packet (output chain applies)."""
        ihl = (pkt[0] & 15) << 2
        self._output(oif, pkt, ihl, out, [], None, oif == WAN)

    @staticmethod
    def _decrement_ttl(pkt: bytearray) -> None:
        pkt[8] -= 1
        c = ((pkt[10] << 8 | pkt[11]) ^ 0xFFFF) + 0xFEFF
        c = (c & 0xFFFF) + (c >> 16)
        c = (c & 0xFFFF) + (c >> 16)
        _pack_H(pkt, 10, c ^ 0xFFFF)

    # ------------------------------------------------------------------- local
    def _local(self, iface: str, pkt: bytearray, ihl: int, proto: int, src: int, dst: int, now: float,
               out: list[tuple[str, bytes]]) -> None:
        if proto == ICMP and pkt[ihl] == ICMP_ECHO and pkt[ihl + 1] == 0:
            body = bytes(pkt[ihl + 4:])
            rep = bytearray(build_icmp(dst, src, ICMP_ECHOREPLY, 0, int.from_bytes(body[:4], "big"), body[4:]))
            self._count("echo_replies")
            self._send(iface, rep, 20, out)
            return
        self.drop("to_self")

    def _icmp_error(self, iface: str, pkt: bytearray, ihl: int, typ: int, code: int, mtu: int, now: float,
                    out: list[tuple[str, bytes]], limit: bool = True) -> None:
        """Send an ICMP error about ``pkt`` back out of ``iface`` (never about an ICMP error)."""
        if pkt[9] == ICMP and len(pkt) > ihl and pkt[ihl] in ICMP_ERRORS:
            return
        if (pkt[6] << 8 | pkt[7]) & IP_OFFMASK:
            return
        if limit:
            # token bucket: 100 errors per second, burst 100
            self._icmp_tokens = min(100.0, self._icmp_tokens + (now - self._icmp_last) * 100.0)
            self._icmp_last = now
            if self._icmp_tokens < 1.0:
                self.drop("icmp_rate_limited")
                return
            self._icmp_tokens -= 1.0
        src = self.lan_ip if iface == LAN else self.wan_ip
        dst = int.from_bytes(pkt[12:16], "big")
        body = bytes(pkt[: min(len(pkt), 548)])
        rest = mtu & 0xFFFF if code == UNREACH_NEEDFRAG else 0
        err = build_icmp(src, dst, typ, code, rest, body)
        self._count("icmp_errors_sent")
        self._send(iface, err, 20, out)

    # -------------------------------------------------------------- masquerade
    def _timeout_for(self, proto: int, state: int) -> float:
        t = self.tmo
        if proto == TCP:
            if state == T_ESTABLISHED:
                return t.tcp_established
            if state == T_FIN:
                return t.tcp_fin
            if state == T_RST:
                return t.tcp_rst
            return t.tcp_transitory
        if proto == UDP:
            return t.udp
        if proto == ICMP:
            return t.icmp
        return t.other

    def new_mapping(self, proto: int, lan_ip: int, lan_port: int) -> Mapping | None:
        """The endpoint-independent mapping of a LAN endpoint, created if needed (None: pool exhausted)."""
        mk = (proto, lan_ip, lan_port)
        m = self._maps.get(mk)
        if m is not None:
            return m
        m = Mapping(proto, lan_ip, lan_port, self.wan_ip, 0, self.wan_ip_b)
        port = self.pool.allocate(proto, lan_port, m)
        if port is None:
            self.drop("pool_exhausted")
            self.event("warning", "pool_exhausted", proto=PROTO_NAMES.get(proto, proto))
            return None
        m.set_wan(self.wan_ip, self.wan_ip_b, port)
        self._maps[mk] = m
        return m

    def static_mapping(self, proto: int, lan_ip: int, lan_port: int, wan_port: int) -> Mapping:
        """A mapping that expiry never frees (port forwards); its WAN port is reserved by the caller."""
        m = Mapping(proto, lan_ip, lan_port, self.wan_ip, wan_port, self.wan_ip_b)
        m.static = True
        self._maps.setdefault((proto, lan_ip, lan_port), m)
        return m

    def drop_mapping(self, m: Mapping) -> None:
        mk = (m.proto, m.lan_ip, m.lan_port)
        if self._maps.get(mk) is m:
            del self._maps[mk]
        self.pool.release(m.proto, m.wan_port, m)

    def tcp_helper_for(self, port: int) -> Helper | None:
        return self._tcp_helpers.get(port)

    def new_session(self, m: Mapping, rem_ip: int, rem_port: int, now: float, state: int = 0) -> Session | None:
        if self.nsessions >= self.max_sessions:
            self.drop("table_full")
            return None
        s = Session(m, rem_ip, rem_port, now, self._timeout_for(m.proto, state))
        s.state = state
        out_t, in_t = self._out[m.proto], self._in[m.proto]
        old = out_t.get(s.out_key) or in_t.get(s.in_key)
        if old is not None:
            self._remove(old)
        out_t[s.out_key] = s
        in_t[s.in_key] = s
        m.add(s)
        self.nsessions += 1
        self._wheel.add(s, s.expires)
        self.event("debug", "entry_created", proto=PROTO_NAMES.get(m.proto, m.proto),
                   lan=f"{ip_str(m.lan_ip)}:{m.lan_port}", wan=f"{ip_str(m.wan_ip)}:{m.wan_port}",
                   remote=f"{ip_str(rem_ip)}:{rem_port}")
        return s

    def _remove(self, s: Session) -> None:
        if s.dead:
            return
        s.dead = True
        self.epoch += 1
        m = s.m
        out_t, in_t = self._out[m.proto], self._in[m.proto]
        if out_t.get(s.out_key) is s:
            del out_t[s.out_key]
        if in_t.get(s.in_key) is s:
            del in_t[s.in_key]
        m.remove(s)
        self.nsessions -= 1
        if s.helper is not None:
            s.helper.session_closed(s)
        if m.empty() and not m.static:
            self.drop_mapping(m)

    def _masq(self, pkt: bytearray, ihl: int, proto: int, src: int, dst: int, sport: int, dport: int,
              flags: int, now: float, out: list[tuple[str, bytes]]) -> Session | None:
        """Masquerade an outbound packet in place. Returns the session (or None: dropped/sent)."""
        if proto == UDP and sport == dport and sport in self._udp_helpers:
            h = self._udp_helpers[sport]
            if h.masq_out(pkt, ihl, now):
                self._decrement_ttl(pkt)
                self._output(WAN, pkt, ihl, out, [], None, True)
            return None
        if proto in (TCP, UDP):
            key = bytes(pkt[12:20]) + bytes(pkt[ihl: ihl + 4])
            s = self._out[proto].get(key)
            if s is None:
                if proto == TCP and self._reset_keys and key in self._reset_keys:
                    if not pkt[ihl + 13] & TH_SYN:
                        self._reset_lan(pkt, ihl, out)
                        return None
                    del self._reset_keys[key]
                if proto == TCP:
                    tfl = pkt[ihl + 13]
                    if tfl & TH_RST or (tfl & TH_FIN and not tfl & TH_ACK):
                        self.drop("tcp_no_session")
                        return None
                    st = T_SYN_SENT if tfl & TH_SYN else T_NEW
                else:
                    st = S_UNREPLIED
                m = self.new_mapping(proto, src, sport)
                if m is None:
                    return None
                s = self.new_session(m, dst, dport, now, st)
                if s is None:
                    return None
                if proto == TCP and dport in self._tcp_helpers:
                    s.helper = self._tcp_helpers[dport]
                    s.helper.session_created(s, now)
            elif proto == TCP:
                self._tcp_track(s, pkt[ihl + 13], True)
            if proto == TCP and pkt[ihl + 13] & TH_SYN:
                self._clamp_mss(pkt, ihl)
            self._translate_out(s, pkt, ihl)
            s.expires = now + s.tmo
            if s.helper is not None and not s.helper.tcp_segment(s, pkt, ihl, True, now):
                return None
            if self.cfg.masquerade.hairpinning and dst == self.wan_ip:
                self._hairpin(pkt, ihl, now, out)
                return None
            return s
        if proto == ICMP:
            t = pkt[ihl]
            if t in ICMP_QUERIES:
                return self._masq_icmp_query(pkt, ihl, src, dst, now)
            if t in ICMP_ERRORS:
                if self._icmp_error_out(pkt, ihl, now):
                    self._decrement_ttl(pkt)
                    self._send(WAN, pkt, ihl, out)
                return None
            self.drop("icmp_type_not_masqueraded")
            return None
        if self.forwarders.owns_outbound(proto, src):
            self.forwarders.masq_out(pkt)
            self._decrement_ttl(pkt)
            self._output(WAN, pkt, ihl, out, [], None, True)
            return None
        ph = self._proto_helpers.get(proto)
        if ph is not None:
            if ph.masq_out(pkt, ihl, now):
                self._decrement_ttl(pkt)
                fe = getattr(ph, "fw_entry", None)
                if fe is not None:  # the caller outputs it with the chains' hits, cached on the entry
                    return fe  # type: ignore[no-any-return]
                self._output(WAN, pkt, ihl, out, [], None, True)
            return None
        self.drop("proto_not_masqueraded")
        return None

    def _hairpin(self, pkt: bytearray, ihl: int, now: float, out: list[tuple[str, bytes]]) -> None:
        """RFC 4787 REQ-9: a LAN host reaching another LAN host's mapping, seen with external addresses."""
        self._count("hairpinned")
        proto = pkt[9]
        s = self._in[proto].get(bytes(pkt[12:20]) + bytes(pkt[ihl: ihl + 4]))
        if s is None:
            m = self.pool.owner(proto, (pkt[ihl + 2] << 8) | pkt[ihl + 3])
            if not isinstance(m, Mapping) or not self._filter_ok(m, int.from_bytes(pkt[12:16], "big"),
                                                                   (pkt[ihl] << 8) | pkt[ihl + 1]):
                self.drop("hairpin_no_mapping")
                return
            s = self.new_session(m, int.from_bytes(pkt[12:16], "big"), (pkt[ihl] << 8) | pkt[ihl + 1], now,
                                 S_REPLIED if proto == UDP else T_SYN_SENT)
            if s is None:
                return
        self._translate_in(s, pkt, ihl)
        # translate_in decremented the TTL a second time; a hairpin is one hop
        old = (pkt[8] << 8) | pkt[9]
        pkt[8] += 1
        _pack_H(pkt, 10, apply_delta((pkt[10] << 8) | pkt[11], word_delta(old, old + 0x100)))
        self._send(LAN, pkt, ihl, out)

    def _translate_out(self, s: Session, pkt: bytearray, ihl: int) -> None:
        m = s.m
        pkt[8] -= 1
        c = ((pkt[10] << 8 | pkt[11]) ^ 0xFFFF) + m.dip_out
        c = (c & 0xFFFF) + (c >> 16)
        c = (c & 0xFFFF) + (c >> 16)
        _pack_H4s(pkt, 10, c ^ 0xFFFF, m.wan_ip_b)
        proto = m.proto
        if proto == ICMP:
            _pack_H(pkt, ihl + 4, m.wan_port)
            _pack_H(pkt, ihl + 2, apply_delta((pkt[ihl + 2] << 8) | pkt[ihl + 3], m.dl4_out))
            return
        _pack_H(pkt, ihl, m.wan_port)
        if proto == UDP:
            _pack_H(pkt, ihl + 6, apply_delta_udp((pkt[ihl + 6] << 8) | pkt[ihl + 7], m.dl4_out))
        else:
            _pack_H(pkt, ihl + 16, apply_delta((pkt[ihl + 16] << 8) | pkt[ihl + 17], m.dl4_out))

    def _translate_in(self, s: Session, pkt: bytearray, ihl: int) -> None:
        m = s.m
        pkt[8] -= 1
        c = ((pkt[10] << 8 | pkt[11]) ^ 0xFFFF) + m.dip_in
        c = (c & 0xFFFF) + (c >> 16)
        c = (c & 0xFFFF) + (c >> 16)
        _pack_H(pkt, 10, c ^ 0xFFFF)
        pkt[16:20] = m.lan_ip_b
        proto = m.proto
        if proto == ICMP:
            _pack_H(pkt, ihl + 4, m.lan_port)
            _pack_H(pkt, ihl + 2, apply_delta((pkt[ihl + 2] << 8) | pkt[ihl + 3], m.dl4_in))
            return
        _pack_H(pkt, ihl + 2, m.lan_port)
        if proto == UDP:
            _pack_H(pkt, ihl + 6, apply_delta_udp((pkt[ihl + 6] << 8) | pkt[ihl + 7], m.dl4_in))
        else:
            _pack_H(pkt, ihl + 16, apply_delta((pkt[ihl + 16] << 8) | pkt[ihl + 17], m.dl4_in))

    def _tcp_track(self, s: Session, tfl: int, outbound: bool) -> None:
        st = s.state
        if tfl & TH_RST:
            st = T_RST
        elif tfl & TH_SYN:
            if tfl & TH_ACK:
                if st in (T_SYN_SENT, T_NEW):
                    st = T_ESTABLISHED
            elif st not in (T_SYN_SENT, T_NEW):
                st = T_SYN_SENT  # a new connection reusing the 5-tuple
        elif tfl & TH_FIN:
            st = T_FIN
        elif st == T_NEW and not outbound:
            st = T_ESTABLISHED
        if st != s.state:
            s.state = st
            s.tmo = self._timeout_for(TCP, st)

    def _clamp_mss(self, pkt: bytearray, ihl: int) -> None:
        if not self.cfg.masquerade.mss_clamp:
            return
        limit = min(self.lan_mtu, self.wan_mtu) - 40
        doff = (pkt[ihl + 12] >> 4) << 2
        i = ihl + 20
        end = ihl + doff
        while i < end:
            k = pkt[i]
            if k == 0:
                return
            if k == 1:
                i += 1
                continue
            if i + 1 >= end:
                return
            ln = pkt[i + 1]
            if ln < 2 or i + ln > end:
                return
            if k == 2 and ln == 4:
                mss = (pkt[i + 2] << 8) | pkt[i + 3]
                if mss > limit:
                    # the option word sits at an even offset from the TCP header start only if (i-ihl) is even
                    old_words = ones_sum(pkt[ihl + ((i - ihl) & ~1): ihl + ((i - ihl) & ~1) + 6])
                    _pack_H(pkt, i + 2, limit)
                    new_words = ones_sum(pkt[ihl + ((i - ihl) & ~1): ihl + ((i - ihl) & ~1) + 6])
                    c = (pkt[ihl + 16] << 8) | pkt[ihl + 17]
                    _pack_H(pkt, ihl + 16, apply_delta(c, ((~old_words) & 0xFFFF) + new_words))
                    self._count("mss_clamped")
                return
            i += ln

    def _masq_icmp_query(self, pkt: bytearray, ihl: int, src: int, dst: int, now: float) -> Session | None:
        ident = (pkt[ihl + 4] << 8) | pkt[ihl + 5]
        key = bytes(pkt[12:20]) + bytes(pkt[ihl + 4: ihl + 6]) + b"\0\0"
        s = self._out[ICMP].get(key)
        if s is None:
            m = self.new_mapping(ICMP, src, ident)
            if m is None:
                return None
            s = self.new_session(m, dst, 0, now, S_UNREPLIED)
            if s is None:
                return None
        self._translate_out(s, pkt, ihl)
        s.expires = now + s.tmo
        return s

    # ------------------------------------------------------------ demasquerade
    def _filter_ok(self, m: Mapping, rem_ip: int, rem_port: int) -> bool:
        f = self.filtering
        if f == 0:
            return True
        for s in m.sessions():
            if s.rem_ip == rem_ip and (f == 1 or s.rem_port == rem_port):
                return True
        return False

    def _demasq(self, pkt: bytearray, ihl: int, proto: int, src: int, sport: int, dport: int, flags: int,
                now: float, out: list[tuple[str, bytes]], hits: list[Any]) -> bool:
        """Inbound to the WAN address. True when handled (delivered or dropped)."""
        if proto in (TCP, UDP):
            if proto == UDP and sport == dport and sport in self._udp_helpers:
                h = self._udp_helpers[sport]
                res = h.demasq_in(pkt, ihl, now)
                if res is not None:
                    self._deliver_helper(res, out)
                    return True
            s = self._in[proto].get(bytes(pkt[12:24]) if ihl == 20 else bytes(pkt[12:20]) + bytes(pkt[ihl:ihl + 4]))
            if s is None:
                owner = self.pool.owner(proto, dport)
                if isinstance(owner, Mapping) and self._filter_ok(owner, src, sport):
                    if proto == TCP and pkt[ihl + 13] & TH_RST:
                        self.drop("tcp_no_session")
                        return True
                    s = self.new_session(owner, src, sport, now, S_REPLIED if proto == UDP else T_SYN_SENT)
                    if s is None:
                        return True
                    s.inbound = True
                else:
                    s = self._portfw_session(proto, pkt, ihl, src, sport, dport, now)
                    if s is None:
                        self.drop("inbound_no_mapping")
                        return True
            if pkt[8] <= 1:
                self._icmp_error(WAN, pkt, ihl, ICMP_TIMXCEED, 0, 0, now, out)
                return True
            if self._size(pkt) > self.lan_mtu and pkt[6] & 0x40:
                self._icmp_error(WAN, pkt, ihl, ICMP_UNREACH, UNREACH_NEEDFRAG, self.lan_mtu, now, out)
                return True
            if proto == TCP:
                self._tcp_track(s, pkt[ihl + 13], False)
                if pkt[ihl + 13] & TH_SYN:
                    self._clamp_mss(pkt, ihl)
            elif s.state == S_UNREPLIED:
                s.state = S_REPLIED
            self._translate_in(s, pkt, ihl)
            s.expires = now + s.tmo
            if s.helper is not None and not s.helper.tcp_segment(s, pkt, ihl, False, now):
                return True
            self._output(LAN, pkt, ihl, out, hits, s, False)
            return True
        if proto == ICMP:
            t = pkt[ihl]
            if t in ICMP_REPLIES:
                key = bytes(pkt[12:20]) + b"\0\0" + bytes(pkt[ihl + 4: ihl + 6])
                s = self._in[ICMP].get(key)
                if s is None:
                    return False
                if pkt[8] <= 1:
                    return True
                s.state = S_REPLIED
                self._translate_in(s, pkt, ihl)
                s.expires = now + s.tmo
                self._output(LAN, pkt, ihl, out, hits, s, False)
                return True
            if t in ICMP_ERRORS:
                if pkt[8] <= 1:
                    self.drop("ttl_exceeded")
                    return True
                if self._icmp_error_in(pkt, ihl):
                    self._output(LAN, pkt, ihl, out, hits, None, False)
                return True
            return False
        ph = self._proto_helpers.get(proto)
        if ph is not None:
            res = ph.demasq_in(pkt, ihl, now)
            if res is not None:
                self._deliver_helper(res, out, hits, getattr(ph, "fw_entry", None) if len(res) == 1 else None)
                return True
        return self._protofw(pkt, ihl, proto, now, out)

    def _deliver_helper(self, pkts: list[bytearray], out: list[tuple[str, bytes]], hits: list[Any] | None = None,
                        entry: Any = None) -> None:
        """Send a helper's inbound packets to the LAN; with ``entry`` (an object with a ``fw``
        slot, like a Session) the input/output chain decision is cached on it for a fast path."""
        for p in pkts:
            ihl = (p[0] & 15) << 2
            if p[8] <= 1:
                self.drop("ttl_exceeded")
                continue
            self._decrement_ttl(p)
            self._output(LAN, p, ihl, out, list(hits) if entry is not None and hits else [], entry, False)

    # hooks for the forwarders (port forwarding and protocol forwarding)
    def _portfw_session(self, proto: int, pkt: bytearray, ihl: int, src: int, sport: int, dport: int,
                        now: float) -> Session | None:
        return self.forwarders.inbound_session(proto, pkt, ihl, src, sport, dport, now)

    def _protofw(self, pkt: bytearray, ihl: int, proto: int, now: float, out: list[tuple[str, bytes]]) -> bool:
        res = self.forwarders.protocol_inbound(proto, pkt, ihl, now)
        if res is None:
            return False
        self._deliver_helper(res, out)
        return True

    # ----------------------------------------------------------- ICMP errors
    def _embedded(self, pkt: bytearray, ihl: int) -> tuple[int, int, int] | None:
        """Offsets of the packet embedded in an ICMP error: (start, its ihl, its protocol)."""
        e = ihl + 8
        if len(pkt) < e + 20 or pkt[e] >> 4 != 4:
            self.drop("icmp_error_truncated")
            return None
        eihl = (pkt[e] & 15) << 2
        if eihl < 20 or len(pkt) < e + eihl + 8:
            self.drop("icmp_error_truncated")
            return None
        return e, eihl, pkt[e + 9]

    def _icmp_error_in(self, pkt: bytearray, ihl: int) -> bool:
        """Translate an inbound ICMP error about a masqueraded packet (RFC 5508 REQ-3..6)."""
        emb = self._embedded(pkt, ihl)
        if emb is None:
            return False
        e, eihl, ep = emb
        t = e + eihl
        if ep in (TCP, UDP):
            key = bytes(pkt[e + 16: e + 20]) + bytes(pkt[e + 12: e + 16]) + bytes(pkt[t + 2: t + 4]) + bytes(pkt[t: t + 2])
        elif ep == ICMP:
            key = bytes(pkt[e + 16: e + 20]) + bytes(pkt[e + 12: e + 16]) + b"\0\0" + bytes(pkt[t + 4: t + 6])
        else:
            self.drop("icmp_error_no_entry")
            return False
        tbl = self._in.get(ep)
        s = tbl.get(key) if tbl is not None else None
        if s is None:
            self.drop("icmp_error_no_entry")
            return False
        m = s.m
        self._rewrite_embedded(pkt, ihl, e, eihl, ep, m.lan_ip, m.lan_port, m.wan_ip, m.wan_port, src_side=True)
        # outer: destination WAN address -> LAN host, TTL
        d = addr_delta(self.wan_ip, m.lan_ip) + 0xFEFF
        pkt[8] -= 1
        _pack_H(pkt, 10, apply_delta((pkt[10] << 8) | pkt[11], d))
        pkt[16:20] = m.lan_ip_b
        self._count("icmp_errors_translated")
        return True

    def _icmp_error_out(self, pkt: bytearray, ihl: int, now: float) -> bool:
        """Translate an ICMP error sent by a LAN host about a packet it received through the NAT."""
        emb = self._embedded(pkt, ihl)
        if emb is None:
            return False
        e, eihl, ep = emb
        t = e + eihl
        if ep in (TCP, UDP):
            key = bytes(pkt[e + 16: e + 20]) + bytes(pkt[e + 12: e + 16]) + bytes(pkt[t + 2: t + 4]) + bytes(pkt[t: t + 2])
        elif ep == ICMP:
            key = bytes(pkt[e + 16: e + 20]) + bytes(pkt[e + 12: e + 16]) + bytes(pkt[t + 4: t + 6]) + b"\0\0"
        else:
            self.drop("icmp_error_no_entry")
            return False
        tbl = self._out.get(ep)
        s = tbl.get(key) if tbl is not None else None
        if s is None:
            self.drop("icmp_error_no_entry")
            return False
        m = s.m
        src = int.from_bytes(pkt[12:16], "big")
        self._rewrite_embedded(pkt, ihl, e, eihl, ep, m.wan_ip, m.wan_port, m.lan_ip, m.lan_port, src_side=False)
        d = addr_delta(src, self.wan_ip)
        _pack_H(pkt, 10, apply_delta((pkt[10] << 8) | pkt[11], d))
        pkt[12:16] = self.wan_ip_b
        self._count("icmp_errors_translated")
        return True

    def _rewrite_embedded(self, pkt: bytearray, ihl: int, e: int, eihl: int, ep: int, new_ip: int, new_port: int,
                          old_ip: int, old_port: int, src_side: bool) -> None:
        """Rewrite the embedded header's address and port (source side when the error comes
        from the WAN about our outbound packet, destination side otherwise), fixing the
        embedded IP checksum, the embedded transport checksum when present, and the ICMP
        checksum, all incrementally."""
        region_end = min(len(pkt), e + eihl + 18)
        if (region_end - e) & 1:
            region_end -= 1
        before = ones_sum(pkt[e:region_end])
        a_off = e + 12 if src_side else e + 16
        t = e + eihl
        da = addr_delta(old_ip, new_ip)
        _pack_H(pkt, e + 10, apply_delta((pkt[e + 10] << 8) | pkt[e + 11], da))
        pkt[a_off: a_off + 4] = new_ip.to_bytes(4, "big")
        if ep == ICMP:
            dp = word_delta(old_port, new_port)
            _pack_H(pkt, t + 4, new_port)
            _pack_H(pkt, t + 2, apply_delta((pkt[t + 2] << 8) | pkt[t + 3], dp))
        else:
            p_off = t if src_side else t + 2
            dp = word_delta(old_port, new_port)
            _pack_H(pkt, p_off, new_port)
            if ep == UDP:
                if len(pkt) >= t + 8:
                    _pack_H(pkt, t + 6, apply_delta_udp((pkt[t + 6] << 8) | pkt[t + 7], da + dp))
            elif len(pkt) >= t + 18:
                _pack_H(pkt, t + 16, apply_delta((pkt[t + 16] << 8) | pkt[t + 17], da + dp))
        after = ones_sum(pkt[e:region_end])
        c = (pkt[ihl + 2] << 8) | pkt[ihl + 3]
        _pack_H(pkt, ihl + 2, apply_delta(c, ((~before) & 0xFFFF) + after))

    # ------------------------------------------------------------------ expiry
    def expire(self, now: float) -> None:
        """Remove what timed out."""
        self.sync()
        for s in self._wheel.due(now, lambda x: x.dead, lambda x: x.expires):
            self.event("debug", "entry_expired", proto=PROTO_NAMES.get(s.m.proto, s.m.proto),
                       lan=f"{ip_str(s.m.lan_ip)}:{s.m.lan_port}", wan_port=s.m.wan_port)
            self._remove(s)
            self._count("expired")
        self.defrag.expire(now)
        for h in self.helpers:
            h.expire(now)
        self.forwarders.expire(now)
        if self._reset_keys:
            for k in [k for k, t in self._reset_keys.items() if t <= now]:
                del self._reset_keys[k]

    # ---------------------------------------------------------------- listing
    def table(self, now: float | None = None) -> list[dict[str, Any]]:
        """Snapshot of the masquerade entries."""
        self.sync()
        rows: list[dict[str, Any]] = []
        seen: set[int] = set()
        for proto, tbl in self._out.items():
            for s in tbl.values():
                if id(s) in seen:
                    continue
                seen.add(id(s))
                m = s.m
                if proto == TCP:
                    state = TCP_STATE_NAMES[s.state]
                else:
                    state = "REPLIED" if s.state == S_REPLIED else "UNREPLIED"
                left = s.expires - now if now is not None else s.tmo
                rows.append({
                    "proto": PROTO_NAMES.get(proto, str(proto)),
                    "lan": f"{ip_str(m.lan_ip)}:{m.lan_port}",
                    "wan": f"{ip_str(m.wan_ip)}:{m.wan_port}",
                    "remote": f"{ip_str(s.rem_ip)}:{s.rem_port}",
                    "state": state,
                    "expires_in": round(max(0.0, left), 1),
                    "inbound": s.inbound,
                    "helper": s.helper.name if s.helper is not None else "",
                })
        for h in self.helpers:
            rows.extend(h.entries(now if now is not None else 0.0))
        rows.extend(self.forwarders.entries(now if now is not None else 0.0))
        return rows

    def table_summary(self) -> dict[tuple[str, str], int]:
        """(protocol, state) -> number of entries, without building the table (for metrics)."""
        out: dict[tuple[str, str], int] = {}
        for proto, tbl in self._out.items():
            pname = PROTO_NAMES.get(proto, str(proto))
            counts = Counter(s.state for s in tbl.values())
            for st, n in counts.items():
                name = TCP_STATE_NAMES[st] if proto == TCP else ("REPLIED" if st == S_REPLIED else "UNREPLIED")
                key = (pname, name.lower())
                out[key] = out.get(key, 0) + n
        now = self._icmp_last
        for e in [e for h in self.helpers for e in h.entries(now)] + self.forwarders.entries(now):
            key = (str(e.get("proto", "unknown")).lower(), str(e.get("state", "") or "none").lower())
            out[key] = out.get(key, 0) + 1
        return out

    def sessions(self) -> list[Session]:
        return [s for s in self._out[TCP].values()] + list(self._out[UDP].values()) + list(self._out[ICMP].values())

    def flush(self, proto: int | None = None, lan_ip: int | None = None) -> int:
        """Remove entries (all, or those matching); returns how many."""
        self.sync()
        n = 0
        for s in self.sessions():
            if proto is not None and s.m.proto != proto:
                continue
            if lan_ip is not None and s.m.lan_ip != lan_ip:
                continue
            self._remove(s)
            n += 1
        if proto is None and lan_ip is None:
            for h in self.helpers:
                n += h.flush()
        self._count("flushed", n)
        return n

    # ------------------------------------------------------- dynamic address
    def set_wan_address(self, addr: ipaddress.IPv4Interface, now: float) -> list[tuple[str, bytes]]:
        """The WAN address changed (ip_dynaddr). Returns packets to send (TCP resets towards the LAN)."""
        self.sync()
        old = self.wan_ip
        self._set_wan(addr)
        if old == self.wan_ip:
            return []
        mode = self.cfg.wan.dynaddr_mode
        self._count("wan_address_changes")
        self.event("info", "wan_address_changed", old=ip_str(old), new=ip_str(self.wan_ip), mode=mode)
        out: list[tuple[str, bytes]] = []
        for s in self.sessions():
            m = s.m
            if m.wan_ip != old:
                continue
            replied = s.state == S_REPLIED if m.proto != TCP else s.state not in (T_NEW, T_SYN_SENT)
            if mode == "rewrite-all" or (mode == "rewrite" and not replied):
                self._rebind(s, self.wan_ip)
            else:
                if m.proto == TCP and len(self._reset_keys) < 65536:
                    # the LAN host learns at its next segment that the session is gone
                    self._reset_keys[s.out_key] = now + self.tmo.tcp_transitory
                self._remove(s)
        for h in self.helpers:
            h.wan_changed(old, self.wan_ip, mode, now)
        self.forwarders.wan_changed(old, self.wan_ip, mode, now)
        return out

    def _rebind(self, s: Session, new_ip: int) -> None:
        self.epoch += 1
        m = s.m
        in_t = self._in[m.proto]
        for x in list(m.sessions()):
            if in_t.get(x.in_key) is x:
                del in_t[x.in_key]
        m.set_wan(new_ip, self.wan_ip_b if new_ip == self.wan_ip else None)
        for x in list(m.sessions()):
            x.rekey()
            in_t[x.in_key] = x
            x.fw = None

    def _reset_lan(self, pkt: bytearray, ihl: int, out: list[tuple[str, bytes]]) -> None:
        """Answer a LAN segment of a flushed TCP session with a RST (RFC 793 reset generation:
        seq = the segment's ACK), so the connection ends at once instead of hanging."""
        tfl = pkt[ihl + 13]
        sport = (pkt[ihl] << 8) | pkt[ihl + 1]
        dport = (pkt[ihl + 2] << 8) | pkt[ihl + 3]
        seq_in = int.from_bytes(pkt[ihl + 4: ihl + 8], "big")
        ack_in = int.from_bytes(pkt[ihl + 8: ihl + 12], "big")
        plen = len(pkt) - ihl - ((pkt[ihl + 12] >> 4) << 2)
        if tfl & TH_ACK:
            seq, ack, fl = ack_in, 0, TH_RST
        else:
            seq, ack, fl = 0, (seq_in + plen + (1 if tfl & TH_SYN else 0)) & 0xFFFFFFFF, TH_RST | TH_ACK
        src = int.from_bytes(pkt[16:20], "big")
        dst = int.from_bytes(pkt[12:16], "big")
        tcp = bytearray(struct.pack("!HHIIBBHHH", dport, sport, seq, ack, 5 << 4, fl, 0, 0, 0))
        _pack_H(tcp, 16, checksum(tcp, pseudo_header_sum(src, dst, TCP, len(tcp))))
        self._count("tcp_resets_sent")
        self._send(LAN, build_ipv4(src, dst, TCP, bytes(tcp)), 20, out)
