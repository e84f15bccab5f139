"""PPTP masquerade: Call-ID masquerade on the TCP 1723 control channel, GRE demultiplexing.

One job: let several LAN hosts run PPTP through the one WAN address at the
same time, to the same server or not, and let a PPTP server on the LAN (port
forwarded) answer calls, without mixing up anybody's GRE.

Design decisions:

- Control channel. The core masquerades the TCP connection as usual and hands
  every segment to ``tcp_segment`` after address/port translation. Each
  direction is a byte stream read with a bounded state (the first 20 bytes of
  the current message and a count), so messages may be split across segments
  or share one. Only bytes at the expected sequence number are parsed; a
  segment beyond it is dropped (counted ``drop_pptp_out_of_order``) so that the
  receiver never holds bytes we have not read; a retransmission gets the
  rewrites we applied the first time (recorded per direction, at most 16).
  A Call ID field that would need rewriting but is cut by the segment's end
  cannot be decided yet: the segment is trimmed just before the field (the
  sender resends the rest, which now starts with the whole field). The
  rewrite keeps every length, so sequence numbers never need adjusting; TCP
  checksums are updated incrementally, byte by byte (fields may sit at odd
  offsets).
- Garbage (bad magic, message type, length): the connection is given up. For
  a connection whose Call IDs we masquerade, the offending segment and every
  later data segment are dropped (``drop_pptp_malformed`` + the reason, then
  ``drop_pptp_stream_abandoned``): passing them unrewritten could make the
  server reuse a Call ID that another LAN client's masqueraded call already
  owns. A forwarded server's connection is never rewritten, so it only stops
  being tracked. Unknown control types with a valid header are passed as
  they are (``pptp_unknown_type``).
- Calls placed or answered by a LAN client (the TCP session was opened from
  the LAN): the client's own Call ID is replaced in outgoing messages by a
  masqueraded ID unique towards that server (the client's own value when it
  is free, like port preservation); the server's references to it (Peer's
  Call ID fields) are rewritten back. Inbound GRE whose key is a masqueraded
  ID goes to its client with the key rewritten back; outbound GRE (key = the
  server's Call ID) is masqueraded by source address.
- Calls answered by a forwarded LAN server (the session came in through a port
  forward, ``session.inbound``): IDs are not rewritten; the server's own Call
  IDs (from its Outgoing-Call-Reply / Incoming-Call-Request) are registered so
  inbound GRE with that key reaches that server, and its outbound GRE is
  masqueraded. Protocol forwarding of GRE (ipfwd) remains the fallback for GRE
  we do not know: inbound enhanced GRE that matches no call is left to it
  (``demasq_in`` returns None) when one is configured, else dropped
  (``drop_gre_no_call``).
- Plain GRE (version 0) is masqueraded by address pair, one LAN host per
  remote; other versions, or version 1 that is not PPP, are refused.
- Timers: a call lives ``call_setup_timeout`` while being set up,
  ``call_timeout`` (refreshed by its GRE) while up, ``call_clear_timeout`` after a
  Call-Clear-Request, Call-Disconnect-Notify, failed reply, Stop-Control-
  Connection or the end of its control connection; its masqueraded ID is
  free once the entry is gone. GRE of a call refreshes its control session.
- Bounds: calls and plain GRE entries together are at most ``pptp.max_entries``
  (refusals counted as ``drop_pptp_table_full``), calls per server at most
  ``max_calls_per_server``; inbound GRE that matches nothing creates nothing.
- Established GRE takes a fast path (``fast_out`` / ``fast_in``): like the
  core's sessions, a call caches the firewall chains' decision (``fw``, filled
  by the engine through ``fw_entry``) and anything unusual takes the full path.
- Calls (and plain GRE entries) are announced on the NAT table's change stream
  (``eng.changed``): ``new`` when set up begins, ``update`` ``state`` when the
  call is up (ESTABLISHED) and when it is being cleared (CLEARING),
  ``address-change`` when the WAN address moves under it, ``destroy`` with
  ``timeout`` (its timer, or the end of its clearing), ``flush``,
  ``address-change`` or ``replaced``.
"""

from __future__ import annotations

import random
import struct
from collections import deque
from typing import TYPE_CHECKING, Any

from masqd.engine.counters import LAN_GRE, WAN_GRE
from masqd.engine.expiry import TimerWheel
from masqd.engine.fastpath import FastEntry, rewrite_dst, rewrite_src
from masqd.engine.helpers.base import Helper
from masqd.engine.nat import TCP, TTL_DELTA, acct_row
from masqd.engine.table import ADDRESS_CHANGE, DESTROY, FLUSH, NEW, REPLACED, STATE, TIMEOUT, UPDATE
from masqd.wire.checksum import addr_delta, apply_delta, ones_sum, word_delta
from masqd.wire.gre import PLAIN, gre_kind
from masqd.wire.ipv4 import TH_FIN, TH_RST, TH_SYN, Malformed, ip_str
from masqd.wire.pptp import (
    CALL_CLEAR_REQ,
    CALL_DISCONNECT_NOTIFY,
    CALL_ID_FIELDS,
    IN_CALL_CONNECTED,
    IN_CALL_REPLY,
    IN_CALL_REQ,
    NAMES,
    OUT_CALL_REPLY,
    OUT_CALL_REQ,
    OWN,
    PEER,
    RESULT_OFF,
    RESULT_OK,
    STOP_CTRL_REPLY,
    STOP_CTRL_REQ,
    check_header,
)

if TYPE_CHECKING:
    from masqd.config import Config
    from masqd.engine.api import EngineAPI
    from masqd.engine.nat import Session

GRE = 47
SETUP, ACTIVE, CLEARING = 0, 1, 2
STATE_NAMES = ("SETUP", "ESTABLISHED", "CLEARING")
_M = 0xFFFFFFFF
_KEEP = 20  # bytes of each message kept: header, Call IDs, result code
_CREATES = (OUT_CALL_REQ, OUT_CALL_REPLY, IN_CALL_REQ, IN_CALL_REPLY)
# Enhanced GRE headers the fast path takes (K and S set, A optional, version 1, PPP) -> IP + GRE
# header length; anything else (acknowledgment-only packets included) takes the full path.
_FAST_HDR = {b"\x30\x01\x88\x0b": 32, b"\x30\x81\x88\x0b": 36}
# why a call was removed -> the reason of its change (masqd.engine.table)
_REASONS = {"expired": TIMEOUT, "cleared": TIMEOUT, "flushed": FLUSH, "replaced": REPLACED}
_pack_H = struct.Struct("!H").pack_into
_pack_H4s = struct.Struct("!H4s").pack_into


