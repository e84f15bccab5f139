"""The sans-IO router's facade: one IPv4 packet in, the packets to send out.

``Engine(cfg).process(iface, packet, now)`` routes a packet that arrived on
"lan" or "wan" and returns ``[(iface, packet)]`` to send; ``expire(now)``
removes what timed out. The work is done by the parts this class wires
together and configures, one concern each:

- :mod:`~masqd.engine.table` (``NatTable``): sessions, mappings, the port pool,
  the timers, the WAN address they are bound to, and the stream of changes;
- :mod:`~masqd.engine.fastpath`: established flows (and the description of them
  that the data plane's flow cache repeats);
- :mod:`~masqd.engine.fullpath`: the Linux 2.2 ipchains packet path;
- :mod:`~masqd.engine.icmp`: ICMP errors sent and translated;
- :mod:`~masqd.engine.routing`, :mod:`~masqd.engine.defrag`,
  :mod:`~masqd.engine.forward` (port and protocol forwards),
  :mod:`~masqd.engine.pcp` (the PCP / NAT-PMP server on the LAN address),
  :mod:`~masqd.engine.helpers` (IPsec, PPTP), :mod:`~masqd.engine.counters`.

The engine is also the helpers' one way in (:class:`masqd.engine.api.EngineAPI`).
Admin operations (the table listing, flush, a new WAN address, reload) are
methods here. Packets the engine sends of its own accord (PCP/NAT-PMP
announcements) come from ``start(now)``, ``set_wan_address`` and ``tick(now)``,
which the data plane calls when ``next_tick`` says. Counts kept outside the engine (the data plane's flow cache) are
folded in by their owner, through ``count_fast``, before it reads the engine:
the engine never calls out.
"""

from __future__ import annotations

import ipaddress
import struct
from collections import Counter
from typing import Any

from masqd import firewall as fwmod
from masqd.config import Config, Timeouts
from masqd.engine.counters import Counters, slot
from masqd.engine.defrag import Reassembler
from masqd.engine.fastpath import FastEntry, FastPath, HelperEntry, HelperFast, HelperFold
from masqd.engine.forward import Forwarders
from masqd.engine.fullpath import RESET_KEYS_MAX, FullPath
from masqd.engine.helpers import HELPERS, Helper
from masqd.engine.icmp import IcmpErrors
from masqd.engine.limits import MAX_MUTED, HostLimits
from masqd.engine.nat import Lease, PortPool, Session, acct_row
from masqd.engine.pcp import PcpServer
from masqd.engine.routing import LAN, WAN, Routes
from masqd.engine.table import FLUSH, NatTable, state_name
from masqd.wire import pcp as pcpwire
from masqd.wire import vnet
from masqd.wire.ipv4 import PROTO_NAMES, TCP, UDP, Malformed, ip_str, set_ip_checksum

_pack_H = struct.Struct("!H").pack_into


