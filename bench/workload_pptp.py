#!/usr/bin/env python3
"""PPTP workload for bench/engine.py ("gre": an established PPTP call's GRE), and a standalone comparison.

bench/engine.py picks up ``WORKLOADS`` from this file. Run directly, it prints
ns/packet for an established enhanced-GRE call (set up through a real control
exchange on TCP 1723, Call ID masqueraded) against an established UDP flow
through ``Engine.process`` (same engine, interleaved rounds, best round kept)
and the ratio the PPTP brief bounds at 1.2.
Usage: python bench/workload_pptp.py [--iters N] [--rounds R]
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

if "__file__" in globals():  # run directly (bench/engine.py execs this file with the path already set)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from scapy.all import IP, TCP, raw  # noqa: E402

from masqd.engine import Engine  # noqa: E402
from masqd.wire import pptp as W  # noqa: E402
from masqd.wire.gre import build_pptp_gre  # noqa: E402

Flow = tuple[Callable[[], object], Callable[[], object]]
LAN, SRV, WAN = "10.0.0.2", "198.51.100.1", "203.0.113.200"


def gre_flow(eng: Engine) -> Flow:
    """10.0.0.2 places a call to 198.51.100.1 over TCP 1723; then GRE both ways, 32-byte PPP payload."""
    syn = raw(IP(src=LAN, dst=SRV) / TCP(sport=40000, dport=1723, flags="S", seq=0))
    o = eng.process("lan", syn, 1.0)
    wport = IP(o[0][1])[TCP].sport
    eng.process("wan", raw(IP(src=SRV, dst=WAN) / TCP(sport=1723, dport=wport, flags="SA", seq=0, ack=1)), 1.0)
    req = W.build(W.OUT_CALL_REQ, call_id=0x100)
    o = eng.process("lan", raw(IP(src=LAN, dst=SRV) / TCP(sport=40000, dport=1723, flags="PA", seq=1, ack=1) / req),
                    1.0)
    masq = int.from_bytes(bytes(IP(o[0][1])[TCP].payload)[12:14], "big")
    rep = W.build(W.OUT_CALL_REPLY, call_id=0x900, peer_call_id=masq)
    eng.process("wan", raw(IP(src=SRV, dst=WAN) / TCP(sport=1723, dport=wport, flags="PA", seq=1, ack=1 + len(req))
                           / rep), 1.0)
    ppp = b"\xff\x03\x00\x21" + b"g" * 28
    out_p = raw(IP(src=LAN, dst=SRV, proto=47) / build_pptp_gre(0x900, ppp, seq=1))
    in_p = raw(IP(src=SRV, dst=WAN, proto=47) / build_pptp_gre(masq, ppp, seq=1))
    for _ in range(2):  # the first pair takes the full path and caches the firewall decision
        if not eng.process("lan", out_p, 1.0) or not eng.process("wan", in_p, 1.0):
            raise RuntimeError("GRE flow did not establish")
    proc = eng.process
    return (lambda: proc("lan", out_p, 2.0)), (lambda: proc("wan", in_p, 2.0))


WORKLOADS: dict[str, tuple[str, Callable[[Engine], Flow]]] = {"gre": ("", gre_flow)}



if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from engine import compare_with_udp  # bench/engine.py

    raise SystemExit(compare_with_udp("gre", gre_flow))