class Call:
    """One PPTP call (one GRE flow pair) between a LAN host and a remote."""

    __slots__ = ("conn", "ctl", "lan_ip", "lan_ip_b", "lan_cid", "lan_cid_b", "masq_cid", "rem_ip", "rem_cid",
                 "state", "expires", "dead", "forwarded", "in_key", "out_key", "dip_out", "dip_in", "up", "fw",
                 "a_out", "a_in")

    def __init__(self, conn: Conn, lan_cid: int, masq_cid: int) -> None:
        self.conn = conn
        self.ctl: Session | None = conn.s
        self.lan_ip = conn.lan_ip
        self.lan_ip_b = conn.lan_ip.to_bytes(4, "big")
        self.lan_cid = lan_cid
        self.lan_cid_b = lan_cid.to_bytes(2, "big")
        self.masq_cid = masq_cid
        self.rem_ip = conn.rem_ip
        self.rem_cid: int | None = None
        self.state = SETUP
        self.expires = 0.0
        self.dead = False
        self.forwarded = conn.forwarded
        self.in_key: bytes | None = None  # registered key in PPTPHelper.in_calls
        self.out_key: bytes | None = None
        self.dip_out = 0
        self.dip_in = 0
        self.up = False  # counted in pptp_calls_setup
        self.fw: Any = None  # firewall decision cache filled by the engine: [gen, out_hits, in_hits]
        self.a_out: Any = None  # packet/byte counters under masquerade.accounting (Acct)
        self.a_in: Any = None


class Stream:
    """One direction of a control connection: where we are in its byte stream."""

    __slots__ = ("exp", "hdr", "pos", "mlen", "ctype", "rw")

    def __init__(self) -> None:
        self.exp: int | None = None  # next expected sequence number
        self.hdr = bytearray()  # first _KEEP bytes of the current message, as received
        self.pos = 0  # bytes of the current message read
        self.mlen = 0  # its length, once the header is read
        self.ctype = 0
        # rewrites applied: (sequence number of the field, old bytes, new bytes)
        self.rw: deque[tuple[int, bytes, bytes]] = deque(maxlen=16)


class Conn:
    """A PPTP control connection (helper data of its TCP session). ``key``: the session's
    outbound lookup key, which names the connection in records. A restored call whose control
    connection had already ended gets a detached one (``s`` None, the other fields given)."""

    __slots__ = ("s", "key", "lan_ip", "rem_ip", "forwarded", "calls", "dirs", "broken")

    def __init__(self, s: Session | None, key: bytes = b"", lan_ip: int = 0, rem_ip: int = 0,
                 forwarded: bool = False) -> None:
        self.s: Session | None = s
        if s is not None:
            key, lan_ip, rem_ip, forwarded = s.out_key, s.m.lan_ip, s.rem_ip, bool(s.inbound)
        self.key = key
        self.lan_ip = lan_ip
        self.rem_ip = rem_ip
        self.forwarded = forwarded
        self.calls: dict[int, Call] = {}  # by the LAN side's own Call ID
        self.dirs = (Stream(), Stream())  # 0: LAN -> WAN, 1: WAN -> LAN
        self.broken = ""


class _Plain:
    __slots__ = ("lan_ip", "rem_ip", "expires", "dead", "dip_out", "dip_in", "lan_ip_b")

    def __init__(self, lan_ip: int, rem_ip: int) -> None:
        self.lan_ip = lan_ip
        self.lan_ip_b = lan_ip.to_bytes(4, "big")
        self.rem_ip = rem_ip
        self.expires = 0.0
        self.dead = False
        self.dip_out = 0
        self.dip_in = 0


def _byte_delta(pkt: bytearray, idx: int, tcp_off: int, new: int) -> int:
    """Set pkt[idx] = new; the checksum delta (the byte's weight depends on its offset parity)."""
    old = pkt[idx]
    pkt[idx] = new
    if (idx - tcp_off) & 1:
        return word_delta(old, new)
    return word_delta(old << 8, new << 8)


