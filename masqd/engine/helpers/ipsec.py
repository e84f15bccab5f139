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
``max_spis_per_remote`` and the whole table by ``ipsec.max_entries``
(refusals counted as ``drop_ipsec_table_full``). Events caused by traffic are
rate-limited per host and in all (a flood of packets from ever new remotes
records a few events per second, and the rate-limit map stays bounded).

Known, documented mis-associations (HOWTO "Routage correct du trafic crypté
entrant"): a reply slower than the pending lifetime, or inbound traffic of an
expired idle pair, arriving while another host is pending, is paired with the
pending host. Recovery comes with the next re-key (fresh SPIs). Keep
``table_lifetime`` a little longer than the peers' re-key interval.

Announced SPI pairs (the HOWTO's "best solution", issue 22): a LAN host that
set up an SA with a remote tells masqd its outbound and inbound SPIs (PCP
SPI_ANNOUNCE, :mod:`masqd.engine.pcp`; the client is deploy/masqd-spi-announce
run by the IPsec daemon's updown hook). ``sa_announced`` pairs the ESP entry at
once (creating it, or completing the host's PENDING one): no serialisation, no
guessing. An announcement whose inbound SPI is already paired to another host
is refused ("taken", counted). A host that announced with a remote is an
*announcer* with it for ``table_lifetime``: its new outbound SPIs are never
serialised (they do not block others, nor wait for them) and never paired
from traffic; inbound ESP from that remote with an SPI nobody has paired (and
no other host pending) is held, up to ``pcp.spi_hold`` seconds and
``pcp.spi_hold_packets`` packets, for the announcement that names it, then
delivered (``esp_held_released``) or dropped (``esp_held_expired``); hosts that
do not announce keep the rules above (guessed copies go to them only). Guessed
copies are remembered per (remote, SPI), so when an announcement later names
the SPI's owner the copies that went to other hosts are counted
(``esp_misdelivered``). A host's re-pairing of an entry keeps its previous
inbound SPI routed to it until the entry ends (the old SA drains).

AH (protocol 51) authenticates the IP addresses, so it cannot survive
masquerade: it is refused both ways with a warning (``ah_refused``).

Established ESP takes a fast path (``fast_out`` / ``fast_in``, called by the
engine's fast path): one dict lookup keyed by the packet's bytes 12..24
(addresses + SPI), a precomputed checksum delta, and the firewall decision
cached on the entry by the full path.

Every entry is announced on the NAT table's change stream (``eng.changed``):
``new`` when an ESP entry starts pending or an ISAKMP entry is made; ``update``
``paired`` when an ESP pair is learned, ``state`` when an entry is replaced,
squelched or an ISAKMP exchange gets its reply, ``address-change`` when it moves
to a new WAN address; ``destroy`` with ``timeout``, ``flush``,
``address-change`` or ``replaced``.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any

from masqd.engine.counters import LAN_ESP, WAN_ESP
from masqd.engine.expiry import TimerWheel
from masqd.engine.fastpath import FastEntry, rewrite_dst, rewrite_src
from masqd.engine.helpers.base import Helper
from masqd.engine.nat import TTL_DELTA, acct_counter, acct_row
from masqd.engine.table import (
    ADDRESS_CHANGE,
    ANNOUNCED,
    DESTROY,
    FLUSH,
    NEW,
    PAIRED,
    STATE,
    TIMEOUT,
    UPDATE,
    WITHDRAWN,
)
from masqd.engine.table import REPLACED as WHY_REPLACED
from masqd.wire.checksum import addr_delta, apply_delta, apply_delta_udp
from masqd.wire.esp import esp_header, spi_reason
from masqd.wire.ipv4 import UDP, ip_str
from masqd.wire.isakmp import ZERO_COOKIE, isakmp_header

if TYPE_CHECKING:
    from masqd.config import Config
    from masqd.engine.api import EngineAPI

ESP, AH = 50, 51
WARN_RATE = 20.0  # traffic-driven events per second, at most

# ESP entry states
PENDING, ESTABLISHED, SQUELCHED, REPLACED = 0, 1, 2, 3
ESP_STATE_NAMES = ("PENDING", "ESTABLISHED", "SQUELCHED", "REPLACED")

_pack_H = struct.Struct("!H").pack_into
_pack_H4s = struct.Struct("!H4s").pack_into


class EspEntry:
    """One outbound SPI of one LAN host towards one remote, and the inbound SPI paired with it."""

    __slots__ = ("lan_ip", "lan_b", "rem_ip", "rem_b", "wan_b", "spi_out", "spi_in", "state", "expires", "tmo",
                 "created", "contended", "retries", "fw", "dip_out", "dip_in", "da_out", "da_in", "out_key",
                 "in_key", "dead", "a_out", "a_in", "announced", "prev_in_key")

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
        self.a_out: Any = None  # packet/byte counters under masquerade.accounting (Acct)
        self.a_in: Any = None
        self.announced = False  # paired by the host's announcement, not learned from traffic
        self.prev_in_key = b""  # the inbound key of the host's previous SA on this entry (still routed)
        self.set_wan(wan_ip)

    def set_wan(self, wan_ip: int) -> None:
        self.wan_b = wan_ip.to_bytes(4, "big")
        self.prev_in_key = b""
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
                 "expires", "dead", "a_out", "a_in")

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
        self.a_out: Any = None  # packet/byte counters under masquerade.accounting (Acct)
        self.a_in: Any = None

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
        self._ev_tokens = WARN_RATE
        self._ev_last = 0.0
        # the entry the last masq_out / demasq_in used, so the engine caches its firewall decision on it
        self.fw_entry: EspEntry | None = None
        # announcements: remote -> {LAN host: announcer until}; held inbound ESP (remote -> [(until,
        # SPI, packet)]) and how many in all; guessed copies (remote + SPI -> {host: packets})
        self._announcers: dict[int, dict[int, float]] = {}
        self._held: dict[int, list[tuple[float, int, bytearray]]] = {}
        self._nheld = 0
        # inbound SPIs copied to guessed hosts: remote + SPI -> (when first, copies per host); kept for
        # ``pending_lifetime`` so a late announcement counts what went to the wrong hosts
        self._guessed: dict[bytes, tuple[float, dict[int, int]]] = {}

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
        """A traffic-driven event, at most once per second per (event, host) and WARN_RATE per
        second in all (so the map of last times grows by WARN_RATE entries a second at most)."""
        k = (name, key)
        last = self._quiet.get(k)
        if last is not None and now - last < 1.0:
            return
        tok = min(WARN_RATE, self._ev_tokens + (now - self._ev_last) * WARN_RATE)
        self._ev_last = now
        if tok < 1.0:
            self._ev_tokens = tok
            self.eng.count("ipsec_events_suppressed")
            return
        self._ev_tokens = tok - 1.0
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
        if self._n >= self.cfg.ipsec.max_entries:
            return "ipsec_table_full"
        if len(r.ike if ike else r.esp) >= self.cfg.ipsec.max_spis_per_remote:
            return "isakmp_too_many_sessions" if ike else "esp_too_many_spis"
        return None

    def _remove_esp(self, e: EspEntry, now: float, reason: str, expired: bool = False) -> None:
        """Remove an ESP entry (``expired``: its lifetime ran out, counted and logged)."""
        if e.dead:
            return
        e.dead = True
        self.eng.changed(DESTROY, e, reason)
        self._n -= 1
        if e.spi_in:  # a paired entry: the data plane's flow cache may repeat its rewrite
            self.eng.fast_void()
        if self._out.get(e.out_key) is e:
            del self._out[e.out_key]
        if e.in_key and self._in.get(e.in_key) is e:
            del self._in[e.in_key]
        if e.prev_in_key and self._in.get(e.prev_in_key) is e:
            del self._in[e.prev_in_key]
        r = self._rem.get(e.rem_ip)
        if r is not None:
            r.esp.pop(e, None)
            if r.pending is e:
                r.pending = None
            self._gc_remote(e.rem_ip)
        if expired:
            self.eng.count("esp_expired")
            self.eng.event("debug" if e.state != PENDING else "info", "esp_expired", lan=ip_str(e.lan_ip),
                           remote=ip_str(e.rem_ip), spi_out=f"0x{e.spi_out:08x}", spi_in=f"0x{e.spi_in:08x}",
                           state=ESP_STATE_NAMES[e.state])

    def _remove_ike(self, e: IkeEntry, reason: str = TIMEOUT) -> None:
        if e.dead:
            return
        e.dead = True
        self.eng.changed(DESTROY, e, reason)
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
            self._remove_esp(e, now, TIMEOUT, expired=True)
            return None
        return e

    def _live_ike(self, e: IkeEntry | None, now: float) -> IkeEntry | None:
        if e is not None and e.expires <= now:
            self.eng.count("isakmp_expired")
            self._remove_ike(e, TIMEOUT)
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
            p = None if self._announcer(lan, rem, now) else self._live_esp(r.pending, now)
            if p is not None:  # rule 2: serialise new SAs per remote
                if not p.contended:
                    p.contended = True
                    eng.changed(UPDATE, p, STATE)
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
        if not self._announcer(lan, rem, now):  # an announcer's reply is paired by its announcement
            r.pending = e
        self._n += 1
        self._wheel.add(e, e.expires)
        eng.count("esp_pending")
        eng.event("info", "esp_pending", lan=ip_str(lan), remote=ip_str(rem), spi_out=f"0x{spi:08x}")
        eng.changed(NEW, e)
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
        self.eng.changed(UPDATE, e, STATE)
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
        ann = self._announcers_of(rem, now)
        if ann:  # an announcing host may name it any moment: hold it; guesses only for the others
            held = self._hold(rem, spi, pkt, now)
            hosts = [h for h in hosts if h not in ann]
            if not hosts:
                if not held:
                    eng.drop("esp_unknown_spi")
                return []
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
        gk = bytes(pkt[12:16]) + spi.to_bytes(4, "big")
        got = self._guessed.get(gk)
        if got is None:
            if len(self._guessed) >= 4096:
                del self._guessed[next(iter(self._guessed))]
            got = self._guessed[gk] = (now, {})
        g = got[1]
        for h in hosts:
            g[h] = g.get(h, 0) + 1
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
            self._remove_esp(old, now, WHY_REPLACED)
        self._in[p.in_key] = p
        r.pending = None
        replaced = 0
        eng = self.eng
        eng.changed(UPDATE, p, PAIRED)
        for x in r.esp:
            if x is not p and x.lan_ip == p.lan_ip and x.state == ESTABLISHED:
                x.state = REPLACED
                x.tmo = ic.pending_lifetime
                x.expires = min(x.expires, now + x.tmo)
                self._wheel.add(x, x.expires)
                eng.changed(UPDATE, x, STATE)
                replaced += 1
        self.eng.count("esp_learned")
        self.eng.event("info", "esp_paired", lan=ip_str(p.lan_ip), remote=ip_str(p.rem_ip),
                       spi_out=f"0x{p.spi_out:08x}", spi_in=f"0x{spi:08x}", waited=round(now - p.created, 3),
                       replaced=replaced)

    # ------------------------------------------------------ announced pairs
    def _announcer(self, lan: int, rem: int, now: float) -> bool:
        a = self._announcers.get(rem)
        return a is not None and a.get(lan, 0.0) > now

    def _announcers_of(self, rem: int, now: float) -> set[int]:
        a = self._announcers.get(rem)
        return {h for h, until in a.items() if until > now} if a else set()

    def _hold(self, rem: int, spi: int, pkt: bytearray, now: float) -> bool:
        """Keep an inbound packet with an unpaired SPI for an announcement (bounded in time and
        number); False when there is no room (counted)."""
        pc = self.cfg.pcp
        self._drop_held(now)
        if self._nheld >= pc.spi_hold_packets or pc.spi_hold <= 0:
            self.eng.count("esp_held_overflow")
            return False
        self._held.setdefault(rem, []).append((now + pc.spi_hold, spi, bytearray(pkt)))
        self._nheld += 1
        self.eng.count("esp_held")
        return True

    def _drop_held(self, now: float) -> None:
        """Drop the held packets whose time ran out."""
        if not self._nheld:
            return
        for rem in list(self._held):
            q = self._held[rem]
            keep = [x for x in q if x[0] > now]
            if len(keep) != len(q):
                self.eng.count("esp_held_expired", len(q) - len(keep))
                self._nheld -= len(q) - len(keep)
            if keep:
                self._held[rem] = keep
            else:
                del self._held[rem]

    def _release(self, e: EspEntry, spi_in: int, now: float) -> list[bytearray]:
        """The held packets for ``e``'s inbound SPI, rewritten for its LAN host."""
        self._drop_held(now)
        q = self._held.get(e.rem_ip)
        if not q:
            return []
        mine = [x for x in q if x[1] == spi_in]
        if not mine:
            return []
        rest = [x for x in q if x[1] != spi_in]
        if rest:
            self._held[e.rem_ip] = rest
        else:
            del self._held[e.rem_ip]
        self._nheld -= len(mine)
        self.eng.count("esp_held_released", len(mine))
        out = []
        for _until, _spi, p in mine:
            out.append(self._send_in(e, p))
        self.fw_entry = None
        return out

    def sa_announced(self, lan_ip: int, rem_ip: int, spi_out: int, spi_in: int, withdraw: bool,
                     now: float) -> tuple[str, list[bytearray]] | None:
        """A LAN host's announcement of an SA pair (see the module docstring)."""
        eng = self.eng
        ic = self.cfg.ipsec
        lan_b = lan_ip.to_bytes(4, "big")
        rem_b = rem_ip.to_bytes(4, "big")
        out_key = lan_b + rem_b + spi_out.to_bytes(4, "big")
        in_key = rem_b + eng.wan_ip_b + spi_in.to_bytes(4, "big")
        if withdraw:
            e = self._out.get(out_key)
            if e is not None and not e.dead:
                self._remove_esp(e, now, WITHDRAWN)
                eng.count("esp_withdrawn")
                eng.event("info", "esp_withdrawn", lan=ip_str(lan_ip), remote=ip_str(rem_ip),
                          spi_out=f"0x{spi_out:08x}", spi_in=f"0x{e.spi_in:08x}")
            return "ok", []
        holder = self._live_esp(self._in.get(in_key), now)
        if holder is not None and holder.lan_ip != lan_ip:
            eng.count("esp_announce_conflicts")
            self._warn("esp_announce_refused", lan_ip, now, lan=ip_str(lan_ip), remote=ip_str(rem_ip),
                       spi_in=f"0x{spi_in:08x}", holder=ip_str(holder.lan_ip),
                       how="announced" if holder.announced else "learned",
                       reason="the inbound SPI is paired to another host")
            return "taken", []
        e = self._live_esp(self._out.get(out_key), now)
        r = self._remote(rem_ip)
        new = e is None
        if e is None:
            why = self._room(r, False)
            if why is not None:
                eng.drop(why)
                self._gc_remote(rem_ip)
                return "full", []
            e = EspEntry(lan_ip, rem_ip, eng.wan_ip, spi_out, now, ic.table_lifetime)
            self._out[out_key] = e
            r.esp[e] = None
            self._n += 1
        elif e.spi_in and e.spi_in != spi_in and e.in_key and self._in.get(e.in_key) is e:
            if e.prev_in_key and self._in.get(e.prev_in_key) is e:
                del self._in[e.prev_in_key]
            e.prev_in_key = e.in_key  # the previous SA of the same host keeps reaching it while it drains
        waited = round(now - e.created, 3)
        e.spi_in = spi_in
        e.in_key = in_key
        e.state = ESTABLISHED
        e.announced = True
        e.tmo = ic.table_lifetime
        e.expires = now + e.tmo
        e.fw = None
        self._wheel.add(e, e.expires)
        self._in[in_key] = e
        if r.pending is e:
            r.pending = None
        for x in r.esp:
            if x is not e and x.lan_ip == lan_ip and x.state == ESTABLISHED and not x.dead:
                x.state = REPLACED
                x.tmo = ic.pending_lifetime
                x.expires = min(x.expires, now + x.tmo)
                self._wheel.add(x, x.expires)
        a = self._announcers.setdefault(rem_ip, {})
        a[lan_ip] = now + ic.table_lifetime
        got = self._guessed.pop(rem_b + spi_in.to_bytes(4, "big"), None)
        if got:
            wrong = sum(n for h, n in got[1].items() if h != lan_ip)
            if wrong:
                eng.count("esp_misdelivered", wrong)
                eng.event("warning", "esp_misdelivered", remote=ip_str(rem_ip), spi_in=f"0x{spi_in:08x}",
                          owner=ip_str(lan_ip), packets=wrong,
                          reason="guessed copies of this SPI went to other hosts before its owner announced it")
        eng.count("esp_announced")
        eng.event("info", "esp_announced", lan=ip_str(lan_ip), remote=ip_str(rem_ip), spi_out=f"0x{spi_out:08x}",
                  spi_in=f"0x{spi_in:08x}", created=new, waited=None if new else waited)
        eng.changed(NEW if new else UPDATE, e, "" if new else ANNOUNCED)
        return "ok", self._release(e, spi_in, now)

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
            eng.changed(NEW, e)
            eng.event("info", "isakmp_session", lan=ip_str(lan), remote=ip_str(rem), version=h.major,
                      icookie=h.icookie.hex(), rcookie=h.rcookie.hex(),
                      state="INIT" if h.rcookie == ZERO_COOKIE else "ESTABLISHED")
        elif e.lan_b != lan_b:  # the same pair from another host: never a legitimate exchange
            self._collision(e, lan_b, now)
            return False
        self._touch(e, now, ic.pending_lifetime if e.rcookie == ZERO_COOKIE else ic.table_lifetime)
        if self.cfg.masquerade.accounting:
            self._count(e, len(pkt), True)
        d = addr_delta(e.lan_ip, eng.wan_ip)
        _pack_H4s(pkt, 10, apply_delta((pkt[10] << 8) | pkt[11], d), eng.wan_ip_b)
        _pack_H(pkt, ihl + 6, apply_delta_udp((pkt[ihl + 6] << 8) | pkt[ihl + 7], d))
        return True

    @staticmethod
    def _count(e: IkeEntry, n: int, outbound: bool) -> None:
        """Accounting of an ISAKMP entry (its packets take no fast path: counted here)."""
        a = acct_counter(e, outbound)
        if a is not None:
            a.pkts += 1
            a.bytes += n

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
                    self._touch(x, now, ic.table_lifetime)
                    eng.changed(UPDATE, x, STATE)
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
            if self.cfg.masquerade.accounting:
                self._count(e, len(pkt), False)
            lan = e.lan_ip
        d = addr_delta(eng.wan_ip, lan)
        _pack_H(pkt, 10, apply_delta((pkt[10] << 8) | pkt[11], d))
        pkt[16:20] = lan.to_bytes(4, "big")
        _pack_H(pkt, ihl + 6, apply_delta_udp((pkt[ihl + 6] << 8) | pkt[ihl + 7], d))
        return [pkt]

    # ---------------------------------------------------------- housekeeping
    def expire(self, now: float) -> None:
        self._drop_held(now)
        old = now - self.cfg.ipsec.pending_lifetime
        guessed = self._guessed
        while guessed:  # (in the order they were made)
            k = next(iter(guessed))
            if guessed[k][0] > old:
                break
            del guessed[k]
        for rem in [rem for rem, a in self._announcers.items() if not any(u > now for u in a.values())]:
            del self._announcers[rem]
        for x in self._wheel.due(now, lambda x: x.dead, lambda x: x.expires):
            if x.dead:  # filed twice (its deadline was shortened) and already removed
                continue
            if isinstance(x, EspEntry):
                if x.state == SQUELCHED:
                    self.eng.event("debug", "esp_squelch_ended", lan=ip_str(x.lan_ip), remote=ip_str(x.rem_ip),
                                   spi_out=f"0x{x.spi_out:08x}")
                    self._remove_esp(x, now, TIMEOUT)
                else:
                    self._remove_esp(x, now, TIMEOUT, expired=True)
            else:
                self.eng.count("isakmp_expired")
                self.eng.event("debug", "isakmp_expired", lan=ip_str(x.lan_ip), remote=ip_str(x.rem_ip),
                               icookie=x.icookie.hex(), rcookie=x.rcookie.hex())
                self._remove_ike(x, TIMEOUT)

    def entries(self, now: float) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = [self._esp_row(e, now) for e in self._out.values()]
        rows.extend(self._ike_row(k, now) for k in self._ike.values())
        return rows

    def row(self, entry: Any, now: float) -> dict[str, Any] | None:
        if isinstance(entry, EspEntry):
            return self._esp_row(entry, now)
        if isinstance(entry, IkeEntry):
            return self._ike_row(entry, now)
        return None

    def _esp_row(self, e: EspEntry, now: float) -> dict[str, Any]:
        return {
            "proto": "esp", "lan": ip_str(e.lan_ip), "wan": ip_str(int.from_bytes(e.wan_b, "big")),
            "remote": ip_str(e.rem_ip), "state": ESP_STATE_NAMES[e.state],
            "spi_out": f"0x{e.spi_out:08x}", "spi_in": f"0x{e.spi_in:08x}",
            "expires_in": round(max(0.0, e.expires - now), 1), "helper": self.name, **acct_row(e),
        }

    def _ike_row(self, k: IkeEntry, now: float) -> dict[str, Any]:
        return {
            "proto": "isakmp", "lan": f"{ip_str(k.lan_ip)}:500", "wan": f"{ip_str(self.eng.wan_ip)}:500",
            "remote": f"{ip_str(k.rem_ip)}:500",
            "state": "INIT" if k.rcookie == ZERO_COOKIE else "ESTABLISHED",
            "icookie": k.icookie.hex(), "rcookie": k.rcookie.hex(), "version": k.version,
            "expires_in": round(max(0.0, k.expires - now), 1), "helper": self.name, **acct_row(k),
        }

    def wan_changed(self, old: int, new: int, mode: str, now: float) -> None:
        """Move entries to the new address (ISAKMP rewrites use the current address per packet)."""
        n = 0
        for e in list(self._out.values()):
            if mode == "flush" or (mode == "rewrite" and e.state != PENDING):
                self._remove_esp(e, now, ADDRESS_CHANGE)
                n += 1
                continue
            if e.in_key and self._in.get(e.in_key) is e:
                del self._in[e.in_key]
            if e.prev_in_key and self._in.get(e.prev_in_key) is e:
                del self._in[e.prev_in_key]
            e.set_wan(new)
            if e.in_key:
                self._in[e.in_key] = e
            self.eng.changed(UPDATE, e, ADDRESS_CHANGE)
        if mode != "rewrite-all":
            for k in list(self._ike.values()):
                if mode == "flush" or k.rcookie != ZERO_COOKIE:
                    self._remove_ike(k, ADDRESS_CHANGE)
                    n += 1
        if n:
            self.eng.count("ipsec_flushed_wan_change", n)

    def flush(self) -> int:
        n = self._n
        for e in list(self._out.values()):
            self._remove_esp(e, 0.0, FLUSH)
        for k in list(self._ike.values()):
            self._remove_ike(k, FLUSH)
        self._rem.clear()
        self._held.clear()
        self._nheld = 0
        self._guessed.clear()
        return n

    def size(self) -> int:
        return self._n

    def tables(self) -> dict[str, tuple[int, int]]:
        return {"ipsec": (self._n, self.cfg.ipsec.max_entries)}

    # ------------------------------------------------------- state as records
    record_kinds = ("esp", "ike")

    def export(self, now: float) -> list[dict[str, Any]]:
        out = [self._esp_record(e, now) for e in self._out.values()]
        out += [self._ike_record(k, now) for k in self._ike.values()]
        return out

    def record(self, entry: Any, now: float) -> dict[str, Any] | None:
        if isinstance(entry, EspEntry):
            return self._esp_record(entry, now)
        if isinstance(entry, IkeEntry):
            return self._ike_record(entry, now)
        return None

    def _esp_record(self, e: EspEntry, now: float) -> dict[str, Any]:
        r = self._rem.get(e.rem_ip)
        return {"k": "esp", "v": 1, "li": e.lan_ip, "ri": e.rem_ip, "wi": int.from_bytes(e.wan_b, "big"),
                "so": e.spi_out, "si": e.spi_in, "st": e.state, "left": round(e.expires - now, 3),
                "tmo": float(e.tmo), "age": round(now - e.created, 3), "cont": e.contended, "retr": e.retries,
                "pend": r is not None and r.pending is e}

    @staticmethod
    def _ike_record(k: IkeEntry, now: float) -> dict[str, Any]:
        return {"k": "ike", "v": 1, "li": k.lan_ip, "ri": k.rem_ip, "ic": k.icookie.hex(), "rc": k.rcookie.hex(),
                "ver": k.version, "age": round(now - k.created, 3), "idle": round(now - k.last, 3),
                "left": round(k.expires - now, 3)}

    def restore(self, rec: dict[str, Any], now: float, left: float) -> str | None:
        if rec["k"] == "esp":
            return self._restore_esp(rec, now, left)
        return self._restore_ike(rec, now, left)

    def _restore_esp(self, rec: dict[str, Any], now: float, left: float) -> str | None:
        lan, rem, spi = rec["li"], rec["ri"], rec["so"]
        e = self._out.get(lan.to_bytes(4, "big") + rem.to_bytes(4, "big") + spi.to_bytes(4, "big"))
        r = self._remote(rem)
        if e is None:
            why = self._room(r, False)
            if why is not None:
                self._gc_remote(rem)
                return why
            e = EspEntry(lan, rem, rec["wi"], spi, now, rec["tmo"])
            self._out[e.out_key] = e
            r.esp[e] = None
            self._n += 1
        elif e.in_key and self._in.get(e.in_key) is e:
            del self._in[e.in_key]
        e.spi_in = rec["si"]
        e.in_key = b""
        e.state = rec["st"]
        e.tmo = rec["tmo"]
        e.expires = now + left
        e.created = now - rec["age"]
        e.contended = rec["cont"]
        e.retries = rec["retr"]
        e.set_wan(rec["wi"])
        if e.in_key:
            other = self._in.get(e.in_key)
            if other is not None and other is not e:  # the inbound SPI is the newest pair's
                self._remove_esp(other, now, reason=WHY_REPLACED)
            self._in[e.in_key] = e
        if rec["pend"]:
            r.pending = e
        elif r.pending is e:
            r.pending = None
        self._wheel.add(e, e.expires)
        return None

    def _restore_ike(self, rec: dict[str, Any], now: float, left: float) -> str | None:
        lan, rem = rec["li"], rec["ri"]
        rem_b = rem.to_bytes(4, "big")
        ic, rc = bytes.fromhex(rec["ic"]), bytes.fromhex(rec["rc"])
        if ic == ZERO_COOKIE:
            return "isakmp_zero_cookie"
        e = self._ike_i.get(rem_b + ic)
        if e is not None and e.lan_ip == lan and e.rcookie in (rc, ZERO_COOKIE):
            if e.rcookie != rc:  # the reply came: the entry is known by its pair from now on
                del self._ike[e.key]
                e.rcookie = rc
                self._ike[e.key] = e
        else:
            e = self._ike.get(rem_b + ic + rc)
            if e is not None and e.lan_ip != lan:
                return "isakmp_collision"
            if e is None:
                r = self._remote(rem)
                why = self._room(r, True)
                if why is not None:
                    self._gc_remote(rem)
                    return why
                e = IkeEntry(lan, rem, ic, rc, rec["ver"], now)
                self._ike[e.key] = e
                self._ike_i[rem_b + ic] = e
                r.ike[e] = None
                self._n += 1
        e.version = rec["ver"]
        e.created = now - rec["age"]
        e.last = now - rec["idle"]
        e.expires = now + left
        self._wheel.add(e, e.expires)
        return None

    def forget(self, rec: dict[str, Any], reason: str) -> bool:
        lan, rem = rec["li"], rec["ri"]
        if rec["k"] == "esp":
            e = self._out.get(lan.to_bytes(4, "big") + rem.to_bytes(4, "big") + rec["so"].to_bytes(4, "big"))
            if e is None:
                return False
            self._remove_esp(e, 0.0, reason=reason)
            return True
        r = self._rem.get(rem)
        ic = bytes.fromhex(rec["ic"])
        hit = [k for k in r.ike if k.lan_ip == lan and k.icookie == ic] if r is not None else []
        for k in hit:
            self._remove_ike(k, reason)
        return bool(hit)

    def rearm(self, now: float) -> None:
        ic = self.cfg.ipsec
        for e in self._out.values():
            if e.state != SQUELCHED:
                e.expires = now + e.tmo
                self._wheel.add(e, e.expires)
        for k in self._ike.values():
            k.expires = now + (ic.pending_lifetime if k.rcookie == ZERO_COOKIE else ic.table_lifetime)
            self._wheel.add(k, k.expires)


HELPER = IPsecHelper
