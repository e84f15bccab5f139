"""IPsec masquerade: ISAKMP/IKE (UDP 500 <-> 500) session tracking and ESP SPI-pair learning.

This is the Linux 2.2 "VPN masquerade" algorithm of the HOWTO (SPEC section 3),
sans-IO, with every constant from ``cfg.ipsec``.

ISAKMP / IKE (v1 and v2 alike: the same 8+8 byte cookie / SPI pair in the same
place). The source port stays 500 for every LAN host. An entry is keyed by
(remote, initiator cookie, responder cookie); a LAN host's initiation creates
it with responder cookie 0 (INIT, lifetime ``pending_lifetime``), the first
reply completes it (ESTABLISHED, lifetime ``table_lifetime``, refreshed by
traffic both ways, so re-keys on the same ISAKMP/IKE SA - IKEv1 quick mode,
IKEv2 CREATE_CHILD_SA - route by the known pair in both directions). While an
initiation is outstanding, another LAN host's initiation to the same remote
with the same initiator cookie would make the reply ambiguous: it is dropped
and counted (``isakmp_collisions``). A zero initiator cookie is refused.

Inbound ISAKMP with a pair the table does not know is an exchange the remote
started (a new initiator cookie, the remote's, and responder cookie 0 - e.g.
an IKEv1 phase-1 re-key started by the remote - or the new IKE SA after an
IKEv2 IKE SA re-key). The encrypted payload cannot tell whose it is; the
choice made here is to deliver it to the LAN host that most recently had
ISAKMP traffic with that remote (else the most recent ESP host), creating no
state: that host's answer creates the entry. With no candidate the packet is
not ours (port forwarding may want it). When UDP 500 is port-forwarded to a
LAN server (a VPN gateway on a private address), a new exchange (responder
cookie 0) goes to that server instead of being guessed: the configuration
says who answers unsolicited ISAKMP, even from a remote that a LAN client
also uses as its gateway (that client's own exchanges keep routing by their
cookies; a phase-1 re-key the remote starts for it then reaches the server
and fails, and the client re-keys as initiator).

ESP (SPEC section 3, rules 1-8). Outbound SPIs are seen in LAN traffic; the
inbound SPI is learned by serialising new outbound SAs per remote: an
unknown (LAN host, outbound SPI, remote) creates a PENDING entry; while it is
pending, other initial packets to that remote are blocked (``esp_blocked``) -
the first block marks the entry contended and from then on its own packets
count as retries (``esp_retries``); after ``pending_retries`` of them it is
SQUELCHED for ``squelch_time`` (its packets dropped, the remote open to the
next host: round-robin). The first inbound ESP from the remote with an SPI in
no entry is the reply: its SPI completes the pending entry (``esp_learned``).
Pending entries expire after ``pending_lifetime`` whatever their traffic;
paired ones after ``table_lifetime`` without traffic. When a host's new pair
is learned, its older pairs with the same remote are REPLACED: they keep
routing but only live ``pending_lifetime`` past their last packet (a re-key
replaces the SA; a still-used parallel SA keeps itself alive or relearns).
Inbound ESP with an unknown SPI and nothing pending is copied to the LAN
hosts that most recently re-keyed with the remote (ISAKMP entries with more
than ``guess_min_left`` seconds left, newest first, at most
``guess_max_hosts``), creating no entry (``esp_guessed``). Without
``parallel_sessions`` a second LAN host is refused while another host has an
entry with that remote. State per remote is bounded by
``max_spis_per_remote`` and the whole table by ``masquerade.max_entries``.

Known, documented mis-associations (HOWTO "Routage correct du trafic crypté
entrant"): a reply slower than the pending lifetime, or inbound traffic of an
expired idle pair, arriving while another host is pending, is paired with the
pending host. Recovery comes with the next re-key (fresh SPIs). Keep
``table_lifetime`` a little longer than the peers' re-key interval.

AH (protocol 51) authenticates the IP addresses, so it cannot survive
masquerade: it is refused both ways with a warning (``ah_refused``).

Established ESP takes a fast path (``fast_out`` / ``fast_in``, called by the
engine's fast path): one dict lookup keyed by the packet's bytes 12..24
(addresses + SPI), a precomputed checksum delta, and the firewall decision
cached on the entry by the full path.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any

from masqd.engine.counters import LAN_ESP, WAN_ESP
from masqd.engine.expiry import TimerWheel
from masqd.engine.fastpath import FastEntry, rewrite_dst, rewrite_src
from masqd.engine.helpers.base import Helper
from masqd.engine.nat import TTL_DELTA
from masqd.wire.checksum import addr_delta, apply_delta, apply_delta_udp
from masqd.wire.esp import esp_header, spi_reason
from masqd.wire.ipv4 import UDP, ip_str
from masqd.wire.isakmp import ZERO_COOKIE, isakmp_header

if TYPE_CHECKING:
    from masqd.config import Config
    from masqd.engine.api import EngineAPI

ESP, AH = 50, 51

# ESP entry states
PENDING, ESTABLISHED, SQUELCHED, REPLACED = 0, 1, 2, 3
ESP_STATE_NAMES = ("PENDING", "ESTABLISHED", "SQUELCHED", "REPLACED")

_pack_H = struct.Struct("!H").pack_into
_pack_H4s = struct.Struct("!H4s").pack_into


class EspEntry:
    """One outbound SPI of one LAN host towards one remote, and the inbound SPI paired with it."""

    __slots__ = ("lan_ip", "lan_b", "rem_ip", "rem_b", "wan_b", "spi_out", "spi_in", "state", "expires", "tmo",
                 "created", "contended", "retries", "fw", "dip_out", "dip_in", "da_out", "da_in", "out_key",
                 "in_key", "dead")

    def __init__(self, lan_ip: int, rem_ip: int, wan_ip: int, spi_out: int, now: float, lifetime: float) -> None:
        self.lan_ip = lan_ip
        self.lan_b = lan_ip.to_bytes(4, "big")
        self.rem_ip = rem_ip
        self.rem_b = rem_ip.to_bytes(4, "big")
        self.spi_out = spi_out
        self.spi_in = 0
        self.state = PENDING
        self.created = now
        self.expires = now + lifetime
        self.tmo = lifetime
        self.contended = False
        self.retries = 0
        self.fw: Any = None  # firewall decision cache, as on engine sessions: [gen, out_hits, in_hits]
        self.dead = False
        self.in_key = b""
        self.set_wan(wan_ip)

    def set_wan(self, wan_ip: int) -> None:
        self.wan_b = wan_ip.to_bytes(4, "big")
        self.out_key = self.lan_b + self.rem_b + self.spi_out.to_bytes(4, "big")
        self.da_out = addr_delta(self.lan_ip, wan_ip)
        self.da_in = addr_delta(wan_ip, self.lan_ip)
        self.dip_out = self.da_out + TTL_DELTA
        self.dip_in = self.da_in + TTL_DELTA
        if self.spi_in:
            self.in_key = self.rem_b + self.wan_b + self.spi_in.to_bytes(4, "big")
        self.fw = None


class IkeEntry:
    """One ISAKMP / IKE SA between a LAN host and a remote, by its cookie (SPI) pair."""

    __slots__ = ("lan_ip", "lan_b", "rem_ip", "rem_b", "icookie", "rcookie", "version", "created", "last",
                 "expires", "dead")

    def __init__(self, lan_ip: int, rem_ip: int, icookie: bytes, rcookie: bytes, version: int, now: float) -> None:
        self.lan_ip = lan_ip
        self.lan_b = lan_ip.to_bytes(4, "big")
        self.rem_ip = rem_ip
        self.rem_b = rem_ip.to_bytes(4, "big")
        self.icookie = icookie
        self.rcookie = rcookie
        self.version = version
        self.created = now
        self.last = now
        self.expires = now
        self.dead = False

    @property
    def key(self) -> bytes:
        return self.rem_b + self.icookie + self.rcookie


class Remote:
    """What the table holds towards one remote address."""

    __slots__ = ("esp", "pending", "ike")

    def __init__(self) -> None:
        self.esp: dict[EspEntry, None] = {}
        self.pending: EspEntry | None = None
        self.ike: dict[IkeEntry, None] = {}


class IPsecHelper(Helper):
    name = "ipsec"
    ip_protocols = (ESP, AH)
    udp_ports = (500,)

    def __init__(self, eng: EngineAPI, cfg: Config) -> None:
        super().__init__(eng, cfg)
        self._out: dict[bytes, EspEntry] = {}  # lan + remote + spi_out  (outbound packet bytes 12..24)
        self._in: dict[bytes, EspEntry] = {}  # remote + wan + spi_in   (inbound packet bytes 12..24)
        self._ike: dict[bytes, IkeEntry] = {}  # remote + icookie + rcookie
        self._ike_i: dict[bytes, IkeEntry] = {}  # remote + icookie -> latest entry with that initiator cookie
        self._rem: dict[int, Remote] = {}
        self._wheel = TimerWheel()
        self._n = 0
        self._quiet: dict[tuple[str, int], float] = {}
        # the entry the last masq_out / demasq_in used, so the engine caches its firewall decision on it
        self.fw_entry: EspEntry | None = None

    def enabled(self) -> bool:
        return self.cfg.ipsec.enabled

    def reload(self, cfg: Config) -> None:
        self.cfg = cfg
        ic = cfg.ipsec
        for e in self._out.values():
            if e.state == ESTABLISHED:
                new = ic.table_lifetime
            elif e.state == REPLACED:
                new = ic.pending_lifetime
            else:
                continue
            if new < e.tmo:  # the idle clock runs from the last packet with the new lifetime
                e.expires -= e.tmo - new
                self._wheel.add(e, e.expires)
            e.tmo = new

    # ------------------------------------------------------------ bookkeeping
    def _warn(self, name: str, key: int, now: float, level: str = "warning", **kw: Any) -> None:
        """A traffic-driven event, at most once per second per (event, host)."""
        k = (name, key)
        last = self._quiet.get(k)
        if last is not None and now - last < 1.0:
            return
        if len(self._quiet) > 4096:
            self._quiet.clear()
        self._quiet[k] = now
        self.eng.event(level, name, **kw)

    def _remote(self, rem_ip: int) -> Remote:
        r = self._rem.get(rem_ip)
        if r is None:
            r = self._rem[rem_ip] = Remote()
        return r

    def _gc_remote(self, rem_ip: int) -> None:
        r = self._rem.get(rem_ip)
        if r is not None and not r.esp and not r.ike:
            del self._rem[rem_ip]

    def _room(self, r: Remote, ike: bool) -> str | None:
        if self._n >= self.cfg.masquerade.max_entries:
            return "ipsec_table_full"
        if len(r.ike if ike else r.esp) >= self.cfg.ipsec.max_spis_per_remote:
            return "isakmp_too_many_sessions" if ike else "esp_too_many_spis"
        return None

    def _remove_esp(self, e: EspEntry, now: float, why: str = "") -> None:
        if e.dead:
            return
        e.dead = True
        self._n -= 1
        if e.spi_in:  # a paired entry: the data plane's flow cache may repeat its rewrite
            self.eng.fast_void()
        if self._out.get(e.out_key) is e:
            del self._out[e.out_key]
        if e.in_key and self._in.get(e.in_key) is e:
            del self._in[e.in_key]
        r = self._rem.get(e.rem_ip)
        if r is not None:
            r.esp.pop(e, None)
            if r.pending is e:
                r.pending = None
            self._gc_remote(e.rem_ip)
        if why == "expired":
            self.eng.count("esp_expired")
            self.eng.event("debug" if e.state != PENDING else "info", "esp_expired", lan=ip_str(e.lan_ip),
                           remote=ip_str(e.rem_ip), spi_out=f"0x{e.spi_out:08x}", spi_in=f"0x{e.spi_in:08x}",
                           state=ESP_STATE_NAMES[e.state])

    def _remove_ike(self, e: IkeEntry) -> None:
        if e.dead:
            return
        e.dead = True
        self._n -= 1
        k = e.key
        if self._ike.get(k) is e:
            del self._ike[k]
        ki = e.rem_b + e.icookie
        if self._ike_i.get(ki) is e:
            del self._ike_i[ki]
        r = self._rem.get(e.rem_ip)
        if r is not None:
            r.ike.pop(e, None)
            self._gc_remote(e.rem_ip)

    def _live_esp(self, e: EspEntry | None, now: float) -> EspEntry | None:
        if e is not None and e.expires <= now:
            self._remove_esp(e, now, "expired")
            return None
        return e

    def _live_ike(self, e: IkeEntry | None, now: float) -> IkeEntry | None:
        if e is not None and e.expires <= now:
            self.eng.count("isakmp_expired")
            self._remove_ike(e)
            return None
        return e

    # ------------------------------------------------------------- dispatch
    def masq_out(self, pkt: bytearray, ihl: int, now: float) -> bool:
        self.fw_entry = None
        p = pkt[9]
        if p == ESP:
            return self._esp_out(pkt, ihl, now)
        if p == AH:
            self._ah(pkt, now, True)
            return False
        return self._ike_out(pkt, ihl, now)

    def demasq_in(self, pkt: bytearray, ihl: int, now: float) -> list[bytearray] | None:
        self.fw_entry = None
        p = pkt[9]
        if p == ESP:
            return self._esp_in(pkt, ihl, now)
        if p == AH:
            self._ah(pkt, now, False)
            return []
        return self._ike_in(pkt, ihl, now)

    def _ah(self, pkt: bytearray, now: float, outbound: bool) -> None:
        eng = self.eng
        eng.count("ah_refused")
        eng.drop("ah_not_masqueradable")
        src = int.from_bytes(pkt[12:16], "big")
        self._warn("ah_refused", src, now, src=ip_str(src), dst=ip_str(int.from_bytes(pkt[16:20], "big")),
                   direction="out" if outbound else "in",
                   reason="AH's integrity check covers the IP addresses, which masquerading rewrites")

    # ------------------------------------------------------------------ ESP
    def _esp_out(self, pkt: bytearray, ihl: int, now: float) -> bool:
        eng = self.eng
        spi, _seq = esp_header(pkt, ihl)
        bad = spi_reason(spi)
        if bad is not None:
            eng.drop(bad)
            return False
        key = bytes(pkt[12:20]) + bytes(pkt[ihl:ihl + 4])
        e = self._live_esp(self._out.get(key), now)
        ic = self.cfg.ipsec
        if e is not None:
            st = e.state
            if st == PENDING and e.contended:
                e.retries += 1
                eng.count("esp_retries")
                if e.retries > ic.pending_retries:
                    self._squelch(e, now)
                    eng.drop("esp_squelched")
                    return False
            elif st == SQUELCHED:
                eng.drop("esp_squelched")
                return False
            elif st != PENDING:
                e.expires = now + e.tmo
            return self._send_out(e, pkt)
        # an initial packet (rule 1)
        lan = int.from_bytes(pkt[12:16], "big")
        rem = int.from_bytes(pkt[16:20], "big")
        r = self._rem.get(rem)
        if r is not None:
            if not ic.parallel_sessions:
                other = next((x for x in r.esp if x.lan_ip != lan and not x.dead and x.expires > now), None)
                if other is not None:
                    eng.count("esp_parallel_refused")
                    eng.drop("esp_parallel_sessions_off")
                    self._warn("esp_parallel_refused", lan, now, lan=ip_str(lan), remote=ip_str(rem),
                               spi_out=f"0x{spi:08x}", holder=ip_str(other.lan_ip),
                               reason="parallel_sessions is off and another LAN host has an IPsec entry "
                                      "with this remote")
                    return False
            p = self._live_esp(r.pending, now)
            if p is not None:  # rule 2: serialise new SAs per remote
                if not p.contended:
                    p.contended = True
                eng.count("esp_blocked")
                eng.drop("esp_blocked")
                self._warn("esp_blocked", lan, now, lan=ip_str(lan), remote=ip_str(rem), spi_out=f"0x{spi:08x}",
                           pending_lan=ip_str(p.lan_ip), pending_spi=f"0x{p.spi_out:08x}",
                           reason="temporarily blocked: another new ESP SA with this remote awaits its reply")
                return False
        else:
            r = self._remote(rem)
        why = self._room(r, False)
        if why is not None:
            eng.drop(why)
            eng.count("esp_refused_full")
            self._warn(why, rem, now, remote=ip_str(rem), lan=ip_str(lan),
                       reason="bounded IPsec state: too many ESP entries")
            self._gc_remote(rem)
            return False
        e = EspEntry(lan, rem, eng.wan_ip, spi, now, ic.pending_lifetime)
        self._out[e.out_key] = e
        r.esp[e] = None
        r.pending = e
        self._n += 1
        self._wheel.add(e, e.expires)
        eng.count("esp_pending")
        eng.event("info", "esp_pending", lan=ip_str(lan), remote=ip_str(rem), spi_out=f"0x{spi:08x}")
        return self._send_out(e, pkt)

    def _send_out(self, e: EspEntry, pkt: bytearray) -> bool:
        _pack_H4s(pkt, 10, apply_delta((pkt[10] << 8) | pkt[11], e.da_out), e.wan_b)
        self.fw_entry = e
        return True

    def _squelch(self, e: EspEntry, now: float) -> None:
        r = self._rem.get(e.rem_ip)
        if r is not None and r.pending is e:
            r.pending = None
        e.state = SQUELCHED
        e.expires = now + self.cfg.ipsec.squelch_time
        self._wheel.add(e, e.expires)
        self.eng.count("esp_squelched")
        self.eng.event("warning", "esp_squelched", lan=ip_str(e.lan_ip), remote=ip_str(e.rem_ip),
                       spi_out=f"0x{e.spi_out:08x}", seconds=self.cfg.ipsec.squelch_time,
                       reason="no reply after the allowed retries while other hosts wait: the remote is "
                              "opened to the next host")

    def _esp_in(self, pkt: bytearray, ihl: int, now: float) -> list[bytearray] | None:
        eng = self.eng
        spi, _seq = esp_header(pkt, ihl)
        bad = spi_reason(spi)
        if bad is not None:
            eng.drop(bad)
            return []
        key = bytes(pkt[12:20]) + bytes(pkt[ihl:ihl + 4])
        e = self._live_esp(self._in.get(key), now)
        if e is not None:
            e.expires = now + e.tmo
            return [self._send_in(e, pkt)]
        rem = int.from_bytes(pkt[12:16], "big")
        r = self._rem.get(rem)
        if r is None:
            return None  # nothing of ours with that remote: protocol forwarding may want it
        p = self._live_esp(r.pending, now)
        if p is not None:  # rule 4: the reply to the pending entry
            self._pair(p, r, spi, now)
            return [self._send_in(p, pkt)]
        if not r.esp:
            if eng.proto_forwarded(ESP):
                return None  # no LAN client has ESP with the remote: the forwarded ESP server's traffic
        # rule 6: a new SPI nobody waits for: the hosts that most recently re-keyed with the remote
        hosts = self._recent_hosts(r, now, self.cfg.ipsec.guess_min_left, self.cfg.ipsec.guess_max_hosts)
        if not hosts:
            if not r.esp and not r.ike:
                self._gc_remote(rem)
                return None
            eng.drop("esp_unknown_spi")
            return []
        eng.count("esp_guessed")
        eng.count("esp_guessed_copies", len(hosts))
        self._warn("esp_guessed", rem, now, level="info", remote=ip_str(rem), spi_in=f"0x{spi:08x}",
                   hosts=[ip_str(h) for h in hosts])
        orig = bytes(pkt)
        csum = (pkt[10] << 8) | pkt[11]
        outs: list[bytearray] = []
        for h in hosts:
            q = bytearray(orig)
            _pack_H(q, 10, apply_delta(csum, addr_delta(eng.wan_ip, h)))
            q[16:20] = h.to_bytes(4, "big")
            outs.append(q)
        return outs

    def _send_in(self, e: EspEntry, pkt: bytearray) -> bytearray:
        _pack_H(pkt, 10, apply_delta((pkt[10] << 8) | pkt[11], e.da_in))
        pkt[16:20] = e.lan_b
        self.fw_entry = e
        return pkt

    def _pair(self, p: EspEntry, r: Remote, spi: int, now: float) -> None:
        ic = self.cfg.ipsec
        p.spi_in = spi
        p.state = ESTABLISHED
        p.tmo = ic.table_lifetime
        p.expires = now + p.tmo
        p.in_key = p.rem_b + p.wan_b + spi.to_bytes(4, "big")
        old = self._in.get(p.in_key)
        if old is not None and old is not p:  # cannot happen: the SPI was in no entry
            self._remove_esp(old, now)
        self._in[p.in_key] = p
        r.pending = None
        replaced = 0
        for x in r.esp:
            if x is not p and x.lan_ip == p.lan_ip and x.state == ESTABLISHED:
                x.state = REPLACED
                x.tmo = ic.pending_lifetime
                x.expires = min(x.expires, now + x.tmo)
                self._wheel.add(x, x.expires)
                replaced += 1
        self.eng.count("esp_learned")
        self.eng.event("info", "esp_paired", lan=ip_str(p.lan_ip), remote=ip_str(p.rem_ip),
                       spi_out=f"0x{p.spi_out:08x}", spi_in=f"0x{spi:08x}", waited=round(now - p.created, 3),
                       replaced=replaced)

    def _recent_hosts(self, r: Remote, now: float, min_left: float, limit: int) -> list[int]:
        """LAN hosts with live ISAKMP entries towards the remote, newest activity first."""
        best: dict[int, float] = {}
        for e in r.ike:
            if e.dead or e.expires - now <= min_left:
                continue
            if e.last > best.get(e.lan_ip, -1.0):
                best[e.lan_ip] = e.last
        return sorted(best, key=lambda h: -best[h])[:limit]

    # ------------------------------------------------------- ESP fast path
    def fast_out(self, data: bytes, now: float) -> list[tuple[str, bytes]] | None:
        """Established outbound ESP (IHL 5, not a fragment, TTL > 1: checked by the engine)."""
        e = self._out.get(data[12:24])
        if e is None or not e.spi_in:
            return None
        eng = self.eng
        n = len(data)
        if n > eng.wan_mtu or (data[2] << 8 | data[3]) != n:
            return None
        hits = eng.fast_hits(e, 0)
        if hits is None:
            return None
        pkt = rewrite_src(data, e.dip_out, e.wan_b)
        e.expires = now + e.tmo
        eng.fast_account(hits, LAN_ESP, WAN_ESP, n)
        return [("wan", bytes(pkt))]

    def fast_in(self, data: bytes, now: float) -> list[tuple[str, bytes]] | None:
        """Established inbound ESP (same preconditions as ``fast_out``)."""
        e = self._in.get(data[12:24])
        if e is None:
            return None
        eng = self.eng
        n = len(data)
        if n > eng.lan_mtu or (data[2] << 8 | data[3]) != n:
            return None
        hits = eng.fast_hits(e, 1)
        if hits is None:
            return None
        pkt = rewrite_dst(data, e.dip_in, e.lan_b)
        e.expires = now + e.tmo
        eng.fast_account(hits, WAN_ESP, LAN_ESP, n)
        return [("lan", bytes(pkt))]

    def fast_entry(self, d: int, data: bytes | bytearray) -> FastEntry | None:
        """What ``fast_out`` (``d`` 0) or ``fast_in`` (1) does to the packets of the ESP pair of
        ``data``, for a cache outside the engine (``FastPath.entry``): the address only, the SPI
        stays. None: not an established pair whose firewall decision is cached."""
        key = bytes(data[12:24])
        eng = self.eng
        if d == 0:
            e = self._out.get(key)
            if e is None or not e.spi_in or eng.fast_hits(e, 0) is None:
                return None
            return (0, ESP, key, e, e.wan_b, -1, e.dip_out, 0, eng.wan_mtu)
        e = self._in.get(key)
        if e is None or eng.fast_hits(e, 1) is None:
            return None
        return (1, ESP, key, e, e.lan_b, -1, e.dip_in, 0, eng.lan_mtu)

    def fast_fold(self, e: EspEntry, last: float) -> None:
        """A cache outside the engine forwarded packets of ``e``, the last one at ``last``: the
        refresh ``fast_out`` / ``fast_in`` would have made."""
        if not e.dead and last + e.tmo > e.expires:
            e.expires = last + e.tmo

    # --------------------------------------------------------------- ISAKMP
    def _ike_out(self, pkt: bytearray, ihl: int, now: float) -> bool:
        eng = self.eng
        h = isakmp_header(pkt, ihl + 8)
        if h.icookie == ZERO_COOKIE:
            eng.drop("isakmp_zero_cookie")
            return False
        lan_b = bytes(pkt[12:16])
        rem_b = bytes(pkt[16:20])
        ic = self.cfg.ipsec
        e = self._live_ike(self._ike.get(rem_b + h.icookie + h.rcookie), now)
        if e is None:
            x = self._live_ike(self._ike_i.get(rem_b + h.icookie), now)
            if h.rcookie == ZERO_COOKIE and x is not None and x.rcookie == ZERO_COOKIE and x.lan_b != lan_b:
                self._collision(x, lan_b, now)
                return False
            lan = int.from_bytes(lan_b, "big")
            rem = int.from_bytes(rem_b, "big")
            r = self._remote(rem)
            why = self._room(r, True)
            if why is not None:
                eng.drop(why)
                self._warn(why, rem, now, remote=ip_str(rem), lan=ip_str(lan),
                           reason="bounded IPsec state: too many ISAKMP sessions")
                self._gc_remote(rem)
                return False
            e = IkeEntry(lan, rem, h.icookie, h.rcookie, h.major, now)
            self._touch(e, now, ic.pending_lifetime if h.rcookie == ZERO_COOKIE else ic.table_lifetime)
            self._wheel.add(e, e.expires)
            self._ike[e.key] = e
            self._ike_i[rem_b + h.icookie] = e
            r.ike[e] = None
            self._n += 1
            eng.count("isakmp_sessions")
            eng.event("info", "isakmp_session", lan=ip_str(lan), remote=ip_str(rem), version=h.major,
                      icookie=h.icookie.hex(), rcookie=h.rcookie.hex(),
                      state="INIT" if h.rcookie == ZERO_COOKIE else "ESTABLISHED")
        elif e.lan_b != lan_b:  # the same pair from another host: never a legitimate exchange
            self._collision(e, lan_b, now)
            return False
        self._touch(e, now, ic.pending_lifetime if e.rcookie == ZERO_COOKIE else ic.table_lifetime)
        d = addr_delta(e.lan_ip, eng.wan_ip)
        _pack_H4s(pkt, 10, apply_delta((pkt[10] << 8) | pkt[11], d), eng.wan_ip_b)
        _pack_H(pkt, ihl + 6, apply_delta_udp((pkt[ihl + 6] << 8) | pkt[ihl + 7], d))
        return True

    @staticmethod
    def _touch(e: IkeEntry, now: float, lifetime: float) -> None:
        """Refresh (the timer wheel re-files a refreshed entry lazily when its old bucket comes due)."""
        e.last = now
        e.expires = now + lifetime

    def _collision(self, holder: IkeEntry, lan_b: bytes, now: float) -> None:
        eng = self.eng
        lan = int.from_bytes(lan_b, "big")
        eng.count("isakmp_collisions")
        eng.drop("isakmp_collision")
        self._warn("isakmp_collision", lan, now, lan=ip_str(lan), remote=ip_str(holder.rem_ip),
                   holder=ip_str(holder.lan_ip), icookie=holder.icookie.hex(),
                   reason="another LAN host's ISAKMP exchange with this remote uses the same cookie and "
                          "awaits its reply")

    def _ike_in(self, pkt: bytearray, ihl: int, now: float) -> list[bytearray] | None:
        eng = self.eng
        h = isakmp_header(pkt, ihl + 8)
        if h.icookie == ZERO_COOKIE:
            eng.drop("isakmp_zero_cookie")
            return []
        rem_b = bytes(pkt[12:16])
        ic = self.cfg.ipsec
        e = self._live_ike(self._ike.get(rem_b + h.icookie + h.rcookie), now)
        if e is None:
            x = self._live_ike(self._ike_i.get(rem_b + h.icookie), now)
            if x is not None and x.rcookie == ZERO_COOKIE:
                if h.rcookie != ZERO_COOKIE:  # the first reply: complete the entry with the responder cookie
                    del self._ike[x.key]
                    x.rcookie = h.rcookie
                    self._ike[x.key] = x
                    eng.count("isakmp_replies")
                    eng.event("info", "isakmp_reply", lan=ip_str(x.lan_ip), remote=ip_str(x.rem_ip),
                              icookie=x.icookie.hex(), rcookie=x.rcookie.hex(), version=x.version)
                e = x  # (rcookie 0: an IKEv2 COOKIE / INVALID_KE answer to our initiation)
        if e is None and h.rcookie == ZERO_COOKIE and self.eng.port_forwarded(UDP, (pkt[ihl + 2] << 8) | pkt[ihl + 3]):
            return None  # a new exchange while UDP 500 is forwarded: the configured server's
        if e is None:
            r = self._rem.get(int.from_bytes(rem_b, "big"))
            target = 0
            if r is not None:
                hosts = self._recent_hosts(r, now, 0.0, 1)
                if hosts:
                    target = hosts[0]
                else:
                    live = [x for x in r.esp if not x.dead]
                    if live:
                        target = max(live, key=lambda x: x.created).lan_ip
            if not target:
                return None  # not a LAN client's exchange: port forwarding may want it
            eng.count("isakmp_remote_initiated")
            self._warn("isakmp_remote_initiated", target, now, level="info", lan=ip_str(target),
                       remote=ip_str(int.from_bytes(rem_b, "big")), icookie=h.icookie.hex(),
                       rcookie=h.rcookie.hex(), version=h.major, exchange=h.exchange)
            lan = target
        else:
            self._touch(e, now, ic.pending_lifetime if e.rcookie == ZERO_COOKIE else ic.table_lifetime)
            lan = e.lan_ip
        d = addr_delta(eng.wan_ip, lan)
        _pack_H(pkt, 10, apply_delta((pkt[10] << 8) | pkt[11], d))
        pkt[16:20] = lan.to_bytes(4, "big")
        _pack_H(pkt, ihl + 6, apply_delta_udp((pkt[ihl + 6] << 8) | pkt[ihl + 7], d))
        return [pkt]

    # ---------------------------------------------------------- housekeeping
    def expire(self, now: float) -> None:
        for x in self._wheel.due(now, lambda x: x.dead, lambda x: x.expires):
            if x.dead:  # filed twice (its deadline was shortened) and already removed
                continue
            if isinstance(x, EspEntry):
                if x.state == SQUELCHED:
                    self.eng.event("debug", "esp_squelch_ended", lan=ip_str(x.lan_ip), remote=ip_str(x.rem_ip),
                                   spi_out=f"0x{x.spi_out:08x}")
                    self._remove_esp(x, now)
                else:
                    self._remove_esp(x, now, "expired")
            else:
                self.eng.count("isakmp_expired")
                self.eng.event("debug", "isakmp_expired", lan=ip_str(x.lan_ip), remote=ip_str(x.rem_ip),
                               icookie=x.icookie.hex(), rcookie=x.rcookie.hex())
                self._remove_ike(x)

    def entries(self, now: float) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        wan = ip_str(self.eng.wan_ip)
        for e in self._out.values():
            rows.append({
                "proto": "esp", "lan": ip_str(e.lan_ip), "wan": ip_str(int.from_bytes(e.wan_b, "big")),
                "remote": ip_str(e.rem_ip), "state": ESP_STATE_NAMES[e.state],
                "spi_out": f"0x{e.spi_out:08x}", "spi_in": f"0x{e.spi_in:08x}",
                "expires_in": round(max(0.0, e.expires - now), 1), "helper": self.name,
            })
        for k in self._ike.values():
            rows.append({
                "proto": "isakmp", "lan": f"{ip_str(k.lan_ip)}:500", "wan": f"{wan}:500",
                "remote": f"{ip_str(k.rem_ip)}:500",
                "state": "INIT" if k.rcookie == ZERO_COOKIE else "ESTABLISHED",
                "icookie": k.icookie.hex(), "rcookie": k.rcookie.hex(), "version": k.version,
                "expires_in": round(max(0.0, k.expires - now), 1), "helper": self.name,
            })
        return rows

    def wan_changed(self, old: int, new: int, mode: str, now: float) -> None:
        """Move entries to the new address (ISAKMP rewrites use the current address per packet)."""
        n = 0
        for e in list(self._out.values()):
            if mode == "flush" or (mode == "rewrite" and e.state != PENDING):
                self._remove_esp(e, now)
                n += 1
                continue
            if e.in_key and self._in.get(e.in_key) is e:
                del self._in[e.in_key]
            e.set_wan(new)
            if e.in_key:
                self._in[e.in_key] = e
        if mode != "rewrite-all":
            for k in list(self._ike.values()):
                if mode == "flush" or k.rcookie != ZERO_COOKIE:
                    self._remove_ike(k)
                    n += 1
        if n:
            self.eng.count("ipsec_flushed_wan_change", n)

    def flush(self) -> int:
        n = self._n
        for e in list(self._out.values()):
            self._remove_esp(e, 0.0)
        for k in list(self._ike.values()):
            self._remove_ike(k)
        self._rem.clear()
        return n

    def size(self) -> int:
        return self._n


HELPER = IPsecHelper
