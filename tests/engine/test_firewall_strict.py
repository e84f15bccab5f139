"""The HOWTO's strict ipchains set (stand-in addresses) applied by the engine.

A VPN client 10.0.0.2 behind masqd may speak IPsec (UDP 500 + ESP) and PPTP
(TCP 1723 + GRE) with its server 198.51.100.1 and nothing else; REJECT sends
ICMP port unreachable; rule counters and -l events come out of the engine.
"""

from __future__ import annotations

from pathlib import Path

from scapy.all import ICMP, IP, TCP, UDP, raw

from masqd.engine import Engine
from tests.engine.conftest import H2, H3, SRV, WAN_IP, make_cfg, one, tcp, udp

RULES = Path(__file__).resolve().parents[2] / "config" / "examples" / "client-strict-ipchains-eth1.rules"


def strict_engine(extra: str = "") -> Engine:
    return Engine(make_cfg(f'[firewall]\nrules_file = "{RULES}"\n{extra}'))


def esp(src: str, dst: str, spi: int = 0x1001, seq: int = 1) -> bytes:
    return raw(IP(src=src, dst=dst, proto=50) / (spi.to_bytes(4, "big") + seq.to_bytes(4, "big") + b"\0" * 24))


def isakmp(icookie: bytes, rcookie: bytes = bytes(8)) -> bytes:
    """A minimal ISAKMP header (RFC 2408 3.1): cookies, SA payload next, v1.0, Main Mode, length 28."""
    return icookie + rcookie + bytes([1, 0x10, 2, 0]) + bytes(4) + (28).to_bytes(4, "big")


def test_isakmp_goes_out_and_its_reply_comes_back() -> None:
    eng = strict_engine()
    out = eng.process("lan", udp(H2, SRV, 500, 500, payload=isakmp(b"I" * 8)), 0.0)
    p = one(out, "wan")
    assert p.src == WAN_IP and p[UDP].dport == 500
    back = eng.process("wan", udp(SRV, WAN_IP, 500, p[UDP].sport, payload=isakmp(b"I" * 8, b"R" * 8)), 0.1)
    q = one(back, "lan")
    assert q.dst == H2 and q[UDP].dport == 500


def test_esp_and_pptp_control_pass() -> None:
    eng = strict_engine()
    assert one(eng.process("lan", esp(H2, SRV), 0.0), "wan").src == WAN_IP
    p = one(eng.process("lan", tcp(H2, SRV, 1025, 1723, flags="S"), 0.0), "wan")
    assert p[TCP].dport == 1723


def test_everything_else_is_denied_and_counted() -> None:
    eng = strict_engine()
    before = dict(eng.counters)
    assert eng.process("lan", tcp(H2, SRV, 1025, 80, flags="S"), 0.0) == []
    assert eng.process("lan", udp(H2, SRV, 1024, 53), 0.0) == []
    assert eng.process("lan", esp(H3, SRV), 0.0) == []
    assert eng.process("wan", tcp(SRV, WAN_IP, 40000, 22, flags="S"), 0.0) == []
    assert eng.counters.get("drop_forward_deny", 0) - before.get("drop_forward_deny", 0) == 3
    assert eng.counters.get("drop_input_deny", 0) - before.get("drop_input_deny", 0) == 1


def test_rule_counters_are_bumped() -> None:
    eng = strict_engine()
    out = eng.process("lan", udp(H2, SRV, 500, 500, payload=isakmp(b"C" * 8)), 0.0)
    assert len(out) == 1
    rules = eng.rules.chains["forward"].rules
    assert rules[0].target == "MASQ" and rules[0].pkts == 1 and rules[0].bytes == 20 + 8 + 28
    assert eng.rules.chains["input"].rules[0].pkts == 1  # LAN accept rule


def test_reject_sends_icmp_port_unreachable_and_logs() -> None:
    eng = strict_engine('rules = "ipchains -I forward 1 -p tcp -d 0/0 80 -j REJECT -l"\n')
    out = eng.process("lan", tcp(H2, SRV, 1025, 80, flags="S"), 0.0)
    p = one(out, "lan")
    assert p[ICMP].type == 3 and p[ICMP].code == 3 and p.dst == H2
    events = [e for e in eng.drain_events() if e[1] == "rule_match"]
    assert events and events[0][2]["verdict"] == "REJECT"


def test_reload_keeps_the_hit_counters_of_rules_that_stay() -> None:
    """A reload that adds a rule keeps the counters of the rules that are still there (matched by
    chain and specification) and the policies'; the new rule starts at 0, a removed one is gone."""
    base = 'rules = """\nipchains -A forward -p udp -s 10.0.0.0/8 -d 0/0 53 -j MASQ\nipchains -A forward -j MASQ\n"""\n'
    eng = Engine(make_cfg("[firewall]\n" + base))
    for i in range(3):
        eng.process("lan", udp(H2, SRV, 4000 + i, 53), 0.0)
    eng.process("lan", tcp(H2, SRV, 5000, 80, "S"), 0.0)
    dns, catch_all = eng.rules.chains["forward"].rules
    assert (dns.pkts, catch_all.pkts) == (3, 1)
    grown = base.replace('ipchains -A forward -j MASQ', 'ipchains -A forward -p tcp -d 0/0 25 -j DENY\nipchains -A forward -j MASQ')
    eng.reload(make_cfg("[firewall]\n" + grown))
    dns, smtp, catch_all = eng.rules.chains["forward"].rules
    assert (dns.pkts, smtp.pkts, catch_all.pkts) == (3, 0, 1)
    assert dns.bytes > 0
    eng.process("lan", udp(H2, SRV, 4010, 53), 1.0)
    assert eng.rules.chains["forward"].rules[0].pkts == 4
    eng.reload(make_cfg("[firewall]\nrules = \"ipchains -A forward -j MASQ\"\n"))
    (only,) = eng.rules.chains["forward"].rules
    assert only.pkts == 1