class Engine:
    """The masquerade router. See the module docstring."""

    def __init__(self, cfg: Config) -> None:
        m = cfg.masquerade
        self.ctr = Counters()
        # the helpers' interface, bound once (no extra call on their paths)
        self.count = self.ctr.count
        self.drop = self.ctr.drop
        self.gauge = self.ctr.gauge
        self.event = self.ctr.event
        self.drain_events = self.ctr.drain_events
        lo, hi = m.port_range
        self.nat = NatTable(m.effective_timeouts, PortPool(lo, hi, m.port_preservation), m.max_entries,
                              int(cfg.wan.address.ip), self.ctr)
        self.changed = self.nat.emit
        self.wan_if = cfg.wan.address
        self.routes = Routes(cfg, cfg.wan.address)
        self.defrag = Reassembler(m.defrag_timeout, m.defrag_max_datagrams, m.defrag_max_bytes, self.ctr.c)
        self.icmp = IcmpErrors(self.nat, self.ctr)
        self.fast = FastPath(self.nat, self.ctr)
        self.fast_hits = self.fast.hits
        self.fast_account = self.fast.account
        self.count_fast = self.fast.count_fast
        self._fast_out = self.fast.out
        self._fast_in = self.fast.inb
        self.rules = fwmod.build_ruleset(cfg)
        self.forwarders = Forwarders(self.nat, self.ctr, self.rules)
        self.full = FullPath(self.nat, self.ctr, self.routes, self.icmp, self.defrag, self.forwarders)
        self._slow = self.full.run
        self.pcp = PcpServer(self.nat, self.ctr, self.routes, self.announce_sa)
        self.pcp.session_made = self.full.attach_tcp_helper
        self.gen = 0  # the rules generation: bumped by every (re)load, voids cached decisions
        # the budget of flow-opening packets of hosts over their mapping rate is applied here
        # (False while the data plane's flow cache applies it to its misses, before Python)
        self.police_openers = True
        self._due: list[Session] = []  # timed-out sessions an expiry with a budget left for later
        self.helpers: list[Helper] = [cls(self, cfg) for cls in HELPERS]
        self._apply(cfg, first=True)

    # ------------------------------------------------------------------ config
    def _apply(self, cfg: Config, first: bool = False) -> None:
        self.cfg = cfg
        t = self.nat
        t.epoch += 1
        m = cfg.masquerade
        t.tmo = m.effective_timeouts
        t.max_entries = m.max_entries
        lo, hi = m.port_range
        lim = cfg.limits
        e = lim.effective(m.max_entries, hi - lo + 1)
        t.set_limits(HostLimits(int(e["max_entries"]), int(e["max_ports"]), e["rate"], int(e["burst"]),
                                e["quarantine"], int(e["half_open"]), e["punt_rate"]),
                     lim.top_offenders, lim.log_interval)
        t.acct = m.accounting
        self.routes.configure(cfg)
        self.lan_mtu = cfg.lan.mtu
        self.wan_mtu = cfg.wan.mtu
        if not first:
            lo, hi = m.port_range
            pool = t.pool
            pool.set_range(lo, hi)
            pool.preserve = m.port_preservation
            self.defrag.timeout = m.defrag_timeout
            self.defrag.max_datagrams = m.defrag_max_datagrams
            self.defrag.max_bytes = m.defrag_max_bytes
            rules = fwmod.build_ruleset(cfg)
            rules.carry_counters(self.rules)  # a reload keeps the hits of rules that stay
            self.rules = rules
            for h in self.helpers:
                h.reload(cfg)
            self.forwarders.configure(self.rules)
        self.gen += 1
        proto_helpers: dict[int, Helper] = {}
        udp_helpers: dict[int, Helper] = {}
        tcp_helpers: dict[int, Helper] = {}
        fast_po: dict[int, HelperFast] = {}
        fast_pi: dict[int, HelperFast] = {}
        fast_pe: dict[int, HelperEntry] = {}
        fast_pf: dict[int, HelperFold] = {}
        for h in self.helpers:
            if not h.enabled():
                continue
            for p in h.ip_protocols:
                proto_helpers.setdefault(p, h)
                # optional per-protocol fast paths (established ESP, GRE): fast_out/fast_in(data, now)
                fo, fi = getattr(h, "fast_out", None), getattr(h, "fast_in", None)
                if fo is not None and fi is not None and proto_helpers[p] is h:
                    fast_po.setdefault(p, fo)
                    fast_pi.setdefault(p, fi)
                    # and their description for the data plane's flow cache (fast_entry/fast_fold)
                    fe, ff = getattr(h, "fast_entry", None), getattr(h, "fast_fold", None)
                    if fe is not None and ff is not None:
                        fast_pe.setdefault(p, fe)
                        fast_pf.setdefault(p, ff)
            for p in h.udp_ports:
                udp_helpers.setdefault(p, h)
            for p in h.tcp_ports:
                tcp_helpers.setdefault(p, h)
        self.fast.configure(self.gen, self.lan_mtu, self.wan_mtu, fast_po, fast_pi, fast_pe, fast_pf)
        was_on = self.pcp.enabled
        self.pcp.configure(cfg)
        if was_on and not self.pcp.enabled:
            self.pcp.disable()
        self.full.configure(cfg, self.rules, self.gen, proto_helpers, udp_helpers, tcp_helpers,
                            self.pcp if self.pcp.enabled else None)

    def reload(self, cfg: Config) -> None:
        """Swap the configuration atomically, keeping the masquerade table."""
        old_wan = self.wan_if
        self._apply(cfg)
        self.count("reloads")
        if cfg.wan.address != old_wan and cfg.wan.address_source == "config":
            self.set_wan_address(cfg.wan.address, self.icmp.last)

    # ------------------------------------------------------- the helpers' view
    @property
    def wan_ip(self) -> int:
        return self.nat.wan_ip

    @property
    def wan_ip_b(self) -> bytes:
        return self.nat.wan_ip_b

    @property
    def gone(self) -> list[Session] | None:
        """Sessions removed since the flow cache last looked (see ``NatTable.gone``)."""
        return self.nat.gone

    @property
    def epoch(self) -> int:
        """Moves whenever a decision cached outside the engine could be void (see ``NatTable``)."""
        return self.nat.epoch

    def port_forwarded(self, proto: int, port: int) -> bool:
        return self.forwarders.port_forwarded(proto, port)

    def announce_sa(self, lan_ip: int, rem_ip: int, spi_out: int, spi_in: int, withdraw: bool,
                    now: float) -> tuple[str, list[bytearray]]:
        """A LAN host announced (or, ``withdraw``, took back) the SPI pair of an SA it set up with
        ``rem_ip``; the helper that owns the protocol pairs it. Returns its status ("ok",
        "taken", "full"; "disabled" when no helper takes announcements) and the inbound packets
        it held for that SPI, now rewritten for the LAN host."""
        for h in self.helpers:
            if h.enabled():
                res = h.sa_announced(lan_ip, rem_ip, spi_out, spi_in, withdraw, now)
                if res is not None:
                    return res
        return "disabled", []

    def fast_void(self) -> None:
        """A helper removed an entry (or changed its rewrite) that a cache outside the engine may
        repeat: every such cached decision is void (the table's epoch moves)."""
        self.nat.epoch += 1

    def proto_forwarded(self, proto: int) -> bool:
        return proto in self.forwarders.proto_hosts

    def find_session(self, proto: int, out_key: bytes) -> Session | None:
        tbl = self.nat.out.get(proto)
        return tbl.get(out_key) if tbl is not None else None

    # ---------------------------------------------------------------- counters
    @property
    def counters(self) -> dict[str, int]:
        """Every counter under its public name, with the table's sizes."""
        t = self.nat
        out = self.ctr.named()
        out["sessions"] = t.nsessions
        out["mappings"] = len(t.maps)
        for p, name in ((TCP, "tcp"), (UDP, "udp"), (1, "icmp")):
            out[f"pool_used_{name}"] = t.pool.use(p)
        out["pool_size"] = t.pool.size
        out["frag_queue"] = len(self.defrag)
        for name, (size, limit) in self.tables().items():
            out[f"table_size_{name}"] = size
            out[f"table_limit_{name}"] = limit
        out["pcp_mappings"] = len(t.leases)
        return out

    def tables(self) -> dict[str, tuple[int, int]]:
        """Every bounded table: name -> (entries, limit)."""
        t = self.nat
        d = self.defrag
        out = {
            "nat_sessions": (t.nsessions, t.max_entries),
            "defrag_datagrams": (len(d), d.max_datagrams),
            "defrag_bytes": (d.bytes, d.max_bytes),
            "tcp_reset_keys": (len(self.full.reset_keys), RESET_KEYS_MAX),
            "limit_offenders": (len(t.offenders.hosts), 2 * t.offenders.n),
            "limit_hosts_over_rate": (len(t.mutes.hosts), MAX_MUTED),
        }
        for h in self.helpers:
            out.update(h.tables())
        return out

    def host_limits(self, now: float | None = None) -> dict[str, Any]:
        """The per-host limits in force, the hosts tracked, the ports in quarantine and the top
        offenders (``masqd stats``, metrics)."""
        return self.nat.host_rows(self.nat.now if now is None else now)

    @property
    def c(self) -> dict[str, int]:
        """The named counters themselves (not the per-interface packet counters)."""
        return self.ctr.c

    @property
    def rx_pkts(self) -> list[int]:
        return self.ctr.rx_pkts

    @property
    def tx_pkts(self) -> list[int]:
        return self.ctr.tx_pkts

    @property
    def tmo(self) -> Timeouts:
        """The timeouts in force (the config's, with ``ipchains -M -S`` / ``ipfwadm -M -s`` applied)."""
        return self.nat.tmo

    @property
    def pool(self) -> PortPool:
        return self.nat.pool

    @property
    def nsessions(self) -> int:
        return self.nat.nsessions

    @property
    def max_sessions(self) -> int:
        return self.nat.max_entries

    # ----------------------------------------------------------------- routing
    def next_hop(self, iface: str, dst: int) -> int:
        """The IPv4 address to resolve on ``iface`` to reach ``dst`` (TAP mode)."""
        return self.routes.next_hop(iface, dst)

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
            if self.police_openers and iface == LAN and self.nat.mutes.hosts and self.nat.hold_back(data, now):
                return []
            out: list[tuple[str, bytes]] = []
            self._slow(iface, data, now, out)
            return out
        except Exception as exc:  # never let one packet take the router down
            return self._refused(exc)

    @property
    def mute_serial(self) -> int:
        """Moves whenever ``mute_rows`` changed (the flow cache watches it)."""
        return self.nat.mutes.serial

    def mute_rows(self) -> list[tuple[bytes, float, float, float]]:
        """The LAN hosts over their mapping rate: (address, until, rate, burst) of the budget of
        flow-opening packets the flow cache lets through to the engine."""
        return self.nat.mutes.rows()

    def count_policed(self, rows: list[tuple[bytes, int]], now: float | None = None) -> None:
        """Flow-opening packets of hosts over their rate that the flow cache dropped (address, n)."""
        if now is None:
            now = self.nat.now
        for ip, n in rows:
            self.nat.policed(int.from_bytes(ip, "big"), n, now)

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
        full = self.full
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
                self.count("rx_super_packets")
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
            if self.police_openers and iface == LAN and self.nat.mutes.hosts and self.nat.hold_back(data, now):
                return []
            # The full path works on ordinary packets: finish the checksum here (what the
            # kernel would do for a device without offload) and, for a super-packet, make it
            # partial again on the way out.
            pkt = bytearray(data)
            if partial:
                vnet.complete_checksum(pkt, ihl, coff, proto == UDP)
            out: list[tuple[str, bytes]] = []
            full.vpkt = pkt
            full.vseg = seg
            full.vsent = []
            try:
                full.run(iface, pkt, now, out)
            finally:
                full.vpkt = None
                full.vseg = 0
            sent, full.vsent = full.vsent, []
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
        self.ctr.forwarded(slot(iface, proto), slot(oif, proto), nseg - 1, 0)
        self.count("rx_super_segments", nseg)

    def fast_entry(self, iface: str, packet: bytes | bytearray) -> FastEntry | None:
        """What the fast path does to the flow of ``packet`` (which arrived on ``iface``), for the
        data plane's flow cache; see :meth:`FastPath.entry`."""
        return self.fast.entry(iface, packet)

    # ------------------------------------------------------------------ expiry
    def expire(self, now: float, budget: int | None = None) -> bool:
        """Remove what timed out: at most ``budget`` sessions in this call (None: all of them).

        Returns whether timed-out sessions are left for another call. The data plane calls
        again in its next loop iteration, so that a mass expiry (a flood's sessions timing out
        in the same second: about 7 µs each) never stops the packets in flight for seconds.
        A session left for later that gets a packet meanwhile stays (filed again)."""
        t = self.nat
        due = self._due
        if not due:
            due = self._due = t.due(now)
        if budget is None or budget >= len(due):
            batch, self._due = due, []
        else:
            batch = due[-budget:]
            del due[-budget:]
        for s in batch:
            if s.dead:  # filed twice (its timeout was shortened): already gone
                continue
            if t.refreshed(s, now):
                continue
            reason = t.expire_reason(s)
            self.event("debug", "entry_expired", proto=PROTO_NAMES.get(s.m.proto, s.m.proto),
                       lan=f"{ip_str(s.m.lan_ip)}:{s.m.lan_port}", wan_port=s.m.wan_port, reason=reason)
            t.remove(s, reason)
            self.count("expired")
        self.defrag.expire(now)
        t.mutes.prune(now)
        for h in self.helpers:
            h.expire(now)
        self.forwarders.expire(now)
        self.pcp.expire(now)
        self.full.expire_resets(now)
        if self._due:
            self.count("expiry_deferred")
        return bool(self._due)

    # ------------------------------------------------------ packets of our own
    def start(self, now: float) -> list[tuple[str, bytes]]:
        """The data plane started: the mapping epoch begins (unless a restored state set it) and
        the PCP/NAT-PMP announcements are scheduled; returns the packets due now."""
        self.nat.mapping_epoch(now)
        self.pcp.start_announcing(now, "start")
        return self.tick(now)

    @property
    def next_tick(self) -> float | None:
        """When ``tick`` next has packets to send (None: nothing scheduled)."""
        return self.pcp.next_announcement if self.pcp.enabled else None

    def tick(self, now: float) -> list[tuple[str, bytes]]:
        """Packets the engine sends of its own accord that are due now: the announcements to
        224.0.0.1:5350 on the LAN, through the output chain like any packet."""
        out: list[tuple[str, bytes]] = []
        if not self.pcp.enabled:
            return out
        lan_ip = self.routes.lan_ip
        for payload in self.pcp.announcements(now):
            pkt = pcpwire.build_udp(lan_ip, pcpwire.ALL_HOSTS, pcpwire.SERVER_PORT, pcpwire.CLIENT_PORT, payload,
                                    ttl=1)
            self.full.output(LAN, pkt, 20, out, [], None, False)
        return out

    # ---------------------------------------------------------------- listing
    @staticmethod
    def session_row(s: Session, now: float | None = None) -> dict[str, Any]:
        """One session as ``masqd table`` shows it (with its counters under accounting)."""
        m = s.m
        left = s.expires - now if now is not None else s.tmo
        row = {
            "proto": PROTO_NAMES.get(m.proto, str(m.proto)),
            "lan": f"{ip_str(m.lan_ip)}:{m.lan_port}",
            "wan": f"{ip_str(m.wan_ip)}:{m.wan_port}",
            "remote": f"{ip_str(s.rem_ip)}:{s.rem_port}",
            "state": state_name(s),
            "expires_in": round(max(0.0, left), 1),
            "inbound": s.inbound,
            "helper": s.helper.name if s.helper is not None else "",
        }
        if type(s) is not Session:
            row.update(acct_row(s))
        return row

    def entry_row(self, entry: Any, now: float | None = None) -> dict[str, Any] | None:
        """Any entry of a :class:`~masqd.engine.table.Change` (a session or a helper's entry) as a
        row of ``masqd table``; None for an entry nobody here knows."""
        if isinstance(entry, Session):
            return self.session_row(entry, now)
        t = now if now is not None else self.icmp.last
        if isinstance(entry, Lease):
            return self.pcp.row(entry, t)
        for h in self.helpers:
            row = h.row(entry, t)
            if row is not None:
                return row
        return None

    def table(self, now: float | None = None) -> list[dict[str, Any]]:
        """Snapshot of the masquerade entries, one dict per entry (``masqd table``)."""
        row = self.session_row
        rows: list[dict[str, Any]] = [row(s, now) for s in self.nat]
        for h in self.helpers:
            rows.extend(h.entries(now if now is not None else 0.0))
        rows.extend(self.forwarders.entries(now if now is not None else 0.0))
        rows.extend(self.pcp.entries(now if now is not None else self.icmp.last))
        return rows

    def table_summary(self) -> dict[tuple[str, str], int]:
        """(protocol, state) -> number of entries, without building the table (for metrics)."""
        out: dict[tuple[str, str], int] = {}
        for proto, tbl in self.nat.out.items():
            pname = PROTO_NAMES.get(proto, str(proto))
            for s, n in Counter(state_name(s) for s in tbl.values()).items():
                key = (pname, s.lower())
                out[key] = out.get(key, 0) + n
        now = self.icmp.last
        for e in ([e for h in self.helpers for e in h.entries(now)] + self.forwarders.entries(now)
                  + self.pcp.entries(now)):
            key = (str(e.get("proto", "unknown")).lower(), str(e.get("state", "") or "none").lower())
            out[key] = out.get(key, 0) + 1
        return out

    def sessions(self) -> list[Session]:
        return self.nat.sessions()

    def flush(self, proto: int | None = None, lan_ip: int | None = None) -> int:
        """Remove entries (all, or those matching); returns how many."""
        n = 0
        for s in self.nat.sessions():
            if proto is not None and s.m.proto != proto:
                continue
            if lan_ip is not None and s.m.lan_ip != lan_ip:
                continue
            self.nat.remove(s, FLUSH)
            n += 1
        if proto is None and lan_ip is None:
            for h in self.helpers:
                n += h.flush()
        self.count("flushed", n)
        return n

    # ------------------------------------------------------- dynamic address
    def set_wan_address(self, addr: ipaddress.IPv4Interface, now: float) -> list[tuple[str, bytes]]:
        """The WAN address changed (ip_dynaddr). Returns packets to send: the first PCP/NAT-PMP
        announcement of the new address (TCP resets towards the LAN go out when the LAN host
        next sends on a closed session)."""
        old = self.nat.wan_ip
        self.wan_if = addr
        self.routes.set_wan(addr)
        self.nat.set_wan(int(addr.ip))
        new = self.nat.wan_ip
        if old == new:
            return []
        mode = self.cfg.wan.dynaddr_mode
        self.count("wan_address_changes")
        self.event("info", "wan_address_changed", old=ip_str(old), new=ip_str(new), mode=mode)
        self.full.wan_changed(old, new, mode, now)
        for h in self.helpers:
            h.wan_changed(old, new, mode, now)
        self.forwarders.wan_changed(old, new, mode, now)
        self.pcp.wan_changed(old, new, mode, now)
        return self.tick(now)
