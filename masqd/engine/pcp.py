"""The PCP (RFC 6887) and NAT-PMP (RFC 6886) server on the LAN address, and its announcements.

masqd's LAN address lives in the engine, not on a kernel device, so the server
is a local service of the engine, sans-IO like the rest: the full path hands it
the UDP payloads that LAN hosts send to the LAN address, port 5351
(:meth:`PcpServer.request`), and it returns the answers. Both protocols share
the port (RFC 6887 appendix A): version 0 is NAT-PMP, version 2 PCP, any other
gets UNSUPP_VERSION.

What it serves:

- the external address (NAT-PMP opcode 0);
- MAP (PCP) and NAT-PMP TCP/UDP mappings: a *lease* in the NAT table
  (:meth:`NatTable.lease <masqd.engine.table.NatTable.lease>`), an inbound
  forwarder with a lifetime: the port pool decides its WAN port (never one a
  configured forwarder or a live mapping holds), new inbound connections
  through it obey the input and forward chains (the full path), it shows in the
  table and in ``masqd rules list``, and it ends with its lifetime, on delete,
  or as ``wan.dynaddr_mode`` says when the WAN address changes;
- PEER: creates (or finds) the session of an internal endpoint with a remote
  peer and keeps it at least for the granted lifetime;
- ANNOUNCE requests, and unsolicited announcements (a NAT-PMP external address
  response and a PCP ANNOUNCE to 224.0.0.1:5350, ten times, the interval from
  250 ms doubling: RFC 6886 section 3.2.1, RFC 6887 section 14.1) after a start
  and after a WAN address change, returned by :meth:`announcements` when due;
- masqd's own SPI_ANNOUNCE opcode (docs/pcp.md): a masqueraded IPsec host
  tells which SPI pair it uses with a remote gateway; the engine's
  ``announce_sa`` hands it to the IPsec helper, which pairs the ESP entry at
  once (and releases the inbound ESP it held for that SPI).

Security (RFC 6887 section 18, RFC 6886 section 3.2): off unless
``[pcp] enabled``; requests only from the LAN side (the caller checks the
interface and source), only for the sender's own address (PCP Client's IP
Address must be the source: ADDRESS_MISMATCH; THIRD_PARTY only from the hosts
in ``pcp.third_party``, only for LAN addresses); per-host request rate (token
bucket) and mapping count; lifetimes bounded by ``min_lifetime`` /
``max_lifetime``; external ports inside ``pcp.ports``. Every refusal is
answered with the RFC's result code (unless the RFC says to stay silent) and
counted: ``pcp_refused_<result>`` / ``natpmp_refused_<result>``, silent drops
as ``drop_pcp_<reason>``.

The epoch (seconds since the mapping state began) is the NAT table's
(``NatTable.mapping_epoch``), so a state file can keep it across a restart.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from masqd.engine.nat import S_UNREPLIED, T_NEW, Lease
from masqd.engine.table import ADDRESS_CHANGE, DELETED, FLUSH, TIMEOUT, UPDATE
from masqd.wire import pcp as w
from masqd.wire.ipv4 import PROTO_NAMES, TCP, UDP, ip_str

if TYPE_CHECKING:
    from masqd.config import Config
    from masqd.engine.counters import Counters
    from masqd.engine.nat import Session
    from masqd.engine.routing import Routes
    from masqd.engine.table import NatTable

# announce_sa(lan, remote, spi_out, spi_in, withdraw, now) -> (status, inbound packets to deliver)
SaHook = Callable[[int, int, int, int, bool, float], tuple[str, list[bytearray]]]

# seconds after the start (or a WAN address change) at which the announcements go out
ANNOUNCE_AT = tuple(0.25 * (2 ** i - 1) for i in range(10))
HOSTS_MAX = 65536  # per-host request state kept at most (the LAN is a /8 at worst)
MAX_FILTERS = 4  # PCP FILTER options per mapping
ESP = 50

_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_NATPMP_MAP = struct.Struct("!BBHHHI")


class _Host:
    """Request accounting of one LAN host: token bucket, quiet time for error answers, leases."""

    __slots__ = ("tokens", "last", "quiet", "leases")

    def __init__(self, burst: float, now: float) -> None:
        self.tokens = burst
        self.last = now
        self.quiet = 0.0
        self.leases = 0


class _Refused(Exception):
    """A PCP request refused with ``result`` (``why`` says which check, for the log)."""

    def __init__(self, result: int, why: str) -> None:
        super().__init__(why)
        self.result = result
        self.why = why


class _Options:
    """The options of one PCP request, validated (RFC 6887 sections 7.3, 13)."""

    __slots__ = ("third_party", "prefer_failure", "filters", "echo")

    def __init__(self) -> None:
        self.third_party: int | None = None
        self.prefer_failure = False
        self.filters: list[tuple[int, int, int]] | None = None  # None: no FILTER option
        self.echo = bytearray()  # the processed options, as they go back in a success response


class PcpServer:
    """See the module docstring. ``configure`` follows the configuration (and reloads)."""

    def __init__(self, table: NatTable, counters: Counters, routes: Routes, announce_sa: SaHook) -> None:
        self.t = table
        self.ctr = counters
        self.routes = routes
        self.announce_sa = announce_sa
        self.hosts: dict[int, _Host] = {}
        self._ann: list[float] = []  # times the next announcements are due
        self._quiet: dict[tuple[str, int], float] = {}
        # set by the full path: attach a protocol helper to a session PEER made (PPTP control)
        self.session_made: Callable[[Session, float], None] = lambda s, now: None
        self.enabled = False

    def configure(self, cfg: Config) -> None:
        p = cfg.pcp
        self.enabled = p.enabled
        self.min_lifetime = p.min_lifetime
        self.max_lifetime = p.max_lifetime
        self.max_per_host = p.max_mappings_per_host
        self.rate = p.requests_per_second
        self.burst = float(p.request_burst)
        self.third_party = frozenset(int(a) for a in p.third_party)
        self.ports = (p.ports[0], p.ports[1])
        self.spi_announce = p.spi_announce and cfg.ipsec.enabled
        self.spi_lifetime = int(cfg.ipsec.table_lifetime)

    # ------------------------------------------------------------- helpers
    def _count(self, name: str, n: int = 1) -> None:
        self.ctr.count(name, n)

    def _event(self, level: str, name: str, key: int, now: float, **kw: Any) -> None:
        """A request-driven event, at most once per second per (event, host)."""
        k = (name, key)
        last = self._quiet.get(k)
        if last is not None and now - last < 1.0:
            return
        if len(self._quiet) > 4096:
            self._quiet.clear()
        self._quiet[k] = now
        self.ctr.event(level, name, **kw)

    def epoch(self, now: float) -> int:
        return self.t.mapping_epoch(now)

    def _lifetime(self, requested: int) -> int:
        return int(min(max(requested, self.min_lifetime), self.max_lifetime))

    def _lan_side(self, addr: int) -> bool:
        """A unicast address on the LAN side (not masqd's own)."""
        return (addr != self.routes.lan_ip and 0 < addr < 0xE0000000 and addr >> 24 != 127
                and self.routes.route(addr) == "lan")

    def _host(self, src: int, now: float) -> _Host | None:
        h = self.hosts.get(src)
        if h is None:
            if len(self.hosts) >= HOSTS_MAX:
                self._prune_hosts(now)
                if len(self.hosts) >= HOSTS_MAX:
                    return None
            h = self.hosts[src] = _Host(self.burst, now)
        return h

    def _prune_hosts(self, now: float) -> None:
        """Forget hosts with no lease whose bucket has refilled."""
        for a, h in list(self.hosts.items()):
            if not h.leases and h.tokens + (now - h.last) * self.rate >= self.burst:
                del self.hosts[a]

    def _admit(self, h: _Host, now: float) -> bool:
        """Take a token from the host's bucket (``rate`` per second, ``burst`` at most)."""
        h.tokens = min(self.burst, h.tokens + (now - h.last) * self.rate)
        h.last = now
        if h.tokens < 1.0:
            return False
        h.tokens -= 1.0
        return True

    def adopt(self, ls: Lease) -> None:
        """A lease restored from a record (state file, sync): counted as its host's."""
        self._leased(ls)

    def end(self, ls: Lease, reason: str) -> None:
        """End a lease from outside (a destroy from the active of a pair)."""
        self._end(ls, reason)

    def _leased(self, ls: Lease) -> None:
        h = self.hosts.get(ls.m.lan_ip)
        if h is None:
            h = self.hosts[ls.m.lan_ip] = _Host(self.burst, ls.created)
        h.leases += 1
        self._count("pcp_mappings_created")
        self.ctr.event("info", "pcp_mapping_created", proto=PROTO_NAMES[ls.m.proto],
                       lan=f"{ip_str(ls.m.lan_ip)}:{ls.m.lan_port}", wan=f"{ip_str(ls.m.wan_ip)}:{ls.m.wan_port}",
                       lifetime=int(ls.lifetime), client=ip_str(ls.client),
                       protocol="pcp" if ls.nonce is not None else "nat-pmp")

    def _end(self, ls: Lease, reason: str) -> None:
        if ls.dead:
            return
        h = self.hosts.get(ls.m.lan_ip)
        if h is not None and h.leases:
            h.leases -= 1
        self.t.end_lease(ls, reason)
        self._count({TIMEOUT: "pcp_mappings_expired", DELETED: "pcp_mappings_deleted",
                     ADDRESS_CHANGE: "pcp_mappings_address_change"}.get(reason, "pcp_mappings_flushed"))
        self.ctr.event("info", "pcp_mapping_removed", proto=PROTO_NAMES[ls.m.proto],
                       lan=f"{ip_str(ls.m.lan_ip)}:{ls.m.lan_port}", wan_port=ls.m.wan_port, reason=reason,
                       connections=ls.hits)

    # -------------------------------------------------------------- requests
    def request(self, src: int, data: bytes | bytearray, now: float) -> tuple[list[bytes], list[bytearray]]:
        """One request from LAN host ``src``: (answers to send back to it, inbound packets
        that an SPI announcement released for the LAN)."""
        if len(data) < 2:
            self.ctr.drop("pcp_runt")
            return [], []
        version, op = data[0], data[1]
        if version == w.NATPMP_VERSION and op >= 128 or version != w.NATPMP_VERSION and op & 0x80:
            self.ctr.drop("pcp_not_a_request")  # a response (R bit): silently dropped
            return [], []
        h = self._host(src, now)
        if h is None:
            self.ctr.drop("pcp_hosts_full")
            return [], []
        if not self._admit(h, now):
            self.ctr.count("pcp_rate_limited")
            if now < h.quiet:
                self.ctr.drop("pcp_rate_limited")
                return [], []
            h.quiet = now + 1.0  # one refusal per second; the rest dropped
            self._event("info", "pcp_rate_limited", src, now, host=ip_str(src), rate=self.rate)
            if version == w.NATPMP_VERSION:
                self._natpmp_refused(w.NATPMP_NO_RESOURCES, "rate", src, now)
                return [w.natpmp_error(op, w.NATPMP_NO_RESOURCES, self.epoch(now))], []
            return [bytes(self._refuse(data, w.NO_RESOURCES, "rate", src, now))], []
        if version == w.NATPMP_VERSION:
            self._count("pcp_requests_natpmp")
            out = self._natpmp(src, data, now)
            return ([out] if out is not None else []), []
        self._count("pcp_requests_pcp")
        extra: list[bytearray] = []
        try:
            resp = self._pcp(src, data, now, extra)
        except _Refused as r:
            resp = self._refuse(data, r.result, r.why, src, now)
        return [bytes(resp)], extra

    def _refuse(self, data: bytes | bytearray, result: int, why: str, src: int, now: float) -> bytearray:
        """An error response (RFC 6887 section 8.3: the request copied, the server's fields set)."""
        name = w.RESULT_NAMES.get(result, str(result))
        self._count(f"pcp_refused_{name}")
        self._event("info", "pcp_refused", src * 16 + result, now, host=ip_str(src), result=name,
                    opcode=data[1] & 0x7F if len(data) > 1 else None, reason=why)
        life = w.SHORT_ERROR_LIFETIME if result in w.SHORT_ERRORS else w.LONG_ERROR_LIFETIME
        return w.pcp_response(data, result, life, self.epoch(now),
                              w.PCP_VERSION if result == w.UNSUPP_VERSION else data[0])

    def _natpmp_refused(self, result: int, why: str, src: int, now: float) -> None:
        name = w.NATPMP_RESULT_NAMES.get(result, str(result))
        self._count(f"natpmp_refused_{name}")
        self._event("info", "natpmp_refused", src * 16 + result, now, host=ip_str(src), result=name, reason=why)

    # -------------------------------------------------------------- NAT-PMP
    def _natpmp(self, src: int, data: bytes | bytearray, now: float) -> bytes | None:
        op = data[1]
        epoch = self.epoch(now)
        wan = self.t.wan_ip
        if op == w.NATPMP_OP_ADDRESS:
            if not wan:
                self._natpmp_refused(w.NATPMP_NETWORK_FAILURE, "no WAN address", src, now)
                return w.natpmp_address(w.NATPMP_NETWORK_FAILURE, epoch, 0)
            self._count("natpmp_address")
            return w.natpmp_address(w.NATPMP_SUCCESS, epoch, wan)
        if op not in (w.NATPMP_OP_MAP_UDP, w.NATPMP_OP_MAP_TCP):
            self._natpmp_refused(w.NATPMP_UNSUPP_OPCODE, f"opcode {op}", src, now)
            return w.natpmp_error(op, w.NATPMP_UNSUPP_OPCODE, epoch)
        if len(data) < 12:
            self.ctr.drop("pcp_natpmp_truncated")  # RFC 6886 has no code for it: no answer
            return None
        _v, _op, _res, internal, suggested, requested = _NATPMP_MAP.unpack_from(data, 0)
        proto = UDP if op == w.NATPMP_OP_MAP_UDP else TCP

        def answer(result: int, external: int = 0, lifetime: int = 0, why: str = "") -> bytes:
            if result != w.NATPMP_SUCCESS:
                self._natpmp_refused(result, why, src, now)
            return w.natpmp_map(op, result, epoch, internal, external, lifetime)

        if requested == 0:  # delete one mapping, or all of the host's (internal port 0)
            gone = [ls for ls in list(self.t.leases.values()) if ls.m.lan_ip == src and ls.m.proto == proto
                    and ls.nonce is None and (internal == 0 or ls.m.lan_port == internal)]
            other = self.t.leases.get((proto, src, internal))
            if internal and other is not None and other.nonce is not None:
                return answer(w.NATPMP_NOT_AUTHORIZED, why="a PCP mapping (nonce) holds the port")
            for ls in gone:
                self._end(ls, DELETED)
            return answer(w.NATPMP_SUCCESS)
        if internal == 0:
            return answer(w.NATPMP_NOT_AUTHORIZED, why="internal port 0 (all ports) cannot be mapped")
        if not wan:
            return answer(w.NATPMP_NETWORK_FAILURE, why="no WAN address")
        life = self._lifetime(requested)
        cur = self.t.leases.get((proto, src, internal))
        if cur is not None:
            if cur.nonce is not None:
                return answer(w.NATPMP_NOT_AUTHORIZED, why="a PCP mapping (nonce) holds the port")
            self.t.renew_lease(cur, now, life)
            self._count("pcp_mappings_renewed")
            return answer(w.NATPMP_SUCCESS, cur.m.wan_port, life)
        h = self.hosts.get(src)
        if h is not None and h.leases >= self.max_per_host:
            return answer(w.NATPMP_NO_RESOURCES, why=f"{self.max_per_host} mappings per host")
        got = self.t.lease(proto, src, internal, suggested or internal, self.ports, False, None, src, now, life)
        if isinstance(got, str):
            if got == "forwarded":
                return answer(w.NATPMP_NOT_AUTHORIZED, why="a configured port forward's server endpoint")
            return answer(w.NATPMP_NO_RESOURCES, why=got)
        self._leased(got)
        return answer(w.NATPMP_SUCCESS, got.m.wan_port, life)

    # ------------------------------------------------------------------ PCP
    def _pcp(self, src: int, data: bytes | bytearray, now: float, extra: list[bytearray]) -> bytearray:
        n = len(data)
        if data[0] != w.PCP_VERSION:
            raise _Refused(w.UNSUPP_VERSION, f"version {data[0]}")
        if n < w.HEADER or n > w.MAX_PCP or n % 4:
            raise _Refused(w.MALFORMED_REQUEST, f"length {n}")
        if w.from_v4mapped(data[8:24]) != src:
            raise _Refused(w.ADDRESS_MISMATCH, "PCP Client's IP Address is not the source address")
        op = data[1] & 0x7F
        size = {w.OP_ANNOUNCE: 0, w.OP_MAP: w.MAP_DATA, w.OP_PEER: w.PEER_DATA}.get(op)
        if op == w.OP_SPI_ANNOUNCE and self.spi_announce:
            size = w.SPI_DATA
        if size is None:
            raise _Refused(w.UNSUPP_OPCODE, f"opcode {op}")
        if n < w.HEADER + size:
            raise _Refused(w.MALFORMED_REQUEST, f"opcode {op} needs {w.HEADER + size} octets, got {n}")
        opts = self._options(data, w.HEADER + size, op)
        requested = _U32.unpack_from(data, 4)[0]
        if op == w.OP_ANNOUNCE:
            self._count("pcp_announce_requests")
            return w.pcp_response(data, w.SUCCESS, 0, self.epoch(now), length=w.HEADER)
        if op == w.OP_MAP:
            return self._map(src, data, requested, opts, now)
        if op == w.OP_PEER:
            return self._peer(src, data, requested, opts, now)
        return self._spi(src, data, requested, opts, now, extra)

    def _options(self, data: bytes | bytearray, i: int, op: int) -> _Options:
        o = _Options()
        n = len(data)
        while i < n:
            if n - i < 4:
                raise _Refused(w.MALFORMED_OPTION, "option header cut short")
            code, length = data[i], _U16.unpack_from(data, i + 2)[0]
            end = i + 4 + ((length + 3) & ~3)
            if end > n:
                raise _Refused(w.MALFORMED_OPTION, f"option {code} longer than the packet")
            body = data[i + 4: i + 4 + length]
            if code == w.OPT_THIRD_PARTY:
                if op not in (w.OP_MAP, w.OP_PEER, w.OP_SPI_ANNOUNCE) or length != 16 or o.third_party is not None:
                    raise _Refused(w.MALFORMED_OPTION, "THIRD_PARTY: wrong opcode, length or repeated")
                addr = w.from_v4mapped(body)
                if addr is None:
                    raise _Refused(w.MALFORMED_OPTION, "THIRD_PARTY: not an IPv4 address")
                o.third_party = addr
            elif code == w.OPT_PREFER_FAILURE:
                if op != w.OP_MAP or length != 0 or o.prefer_failure:
                    raise _Refused(w.MALFORMED_OPTION, "PREFER_FAILURE: wrong opcode, length or repeated")
                o.prefer_failure = True
            elif code == w.OPT_FILTER:
                if op != w.OP_MAP or length != 20:
                    raise _Refused(w.MALFORMED_OPTION, "FILTER: wrong opcode or length")
                plen, port = body[1], _U16.unpack_from(body, 2)[0]
                addr = w.from_v4mapped(body[4:20])
                if o.filters is None:
                    o.filters = []
                if plen == 0:  # "remove all filters" (RFC 6887 section 13.3)
                    o.filters.clear()
                elif addr is None or not 96 <= plen <= 128:
                    raise _Refused(w.MALFORMED_OPTION, "FILTER: not an IPv4 prefix")
                else:
                    mask = (0xFFFFFFFF << (128 - plen)) & 0xFFFFFFFF
                    o.filters.append((addr & mask, mask, port))
                    if len(o.filters) > MAX_FILTERS:
                        raise _Refused(w.EXCESSIVE_REMOTE_PEERS, f"more than {MAX_FILTERS} FILTER options")
            elif code < 128:
                raise _Refused(w.UNSUPP_OPTION, f"mandatory option {code}")
            else:
                i = end  # an optional option the server does not know: ignored, not echoed
                continue
            o.echo += data[i:end]
            i = end
        return o

    def _internal(self, src: int, opts: _Options) -> int:
        """The internal address a MAP or PEER is for: the sender's, or a THIRD_PARTY's."""
        tp = opts.third_party
        if tp is None:
            return src
        if tp == src:
            raise _Refused(w.MALFORMED_REQUEST, "THIRD_PARTY names the sender itself")
        if src not in self.third_party:
            raise _Refused(w.NOT_AUTHORIZED, "THIRD_PARTY from a host not in pcp.third_party")
        if not self._lan_side(tp):
            raise _Refused(w.NOT_AUTHORIZED, "THIRD_PARTY for an address outside the LAN")
        return tp

    def _authorized(self, src: int, ls: Lease, nonce: bytes) -> None:
        if ls.nonce is None:
            raise _Refused(w.NOT_AUTHORIZED, "a NAT-PMP mapping holds the endpoint")
        if ls.nonce != nonce:
            raise _Refused(w.NOT_AUTHORIZED, "mapping nonce does not match")

    def _map(self, src: int, data: bytes | bytearray, requested: int, opts: _Options, now: float) -> bytearray:
        nonce = bytes(data[24:36])
        proto = data[36]
        internal = _U16.unpack_from(data, 40)[0]
        suggested = _U16.unpack_from(data, 42)[0]
        sugg_addr = data[44:60]
        lan = self._internal(src, opts)
        if proto == 0 and internal:
            raise _Refused(w.MALFORMED_REQUEST, "protocol 0 (all) with an internal port")
        if opts.prefer_failure and not suggested and w.is_unspecified(sugg_addr):
            raise _Refused(w.MALFORMED_OPTION, "PREFER_FAILURE without a suggested port or address")
        wan = self.t.wan_ip
        if requested == 0:  # delete
            if proto not in (0, TCP, UDP):
                raise _Refused(w.UNSUPP_PROTOCOL, f"protocol {proto}")
            gone = [ls for ls in self.t.leases.values() if ls.m.lan_ip == lan and (proto == 0 or ls.m.proto == proto)
                    and (internal == 0 or ls.m.lan_port == internal)]
            for ls in gone:
                if internal:
                    self._authorized(src, ls, nonce)
            port = 0
            for ls in gone:
                if ls.nonce == nonce:
                    port = ls.m.wan_port
                    self._end(ls, DELETED)
            return self._map_answer(data, w.SUCCESS, 0, now, proto, internal, port, wan, opts)
        if proto not in (TCP, UDP):
            raise _Refused(w.UNSUPP_PROTOCOL, f"protocol {proto}: masqd maps TCP and UDP")
        if not internal:
            raise _Refused(w.MALFORMED_REQUEST, "internal port 0 (all ports) with a lifetime")
        if not wan:
            raise _Refused(w.NETWORK_FAILURE, "no WAN address")
        if not w.is_unspecified(sugg_addr) and w.from_v4mapped(sugg_addr) != wan and opts.prefer_failure:
            raise _Refused(w.CANNOT_PROVIDE_EXTERNAL, "suggested external address is not the WAN address")
        life = self._lifetime(requested)
        cur = self.t.leases.get((proto, lan, internal))
        if cur is not None:
            self._authorized(src, cur, nonce)
            if opts.prefer_failure and suggested and suggested != cur.m.wan_port:
                raise _Refused(w.CANNOT_PROVIDE_EXTERNAL, "the mapping has another external port")
            self.t.renew_lease(cur, now, life)
            if opts.filters is not None:
                cur.filters = tuple(opts.filters)
            self._count("pcp_mappings_renewed")
            ls = cur
        else:
            h = self.hosts.get(lan)
            if h is not None and h.leases >= self.max_per_host:
                raise _Refused(w.USER_EX_QUOTA, f"{self.max_per_host} mappings per host")
            # no suggestion: the internal port, when free (port preservation)
            got = self.t.lease(proto, lan, internal, suggested or internal, self.ports,
                               opts.prefer_failure and suggested != 0, nonce, src, now, life)
            if isinstance(got, str):
                raise _Refused({"forwarded": w.NOT_AUTHORIZED, "port-busy": w.CANNOT_PROVIDE_EXTERNAL}.get(
                    got, w.NO_RESOURCES), got)
            ls = got
            if opts.filters:
                ls.filters = tuple(opts.filters)
            self._leased(ls)
        return self._map_answer(data, w.SUCCESS, life, now, proto, internal, ls.m.wan_port, ls.m.wan_ip, opts)

    def _map_answer(self, data: bytes | bytearray, result: int, life: int, now: float, proto: int, internal: int,
                    port: int, addr: int, opts: _Options) -> bytearray:
        out = w.pcp_response(data, result, life, self.epoch(now), length=w.HEADER + w.MAP_DATA)
        out[36] = proto
        out[37:40] = b"\0\0\0"
        _U16.pack_into(out, 40, internal)
        _U16.pack_into(out, 42, port)
        out[44:60] = w.v4mapped(addr)
        out += opts.echo
        return out

    def _peer(self, src: int, data: bytes | bytearray, requested: int, opts: _Options, now: float) -> bytearray:
        proto = data[36]
        internal = _U16.unpack_from(data, 40)[0]
        rport = _U16.unpack_from(data, 60)[0]
        rem = w.from_v4mapped(data[64:80])
        lan = self._internal(src, opts)
        if proto not in (TCP, UDP):
            raise _Refused(w.UNSUPP_PROTOCOL, f"protocol {proto}: masqd maps TCP and UDP")
        if not internal or not rport:
            raise _Refused(w.MALFORMED_REQUEST, "PEER needs the internal and the remote peer port")
        if rem is None:
            raise _Refused(w.MALFORMED_REQUEST, "remote peer is not an IPv4 address")
        if (rem == 0 or rem >= 0xE0000000 or rem >> 24 == 127 or rem == self.t.wan_ip
                or self.routes.route(rem) != "wan"):
            raise _Refused(w.NOT_AUTHORIZED, "remote peer is not an address on the WAN side")
        if not self.t.wan_ip:
            raise _Refused(w.NETWORK_FAILURE, "no WAN address")
        t = self.t
        key = lan.to_bytes(4, "big") + rem.to_bytes(4, "big") + internal.to_bytes(2, "big") + rport.to_bytes(2, "big")
        s = t.out[proto].get(key)
        if requested == 0:
            port = 0
            if s is not None:
                t.hold_session(s, 0.0)
                port = s.m.wan_port
            return self._peer_answer(data, 0, now, port, opts)
        life = self._lifetime(requested)
        if s is None:
            m = t.new_mapping(proto, lan, internal, now)
            if m is None:
                raise _Refused(w.NO_RESOURCES, "port pool exhausted")
            s = t.new_session(m, rem, rport, now, T_NEW if proto == TCP else S_UNREPLIED)
            if s is None:
                if m.empty() and not m.static:
                    t.drop_mapping(m)
                raise _Refused(w.NO_RESOURCES, "table full")
            self.session_made(s, now)
            self._count("pcp_peer_created")
        else:
            self._count("pcp_peer_extended")
        t.hold_session(s, now + life)
        self.ctr.event("debug", "pcp_peer", proto=PROTO_NAMES[proto], lan=f"{ip_str(lan)}:{internal}",
                       wan=f"{ip_str(s.m.wan_ip)}:{s.m.wan_port}", remote=f"{ip_str(rem)}:{rport}", lifetime=life)
        return self._peer_answer(data, life, now, s.m.wan_port, opts)

    def _peer_answer(self, data: bytes | bytearray, life: int, now: float, port: int, opts: _Options) -> bytearray:
        out = w.pcp_response(data, w.SUCCESS, life, self.epoch(now), length=w.HEADER + w.PEER_DATA)
        out[37:40] = b"\0\0\0"
        _U16.pack_into(out, 42, port)
        out[44:60] = w.v4mapped(self.t.wan_ip)
        out[62:64] = b"\0\0"
        out += opts.echo
        return out

    # --------------------------------------------------- SPI announcement
    def _spi(self, src: int, data: bytes | bytearray, requested: int, opts: _Options, now: float,
             extra: list[bytearray]) -> bytearray:
        if opts.third_party is not None:
            self._count("spi_announce_refused_other_host")
            raise _Refused(w.NOT_AUTHORIZED, "an SPI announcement names another host (THIRD_PARTY)")
        proto = data[36]
        spi_out = _U32.unpack_from(data, 40)[0]
        spi_in = _U32.unpack_from(data, 44)[0]
        rem = w.from_v4mapped(data[48:64])
        if proto != ESP:
            raise _Refused(w.UNSUPP_PROTOCOL, f"protocol {proto}: SPI pairs are ESP's (50)")
        if spi_out < 256 or spi_in < 256:
            raise _Refused(w.MALFORMED_REQUEST, "SPI 0..255 is reserved (RFC 4303)")
        if rem is None or rem == 0 or rem >= 0xE0000000 or rem == self.t.wan_ip or self.routes.route(rem) != "wan":
            raise _Refused(w.MALFORMED_REQUEST, "the remote gateway is not an address on the WAN side")
        status, pkts = self.announce_sa(src, rem, spi_out, spi_in, requested == 0, now)
        if status == "taken":
            self._count("spi_announce_refused_taken")
            raise _Refused(w.NOT_AUTHORIZED, "the inbound SPI is paired to another host")
        if status == "full":
            self._count("spi_announce_refused_full")
            raise _Refused(w.NO_RESOURCES, "IPsec table full")
        if status != "ok":
            raise _Refused(w.UNSUPP_OPCODE, "IPsec masquerade is off")
        extra.extend(pkts)
        self._count("spi_withdrawn" if requested == 0 else "spi_announced")
        out = w.pcp_response(data, w.SUCCESS, 0 if requested == 0 else self.spi_lifetime, self.epoch(now),
                             length=w.HEADER + w.SPI_DATA)
        out += opts.echo
        return out

    # ------------------------------------------------------- announcements
    def start_announcing(self, now: float, why: str) -> None:
        """Schedule the unsolicited announcements (after a start or a WAN address change)."""
        if not self.enabled:
            self._ann = []
            return
        self._ann = [now + d for d in ANNOUNCE_AT]
        self.ctr.event("info", "pcp_announcing", reason=why, epoch=self.epoch(now),
                       external=ip_str(self.t.wan_ip))

    @property
    def next_announcement(self) -> float | None:
        return self._ann[0] if self._ann else None

    def announcements(self, now: float) -> list[bytes]:
        """The payloads to multicast to 224.0.0.1:5350 now (none when nothing is due; one set when
        several came due at once)."""
        if not self._ann or self._ann[0] > now:
            return []
        while self._ann and self._ann[0] <= now:
            self._ann.pop(0)
        epoch = self.epoch(now)
        self._count("pcp_announcements_sent")
        return [w.natpmp_address(w.NATPMP_SUCCESS, epoch, self.t.wan_ip), w.pcp_announce(epoch)]

    # ------------------------------------------------------------ lifecycle
    def expire(self, now: float) -> None:
        for ls in self.t.leases_due(now):
            self._end(ls, TIMEOUT)
        if len(self.hosts) > 1024:
            self._prune_hosts(now)

    def wan_changed(self, old: int, new: int, mode: str, now: float) -> None:
        """``flush``: the leases end and the epoch starts again (the state is lost); ``rewrite``
        and ``rewrite-all``: the leases follow the new address, like port forwards. Both
        protocols' clients hear of the new address from the announcements."""
        if mode == "flush":
            for ls in list(self.t.leases.values()):
                self._end(ls, ADDRESS_CHANGE)
            self.t.lost_mappings(now)
        else:
            for ls in self.t.leases.values():
                m = ls.m
                if m.wan_ip != new and m.empty():
                    m.set_wan(new, self.t.wan_ip_b if new == self.t.wan_ip else None)
                    self.t.emit(UPDATE, ls, ADDRESS_CHANGE)
        self.start_announcing(now, "wan-address-change")

    def disable(self) -> None:
        """PCP was turned off by a reload: the leases end."""
        for ls in list(self.t.leases.values()):
            self._end(ls, FLUSH)
        self._ann = []

    def entries(self, now: float) -> list[dict[str, Any]]:
        """The leases as ``masqd table`` rows."""
        return [self.row(ls, now) for ls in self.t.leases.values()]

    @staticmethod
    def row(ls: Lease, now: float) -> dict[str, Any]:
        """One lease as a ``masqd table`` row."""
        m = ls.m
        return {
            "proto": "pcp", "lan": f"{ip_str(m.lan_ip)}:{m.lan_port}", "wan": f"{ip_str(m.wan_ip)}:{m.wan_port}",
            "remote": PROTO_NAMES[m.proto], "state": "MAP" if ls.nonce is not None else "NAT-PMP",
            "hits": ls.hits, "client": ip_str(ls.client), "expires_in": round(max(0.0, ls.expires - now), 1),
        }

    def rule_rows(self, now: float) -> list[dict[str, Any]]:
        """The leases as ``masqd rules list`` rows (they are inbound forwarders, like portfw lines)."""
        rows: list[dict[str, Any]] = []
        for i, ls in enumerate(self.t.leases.values()):
            m = ls.m
            how = "PCP MAP" if ls.nonce is not None else "NAT-PMP"
            rows.append({
                "chain": "pcp", "num": i + 1, "pkts": None, "bytes": None, "connections": ls.hits,
                "rule": f"portfw {PROTO_NAMES[m.proto]} {ip_str(m.wan_ip)}:{m.wan_port} -> "
                        f"{ip_str(m.lan_ip)}:{m.lan_port} ({how} from {ip_str(ls.client)}, "
                        f"{round(max(0.0, ls.expires - now))} s left, {ls.hits} connections)",
                "origin": f"{how.lower()} {ip_str(ls.client)}",
            })
        return rows