class PPTPHelper(Helper):
    name = "pptp"
    ip_protocols = (47,)

    def __init__(self, eng: EngineAPI, cfg: Config) -> None:
        super().__init__(eng, cfg)
        self.in_calls: dict[bytes, Call] = {}  # remote ip (4) + Call ID the remote sends to (2)
        self.out_calls: dict[bytes, Call] = {}  # lan ip + remote ip + the remote's Call ID
        self.server_calls: dict[int, int] = {}  # remote ip -> calls registered towards it
        self.conns: dict[int, dict[Conn, None]] = {}  # remote ip -> live control connections
        self.plain_out: dict[bytes, _Plain] = {}  # lan ip + remote ip
        self.plain_in: dict[bytes, _Plain] = {}  # remote ip
        self.ncalls = 0
        self.calls: dict[Call, None] = {}  # every call entry
        self._orphans: list[Call] = []  # calls whose control connection ended
        self._wheel = TimerWheel()
        self._rng = random.Random(0x7070)
        self.fw_entry: Call | None = None  # the call of the packet just handled: the engine caches chains on it
        self._full_logged = -1e18
        self._detached: dict[bytes, Conn] = {}  # restored calls' ended control connections, by key
        self.reload(cfg)

    def reload(self, cfg: Config) -> None:
        self.cfg = cfg
        p = cfg.pptp
        self.tcp_ports = (p.port,)
        self.t_setup = p.call_setup_timeout
        self.t_call = p.call_timeout
        self.t_clear = p.call_clear_timeout
        self.max_calls = p.max_calls_per_server
        self.max_entries = p.max_entries
        self.t_plain = cfg.masquerade.effective_timeouts.other

    def enabled(self) -> bool:
        return self.cfg.pptp.enabled

    # ================================================================ control
    def session_created(self, s: Session, now: float) -> None:
        conn = Conn(s)
        s.hdata = conn
        peers = self.conns.setdefault(conn.rem_ip, {})
        if not conn.forwarded:
            others = {c.lan_ip for c in peers if not c.forwarded and c.lan_ip != conn.lan_ip}
            if others:
                self.eng.count("pptp_second_control_connections")
                self.eng.event("info", "pptp_second_control_connection", lan=ip_str(conn.lan_ip),
                               server=ip_str(conn.rem_ip), others=sorted(ip_str(x) for x in others),
                               note="RFC 2637 allows one control connection per pair of systems; "
                                    "Call IDs are masqueraded so both work")
        peers[conn] = None
        self.eng.changed(NEW, conn)

    def session_closed(self, s: Session) -> None:
        conn = s.hdata
        if not isinstance(conn, Conn):
            return
        conn.s = None
        peers = self.conns.get(conn.rem_ip)
        if peers is not None:
            peers.pop(conn, None)
            if not peers:
                del self.conns[conn.rem_ip]
        # its calls are over; their grace period starts at the next expire() (we do not know "now" here)
        for call in list(conn.calls.values()):
            call.ctl = None
            self._orphans.append(call)

    def tcp_segment(self, s: Session, pkt: bytearray, ihl: int, outbound: bool, now: float) -> bool:
        conn = s.hdata
        if not isinstance(conn, Conn):
            return True
        st = conn.dirs[0 if outbound else 1]
        before = (st.exp, st.pos, conn.broken)
        ok = self._segment(conn, pkt, ihl, outbound, now)
        if (st.exp, st.pos, conn.broken) != before:  # where the stream is read: a change of state
            self.eng.changed(UPDATE, conn, "stream")
        return ok

    def _segment(self, conn: Conn, pkt: bytearray, ihl: int, outbound: bool, now: float) -> bool:
        tcp = ihl
        doff = (pkt[tcp + 12] >> 4) << 2
        data = tcp + doff
        plen = len(pkt) - data
        fl = pkt[tcp + 13]
        if fl & TH_RST:
            return True
        if conn.broken:
            if plen > 0 and not conn.forwarded:
                self.eng.drop("pptp_stream_abandoned")
                return False
            return True
        st = conn.dirs[0 if outbound else 1]
        seq = int.from_bytes(pkt[tcp + 4: tcp + 8], "big")
        if fl & TH_SYN:
            seq = (seq + 1) & _M
            st.exp = seq
        if plen <= 0:
            return True
        if st.exp is None:  # attached mid-stream: assume a message starts here (checked by its magic)
            st.exp = seq
        d = (seq - st.exp) & _M
        if d and d < 0x80000000:
            self.eng.drop("pptp_out_of_order")
            return False
        delta = 0
        start = 0
        if d:
            back = 0x100000000 - d  # bytes of this segment before the expected sequence number
            delta = self._reapply(st, pkt, tcp, data, seq, plen)
            if back >= plen:
                if delta:
                    self._fix(pkt, tcp, delta)
                return True
            start = back
        try:
            keep, dd = self._parse(conn, st, outbound, pkt, tcp, data, start, plen, seq, now)
        except Malformed as exc:
            return self._abandon(conn, exc.reason, outbound)
        delta += dd
        if keep < plen:
            if keep <= 0:
                self.eng.drop("pptp_split_field")
                return False
            delta += self._trim(pkt, tcp, data, keep)
            self.eng.count("pptp_segments_trimmed")
        if delta:
            self._fix(pkt, tcp, delta)
        st.exp = (seq + keep) & _M
        return True

    def _abandon(self, conn: Conn, reason: str, outbound: bool) -> bool:
        conn.broken = reason
        eng = self.eng
        eng.count("pptp_streams_abandoned")
        eng.event("warning", "pptp_stream_abandoned", reason=reason, lan=ip_str(conn.lan_ip),
                  server=ip_str(conn.rem_ip), direction="out" if outbound else "in",
                  action="passed on, no longer tracked" if conn.forwarded else "connection's data dropped")
        if conn.forwarded:
            eng.count("pptp_malformed_" + reason)
            return True
        eng.drop("pptp_malformed")
        eng.drop(reason)
        return False

    @staticmethod
    def _fix(pkt: bytearray, tcp: int, delta: int) -> None:
        c = apply_delta((pkt[tcp + 16] << 8) | pkt[tcp + 17], delta)
        pkt[tcp + 16] = c >> 8
        pkt[tcp + 17] = c & 0xFF

    def _trim(self, pkt: bytearray, tcp: int, data: int, keep: int) -> int:
        """Cut the segment after ``keep`` payload bytes; returns the TCP checksum delta (IP header fixed here)."""
        cut = data + keep
        removed = bytes(pkt[cut:])
        if (cut - tcp) & 1:
            removed = b"\0" + removed
        delta = word_delta(ones_sum(removed), 0)
        old_tl = len(pkt) - tcp
        delta += word_delta(old_tl, cut - tcp)  # pseudo-header length
        fl = pkt[tcp + 13]
        if fl & TH_FIN:  # the FIN now lies beyond what is sent
            w = (pkt[tcp + 12] << 8) | fl
            pkt[tcp + 13] = fl & ~TH_FIN
            delta += word_delta(w, w & ~TH_FIN)
        del pkt[cut:]
        old_ip = (pkt[2] << 8) | pkt[3]
        pkt[2] = cut >> 8
        pkt[3] = cut & 0xFF
        c = apply_delta((pkt[10] << 8) | pkt[11], word_delta(old_ip, cut))
        pkt[10] = c >> 8
        pkt[11] = c & 0xFF
        return delta

    @staticmethod
    def _reapply(st: Stream, pkt: bytearray, tcp: int, data: int, seq: int, plen: int) -> int:
        delta = 0
        for fseq, old, new in st.rw:
            for j in (0, 1):
                k = ((fseq + j) - seq) & _M
                if k < plen and pkt[data + k] == old[j] and old[j] != new[j]:
                    delta += _byte_delta(pkt, data + k, tcp, new[j])
        return delta

    def _rewritable(self, conn: Conn, outbound: bool, ctype: int, kind: int) -> bool:
        if conn.forwarded:
            return False
        if outbound:
            return kind == OWN
        return kind == PEER or ctype == CALL_DISCONNECT_NOTIFY

    def _parse(self, conn: Conn, st: Stream, outbound: bool, pkt: bytearray, tcp: int, data: int, i: int,
               plen: int, seq: int, now: float) -> tuple[int, int]:
        """Read payload bytes [i, plen) (at the expected sequence number). Returns (bytes to keep,
        checksum delta). Raises Malformed on garbage."""
        delta = 0
        while i < plen:
            pos = st.pos
            if pos < 12:
                take = min(12 - pos, plen - i)
                st.hdr += pkt[data + i: data + i + take]
                st.pos = pos + take
                i += take
                if st.pos == 12:
                    st.mlen, st.ctype = check_header(st.hdr)
                    if st.ctype not in NAMES:
                        self.eng.count("pptp_unknown_type")
                continue
            mlen = st.mlen
            # a Call ID field starting here?
            fld = -1
            for off, kind in CALL_ID_FIELDS.get(st.ctype, ()):
                if off == pos:
                    fld = kind
                    break
            if fld >= 0 and self._rewritable(conn, outbound, st.ctype, fld):
                if plen - i < 2:
                    return i, delta  # the field is cut: trim before it
                old = (pkt[data + i] << 8) | pkt[data + i + 1]
                new = self._field(conn, outbound, st.ctype, fld, old, now)
                st.hdr += pkt[data + i: data + i + 2]
                if new != old:
                    delta += _byte_delta(pkt, data + i, tcp, new >> 8)
                    delta += _byte_delta(pkt, data + i + 1, tcp, new & 0xFF)
                    st.rw.append(((seq + i) & _M, old.to_bytes(2, "big"), new.to_bytes(2, "big")))
                    self.eng.count("pptp_call_ids_rewritten")
                st.pos = pos + 2
                i += 2
            else:
                # plain bytes up to the next field or the end of the message
                nxt = mlen
                for off, _kind in CALL_ID_FIELDS.get(st.ctype, ()):
                    if pos < off < nxt:
                        nxt = off
                take = min(nxt - pos, plen - i)
                if pos < _KEEP:
                    k = min(take, _KEEP - pos)
                    st.hdr += pkt[data + i: data + i + k]
                st.pos = pos + take
                i += take
            if st.pos >= mlen:
                try:
                    self._message(conn, outbound, st.ctype, st.hdr, now)
                finally:
                    st.hdr = bytearray()
                    st.pos = 0
                    st.mlen = 0
                    st.ctype = 0
        return plen, delta

    # ------------------------------------------------------------ call table
    def _field(self, conn: Conn, outbound: bool, ctype: int, kind: int, v: int, now: float) -> int:
        """The value to put in a Call ID field that we rewrite (client connections only)."""
        if outbound:  # the client's own Call ID -> its masqueraded ID
            call = conn.calls.get(v)
            if ctype in _CREATES and (call is None or ctype in (OUT_CALL_REQ, IN_CALL_REQ)):
                if call is not None:  # the client reuses an ID: the old call is over
                    self._remove(call, REPLACED)
                call = self._new_call(conn, v, now)
                if call is None:
                    full = self.ncalls + len(self.plain_out) >= self.max_entries
                    raise Malformed("pptp_table_full" if full else "pptp_call_ids_exhausted")
            if call is None:
                self.eng.count("pptp_unknown_call_id")
                return v
            return call.masq_cid
        # inbound: a reference to the client's call (masqueraded ID) -> the client's own ID
        if ctype == CALL_DISCONNECT_NOTIFY:
            # RFC 2637: the sender's own ID; some peers send the receiver's: accept both
            for c in conn.calls.values():
                if c.rem_cid == v:
                    return v
        call = self.in_calls.get(conn.rem_ip.to_bytes(4, "big") + v.to_bytes(2, "big"))
        if call is None or call.conn is not conn:
            if ctype != CALL_DISCONNECT_NOTIFY:
                self.eng.count("pptp_unknown_call_id")
            return v
        return call.lan_cid

    def _full(self, now: float) -> bool:
        """The table (calls and plain GRE entries) is full: counted, logged at most every 10 s."""
        if self.ncalls + len(self.plain_out) < self.max_entries:
            return False
        self.eng.drop("pptp_table_full")
        if now - self._full_logged >= 10.0:
            self._full_logged = now
            self.eng.event("warning", "pptp_table_full", limit=self.max_entries)
        return True

    def _new_call(self, conn: Conn, lan_cid: int, now: float) -> Call | None:
        rem = conn.rem_ip
        rb = rem.to_bytes(4, "big")
        if self._full(now):
            return None
        if self.server_calls.get(rem, 0) >= self.max_calls:
            if now - self._full_logged >= 10.0:
                self._full_logged = now
                self.eng.event("warning", "pptp_call_ids_exhausted", server=ip_str(rem), limit=self.max_calls)
            return None
        masq = lan_cid
        if not conn.forwarded:
            got = self._alloc(rb, lan_cid)
            if got is None:
                return None
            masq = got
        call = Call(conn, lan_cid, masq)
        conn.calls[lan_cid] = call
        self.calls[call] = None
        key = rb + masq.to_bytes(2, "big")
        if key in self.in_calls:  # only for a forwarded server: a client's call owns the ID
            self.eng.count("pptp_call_id_conflicts")
            self.eng.event("warning", "pptp_call_id_conflict", lan=ip_str(conn.lan_ip), call_id=lan_cid,
                           remote=ip_str(rem), note="its inbound GRE is left to protocol forwarding")
        else:
            self.in_calls[key] = call
            call.in_key = key
        self.server_calls[rem] = self.server_calls.get(rem, 0) + 1
        self.ncalls += 1
        self._gauge()
        self._deltas(call)
        call.expires = now + self.t_setup
        self.eng.changed(NEW, call)
        self._wheel.add(call, call.expires)
        self.eng.event("debug", "pptp_call_created", lan=ip_str(conn.lan_ip), call_id=lan_cid, masq_call_id=masq,
                       server=ip_str(rem), forwarded=conn.forwarded)
        return call

    def _alloc(self, rb: bytes, wanted: int) -> int | None:
        ic = self.in_calls
        if wanted and rb + wanted.to_bytes(2, "big") not in ic:
            return wanted
        rng = self._rng
        for _ in range(32):
            c = rng.randrange(1, 0x10000)
            if rb + c.to_bytes(2, "big") not in ic:
                return c
        start = rng.randrange(1, 0x10000)
        for k in range(0xFFFF):
            c = (start + k - 1) % 0xFFFF + 1
            if rb + c.to_bytes(2, "big") not in ic:
                return c
        return None

    def _deltas(self, c: Call | _Plain) -> None:
        wan = self.eng.wan_ip
        c.dip_out = addr_delta(c.lan_ip, wan)
        c.dip_in = addr_delta(wan, c.lan_ip)

    def _gauge(self) -> None:
        self.eng.gauge("pptp_call_ids_in_use", self.ncalls)

    def _set_rem(self, call: Call, rem_cid: int) -> None:
        if call.out_key is not None and self.out_calls.get(call.out_key) is call:
            del self.out_calls[call.out_key]
            self.eng.fast_void()  # the flow cache may hold the old key
        call.rem_cid = rem_cid
        call.out_key = call.lan_ip_b + call.rem_ip.to_bytes(4, "big") + rem_cid.to_bytes(2, "big")
        self.out_calls[call.out_key] = call

    def _set_state(self, call: Call, state: int, now: float) -> None:
        if call.dead:
            return
        if state == ACTIVE:
            if call.state == CLEARING:
                return
            if not call.up:
                call.up = True
                self.eng.count("pptp_calls_setup")
                self.eng.event("info", "pptp_call_up", lan=ip_str(call.lan_ip), call_id=call.lan_cid,
                               masq_call_id=call.masq_cid, server=ip_str(call.rem_ip), server_call_id=call.rem_cid,
                               forwarded=call.forwarded)
            changed = call.state != ACTIVE
            call.state = ACTIVE
            call.expires = now + self.t_call
            if changed:
                self.eng.changed(UPDATE, call, STATE)
            return
        if state == CLEARING:
            if call.state != CLEARING:
                call.state = CLEARING
                call.expires = now + self.t_clear
                self._wheel.add(call, call.expires)  # earlier than its filed deadline
                self.eng.changed(UPDATE, call, STATE)
            return
        if call.state != state:
            call.state = state
            self.eng.changed(UPDATE, call, STATE)

    def _remove(self, call: Call, why: str) -> None:
        """Remove a call; ``why`` is a destroy reason of :mod:`masqd.engine.table`."""
        if call.dead:
            return
        call.dead = True
        self.eng.changed(DESTROY, call, _REASONS.get(why, why))
        self.eng.fast_void()  # the data plane's flow cache may repeat its GRE rewrites
        if call.in_key is not None and self.in_calls.get(call.in_key) is call:
            del self.in_calls[call.in_key]
        if call.out_key is not None and self.out_calls.get(call.out_key) is call:
            del self.out_calls[call.out_key]
        self.calls.pop(call, None)
        conn = call.conn
        if conn.calls.get(call.lan_cid) is call:
            del conn.calls[call.lan_cid]
        if conn.s is None and not conn.calls and self._detached.get(conn.key) is conn:
            del self._detached[conn.key]
        n = self.server_calls.get(call.rem_ip, 0) - 1
        if n > 0:
            self.server_calls[call.rem_ip] = n
        else:
            self.server_calls.pop(call.rem_ip, None)
        self.ncalls -= 1
        self._gauge()
        self.eng.count("pptp_calls_torn_down")
        self.eng.event("info", "pptp_call_down", lan=ip_str(call.lan_ip), call_id=call.lan_cid,
                       masq_call_id=call.masq_cid, server=ip_str(call.rem_ip), server_call_id=call.rem_cid,
                       reason=("cleared" if call.state == CLEARING else "expired") if why == TIMEOUT
                       else "flushed" if why == FLUSH else why)

    def _message(self, conn: Conn, outbound: bool, ctype: int, hdr: bytearray, now: float) -> None:
        """A whole message was read: update the call table (values as received)."""
        if ctype in (STOP_CTRL_REQ, STOP_CTRL_REPLY):
            for c in list(conn.calls.values()):
                self._set_state(c, CLEARING, now)
            return
        fields = CALL_ID_FIELDS.get(ctype)
        if fields is None or len(hdr) < 14:
            return
        own = (hdr[12] << 8) | hdr[13]
        peer = ((hdr[14] << 8) | hdr[15]) if len(hdr) >= 16 else 0
        ok = ctype not in RESULT_OK or (len(hdr) > RESULT_OFF and hdr[RESULT_OFF] == RESULT_OK[ctype])
        if outbound:
            # fields as the LAN side wrote them: own = its own ID, peer = the remote's
            if ctype in _CREATES:
                call = conn.calls.get(own)
                if call is None:  # forwarded server (client calls were created at the field)
                    if not conn.forwarded:
                        return
                    call = self._new_call(conn, own, now)
                    if call is None:
                        return
                if ctype in (OUT_CALL_REPLY, IN_CALL_REPLY):
                    self._set_rem(call, peer)
                    if not ok:
                        self._set_state(call, CLEARING, now)
                    elif ctype == OUT_CALL_REPLY:
                        self._set_state(call, ACTIVE, now)
                    else:  # (an incoming call's reply: the call learnt the peer's ID, still being set up)
                        self.eng.changed(UPDATE, call, STATE)
            elif ctype == IN_CALL_CONNECTED:
                for c in conn.calls.values():
                    if c.rem_cid == own:  # ICCN's only field is the peer's ID, at offset 12
                        self._set_state(c, ACTIVE, now)
            elif ctype in (CALL_CLEAR_REQ, CALL_DISCONNECT_NOTIFY):
                call = conn.calls.get(own)
                if call is not None:
                    self._set_state(call, CLEARING, now)
            return
        # inbound: own = the remote's ID; peer = the LAN side's ID as the remote knows it (masqueraded)
        if ctype in (OUT_CALL_REPLY, IN_CALL_REPLY):
            call = self._by_masq(conn, peer)
            if call is not None:
                self._set_rem(call, own)
                if not ok:
                    self._set_state(call, CLEARING, now)
                elif ctype == OUT_CALL_REPLY:
                    self._set_state(call, ACTIVE, now)
                else:  # (an incoming call's reply: the call learnt the peer's ID, still being set up)
                    self.eng.changed(UPDATE, call, STATE)
        elif ctype == IN_CALL_CONNECTED:
            call = self._by_masq(conn, own)
            if call is not None:
                self._set_state(call, ACTIVE, now)
        elif ctype in (CALL_CLEAR_REQ, CALL_DISCONNECT_NOTIFY):
            hit = [c for c in conn.calls.values() if c.rem_cid == own]
            if not hit and ctype == CALL_DISCONNECT_NOTIFY:
                c2 = self._by_masq(conn, own)
                hit = [c2] if c2 is not None else []
            for c in hit:
                self._set_state(c, CLEARING, now)

    def _by_masq(self, conn: Conn, masq: int) -> Call | None:
        for c in conn.calls.values():
            if c.masq_cid == masq:
                return c
        return None

    # ==================================================================== GRE
    def masq_out(self, pkt: bytearray, ihl: int, now: float) -> bool:
        self.fw_entry = None
        kind = gre_kind(pkt, ihl)
        if kind == PLAIN:
            return self._plain_out(pkt, now)
        call = self.out_calls.get(bytes(pkt[12:20]) + bytes(pkt[ihl + 6: ihl + 8]))
        if call is None:
            self.eng.drop("gre_no_call")
            return False
        c = apply_delta((pkt[10] << 8) | pkt[11], call.dip_out)
        pkt[10] = c >> 8
        pkt[11] = c & 0xFF
        pkt[12:16] = self.eng.wan_ip_b
        self._touch(call, now)
        self.fw_entry = call
        return True

    def demasq_in(self, pkt: bytearray, ihl: int, now: float) -> list[bytearray] | None:
        self.fw_entry = None
        kind = gre_kind(pkt, ihl)
        if kind == PLAIN:
            return self._plain_in(pkt, now)
        call = self.in_calls.get(bytes(pkt[12:16]) + bytes(pkt[ihl + 6: ihl + 8]))
        if call is None:
            if self._protofw():
                return None
            self.eng.drop("gre_no_call")
            return []
        c = apply_delta((pkt[10] << 8) | pkt[11], call.dip_in)
        pkt[10] = c >> 8
        pkt[11] = c & 0xFF
        pkt[16:20] = call.lan_ip_b
        pkt[ihl + 6: ihl + 8] = call.lan_cid_b
        self._touch(call, now)
        self.fw_entry = call
        return [pkt]

    def _touch(self, call: Call, now: float) -> None:
        if call.state == ACTIVE:
            call.expires = now + self.t_call
        s = call.ctl
        if s is not None:
            s.seen = now

    def _protofw(self) -> bool:
        return self.eng.proto_forwarded(47)

    def _plain_out(self, pkt: bytearray, now: float) -> bool:
        key = bytes(pkt[12:20])
        e = self.plain_out.get(key)
        if e is None:
            src = int.from_bytes(pkt[12:16], "big")
            rem = int.from_bytes(pkt[16:20], "big")
            other = self.plain_in.get(bytes(pkt[16:20]))
            if other is not None and other.lan_ip != src:
                self.eng.drop("gre_plain_remote_busy")
                return False
            if self._full(now):
                return False
            e = _Plain(src, rem)
            self._deltas(e)
            self.plain_out[key] = e
            self.plain_in[bytes(pkt[16:20])] = e
            e.expires = now + self.t_plain
            self._wheel.add(e, e.expires)
            self.eng.changed(NEW, e)
            self.eng.event("debug", "entry_created", proto="gre", lan=ip_str(src), remote=ip_str(rem), kind="plain")
        c = apply_delta((pkt[10] << 8) | pkt[11], e.dip_out)
        pkt[10] = c >> 8
        pkt[11] = c & 0xFF
        pkt[12:16] = self.eng.wan_ip_b
        e.expires = now + self.t_plain
        return True

    def _plain_in(self, pkt: bytearray, now: float) -> list[bytearray] | None:
        e = self.plain_in.get(bytes(pkt[12:16]))
        if e is None:
            if self._protofw():
                return None
            self.eng.drop("gre_no_entry")
            return []
        c = apply_delta((pkt[10] << 8) | pkt[11], e.dip_in)
        pkt[10] = c >> 8
        pkt[11] = c & 0xFF
        pkt[16:20] = e.lan_ip_b
        e.expires = now + self.t_plain
        return [pkt]

    # --------------------------------------------------------------- fast path
    def fast_out(self, data: bytes, now: float) -> list[tuple[str, bytes]] | None:
        """Established enhanced GRE from a LAN host (IPv4 header checked by the core: 20 bytes,
        no fragment, TTL > 1). None: take the full path (which also counts what is wrong)."""
        hl = _FAST_HDR.get(data[20:24])
        call = self.out_calls.get(data[12:20] + data[26:28])
        if hl is None or call is None:
            return None
        eng = self.eng
        n = len(data)
        if n > eng.wan_mtu or (data[2] << 8 | data[3]) != n or (data[24] << 8 | data[25]) > n - hl:
            return None
        hits = eng.fast_hits(call, 0)
        if hits is None:
            return None
        pkt = rewrite_src(data, call.dip_out + TTL_DELTA, eng.wan_ip_b)
        self._touch(call, now)
        eng.fast_account(hits, LAN_GRE, WAN_GRE, n)
        return [("wan", bytes(pkt))]

    def fast_in(self, data: bytes, now: float) -> list[tuple[str, bytes]] | None:
        """Established enhanced GRE to the WAN address. None: take the full path."""
        hl = _FAST_HDR.get(data[20:24])
        call = self.in_calls.get(data[12:16] + data[26:28])
        if hl is None or call is None:
            return None
        eng = self.eng
        n = len(data)
        if (data[16:20] != eng.wan_ip_b or n > eng.lan_mtu or (data[2] << 8 | data[3]) != n
                or (data[24] << 8 | data[25]) > n - hl):
            return None
        hits = eng.fast_hits(call, 1)
        if hits is None:
            return None
        pkt = rewrite_dst(data, call.dip_in + TTL_DELTA, call.lan_ip_b)
        pkt[26:28] = call.lan_cid_b
        self._touch(call, now)
        eng.fast_account(hits, WAN_GRE, LAN_GRE, n)
        return [("lan", bytes(pkt))]

    def fast_entry(self, d: int, data: bytes | bytearray) -> FastEntry | None:
        """What ``fast_out`` (``d`` 0) or ``fast_in`` (1) does to the GRE of the call of ``data``,
        for a cache outside the engine (``FastPath.entry``): the address, and inbound the key
        (at IP + 26) back to the LAN side's own Call ID (enhanced GRE has no checksum). The
        lookup key is the packet's addresses and its key field. None: not an established call
        whose firewall decision is cached, or a header the fast path does not take."""
        if len(data) < 36 or _FAST_HDR.get(bytes(data[20:24])) is None:
            return None
        eng = self.eng
        key = bytes(data[12:20]) + bytes(data[26:28]) + b"\0\0"
        if d == 0:
            call = self.out_calls.get(bytes(data[12:20]) + bytes(data[26:28]))
            if call is None or eng.fast_hits(call, 0) is None:
                return None
            return (0, GRE, key, call, eng.wan_ip_b, -1, call.dip_out + TTL_DELTA, 0, eng.wan_mtu)
        call = self.in_calls.get(bytes(data[12:16]) + bytes(data[26:28]))
        if call is None or bytes(data[16:20]) != eng.wan_ip_b or eng.fast_hits(call, 1) is None:
            return None
        return (1, GRE, key, call, call.lan_ip_b, call.lan_cid, call.dip_in + TTL_DELTA, 0, eng.lan_mtu)

    def fast_fold(self, call: Call, last: float) -> None:
        """A cache outside the engine forwarded GRE of ``call``, the last packet at ``last``: the
        refresh ``fast_out`` / ``fast_in`` would have made (the call while up, its control session)."""
        if call.state == ACTIVE and last + self.t_call > call.expires:
            call.expires = last + self.t_call
        s = call.ctl
        if s is not None and last > s.seen:
            s.seen = last

    # ============================================================ housekeeping
    def expire(self, now: float) -> None:
        if self._orphans:
            for c in self._orphans:
                if not c.dead and c.state != CLEARING:
                    c.state = CLEARING
                    c.expires = now + self.t_clear
                    self._wheel.add(c, c.expires)
                    self.eng.changed(UPDATE, c, STATE)
            self._orphans.clear()
        for x in self._wheel.due(now, lambda e: e.dead, lambda e: e.expires):
            if isinstance(x, Call):
                if x.state != CLEARING:
                    self.eng.count("pptp_calls_expired")
                self._remove(x, TIMEOUT)
            else:
                self._remove_plain(x, TIMEOUT)

    def _remove_plain(self, e: _Plain, why: str = TIMEOUT) -> None:
        if e.dead:
            return
        e.dead = True
        k_out = e.lan_ip_b + e.rem_ip.to_bytes(4, "big")
        if self.plain_out.get(k_out) is e:
            del self.plain_out[k_out]
        k_in = e.rem_ip.to_bytes(4, "big")
        if self.plain_in.get(k_in) is e:
            del self.plain_in[k_in]
        self.eng.changed(DESTROY, e, why)

    def entries(self, now: float) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = [self._call_row(call, now) for call in self.calls]
        rows.extend(self._plain_row(e, now) for e in self.plain_out.values())
        return rows

    def row(self, entry: Any, now: float) -> dict[str, Any] | None:
        if isinstance(entry, Call):
            return self._call_row(entry, now)
        if isinstance(entry, _Plain):
            return self._plain_row(entry, now)
        return None

    def _call_row(self, call: Call, now: float) -> dict[str, Any]:
        rc = call.rem_cid
        return {
            "proto": "gre",
            "lan": f"{ip_str(call.lan_ip)}:{call.lan_cid}",
            "wan": f"{ip_str(self.eng.wan_ip)}:{call.masq_cid}",
            "remote": f"{ip_str(call.rem_ip)}:{'?' if rc is None else rc}",
            "state": STATE_NAMES[call.state],
            "expires_in": round(max(0.0, call.expires - now), 1),
            "inbound": call.forwarded,
            "helper": "pptp",
            "lan_call_id": call.lan_cid,
            "masq_call_id": call.masq_cid,
            "server_call_id": rc,
            "server_calls": self.server_calls.get(call.rem_ip, 0),
            **acct_row(call),
        }

    def _plain_row(self, e: _Plain, now: float) -> dict[str, Any]:
        return {"proto": "gre", "lan": ip_str(e.lan_ip), "wan": ip_str(self.eng.wan_ip), "remote": ip_str(e.rem_ip),
                "state": "PLAIN", "expires_in": round(max(0.0, e.expires - now), 1), "inbound": False,
                "helper": "pptp"}

    def wan_changed(self, old: int, new: int, mode: str, now: float) -> None:
        if mode == "flush":
            self._flush(ADDRESS_CHANGE)
            return
        for call in self.calls:
            self._deltas(call)
            call.fw = None
            self.eng.changed(UPDATE, call, ADDRESS_CHANGE)
        for e in self.plain_out.values():
            self._deltas(e)
            self.eng.changed(UPDATE, e, ADDRESS_CHANGE)

    def flush(self) -> int:
        return self._flush(FLUSH)

    def _flush(self, why: str) -> int:
        calls = list(self.calls)
        for c in calls:
            self._remove(c, why)
        plain = list(self.plain_out.values())
        for e in plain:
            self._remove_plain(e, why)
        return len(calls) + len(plain)

    def size(self) -> int:
        return self.ncalls + len(self.plain_out)

    def tables(self) -> dict[str, tuple[int, int]]:
        return {"pptp": (self.ncalls + len(self.plain_out), self.max_entries)}

    # ------------------------------------------------------- state as records
    record_kinds = ("pptp_conn", "pptp_call", "gre_plain")

    def export(self, now: float) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for peers in self.conns.values():
            out.extend(self._conn_record(c) for c in peers)
        out.extend(self._call_record(c, now) for c in self.calls)
        out.extend(self._plain_record(e, now) for e in self.plain_out.values())
        return out

    def record(self, entry: Any, now: float) -> dict[str, Any] | None:
        if isinstance(entry, Call):
            return self._call_record(entry, now)
        if isinstance(entry, Conn):
            return self._conn_record(entry)
        if isinstance(entry, _Plain):
            return self._plain_record(entry, now)
        return None

    @staticmethod
    def _conn_record(c: Conn) -> dict[str, Any]:
        return {"k": "pptp_conn", "v": 1, "key": c.key.hex(), "li": c.lan_ip, "ri": c.rem_ip, "fwd": c.forwarded,
                "broken": c.broken,
                "dirs": [[st.exp, bytes(st.hdr).hex(), st.pos, st.mlen, st.ctype,
                          [[q, o.hex(), n.hex()] for q, o, n in st.rw]] for st in c.dirs]}

    @staticmethod
    def _call_record(c: Call, now: float) -> dict[str, Any]:
        return {"k": "pptp_call", "v": 1, "conn": c.conn.key.hex(), "li": c.lan_ip, "ri": c.rem_ip,
                "fwd": c.forwarded, "lc": c.lan_cid, "mc": c.masq_cid, "rc": -1 if c.rem_cid is None else c.rem_cid,
                "st": c.state, "left": round(c.expires - now, 3), "up": c.up}

    @staticmethod
    def _plain_record(e: _Plain, now: float) -> dict[str, Any]:
        return {"k": "gre_plain", "v": 1, "li": e.lan_ip, "ri": e.rem_ip, "left": round(e.expires - now, 3)}

    def _conn_of(self, key: bytes) -> Conn | None:
        s = self.eng.find_session(TCP, key)
        if s is not None and isinstance(s.hdata, Conn):
            return s.hdata
        return self._detached.get(key)

    def restore(self, rec: dict[str, Any], now: float, left: float) -> str | None:
        k = rec["k"]
        if k == "pptp_conn":
            return self._restore_conn(rec)
        if k == "pptp_call":
            return self._restore_call(rec, now, left)
        return self._restore_plain(rec, now, left)

    def _restore_conn(self, rec: dict[str, Any]) -> str | None:
        s = self.eng.find_session(TCP, bytes.fromhex(rec["key"]))
        if s is None or s.helper is not self:
            return "no_session"
        conn = s.hdata
        if not isinstance(conn, Conn):
            conn = Conn(s)
            s.hdata = conn
            self.conns.setdefault(conn.rem_ip, {})[conn] = None
        conn.broken = rec["broken"]
        for st, d in zip(conn.dirs, rec["dirs"], strict=True):
            st.exp = d[0]
            st.hdr = bytearray.fromhex(d[1])
            st.pos, st.mlen, st.ctype = d[2], d[3], d[4]
            st.rw = deque(((q, bytes.fromhex(o), bytes.fromhex(n)) for q, o, n in d[5]), maxlen=16)
        return None

    def _restore_call(self, rec: dict[str, Any], now: float, left: float) -> str | None:
        ckey = bytes.fromhex(rec["conn"])
        conn = self._conn_of(ckey)
        if conn is None:  # its control connection had ended: the call is clearing
            conn = Conn(None, ckey, rec["li"], rec["ri"], rec["fwd"])
            self._detached[ckey] = conn
        lc, mc, rem = rec["lc"], rec["mc"], conn.rem_ip
        call = conn.calls.get(lc)
        if call is not None and call.masq_cid != mc:
            self._remove(call, "replaced")
            call = None
        if call is None:
            if self.server_calls.get(rem, 0) >= self.max_calls:
                return "pptp_call_ids_exhausted"
            key = rem.to_bytes(4, "big") + mc.to_bytes(2, "big")
            holder = self.in_calls.get(key)
            if holder is not None and not conn.forwarded:
                return "pptp_call_id_taken"
            call = Call(conn, lc, mc)
            if conn.s is None:
                call.ctl = None
            conn.calls[lc] = call
            self.calls[call] = None
            if holder is None:
                self.in_calls[key] = call
                call.in_key = key
            self.server_calls[rem] = self.server_calls.get(rem, 0) + 1
            self.ncalls += 1
            self._gauge()
            self._deltas(call)
        if rec["rc"] >= 0 and call.rem_cid != rec["rc"]:
            self._set_rem(call, rec["rc"])
        call.state = rec["st"]
        call.up = rec["up"]
        call.expires = now + left
        self._wheel.add(call, call.expires)
        return None

    def _restore_plain(self, rec: dict[str, Any], now: float, left: float) -> str | None:
        lan, rem = rec["li"], rec["ri"]
        rb = rem.to_bytes(4, "big")
        e = self.plain_out.get(lan.to_bytes(4, "big") + rb)
        if e is None:
            other = self.plain_in.get(rb)
            if other is not None and other.lan_ip != lan:
                return "gre_plain_remote_busy"
            e = _Plain(lan, rem)
            self._deltas(e)
            self.plain_out[e.lan_ip_b + rb] = e
            self.plain_in[rb] = e
        e.expires = now + left
        self._wheel.add(e, e.expires)
        return None

    def forget(self, rec: dict[str, Any], reason: str) -> bool:
        k = rec["k"]
        if k == "pptp_conn":  # goes with its session
            return False
        if k == "pptp_call":
            conn = self._conn_of(bytes.fromhex(rec["conn"]))
            call = conn.calls.get(rec["lc"]) if conn is not None else None
            if call is None:
                return False
            self._remove(call, reason)
            return True
        e = self.plain_out.get(rec["li"].to_bytes(4, "big") + rec["ri"].to_bytes(4, "big"))
        if e is None:
            return False
        self._remove_plain(e, reason)
        return True

    def rearm(self, now: float) -> None:
        for c in self.calls:
            if c.state != CLEARING:
                c.expires = now + (self.t_call if c.state == ACTIVE else self.t_setup)
                self._wheel.add(c, c.expires)
        for e in self.plain_out.values():
            e.expires = now + self.t_plain
            self._wheel.add(e, e.expires)


HELPER = PPTPHelper
