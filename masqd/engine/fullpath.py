"""The full packet path, in Linux 2.2 ipchains order, where every decision is made.

sanity checks -> reassembly -> input chain of the incoming interface ->
demasquerade (replies skip the forward chain) -> local delivery (echo, the
PCP / NAT-PMP server on the LAN address) ->
routing -> TTL and MTU -> forward chain (MASQ) -> masquerade -> output chain of
the outgoing interface -> fragment. Every drop is counted here by its reason.

The full path creates sessions (through the NAT table), tracks TCP state,
clamps the MSS, caches the chains' decision on a session for the fast path
(``s.fw = [rules generation, outbound hits, inbound hits]``), hands packets
to the protocol helpers that own them (ESP, GRE, ISAKMP, PPTP control) and to
the inbound forwarders, and asks ``IcmpErrors`` for the errors it must send.

Under ``masquerade.accounting`` it also counts each entry's packets (its
``a_out`` / ``a_in`` :class:`~masqd.engine.nat.Acct`) and puts the counter of the
direction at the end of the decision it caches: a fast path counts it with the
rules (``FastPath.account``), and so does ``FastPath.count_fast`` for what the
data plane's flow cache forwarded. Without accounting nothing of this runs.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any

from masqd import firewall as fwmod
from masqd.engine.counters import WAN_BASE, proto_index
from masqd.engine.defrag import fragment
from masqd.engine.nat import (
    S_INBOUND,
    S_REPLIED,
    S_UNREPLIED,
    T_ESTABLISHED,
    T_FIN,
    T_NEW,
    T_RST,
    T_SYN_SENT,
    Lease,
    Mapping,
    Session,
    acct_counter,
    translate_in,
    translate_out,
)
from masqd.engine.table import ADDRESS_CHANGE
from masqd.wire import pcp as pcpwire
from masqd.wire.checksum import apply_delta, checksum, ones_sum, pseudo_header_sum, word_delta
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
    decrement_ttl,
    ip_str,
    rewrite_tos,
)

if TYPE_CHECKING:
    from masqd.config import Config
    from masqd.engine.counters import Counters
    from masqd.engine.defrag import Reassembler
    from masqd.engine.forward import Forwarders
    from masqd.engine.helpers import Helper
    from masqd.engine.icmp import IcmpErrors
    from masqd.engine.pcp import PcpServer
    from masqd.engine.routing import Routes
    from masqd.engine.table import NatTable

_pack_H = struct.Struct("!H").pack_into

LAN, WAN = "lan", "wan"
Out = list[tuple[str, bytes]]
RESET_KEYS_MAX = 65536


class FullPath:
    """See the module docstring. ``configure`` gives it what the configuration decides."""

    def __init__(self, table: NatTable, counters: Counters, routes: Routes, icmp: IcmpErrors,
                 defrag: Reassembler, forwarders: Forwarders) -> None:
        self.t = table
        self.ctr = counters
        self.routes = routes
        self.icmp = icmp
        self.defrag = defrag
        self.forwarders = forwarders
        # LAN segments of TCP sessions closed by a WAN address change get a RST (until the time)
        self.reset_keys: dict[bytes, float] = {}
        # the packet being routed by process_vnet (offload metadata), its segment size, what was sent
        self.vpkt: bytearray | None = None
        self.vseg = 0
        self.vsent: list[int] = []
        self.gen = 0
        self.fw_trivial: list[Any] = [0, (), ()]
        self.acct = False  # masquerade.accounting
        self.pcp: PcpServer | None = None

    def configure(self, cfg: Config, rules: Any, gen: int, proto_helpers: dict[int, Helper],
                  udp_helpers: dict[int, Helper], tcp_helpers: dict[int, Helper],
                  pcp: PcpServer | None = None) -> None:
        self.pcp = pcp
        m = cfg.masquerade
        self.rules = rules
        self.gen = gen
        self.fw_trivial = [gen, (), ()]  # the decision of an empty ruleset, shared by every session
        self.lan_mtu = cfg.lan.mtu
        self.wan_mtu = cfg.wan.mtu
        self.filtering = {"endpoint-independent": 0, "address-dependent": 1, "address-and-port-dependent": 2}[
            m.inbound_filtering]
        self.hairpinning = m.hairpinning
        self.mss_clamp = m.mss_clamp
        self.acct = m.accounting
        self.tcp_transitory = m.effective_timeouts.tcp_transitory
        self.proto_helpers = proto_helpers
        self.udp_helpers = udp_helpers
        self.tcp_helpers = tcp_helpers

    # --------------------------------------------------------------- the path
    def run(self, iface: str, data: bytes | bytearray, now: float, out: Out) -> None:
        """Route one packet that arrived on ``iface``; append what to send to ``out``."""
        ctr = self.ctr
        pkt = data if type(data) is bytearray else bytearray(data)
        ihl = check_ipv4(pkt)
        proto = pkt[9]
        ctr.received((0 if iface == LAN else WAN_BASE) + proto_index(proto), len(pkt))
        src = int.from_bytes(pkt[12:16], "big")
        dst = int.from_bytes(pkt[16:20], "big")
        if self.routes.martian(iface, src):
            ctr.drop("martian_source")
            return
        if dst >= 0xE0000000 or dst == 0 or dst >> 24 == 127:
            ctr.drop("not_unicast")
            return
        ff = (pkt[6] << 8) | pkt[7]
        if ff & (IP_MF | IP_OFFMASK):
            whole = self.defrag.add(pkt, ihl, now)
            if whole is None:
                ctr.count("frag_queued")
                return
            ctr.count("frag_reassembled")
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
            if not self.fw_pass(d, "input", iface, pkt, ihl, out, hits):
                return
        wan_ip = self.t.wan_ip
        # demasquerade: replies to masqueraded connections skip the forward chain
        if iface == WAN and dst == wan_ip:
            if self.demasq(pkt, ihl, proto, src, sport, dport, now, out, hits):
                return
        hairpin = (iface == LAN and dst == wan_ip and self.hairpinning
                   and (proto == TCP or proto == UDP or (proto == ICMP and pkt[ihl] in ICMP_ERRORS)))
        if (dst == self.routes.lan_ip or dst == wan_ip) and not hairpin:
            self.local(iface, pkt, ihl, proto, src, dst, out, now)
            return
        oif = WAN if hairpin else self.routes.route(dst)
        if iface == WAN and oif == WAN:
            ctr.drop("no_route")
            return
        # TTL
        if pkt[8] <= 1:
            self.icmp_error(iface, pkt, ihl, ICMP_TIMXCEED, 0, 0, now, out)
            ctr.count("ttl_exceeded")
            return
        mtu = self.wan_mtu if oif == WAN else self.lan_mtu
        if self.size(pkt) > mtu and pkt[6] & 0x40:
            self.icmp_error(iface, pkt, ihl, ICMP_UNREACH, UNREACH_NEEDFRAG, mtu, now, out)
            ctr.count("frag_needed_sent")
            return
        # forward chain
        d = rules.evaluate("forward", oif, proto, src, dst, sport, dport, flags)
        fhits: list[Any] = []
        if not self.fw_pass(d, "forward", iface, pkt, ihl, out, fhits):
            return
        hits.extend(fhits)
        if d.verdict == fwmod.MASQ and oif == WAN:
            s = self.masq(pkt, ihl, proto, src, dst, sport, dport, now, out)
            if s is not None:
                self.output(WAN, pkt, ihl, out, hits, s, True)
            return
        # plain routing, no translation
        decrement_ttl(pkt)
        self.output(oif, pkt, ihl, out, hits, None, True)

    def fw_pass(self, d: fwmod.Decision, chain: str, iface: str, pkt: bytearray, ihl: int, out: Out,
                hits: list[Any]) -> bool:
        """Count a chain's decision on its rules; False (counted, REJECT answered) unless it passes."""
        n = len(pkt)
        for r in d.rules:
            r.pkts += 1
            r.bytes += n
        hits.extend(d.rules)
        if d.logged:
            for r in d.logged:
                self.ctr.event("info", "rule_match", chain=chain, iface=iface, rule=str(r),
                               verdict=fwmod.VERDICT_NAMES.get(d.verdict, "?"),
                               src=ip_str(int.from_bytes(pkt[12:16], "big")),
                               dst=ip_str(int.from_bytes(pkt[16:20], "big")), proto=pkt[9])
            hits.append(None)  # marks "do not cache": every match must be logged
        if not d.cache:
            hits.append(None)  # a decision for this packet only (a TOS rewrite, TCP flags)
        v = d.verdict
        if v == fwmod.ACCEPT or v == fwmod.MASQ:
            if d.tos is not None and rewrite_tos(pkt, *d.tos):  # ipchains -t
                self.ctr.count("tos_rewritten")
            return True
        self.ctr.drop(f"{chain}_{'reject' if v == fwmod.REJECT else 'deny'}")
        if v == fwmod.REJECT:
            self.icmp_error(iface, pkt, ihl, ICMP_UNREACH, d.code, 0, 0.0, out, limit=False)
        return False

    def output(self, oif: str, pkt: bytearray, ihl: int, out: Out, hits: list[Any], s: Any,
               outbound: bool) -> bool:
        """Output chain of ``oif``, then send (fragmenting if needed). Caches the decision on ``s``
        (a Session, or a helper's entry with an ``fw`` slot)."""
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
            if not self.fw_pass(d, "output", oif, pkt, ihl, out, hits):
                return False
        a = acct_counter(s, outbound) if self.acct and s is not None else None
        if s is not None and None not in hits and not self.helper_port_session(s):
            fw = s.fw
            if fw is None or fw[0] != self.gen:
                # (a UDP session an inbound packet made keeps its own: its first outbound packet,
                # the LAN side's answer, must take this path to record that it was answered)
                trivial = rules.trivial and a is None and not (isinstance(s, Session) and s.state == S_INBOUND)
                fw = self.fw_trivial if trivial else [self.gen, None, None]
                s.fw = fw
            if fw is not self.fw_trivial:
                h = tuple(hits) if a is None else (*hits, a)  # the fast paths count ``a`` as a rule
                if outbound:
                    fw[1] = h
                else:
                    fw[2] = h
        if a is not None:
            a.pkts += 1
            a.bytes += len(pkt)
        self.send(oif, pkt, ihl, out)
        return True

    def size(self, pkt: bytearray) -> int:
        """Length that must fit the MTU: a super-packet's segments, else the packet."""
        return self.vseg if self.vseg and pkt is self.vpkt else len(pkt)

    def helper_port_session(self, s: Any) -> bool:
        """A UDP session on a helper's port pair (ISAKMP 500<->500, 4500<->4500), e.g. a port
        forward's: the helper tells exchanges apart by cookies, so it never takes the fast path."""
        if not isinstance(s, Session):  # a helper's own entry (ESP pair, GRE call)
            return False
        m = s.m
        return m.proto == UDP and m.wan_port in self.udp_helpers and s.in_key[8:10] == s.in_key[10:12]

    def send(self, oif: str, pkt: bytearray, ihl: int, out: Out) -> None:
        """Append ``pkt`` to ``out`` for ``oif``: fragmented to its MTU, or dropped when it cannot be."""
        mtu = self.wan_mtu if oif == WAN else self.lan_mtu
        k = (0 if oif == LAN else WAN_BASE) + proto_index(pkt[9])
        ctr = self.ctr
        if self.vseg and pkt is self.vpkt:  # a super-packet: the caller adds its offload header back
            if self.vseg > mtu:
                ctr.drop("too_big_super_packet")
                return
            self.vsent.append(len(out))
            ctr.sent(k, len(pkt))
            out.append((oif, bytes(pkt)))
            return
        if len(pkt) > mtu:
            if pkt[6] & 0x40:
                ctr.drop("too_big_df")
                return
            frags = fragment(pkt, ihl, mtu)
            ctr.count("fragments_sent", len(frags))
            for f in frags:
                ctr.sent(k, len(f))
                out.append((oif, bytes(f)))
            return
        ctr.sent(k, len(pkt))
        out.append((oif, bytes(pkt)))

    def icmp_error(self, iface: str, pkt: bytearray, ihl: int, typ: int, code: int, mtu: int, now: float,
                   out: Out, limit: bool = True) -> None:
        """Send an ICMP error about ``pkt`` back out of ``iface`` (never about an ICMP error)."""
        src = self.routes.lan_ip if iface == LAN else self.t.wan_ip
        err = self.icmp.make(src, pkt, ihl, typ, code, mtu, now, limit)
        if err is not None:
            self.send(iface, err, 20, out)

    # ------------------------------------------------------------------- local
    def local(self, iface: str, pkt: bytearray, ihl: int, proto: int, src: int, dst: int, out: Out,
              now: float = 0.0) -> None:
        """A packet for masqd itself: it answers echo requests and PCP / NAT-PMP requests (UDP
        5351 on the LAN address, from the LAN side) and drops the rest."""
        if proto == UDP and dst == self.routes.lan_ip and (pkt[ihl + 2] << 8 | pkt[ihl + 3]) == pcpwire.SERVER_PORT:
            self.pcp_request(iface, pkt, ihl, src, now, out)
            return
        if proto == ICMP and pkt[ihl] == ICMP_ECHO and pkt[ihl + 1] == 0:
            body = bytes(pkt[ihl + 4:])
            rep = bytearray(build_icmp(dst, src, ICMP_ECHOREPLY, 0, int.from_bytes(body[:4], "big"), body[4:]))
            self.ctr.count("echo_replies")
            self.send(iface, rep, 20, out)
            return
        self.ctr.drop("to_self")

    def pcp_request(self, iface: str, pkt: bytearray, ihl: int, src: int, now: float, out: Out) -> None:
        """A PCP / NAT-PMP request: answered from the LAN address, port 5351, through the output
        chain; what an SPI announcement released goes to the LAN like a helper's inbound packet."""
        pcp = self.pcp
        if pcp is None:
            self.ctr.drop("pcp_disabled")
            return
        if iface != LAN or self.routes.route(src) != LAN:
            self.ctr.drop("pcp_not_from_lan")
            return
        ulen = (pkt[ihl + 4] << 8) | pkt[ihl + 5]
        if not pcpwire.udp_checksum_ok(pkt, ihl, ulen):
            self.ctr.drop("pcp_bad_checksum")
            return
        sport = (pkt[ihl] << 8) | pkt[ihl + 1]
        answers, released = pcp.request(src, bytes(pkt[ihl + 8: ihl + ulen]), now)
        lan_ip = self.routes.lan_ip
        for a in answers:
            rep = pcpwire.build_udp(lan_ip, src, pcpwire.SERVER_PORT, sport, a)
            self.output(LAN, rep, 20, out, [], None, False)
        if released:
            self.deliver_helper(released, out)

    def attach_tcp_helper(self, s: Session, now: float) -> None:
        """A TCP session made outside the packet path (PCP PEER) gets its server port's helper."""
        h = self.tcp_helpers.get(s.rem_port) if s.m.proto == TCP else None
        if h is not None and s.helper is None:
            s.helper = h
            h.session_created(s, now)

    # -------------------------------------------------------------- masquerade
    def masq(self, pkt: bytearray, ihl: int, proto: int, src: int, dst: int, sport: int, dport: int,
             now: float, out: Out) -> Any:
        """Masquerade an outbound packet in place. Returns the entry whose firewall decision the
        caller caches while sending it (a Session or a helper's entry), or None: dropped or sent."""
        t, ctr = self.t, self.ctr
        if proto == UDP and sport == dport and sport in self.udp_helpers:
            h = self.udp_helpers[sport]
            if h.masq_out(pkt, ihl, now):
                decrement_ttl(pkt)
                self.output(WAN, pkt, ihl, out, [], None, True)
            return None
        if proto in (TCP, UDP):
            key = bytes(pkt[12:20]) + bytes(pkt[ihl: ihl + 4])
            s = t.out[proto].get(key)
            if s is None:
                if proto == TCP and self.reset_keys and key in self.reset_keys:
                    if not pkt[ihl + 13] & TH_SYN:
                        self.reset_lan(pkt, ihl, out)
                        return None
                    del self.reset_keys[key]
                if proto == TCP:
                    tfl = pkt[ihl + 13]
                    if tfl & TH_RST or (tfl & TH_FIN and not tfl & TH_ACK):
                        ctr.drop("tcp_no_session")
                        return None
                    st = T_SYN_SENT if tfl & TH_SYN else T_NEW
                else:
                    st = S_UNREPLIED
                m = t.new_mapping(proto, src, sport, now)
                if m is None:
                    return None
                th = self.tcp_helpers.get(dport) if proto == TCP else None
                s = t.new_session(m, dst, dport, now, st, helper=th)
                if s is None:
                    return None
                if th is not None:
                    th.session_created(s, now)
            elif proto == TCP:
                self.tcp_track(s, pkt[ihl + 13], True, now)
            elif s.state == S_INBOUND:  # the LAN side answers a session an inbound packet made
                t.set_state(s, S_REPLIED, now)
            if proto == TCP and pkt[ihl + 13] & TH_SYN:
                self.clamp_mss(pkt, ihl)
            translate_out(s, pkt, ihl)
            s.seen = now
            if s.helper is not None and not s.helper.tcp_segment(s, pkt, ihl, True, now):
                return None
            if self.hairpinning and dst == t.wan_ip:
                self.hairpin(pkt, ihl, now, out)
                return None
            return s
        if proto == ICMP:
            typ = pkt[ihl]
            if typ in ICMP_QUERIES:
                return self.masq_icmp_query(pkt, ihl, src, dst, now)
            if typ in ICMP_ERRORS:
                if self.icmp.translate_out(pkt, ihl):
                    if self.hairpinning and dst == t.wan_ip:
                        # about a hairpinned packet: back to the LAN host that sent it, translated as
                        # an error arriving from the WAN would be (translate_in takes one off the TTL)
                        if self.icmp.translate_in(pkt, ihl):
                            self.ctr.count("hairpinned")
                            self.send(LAN, pkt, ihl, out)
                        return None
                    decrement_ttl(pkt)
                    self.send(WAN, pkt, ihl, out)
                return None
            ctr.drop("icmp_type_not_masqueraded")
            return None
        if self.forwarders.owns_outbound(proto, src):
            self.forwarders.masq_out(pkt)
            decrement_ttl(pkt)
            self.output(WAN, pkt, ihl, out, [], None, True)
            return None
        ph = self.proto_helpers.get(proto)
        if ph is not None:
            if ph.masq_out(pkt, ihl, now):
                decrement_ttl(pkt)
                fe = getattr(ph, "fw_entry", None)
                if fe is not None:  # the caller outputs it with the chains' hits, cached on the entry
                    return fe
                self.output(WAN, pkt, ihl, out, [], None, True)
            return None
        ctr.drop("proto_not_masqueraded")
        return None

    def hairpin(self, pkt: bytearray, ihl: int, now: float, out: Out) -> None:
        """RFC 4787 REQ-9, RFC 5382 REQ-8: a LAN host reaching another LAN host's mapping (or a port
        forward), seen with the sender's external address and port. The packet comes from behind
        this NAT, so no inbound filtering applies to it, whatever ``inbound_filtering`` says; the
        target's session is tracked as an inbound packet's would be."""
        t = self.t
        self.ctr.count("hairpinned")
        proto = pkt[9]
        s = t.inb[proto].get(bytes(pkt[12:20]) + bytes(pkt[ihl: ihl + 4]))
        src = int.from_bytes(pkt[12:16], "big")
        sport = (pkt[ihl] << 8) | pkt[ihl + 1]
        if s is None:
            dport = (pkt[ihl + 2] << 8) | pkt[ihl + 3]
            m = t.pool.owner(proto, dport)
            if isinstance(m, Mapping):
                if proto == TCP and pkt[ihl + 13] & TH_RST:
                    self.ctr.drop("tcp_no_session")
                    return
                s = t.new_session(m, src, sport, now, S_INBOUND if proto == UDP else T_SYN_SENT, inbound=True)
            elif self.forwarders.port_forwarded(proto, dport):
                s = self.forwarded_session(proto, pkt, ihl, src, sport, dport, now)
            else:
                self.ctr.drop("hairpin_no_mapping")
            if s is None:
                return
        if proto == TCP:
            self.tcp_track(s, pkt[ihl + 13], False, now)
        elif s.state == S_UNREPLIED:
            t.set_state(s, S_REPLIED, now)
        translate_in(s, pkt, ihl)
        s.expires = now + s.tmo
        # translate_in decremented the TTL a second time; a hairpin is one hop
        old = (pkt[8] << 8) | pkt[9]
        pkt[8] += 1
        _pack_H(pkt, 10, apply_delta((pkt[10] << 8) | pkt[11], word_delta(old, old + 0x100)))
        self.send(LAN, pkt, ihl, out)

    def tcp_track(self, s: Session, tfl: int, outbound: bool, now: float) -> None:
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
        self.t.set_state(s, st, now)

    def clamp_mss(self, pkt: bytearray, ihl: int) -> None:
        if not self.mss_clamp:
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
                    w = ihl + ((i - ihl) & ~1)
                    old_words = ones_sum(pkt[w: w + 6])
                    _pack_H(pkt, i + 2, limit)
                    new_words = ones_sum(pkt[w: w + 6])
                    c = (pkt[ihl + 16] << 8) | pkt[ihl + 17]
                    _pack_H(pkt, ihl + 16, apply_delta(c, ((~old_words) & 0xFFFF) + new_words))
                    self.ctr.count("mss_clamped")
                return
            i += ln

    def masq_icmp_query(self, pkt: bytearray, ihl: int, src: int, dst: int, now: float) -> Session | None:
        t = self.t
        ident = (pkt[ihl + 4] << 8) | pkt[ihl + 5]
        key = bytes(pkt[12:20]) + bytes(pkt[ihl + 4: ihl + 6]) + b"\0\0"
        s = t.out[ICMP].get(key)
        if s is None:
            m = t.new_mapping(ICMP, src, ident, now)
            if m is None:
                return None
            s = t.new_session(m, dst, 0, now, S_UNREPLIED)
            if s is None:
                return None
        translate_out(s, pkt, ihl)
        s.seen = now
        return s

    # ------------------------------------------------------------ demasquerade
    def filter_ok(self, m: Mapping, rem_ip: int, rem_port: int) -> bool:
        """RFC 4787 REQ-8: may ``rem_ip:rem_port`` send to mapping ``m``?"""
        f = self.filtering
        if f == 0:
            return True
        for s in m.sessions():
            if s.rem_ip == rem_ip and (f == 1 or s.rem_port == rem_port):
                return True
        return False

    def demasq(self, pkt: bytearray, ihl: int, proto: int, src: int, sport: int, dport: int, now: float,
               out: Out, hits: list[Any]) -> bool:
        """Inbound to the WAN address. True when handled (delivered or dropped)."""
        t, ctr = self.t, self.ctr
        if proto in (TCP, UDP):
            if proto == UDP and sport == dport and sport in self.udp_helpers:
                h = self.udp_helpers[sport]
                res = h.demasq_in(pkt, ihl, now)
                if res is not None:
                    self.deliver_helper(res, out)
                    return True
            s = t.inb[proto].get(bytes(pkt[12:24]) if ihl == 20 else bytes(pkt[12:20]) + bytes(pkt[ihl:ihl + 4]))
            if s is None:
                owner = t.pool.owner(proto, dport)
                lease = owner.fwd if isinstance(owner, Mapping) else None
                if type(lease) is Lease:
                    s = self.leased_session(lease, pkt, ihl, src, sport, now, out)
                    if s is None:
                        return True
                elif isinstance(owner, Mapping) and self.filter_ok(owner, src, sport):
                    if proto == TCP and pkt[ihl + 13] & TH_RST:
                        ctr.drop("tcp_no_session")
                        return True
                    s = t.new_session(owner, src, sport, now, S_INBOUND if proto == UDP else T_SYN_SENT,
                                      inbound=True)
                    if s is None:
                        return True
                else:
                    s = self.forwarded_session(proto, pkt, ihl, src, sport, dport, now)
                    if s is None:
                        if not self.forwarders.port_forwarded(proto, dport):  # (else counted already)
                            ctr.drop("inbound_no_mapping")
                        return True
            if pkt[8] <= 1:
                self.icmp_error(WAN, pkt, ihl, ICMP_TIMXCEED, 0, 0, now, out)
                return True
            if self.size(pkt) > self.lan_mtu and pkt[6] & 0x40:
                self.icmp_error(WAN, pkt, ihl, ICMP_UNREACH, UNREACH_NEEDFRAG, self.lan_mtu, now, out)
                return True
            if proto == TCP:
                self.tcp_track(s, pkt[ihl + 13], False, now)
                if pkt[ihl + 13] & TH_SYN:
                    self.clamp_mss(pkt, ihl)
            elif s.state == S_UNREPLIED:
                t.set_state(s, S_REPLIED, now)
            translate_in(s, pkt, ihl)
            s.seen = now
            if s.helper is not None and not s.helper.tcp_segment(s, pkt, ihl, False, now):
                return True
            self.output(LAN, pkt, ihl, out, hits, s, False)
            return True
        if proto == ICMP:
            typ = pkt[ihl]
            if typ in ICMP_REPLIES:
                key = bytes(pkt[12:20]) + b"\0\0" + bytes(pkt[ihl + 4: ihl + 6])
                s = t.inb[ICMP].get(key)
                if s is None:
                    return False
                if pkt[8] <= 1:
                    return True
                t.set_state(s, S_REPLIED, now)
                translate_in(s, pkt, ihl)
                s.seen = now
                self.output(LAN, pkt, ihl, out, hits, s, False)
                return True
            if typ in ICMP_ERRORS:
                if pkt[8] <= 1:
                    ctr.drop("ttl_exceeded")
                    return True
                if self.icmp.translate_in(pkt, ihl):
                    self.output(LAN, pkt, ihl, out, hits, None, False)
                return True
            return False
        ph = self.proto_helpers.get(proto)
        if ph is not None:
            res = ph.demasq_in(pkt, ihl, now)
            if res is not None:
                self.deliver_helper(res, out, hits, getattr(ph, "fw_entry", None) if len(res) == 1 else None)
                return True
        res = self.forwarders.protocol_inbound(proto, pkt, ihl, now)
        if res is None:
            return False
        self.deliver_helper(res, out)
        return True

    def leased_session(self, lease: Lease, pkt: bytearray, ihl: int, src: int, sport: int, now: float,
                       out: Out) -> Session | None:
        """A new inbound connection through a PCP/NAT-PMP lease: a TCP one must open with a SYN,
        the remote must pass the lease's FILTER and the forward chain (towards the LAN host and
        port) must let it through; then a session, the server port's helper attached."""
        m = lease.m
        proto = m.proto
        flags = 0
        if proto == TCP:
            tfl = pkt[ihl + 13]
            if not tfl & TH_SYN or tfl & (TH_ACK | TH_RST):
                self.ctr.drop("pcp_not_syn")
                return None
            flags = fwmod.FLAG_SYN
        if not lease.allows(src, sport):
            self.ctr.drop("pcp_filtered")
            return None
        d = self.rules.evaluate("forward", LAN, proto, src, m.lan_ip, sport, m.lan_port, flags)
        if not self.fw_pass(d, "forward", WAN, pkt, ihl, out, []):
            return None
        s = self.t.new_session(m, src, sport, now, T_SYN_SENT if proto == TCP else S_REPLIED)
        if s is None:
            return None
        s.inbound = True
        lease.hits += 1
        self.ctr.count("pcp_connections")
        self.attach_tcp_helper_port(s, m.lan_port, now)
        return s

    def attach_tcp_helper_port(self, s: Session, port: int, now: float) -> None:
        h = self.tcp_helpers.get(port) if s.m.proto == TCP else None
        if h is not None:
            s.helper = h
            h.session_created(s, now)

    def forwarded_session(self, proto: int, pkt: bytearray, ihl: int, src: int, sport: int, dport: int,
                          now: float) -> Session | None:
        """A new inbound connection to a port forward (ipportfw / ipmasqadm portfw): a session
        through the chosen server's mapping, the TCP helper of the server's port attached."""
        m = self.forwarders.inbound_mapping(proto, pkt, ihl, dport)
        if m is None:
            return None
        h = self.tcp_helpers.get(m.lan_port) if proto == TCP else None
        s = self.t.new_session(m, src, sport, now, T_SYN_SENT if proto == TCP else S_INBOUND, inbound=True,
                               helper=h)
        if s is None:
            return None
        if h is not None:
            h.session_created(s, now)
        self.forwarders.connected(m)
        return s

    def deliver_helper(self, pkts: list[bytearray], out: Out, hits: list[Any] | None = None,
                       entry: Any = None) -> None:
        """Send a helper's inbound packets to the LAN; with ``entry`` (an object with a ``fw``
        slot, like a Session) the input/output chain decision is cached on it for a fast path."""
        for p in pkts:
            ihl = (p[0] & 15) << 2
            if p[8] <= 1:
                self.ctr.drop("ttl_exceeded")
                continue
            decrement_ttl(p)
            self.output(LAN, p, ihl, out, list(hits) if entry is not None and hits else [], entry, False)

    # ------------------------------------------------------- dynamic address
    def wan_changed(self, old: int, new: int, mode: str, now: float) -> None:
        """ip_dynaddr: move the sessions of the old address or close them, as ``mode`` says."""
        t = self.t
        for s in t.sessions():
            m = s.m
            if m.wan_ip != old:
                continue
            replied = s.state == S_REPLIED if m.proto != TCP else s.state not in (T_NEW, T_SYN_SENT)
            if mode == "rewrite-all" or (mode == "rewrite" and not replied):
                t.rebind(s, new)
            else:
                if m.proto == TCP and len(self.reset_keys) < RESET_KEYS_MAX:
                    # the LAN host learns at its next segment that the session is gone
                    self.reset_keys[s.out_key] = now + self.tcp_transitory
                t.remove(s, ADDRESS_CHANGE)

    def expire_resets(self, now: float) -> None:
        if self.reset_keys:
            for k in [k for k, tm in self.reset_keys.items() if tm <= now]:
                del self.reset_keys[k]

    def reset_lan(self, pkt: bytearray, ihl: int, out: Out) -> None:
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
        self.ctr.count("tcp_resets_sent")
        self.send(LAN, build_ipv4(src, dst, TCP, bytes(tcp)), 20, out)
