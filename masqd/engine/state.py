"""The masquerade state as plain records: made from the live entries, checked, and applied back.

One job: turn every entry of the NAT table and of the helpers into a plain,
versioned record (a dict of ints, bools and short strings, JSON-ready) and
back. The state file (``masqd.ops.statefile``) and the active/backup sync
(``masqd.ops.hasync``) carry these records; neither knows an entry's insides.

Kinds (version 1 each; ``RECORD_VERSIONS``):

- ``session``: a TCP/UDP/ICMP session with its mapping (LAN and WAN address
  and port, remote, state, seconds left, inbound flag, port-forward flag, the
  helper attached to it);
- ``esp``, ``ike``: the IPsec helper's SPI pairs and ISAKMP cookie pairs;
- ``pptp_conn``, ``pptp_call``, ``gre_plain``: the PPTP helper's control
  connections (with the position in each direction's byte stream), calls
  (Call IDs) and plain GRE entries;
- ``lease``: a mapping a LAN host asked for over PCP or NAT-PMP (its endpoint
  and WAN port, nonce, client, lifetime, FILTERs). Leases come before the
  sessions in a document, so a session through a lease finds it.

A document also carries the PCP/NAT-PMP mapping epoch, so a restart that keeps
the table keeps the epoch going (RFC 6887 section 8.5).

Times travel as seconds left (``left``), never as clock values: the two ends
of a record do not share a clock. Applying a record is an *upsert* through
the same table API a packet uses (``NatTable.restore_mapping`` /
``restore_session``, the forwarders, the helpers' ``restore``), so the limits
(table size, port ownership, per-remote bounds) hold for restored state and a
refusal is a reason, never an exception. ``check`` validates a record's shape
before anything is applied, so a bad record is refused whole. ``key`` names
the entry a record is about (for a destroy, and for the sweep after a full
resync). Nothing here does I/O.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from masqd.engine.nat import ICMP, TCP, UDP, Lease, Mapping, Session
from masqd.engine.table import ADDRESS_CHANGE, REPLACED

if TYPE_CHECKING:
    from masqd.engine.core import Engine

FORMAT = 1
RECORD_VERSIONS = {"session": 1, "esp": 1, "ike": 1, "pptp_conn": 1, "pptp_call": 1, "gre_plain": 1, "lease": 1}

U32 = (0, 0xFFFFFFFF)
U16 = (0, 0xFFFF)
U8 = (0, 0xFF)
# field -> (type, low, high) for numbers, (str, min length, max length) for strings (hex for bytes)
Schema = dict[str, tuple[type, float, float]]
_F: tuple[type, float, float] = (float, -1e9, 1e9)
SCHEMAS: dict[str, Schema] = {
    "session": {"p": (int, *U8), "li": (int, *U32), "lp": (int, *U16), "wi": (int, *U32), "wp": (int, *U16),
                "ri": (int, *U32), "rp": (int, *U16), "st": (int, 0, 6), "left": _F, "in": (bool, 0, 1),
                "fwd": (bool, 0, 1), "h": (str, 0, 16)},
    "esp": {"li": (int, *U32), "ri": (int, *U32), "wi": (int, *U32), "so": (int, *U32), "si": (int, *U32),
            "st": (int, 0, 3), "left": _F, "tmo": (float, 0, 1e9), "age": _F, "cont": (bool, 0, 1),
            "retr": (int, 0, 1 << 30), "pend": (bool, 0, 1)},
    "ike": {"li": (int, *U32), "ri": (int, *U32), "ic": (str, 16, 16), "rc": (str, 16, 16), "ver": (int, *U8),
            "age": _F, "idle": _F, "left": _F},
    "pptp_conn": {"key": (str, 24, 24), "li": (int, *U32), "ri": (int, *U32), "fwd": (bool, 0, 1),
                  "broken": (str, 0, 64), "dirs": (list, 2, 2)},
    "pptp_call": {"conn": (str, 24, 24), "li": (int, *U32), "ri": (int, *U32), "fwd": (bool, 0, 1),
                  "lc": (int, *U16), "mc": (int, *U16), "rc": (int, -1, 0xFFFF), "st": (int, 0, 2),
                  "left": _F, "up": (bool, 0, 1)},
    "gre_plain": {"li": (int, *U32), "ri": (int, *U32), "left": _F},
    "lease": {"p": (int, *U8), "li": (int, *U32), "lp": (int, *U16), "wi": (int, *U32), "wp": (int, *U16),
              "nonce": (str, 0, 24), "cl": (int, *U32), "left": _F, "life": (float, 0, 1e9),
              "flt": (list, 0, 64)},
}
_HEX = frozenset("0123456789abcdef")


class BadRecord(ValueError):
    """A record that is not one this masqd can apply (unknown kind or version, bad field)."""


def check(rec: Any) -> dict[str, Any]:
    """``rec`` itself when it is a well-formed record of a known kind and version; else BadRecord."""
    if not isinstance(rec, dict):
        raise BadRecord("not an object")
    kind = rec.get("k")
    schema = SCHEMAS.get(kind) if isinstance(kind, str) else None
    if schema is None or not isinstance(kind, str):
        raise BadRecord(f"unknown kind {kind!r}")
    if rec.get("v") != RECORD_VERSIONS[kind]:
        raise BadRecord(f"{kind}: version {rec.get('v')!r}, this masqd reads {RECORD_VERSIONS[kind]}")
    for name, (typ, lo, hi) in schema.items():
        if name not in rec:
            raise BadRecord(f"{kind}: no field {name!r}")
        v = rec[name]
        if typ is float:
            if isinstance(v, bool) or not isinstance(v, int | float) or not lo <= v <= hi or v != v:
                raise BadRecord(f"{kind}.{name}: {v!r} is not a number in [{lo}, {hi}]")
        elif typ is int:
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise BadRecord(f"{kind}.{name}: {v!r} is not an integer in [{lo}, {hi}]")
        elif typ is bool:
            if not isinstance(v, bool):
                raise BadRecord(f"{kind}.{name}: {v!r} is not true/false")
        elif typ is str:
            if not isinstance(v, str) or not lo <= len(v) <= hi:
                raise BadRecord(f"{kind}.{name}: {v!r} is not a string of {lo:.0f}-{hi:.0f} characters")
        elif not isinstance(v, list) or not lo <= len(v) <= hi:
            raise BadRecord(f"{kind}.{name}: not a list of {lo:.0f}-{hi:.0f} items")
    if kind in ("ike", "pptp_conn", "pptp_call"):
        for name in ("ic", "rc", "key", "conn"):
            if name in schema and schema[name][0] is str and not set(rec[name]) <= _HEX:
                raise BadRecord(f"{kind}.{name}: not lowercase hex")
    if kind == "session" and rec["p"] not in (TCP, UDP, ICMP):
        raise BadRecord(f"session.p: protocol {rec['p']} has no sessions")
    if kind == "lease":
        if rec["p"] not in (TCP, UDP) or len(rec["nonce"]) not in (0, 24) or not set(rec["nonce"]) <= _HEX:
            raise BadRecord("lease: not a TCP/UDP mapping with a 12-byte nonce or none")
        if not all(isinstance(f, list) and len(f) == 3 and all(type(x) is int and 0 <= x <= U32[1] for x in f)
                   and f[2] <= 0xFFFF for f in rec["flt"]):
            raise BadRecord("lease.flt: not (address, mask, port) filters")
    if kind == "pptp_conn":
        for d in rec["dirs"]:
            _check_stream(d)
    return rec


def _check_stream(d: Any) -> None:
    ok = (isinstance(d, list) and len(d) == 6 and (d[0] is None or (type(d[0]) is int and 0 <= d[0] <= U32[1]))
          and isinstance(d[1], str) and len(d[1]) <= 40 and set(d[1]) <= _HEX and len(d[1]) % 2 == 0
          and all(type(x) is int and 0 <= x <= 0xFFFF for x in d[2:5])
          and isinstance(d[5], list) and len(d[5]) <= 16)
    if ok:
        for rw in d[5]:
            if not (isinstance(rw, list) and len(rw) == 3 and type(rw[0]) is int and 0 <= rw[0] <= U32[1]
                    and all(isinstance(x, str) and len(x) == 4 and set(x) <= _HEX for x in rw[1:])):
                ok = False
    if not ok:
        raise BadRecord("pptp_conn.dirs: not two stream positions")


def key(rec: dict[str, Any]) -> tuple[Any, ...]:
    """What entry a (checked) record is about: equal keys, the same entry."""
    k = rec["k"]
    if k == "session":
        return (k, rec["p"], rec["li"], rec["lp"], rec["ri"], rec["rp"])
    if k == "esp":
        return (k, rec["li"], rec["ri"], rec["so"])
    if k == "ike":
        return (k, rec["li"], rec["ri"], rec["ic"])
    if k == "pptp_conn":
        return (k, rec["key"])
    if k == "pptp_call":
        return (k, rec["conn"], rec["lc"])
    if k == "lease":
        return (k, rec["p"], rec["li"], rec["lp"])
    return (k, rec["li"], rec["ri"])


# ---------------------------------------------------------------- sessions

def session_record(s: Session, now: float) -> dict[str, Any]:
    m = s.m
    return {"k": "session", "v": 1, "p": m.proto, "li": m.lan_ip, "lp": m.lan_port, "wi": m.wan_ip,
            "wp": m.wan_port, "ri": s.rem_ip, "rp": s.rem_port, "st": s.state,
            "left": round(s.expires - now, 3), "in": bool(s.inbound), "fwd": bool(m.static and m.fwd is not None),
            "h": s.helper.name if s.helper is not None else ""}


def lease_record(ls: Lease, now: float) -> dict[str, Any]:
    m = ls.m
    return {"k": "lease", "v": 1, "p": m.proto, "li": m.lan_ip, "lp": m.lan_port, "wi": m.wan_ip, "wp": m.wan_port,
            "nonce": ls.nonce.hex() if ls.nonce is not None else "", "cl": ls.client,
            "left": round(ls.expires - now, 3), "life": float(ls.lifetime), "flt": [list(f) for f in ls.filters]}


def restore_lease(eng: Engine, rec: dict[str, Any], now: float, left: float) -> str | None:
    if not eng.pcp.enabled:
        return "pcp_off"
    ls = eng.nat.restore_lease(rec["p"], rec["li"], rec["lp"], rec["wi"], rec["wp"],
                               bytes.fromhex(rec["nonce"]) if rec["nonce"] else None, rec["cl"], now, left,
                               rec["life"], tuple((a, m, p) for a, m, p in rec["flt"]))
    if ls is None:
        return "port_taken"
    if ls[1]:  # a new lease (not one renewed): its host's
        eng.pcp.adopt(ls[0])
    return None


def _out_key(rec: dict[str, Any]) -> bytes:
    return (rec["li"].to_bytes(4, "big") + rec["ri"].to_bytes(4, "big") + rec["lp"].to_bytes(2, "big")
            + rec["rp"].to_bytes(2, "big"))


def restore_session(eng: Engine, rec: dict[str, Any], now: float, left: float) -> str | None:
    t = eng.nat
    proto = rec["p"]
    helper = None
    if rec["h"]:
        helper = next((h for h in eng.helpers if h.name == rec["h"] and h.enabled()), None)
        if helper is None:
            return "helper_off"
    s = t.out[proto].get(_out_key(rec))
    if s is not None and (s.m.wan_port != rec["wp"] or s.m.wan_ip != rec["wi"]):
        t.remove(s, ADDRESS_CHANGE if s.m.wan_ip != rec["wi"] else REPLACED)
        s = None
    if s is None:
        ls = t.leases.get((proto, rec["li"], rec["lp"])) if rec["fwd"] else None
        m: Mapping | None
        if ls is not None and ls.m.wan_port == rec["wp"]:  # a session through a PCP/NAT-PMP lease
            m = ls.m
        elif rec["fwd"]:
            m = eng.forwarders.restore_mapping(proto, rec["li"], rec["lp"], rec["wp"])
        else:
            m = t.restore_mapping(proto, rec["li"], rec["lp"], rec["wi"], rec["wp"])
        if m is None:
            return "no_port_forward" if rec["fwd"] else "port_taken"
        if t.nsessions >= t.max_entries:
            if m.empty() and not m.static:
                t.drop_mapping(m, used=False)  # (never used here: no quarantine)
            return "table_full"
        s = t.restore_session(m, rec["ri"], rec["rp"], now, rec["st"], left)
        if s is None:
            return "table_full"
    else:
        t.set_state(s, rec["st"], now)
        t.restore_expiry(s, now, left)
    s.inbound = rec["in"]
    if helper is not None and s.helper is None:
        s.helper = helper
        helper.session_created(s, now)  # the helper's own record (stream positions) follows
    return None


# ---------------------------------------------------------------- the whole engine

def export(eng: Engine, now: float) -> list[dict[str, Any]]:
    """Every entry as a record: leases, then sessions (helpers' records refer to them)."""
    out = export_leases(eng, now)
    out.extend(session_record(s, now) for s in eng.nat)
    out.extend(export_helpers(eng, now))
    return out


def export_leases(eng: Engine, now: float) -> list[dict[str, Any]]:
    """The first part of :func:`export` (for one made in parts: leases, sessions, helpers)."""
    return [lease_record(ls, now) for ls in eng.nat.leases.values()]


def export_helpers(eng: Engine, now: float) -> list[dict[str, Any]]:
    """The last part of :func:`export`: the helpers' records (after the sessions they refer to)."""
    out: list[dict[str, Any]] = []
    for h in eng.helpers:
        out.extend(h.export(now))
    return out


def record_of(eng: Engine, entry: Any, now: float) -> dict[str, Any] | None:
    """The record of one entry seen on the change stream (None: not an entry we carry)."""
    if isinstance(entry, Session):  # (an AcctSession too)
        return session_record(entry, now)
    if isinstance(entry, Lease):
        return lease_record(entry, now)
    for h in eng.helpers:
        r = h.record(entry, now)
        if r is not None:
            return r
    return None


def apply(eng: Engine, rec: dict[str, Any], now: float, down: float = 0.0) -> str | None:
    """Create or update the entry of a checked record, its time left shortened by ``down``
    seconds. None when applied; else why not (``expired``, ``table_full``, ``port_taken``...)."""
    left = float(rec.get("left", 1e9)) - down
    if left <= 0:
        return "expired"
    if rec["k"] == "session":
        return restore_session(eng, rec, now, left)
    if rec["k"] == "lease":
        return restore_lease(eng, rec, now, left)
    for h in eng.helpers:
        if rec["k"] in h.record_kinds:
            if not h.enabled():
                return "helper_off"
            return h.restore(rec, now, left)
    return "unknown_kind"


def forget(eng: Engine, rec: dict[str, Any], reason: str) -> bool:
    """Remove the entry a checked record names (a destroy from the peer). True if it existed."""
    if rec["k"] == "session":
        s = eng.nat.out[rec["p"]].get(_out_key(rec))
        if s is None:
            return False
        eng.nat.remove(s, reason)
        return True
    if rec["k"] == "lease":
        ls = eng.nat.leases.get((rec["p"], rec["li"], rec["lp"]))
        if ls is None:
            return False
        eng.pcp.end(ls, reason)
        return True
    for h in eng.helpers:
        if rec["k"] in h.record_kinds:
            return h.forget(rec, reason)
    return False


def sweep(eng: Engine, keep: set[tuple[Any, ...]], now: float, reason: str) -> int:
    """Remove every entry whose key is not in ``keep`` (after a full resync). Returns how many."""
    n = 0
    for rec in export(eng, now):
        if key(rec) not in keep and forget(eng, rec, reason):
            n += 1
    return n


def rearm(eng: Engine, now: float) -> None:
    """Give every entry a full lifetime from ``now``: a backup taking over does not know when
    each entry last saw traffic on the active, so none may expire before its timeout."""
    t = eng.nat
    for s in t:
        t.restore_expiry(s, now, s.tmo)
    for h in eng.helpers:
        h.rearm(now)


def apply_all(eng: Engine, recs: Iterable[dict[str, Any]], now: float, down: float,
              refused: Callable[[str], None]) -> int:
    """Apply checked records in order; ``refused(reason)`` for each one not applied. Returns
    how many were applied."""
    n = 0
    for rec in recs:
        why = apply(eng, rec, now, down)
        if why is None:
            n += 1
        else:
            refused(why)
    return n


# ---------------------------------------------------------------- a whole document

def document(eng: Engine, now: float) -> dict[str, Any]:
    """Everything a restart must keep: the records, the WAN address they are bound to and the
    counters (named ones and the per-interface packet counters)."""
    c = eng.ctr
    return {"format": FORMAT, "kinds": dict(RECORD_VERSIONS), "wan": str(eng.wan_if),
            "epoch": eng.nat.mapping_epoch(now),
            "counters": dict(c.c), "packets": [list(c.rx_pkts), list(c.rx_bytes), list(c.tx_pkts), list(c.tx_bytes)],
            "records": export(eng, now)}


def check_document(doc: Any) -> list[dict[str, Any]]:
    """The checked records of a document (BadRecord for anything this masqd cannot apply whole)."""
    if not isinstance(doc, dict):
        raise BadRecord("not an object")
    if doc.get("format") != FORMAT:
        raise BadRecord(f"format {doc.get('format')!r}, this masqd reads {FORMAT}")
    recs = doc.get("records")
    if not isinstance(recs, list):
        raise BadRecord("no record list")
    try:
        ipaddress.IPv4Interface(doc.get("wan"))
    except (ValueError, TypeError):
        raise BadRecord(f"wan: {doc.get('wan')!r} is not an address") from None
    counters = doc.get("counters")
    if not isinstance(counters, dict) or not all(isinstance(k, str) and type(v) is int for k, v in counters.items()):
        raise BadRecord("counters: not names and integers")
    packets = doc.get("packets")
    if not isinstance(packets, list) or len(packets) != 4 or not all(
            isinstance(x, list) and all(type(v) is int and v >= 0 for v in x) for x in packets):
        raise BadRecord("packets: not four lists of counts")
    for i, r in enumerate(recs):
        try:
            check(r)
        except BadRecord as exc:
            raise BadRecord(f"record {i}: {exc}") from None
    return recs


def load_document(eng: Engine, doc: dict[str, Any], now: float, down: float, dynamic_wan: bool) -> Counter[str]:
    """Restore a document into a fresh engine, its timers shortened by ``down`` seconds.

    The records go in on the WAN address they were saved with; then, unless that address is
    dynamic (``dynamic_wan``: it is the last one masqd was told, and stays), the engine moves
    to its configured address as a dynamic-address change does (``wan.dynaddr_mode``).
    Returns what happened: ``restored`` and a count per refusal reason. Raises BadRecord
    (nothing applied) when the document is not well formed."""
    recs = check_document(doc)
    out: Counter[str] = Counter()
    c = eng.ctr
    for k, v in doc["counters"].items():
        c.c[k] = v
    for mine, saved in zip((c.rx_pkts, c.rx_bytes, c.tx_pkts, c.tx_bytes), doc["packets"], strict=True):
        for i, v in enumerate(saved[: len(mine)]):
            mine[i] = v
    current = eng.wan_if
    saved_wan = ipaddress.IPv4Interface(doc["wan"])
    if saved_wan != current:  # put the table back where it was before anything moves
        eng.wan_if = saved_wan
        eng.routes.set_wan(saved_wan)
        eng.nat.set_wan(int(saved_wan.ip))
    epoch = doc.get("epoch")
    if type(epoch) is int and epoch >= 0:  # (documents of before the leases have none)
        eng.nat.restore_mapping_epoch(epoch + down, now)
    out["restored"] = apply_all(eng, recs, now, down, lambda why: out.update((why,)))
    if saved_wan != current and not dynamic_wan:
        eng.set_wan_address(current, now)
    return out
